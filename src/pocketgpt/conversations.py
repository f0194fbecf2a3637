"""Conversations for chat fine-tuning: JSONL files in the forms people have, each conversation rendered
through the model's chat template into token ids with the assistant's tokens marked, written as a chat
data folder (data.py owns its files; packing into context rows happens when training opens it).

A line is one conversation, in one of these forms (one form per file):
  messages        {"messages": [{"role": "user", "content": "..."}, ...]}   (OpenAI, TRL)
  conversations   {"conversations": [{"from": "human", "value": "..."}, ...]}  (ShareGPT; role/content too)
  prompt          {"prompt": "...", "completion": "..."}
  alpaca          {"instruction": "...", "input": "...", "output": "..."}
any with an optional top-level "system" string. Only the assistant's tokens are trained on: the answer's
text and the template's end-of-turn marker after it (so the model learns to stop); the system and user
turns and the template's own headers are context.

Torch-free. The marking works on the rendered text: each assistant answer is found in it in order and
the tokens that start inside it (or inside the end-of-turn marker) are marked, so the ids are exactly
those transformers' apply_chat_template gives the same conversation.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .chat import ROLES, Message, render_for
from .config import check_val_fraction
from .errors import PocketError

CHAT_SUFFIXES = (".jsonl",)
VAL_FILE = "val.jsonl"  # beside the inputs: the held-out conversations, instead of --val-fraction
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant", "bot": "assistant"}
FORM_KEYS = (("messages", ("messages",)), ("conversations", ("conversations",)),
             ("prompt", ("prompt", "completion")), ("alpaca", ("instruction", "output")))
EXAMPLES = 3  # held-out questions each eval answers (samples.txt, the report)
SENTINEL = "\ue000pocketgpt-answer\ue001"  # private-use characters: no template or tokenizer treats them specially


@dataclass
class Conversation:
    messages: list[Message]
    source: str  # "file line N", for every message that names it


# ---------------------------------------------------------------- reading

def is_chat_path(path: Path) -> bool:
    """A .jsonl file, or a folder holding .jsonl files and no .txt."""
    if path.is_file():
        return path.suffix.lower() in CHAT_SUFFIXES
    if path.is_dir():
        return any(_chat_files_in(path)) and not any(path.rglob("*.txt"))
    return False


def _chat_files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in CHAT_SUFFIXES)


def chat_files(inputs: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """(train files, val files): files as given, folders as their .jsonl files; a val.jsonl (given inside a
    folder or found beside a file) holds the held-out conversations."""
    train: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise PocketError(f"input not found: {item}")
        found = _chat_files_in(p) if p.is_dir() else [p]
        if not found:
            raise PocketError(f"folder {p} has no .jsonl files of conversations")
        train.extend(q for q in found if q not in train)
    val = [p for p in train if p.name == VAL_FILE]
    beside = {p.parent / VAL_FILE for p in train if (p.parent / VAL_FILE).is_file()}
    val += sorted(beside - set(val))
    train = [p for p in train if p not in val]
    if not train:
        raise PocketError(f"only {VAL_FILE} was given; give the training conversations too")
    return train, val


def read_conversations(path: Path) -> list[Conversation]:
    """Every line of a JSONL file as a conversation; the first bad line is one error naming file and line."""
    out, form_seen = [], None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PocketError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PocketError(f"{where}: not JSON ({e.msg} at column {e.colno}); write one conversation per line "
                              "as a JSON object") from None
        form = _form(obj, where)
        if form_seen not in (None, form):
            raise PocketError(f"{where}: a {form!r} conversation in a file of {form_seen!r} ones; keep one form per "
                              "file")
        form_seen = form
        out.append(Conversation(_messages(obj, form, where), where))
    if not out:
        raise PocketError(f"{path} holds no conversations; write one JSON object per line")
    return out


def _form(obj: Any, where: str) -> str:
    if isinstance(obj, dict):
        for form, keys in FORM_KEYS:
            if all(k in obj for k in keys):
                return form
    names = "; ".join(", ".join(f'"{k}"' for k in keys) for _, keys in FORM_KEYS)
    raise PocketError(f"{where}: not a conversation; give an object with one of these sets of keys: {names}")


def _messages(obj: dict[str, Any], form: str, where: str) -> list[Message]:
    if form == "messages":
        turns = [_turn(m, "role", "content", where, k) for k, m in enumerate(_listed(obj, "messages", where))]
    elif form == "conversations":
        turns = [_sharegpt_turn(m, where, k) for k, m in enumerate(_listed(obj, "conversations", where))]
    elif form == "prompt":
        turns = [{"role": "user", "content": _text(obj, "prompt", where)},
                 {"role": "assistant", "content": _text(obj, "completion", where)}]
    else:
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise PocketError(f'{where}: "input" must be a string')
        question = _text(obj, "instruction", where) + (f"\n\n{extra}" if extra.strip() else "")
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": _text(obj, "output", where)}]
    if "system" in obj and form != "messages":
        turns.insert(0, {"role": "system", "content": _text(obj, "system", where)})
    if not any(t["role"] == "assistant" for t in turns):
        raise PocketError(f"{where}: no assistant turn; a conversation trains on the assistant's answers, so give "
                          "at least one")
    return turns


def _listed(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = obj[key]
    if not isinstance(value, list) or not value:
        raise PocketError(f'{where}: "{key}" must be a non-empty list of turns')
    return value


def _turn(m: Any, role_key: str, content_key: str, where: str, k: int) -> Message:
    if not isinstance(m, dict) or role_key not in m or content_key not in m:
        raise PocketError(f'{where}: turn {k + 1} must be an object with "{role_key}" and "{content_key}"')
    role = m[role_key]
    if role not in ROLES:
        raise PocketError(f"{where}: turn {k + 1} has the unknown role {role!r}; use one of {', '.join(ROLES)}")
    return {"role": role, "content": _text(m, content_key, f"{where}: turn {k + 1}", nested=True)}


def _sharegpt_turn(m: Any, where: str, k: int) -> Message:
    if not isinstance(m, dict):
        raise PocketError(f"{where}: turn {k + 1} must be an object")
    role_key = "from" if "from" in m else "role"
    content_key = "value" if "value" in m else "content"
    role = m.get(role_key)
    if role not in SHAREGPT_ROLES:
        known = ", ".join(sorted(SHAREGPT_ROLES))
        raise PocketError(f"{where}: turn {k + 1} has the unknown role {role!r}; use one of {known}")
    return _turn({"role": SHAREGPT_ROLES[role], "content": m.get(content_key)}, "role", "content", where, k)


def _text(obj: dict[str, Any], key: str, where: str, nested: bool = False) -> str:
    value = obj.get(key)
    label = where if nested else f'{where}: "{key}"'
    if not isinstance(value, str):
        raise PocketError(f"{label} must be a string")
    if not value.strip():
        raise PocketError(f"{label} is empty; remove the turn or give it text")
    return value


# ---------------------------------------------------------------- rendering and marking

@dataclass
class Encoded:
    """One conversation in token ids: mask 1 where the token is trained on; exchanges: the token offset at
    which each exchange (the turns up to and including an assistant answer) ends, the last one len(ids)."""

    ids: list[int]
    mask: list[int]
    exchanges: list[int]


class ChatFormat:
    """How a tokenizer with a chat template turns a conversation into ids and a loss mask."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.end_of_turn = self._end_of_turn()

    def render(self, messages: Sequence[Message]) -> str:
        return render_for(self.tokenizer, messages, add_generation_prompt=False)

    def _end_of_turn(self) -> str:
        """What the template writes right after an answer (<|im_end|>, <|eot_id|>, ...), whitespace dropped."""
        text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}])
        after = text.split(SENTINEL, 1)[1] if SENTINEL in text else ""
        return after.strip()

    def encode(self, conv: Conversation) -> Encoded:
        text = self.render(conv.messages)
        spans = self._answer_spans(text, conv)
        ids, starts = self.tokenizer.encode_with_offsets(text)
        mask, exchanges, k = [0] * len(ids), [], 0
        for i, start in enumerate(starts):
            while k < len(spans) and start >= spans[k][1]:
                exchanges.append(i)
                k += 1
            if k < len(spans) and start >= spans[k][0]:
                mask[i] = 1
        exchanges += [len(ids)] * (len(spans) - k)
        exchanges[-1] = len(ids)  # what follows the last answer (a newline) goes with it
        return Encoded(ids, mask, exchanges)

    def _answer_spans(self, text: str, conv: Conversation) -> list[tuple[int, int]]:
        """Where each assistant answer (and the end-of-turn marker after it) lies in the rendered text."""
        spans, cursor = [], 0
        for m in conv.messages:
            content = m["content"]
            at = text.find(content, cursor)
            if at < 0 and m["role"] == "assistant":
                content = content.strip()
                at = text.find(content, cursor)
            if at < 0:
                if m["role"] == "assistant":
                    raise PocketError(f"{conv.source}: the model's chat template rewrites the assistant's answer, so "
                                      "its tokens cannot be told apart; simplify the answer's text")
                continue
            end = at + len(content)
            if m["role"] == "assistant":
                rest = text[end:]
                marker = len(rest) - len(rest.lstrip()) + len(self.end_of_turn)
                if self.end_of_turn and rest.lstrip().startswith(self.end_of_turn):
                    end += marker
                spans.append((at, end))
            cursor = end
        return spans


# ---------------------------------------------------------------- the chat data folder

@dataclass
class SplitChats:
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    exchanges: list[list[int]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    bytes: int = 0

    def add(self, enc: Encoded, source: str, token_bytes: np.ndarray) -> None:
        self.ids += enc.ids
        self.mask += enc.mask
        self.exchanges.append(enc.exchanges)
        self.sources.append(source)
        trained = np.asarray(enc.ids)[np.asarray(enc.mask, dtype=bool)]
        self.bytes += int(token_bytes[trained].sum())

    def counts(self) -> dict[str, int]:
        return {"tokens": int(sum(self.mask)), "bytes": self.bytes, "conversations": len(self.sources),
                "context_tokens": len(self.ids) - int(sum(self.mask))}


def split_conversations(train_files: list[Path], val_files: list[Path], val_fraction: float,
                        seed: int = 1337) -> tuple[list[Conversation], list[Conversation]]:
    """The train and val conversations: val.jsonl's, or a seeded share of the others (at least one)."""
    train = [c for p in train_files for c in read_conversations(p)]
    if val_files:
        return train, [c for p in val_files for c in read_conversations(p)]
    if len(train) < 2:
        raise PocketError(f"{train_files[0]} holds one conversation; give at least two (one is held out) or a "
                          f"{VAL_FILE} beside it")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_val = min(len(train) - 1, max(1, round(len(train) * val_fraction)))
    held = set(order[:n_val])
    return [c for i, c in enumerate(train) if i not in held], [c for i, c in enumerate(train) if i in held]


@dataclass
class ChatInputs:
    """The conversations a run trains on, read and checked; sources: the files they came from."""

    train: list[Conversation]
    val: list[Conversation]
    sources: list[dict[str, Any]]  # each file's path, bytes and sha256, as a text data folder's meta lists them
    val_fraction: float

    def examples(self, n: int = EXAMPLES) -> list[dict[str, Any]]:
        """The first n held-out conversations as questions: the turns before the last answer, and that answer."""
        out = []
        for conv in self.val[:n]:
            last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
            out.append({"messages": conv.messages[:last], "reference": conv.messages[last]["content"]})
        return out


def read_inputs(inputs: Sequence[str], val_fraction: float) -> ChatInputs:
    """The conversations of the inputs, every line checked (one error naming the first bad file and line)."""
    check_val_fraction(val_fraction)
    train_files, val_files = chat_files(inputs)
    train, val = split_conversations(train_files, val_files, val_fraction)
    return ChatInputs(train, val, [_source(p) for p in train_files + val_files], val_fraction)


def _source(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def prepare_chat(chats: ChatInputs, out: Path, tokenizer: Any, block_size: int,
                 say: Callable[[str], None] = print) -> Path:
    """Conversations -> a chat data folder at out (built aside and swapped in whole, as prepare does); a
    conversation whose first exchange is longer than the context is refused before anything is written."""
    from .data import TOKENIZER, too_long, write_chat_meta, write_chat_split
    from .files import write_dir
    from .tokenizer import save_tokenizer

    if not getattr(tokenizer, "chat_template", None):
        raise PocketError("this model has no chat template, so its conversations cannot be rendered; fine-tune a "
                          "model that brings one (an instruct model's folder), or train on the file as plain text "
                          "with --data-format text")
    started = time.time()
    fmt = ChatFormat(tokenizer)
    sizes = tokenizer.token_bytes()
    splits = {"train": SplitChats(), "val": SplitChats()}
    for split, convs in (("train", chats.train), ("val", chats.val)):
        for conv in convs:
            try:
                encoded = fmt.encode(conv)
            except PocketError as e:  # a character the model's vocabulary lacks: which line has it
                raise PocketError(f"{conv.source}: {e}") from None
            if encoded.exchanges[0] > block_size + 1:
                raise too_long(conv.source, encoded.exchanges[0], block_size)
            splits[split].add(encoded, conv.source, sizes)
    def fill(tmp: Path) -> None:
        for split, got in splits.items():
            write_chat_split(tmp, split, got.ids, got.mask, got.exchanges, got.sources, tokenizer.vocab_size)
        save_tokenizer(tokenizer, tmp / TOKENIZER)
        write_chat_meta(tmp, tokenizer, {s: c.counts() for s, c in splits.items()}, chats.sources,
                        chats.examples(), chats.val_fraction, time.time() - started)

    write_dir(out, fill, "data folder")
    t, v = splits["train"].counts(), splits["val"].counts()
    say(f"chat data: {t['conversations']:,} train / {v['conversations']:,} val conversations; {t['tokens']:,} answer "
        f"tokens to train on, {t['context_tokens']:,} of context")
    return out
