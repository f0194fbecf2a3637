"""Write a small chat data set of our own from the bundled Tiny Shakespeare: questions about its lines
with one right answer each, so a fine-tune can be scored by exact match.

    python examples/shakespeare_chat.py chats/        # chats/train.jsonl and chats/val.jsonl

Four kinds of question, each asked of a line of the play text (a speaker's first line in a speech):
  who      "Who says this?" and the line              -> the speaker, as the text names them (ROMEO)
  first    "What is the first word of this?" and it  -> that word, punctuation dropped
  loud     "Say this loudly:" and the line           -> the line in capitals
  repeat   "Repeat after me:" and the line           -> the line as it is
(the line on a line of its own: only characters of the play, so a char model trained on it can read them)
`who` needs the play remembered; the others are rules a model learns from the examples. Held-out
questions ask about lines that no training question uses.

Licence: Tiny Shakespeare is Shakespeare's text (public domain); the questions and answers are made
by this script and are under pocketgpt's own licence.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

import pocketgpt

CORPUS = Path(pocketgpt.__file__).parent / "corpora" / "tinyshakespeare.txt.gz"
KINDS = ("who", "first", "loud", "repeat")


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, first line) of every speech: a block that starts with "NAME:" on a line of its own."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip().split("\n")
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Za-z ]+:", lines[0]):
            line = lines[1].strip()
            if 12 <= len(line) <= 80:
                out.append((lines[0][:-1], line))
    return out


def question(kind: str, speaker: str, line: str) -> dict[str, object]:
    if kind == "who":
        q, a = f"Who says this?\n{line}", speaker
    elif kind == "first":
        q, a = f"What is the first word of this?\n{line}", re.sub(r"[^\w']", "", line.split()[0]) or line.split()[0]
    elif kind == "loud":
        q, a = f"Say this loudly:\n{line}", line.upper()
    else:
        q, a = f"Repeat after me:\n{line}", line
    return {"kind": kind, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def make(seed: int = 0, val_lines: int = 100) -> tuple[list[dict], list[dict]]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        found = speeches(f.read())
    rng = random.Random(seed)
    rng.shuffle(found)
    held, rest = found[:val_lines], found[val_lines:]
    train = [question(rng.choice(KINDS), s, line) for s, line in rest]
    val = [question(KINDS[i % len(KINDS)], s, line) for i, (s, line) in enumerate(held)]
    return train, val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for train.jsonl and val.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train, val = make(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        with open(args.out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"{args.out}: {len(train):,} training and {len(val):,} held-out conversations")


if __name__ == "__main__":
    main()
