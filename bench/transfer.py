"""Does starting from a pretrained model help? Fine-tuning vs LoRA vs from scratch, at equal wall time.

    python bench/transfer.py                       # pretrain 6 min, then 4 min each (~25 minutes)
    python bench/transfer.py --pretrain-minutes 2 --minutes 1    # a quick look

No real GPT-2 weights can be downloaded on these machines, so the pretrained model is one we make:

1. pretrain a GPT-2-BPE model (4 layers, width 256, context 128) on another corpus: Python's
   reference documentation, which ships with every CPython (pydoc_data.topics, ~0.47 MB of
   English prose about code), for --pretrain-minutes;
2. export it as a Hugging Face folder (`pocketgpt export --format hf`), the path a real GPT-2 takes;
3. train on the bundled Tiny Shakespeare (GPT-2 tokens, the same prepared folder for all), each for
   --minutes of wall time, one after another:
   - scratch:   the same shape from random weights (the default recipe's optimizer and schedule),
   - finetune:  `--init-from` the exported folder (the finetune preset: AdamW 5e-5, dropout 0.1),
   - lora:      `--init-from` it with `--lora-rank 8` (the finetune-lora preset: AdamW 2e-4);
4. score each, and the exported base itself (zero-shot), on the full Shakespeare val split:
   `pocketgpt eval --json` (bits per byte: lower is better).

Every run is a real `pocketgpt` child process, so the table is what a user gets from the CLI; all
use batch 8, an eval every 100 iterations on 10 batches, and no early stop (RUN below).
The runs share the machine with nothing else the script starts; run it on a quiet machine.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPE = dict(n_layer=4, n_head=4, n_embd=256, block_size=128)
# the same batch and eval cost for every run (GPT-2's 50257-token head makes each eval batch dear on a CPU)
RUN = dict(batch_size=8, eval_interval=100, eval_iters=10, early_stop_patience=0)


def pydoc_corpus(path: Path) -> Path:
    import pydoc_data.topics as topics

    path.write_text("\n\n".join(topics.topics.values()), encoding="utf-8")
    return path


def timed_train(*args: str) -> float:
    start = time.monotonic()
    common.pocketgpt("train", *args, *common.QUIET, *common.NO_PLOTS)
    return time.monotonic() - start


def row(name: str, run: Path, data: Path, seconds: float | None) -> dict[str, object]:
    ev = json.loads(common.pocketgpt("eval", "--model", str(run), "--data", str(data), "--json"))
    iters = None
    if (run / "metrics.jsonl").is_file():
        iters = max((m["iter"] for m in common.metrics(run) if "iter" in m), default=None)
    return {"run": name, "iters": iters, "wall_s": seconds, "val_loss": ev["loss"], "val_bpb": ev["bits_per_byte"]}


def machine() -> str:
    import platform

    import torch

    from pocketgpt.probe import cpu_name

    cpu = cpu_name()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--pretrain-minutes", type=float, default=6.0)
    p.add_argument("--minutes", type=float, default=4.0, help="wall time of each Shakespeare run")
    p.add_argument("--lora-rank", type=int, default=8)
    args = p.parse_args()
    shape, run = common.flags(**SHAPE), common.flags(**RUN)
    with common.scratch() as tmp:
        shk = common.prepare_bundled(tmp / "shakespeare", "--tokenizer", "gpt2")
        pyd = tmp / "pydoc"
        common.pocketgpt("prepare", str(pydoc_corpus(tmp / "pydoc.txt")), "--tokenizer", "gpt2", "--out", str(pyd))
        base, base_hf = tmp / "base", tmp / "base-hf"
        pre_s = timed_train("--data", str(pyd), "--out", str(base), *shape, *run,
                            "--max-time", str(args.pretrain_minutes * 60), "--max-iters", "1000000")
        common.pocketgpt("export", "--model", str(base), "--format", "hf", "--out", str(base_hf))
        budget = [*run, "--max-time", str(args.minutes * 60), "--max-iters", "1000000"]
        runs = {
            "scratch": ["--data", str(shk), *shape, *budget],
            "finetune": ["--data", str(shk), "--init-from", str(base_hf), *budget],
            "lora": ["--data", str(shk), "--init-from", str(base_hf), "--lora-rank", str(args.lora_rank), *budget],
        }
        rows = [row("pretrained base, zero-shot", base_hf, shk, None)]
        for name, flags in runs.items():
            seconds = timed_train(*flags, "--out", str(tmp / name))
            rows.append(row(name, tmp / name, shk, seconds))
    print(f"\npretrain: {SHAPE} on Python's reference docs (pydoc_data), GPT-2 tokens, {pre_s:.0f} s")
    print(f"each Shakespeare run: {args.minutes:g} min wall time; val = the full Shakespeare val split\n")
    common.markdown_header("run", "iterations", "wall s", "val loss", "val bits/byte")
    for r in rows:
        wall = "" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        iters = "" if r["iters"] is None else str(r["iters"])
        print(f"| {r['run']} | {iters} | {wall} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |")
    print(f"\nmachine: {machine()}")


if __name__ == "__main__":
    main()
