"""Does chat fine-tuning teach a model to answer? Pretrain a char model on the bundled Tiny Shakespeare,
fine-tune it on examples/shakespeare_chat.py's conversations (loss on the answers only), and score both
on the held-out questions by exact match (greedy), per kind of question, with the masked val loss.

    python bench/chat_sft.py                                  # 5 min pretraining + 4 min fine-tuning
    python bench/chat_sft.py --base runs/bard --sft-flags "--learning-rate 1e-3"   # the finetune preset instead

The commands it runs are the README's worked example, as a user types them. The model before the
fine-tune has no chat template, so it is asked through the role-line transcript ("user: ...\\nassistant:")
that `pocketgpt chat` gives such a model.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def run(*args: str) -> float:
    started = time.time()
    subprocess.run([sys.executable, "-m", "pocketgpt", *args], check=True, stdout=subprocess.DEVNULL)
    return time.time() - started


def score(model_dir: Path, val: list[dict], max_new_tokens: int) -> dict[str, float]:
    import pocketgpt

    lm = pocketgpt.load(model_dir)
    right, asked = Counter(), Counter()
    for row in val:
        question, answer = row["messages"][:-1], row["messages"][-1]["content"]
        got = lm.chat(question, max_new_tokens=max_new_tokens, temperature=0.0)
        asked[row["kind"]] += 1
        right[row["kind"]] += got.strip() == answer.strip()
    out = {kind: right[kind] / asked[kind] for kind in sorted(asked)}
    out["all"] = sum(right.values()) / sum(asked.values())
    return out


def best_val(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return min(r["val_loss"] for r in rows if "val_loss" in r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrain", default="5m", help="pretraining budget (--max-time)")
    ap.add_argument("--sft", default="4m", help="fine-tuning budget (--max-time)")
    ap.add_argument("--block-size", default="256")
    ap.add_argument("--base", type=Path, help="a pretrained run to fine-tune (skips the pretraining)")
    ap.add_argument("--sft-flags", default="--preset demo",
                    help="the fine-tune's recipe (default '--preset demo': the base's own; '' for the finetune preset)")
    ap.add_argument("--keep", type=Path, help="a folder to keep the runs in (default: a temporary one)")
    args = ap.parse_args()
    from shakespeare_chat import make

    work = args.keep or Path(tempfile.mkdtemp(prefix="pocketgpt-chat-"))
    work.mkdir(parents=True, exist_ok=True)
    train, val = make()
    chats = work / "chats"
    chats.mkdir(exist_ok=True)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        (chats / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pre, sft = args.base or work / "pre", work / "sft"
    t_pre = 0.0 if args.base else run("train", "--out", str(pre), "--block-size", args.block_size, "--max-time",
                                      args.pretrain, "--overwrite")
    t_sft = run("train", str(chats / "train.jsonl"), "--init-from", str(pre), "--out", str(sft),
                "--max-time", args.sft, "--overwrite", *args.sft_flags.split())
    before, after = score(pre, val, 60), score(sft, val, 60)
    print(f"machine: {platform.processor() or platform.machine()}, {len(train):,} training / {len(val)} held-out "
          f"conversations; pretrain {args.pretrain} ({t_pre:.0f} s), fine-tune {args.sft} ({t_sft:.0f} s) with "
          f"{args.sft_flags or 'the finetune preset'}")
    print(f"pretrained val loss {best_val(pre):.4f}; fine-tuned masked val loss {best_val(sft):.4f}")
    print(f"{'exact match':14s}" + "".join(f"{k:>9s}" for k in after))
    for name, got in (("before", before), ("after", after)):
        print(f"{name:14s}" + "".join(f"{got[k]:9.0%}" for k in after))


if __name__ == "__main__":
    main()
