"""Which tokenizer learns the bundled corpus best in the same CPU time? Compared in bits per byte.

    python bench/tokenizers_compare.py                  # 4 rows x 120 s of training, ~10 minutes
    python bench/tokenizers_compare.py --budget 60 --only bpe

Every row prepares the bundled Tiny Shakespeare with one tokenizer (val = the last 10 % of the
text), trains the `demo` preset on it under --max-time, then `pocketgpt eval --json` scores the
whole val split. Loss per token is not comparable across vocabularies (a char token is one byte, a
BPE token about four), bits per byte is: it is the column to read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

ROWS: list[tuple[str, list[str]]] = [
    ("char", ["--tokenizer", "char"]),
    ("bpe-1024", ["--tokenizer", "bpe", "--vocab-size", "1024"]),
    ("bpe-4096", ["--tokenizer", "bpe", "--vocab-size", "4096"]),
    ("gpt2", ["--tokenizer", "gpt2"]),
]
QUIET = ["--eval-interval", "1000000", *common.QUIET, *common.NO_PLOTS]


def run_row(tmp: Path, name: str, prepare_flags: list[str], budget: float, extra: list[str]) -> dict[str, float]:
    data = common.prepare_bundled(tmp / f"data-{name}", *prepare_flags)
    run = tmp / f"run-{name}"
    common.train(data, run, "--preset", "demo", "--max-time", str(budget), *QUIET, *extra)
    scored = common.evaluate(run)
    info = common.info(run)
    meta = json.loads((data / "meta.json").read_text())
    return {"vocab": meta["vocab_size"], "params": info["parameters"], "iters": info["iters"],
            "tokens_per_s": common.median_tokens_per_s(run), "bytes_per_token": scored["bytes"] / scored["tokens"],
            "loss": scored["loss"], "bpb": scored["bits_per_byte"]}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of training per row")
    ap.add_argument("--only", default="", help="run only rows whose name contains this")
    ap.add_argument("extra", nargs="*", help="more train flags for every row, after --")
    args = ap.parse_args()
    print(f"bundled Tiny Shakespeare, preset demo, {args.budget:.0f} s of training per row; full val split")
    print(f"{'tokenizer':10s} {'vocab':>6s} {'params':>10s} {'iters':>6s} {'tokens/s':>9s} {'bytes/tok':>9s} "
          f"{'val loss':>9s} {'bits/byte':>9s}")
    with common.scratch() as tmp:
        for name, flags in ROWS:
            if args.only not in name:
                continue
            r = run_row(tmp, name, flags, args.budget, args.extra)
            print(f"{name:10s} {r['vocab']:6d} {r['params']:10,d} {r['iters']:6d} {r['tokens_per_s']:9,.0f} "
                  f"{r['bytes_per_token']:9.2f} {r['loss']:9.4f} {r['bpb']:9.4f}", flush=True)


if __name__ == "__main__":
    main()
