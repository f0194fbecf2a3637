"""Learning per CPU-minute: each option's effect on full val loss at a fixed wall-clock budget.

    python bench/ablation.py --budget 120                # the default list, ~2.5 min per row
    python bench/ablation.py --budget 120 --only muon    # rows whose name contains 'muon'

Every row trains the bundled Tiny Shakespeare (char-level, val = last 10 %) under --max-time, then
`pocketgpt eval` takes the full val loss. Each row adds one lever to the row
above, so the differences between rows are each lever's worth at this budget.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

# nanoGPT's CPU model shape (0.8M parameters), nothing printed or drawn during the run
BASE = ["--preset", "demo", *common.flags(**common.NANOGPT_SHAPE, dropout=0, eval_interval=1000000),
        *common.QUIET, *common.NO_PLOTS]
NANOGPT = ["--optimizer", "adamw", "--learning-rate", "1e-3", "--min-lr", "1e-4", "--schedule", "cosine",
           "--batch-size", "12", "--pos-emb", "learned", "--norm", "layernorm", "--qk-norm", "false",
           "--mlp", "gelu", "--tie-embeddings", "true", "--zero-init-proj", "false", "--compile", "false"]
# Each row adds one lever to the row above (later flags override earlier ones).
STEPS: list[tuple[str, list[str]]] = [
    ("nanoGPT-like: AdamW 1e-3, cosine, batch 12", []),
    ("+ WSD schedule laid over the budget", ["--schedule", "wsd", "--min-lr", "0"]),
    ("+ AdamW lr 4e-3", ["--learning-rate", "4e-3"]),
    ("+ batch 24", ["--batch-size", "24"]),
    ("+ Muon (lr 0.02) on block matrices, AdamW 6e-3", ["--optimizer", "muon", "--learning-rate", "6e-3"]),
    ("+ rotary position embeddings", ["--pos-emb", "rope"]),
    ("+ RMSNorm", ["--norm", "rmsnorm"]),
    ("+ QK-norm", ["--qk-norm", "true"]),
    ("+ ReLU^2 MLP", ["--mlp", "relu2"]),
    ("+ untied output head", ["--tie-embeddings", "false"]),
    ("+ zero-initialised output projections", ["--zero-init-proj", "true"]),
    ("+ batch 48", ["--batch-size", "48"]),
    ("+ torch.compile (compile time counted in the budget)", ["--compile", "true"]),
]


def cumulative_rows() -> list[tuple[str, list[str]]]:
    rows, flags = [], list(NANOGPT)
    for name, extra in STEPS:
        flags = flags + extra
        rows.append((name, flags))
    return rows


def run_row(tmp: Path, data: Path, i: int, flags: list[str], budget: float) -> dict[str, float]:
    run = tmp / f"row{i}"
    common.train(data, run, *BASE, "--max-time", str(budget), *flags)
    iters = max(m["iter"] for m in common.metrics(run))
    return {"val": common.evaluate(run)["loss"], "tokens_per_s": common.median_tokens_per_s(run), "iters": iters}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of training per row")
    ap.add_argument("--only", default="", help="run only rows whose name contains this")
    args = ap.parse_args()
    rows = [(n, f) for n, f in cumulative_rows() if args.only in n]
    with common.scratch() as tmp:
        data = common.prepare_bundled(tmp / "data")
        print(f"budget {args.budget:.0f} s per row; full val loss on Tiny Shakespeare (char)")
        print(f"{'option':55s} {'full val':>9s} {'tokens/s':>9s} {'iters':>7s}")
        for i, (name, flags) in enumerate(rows):
            r = run_row(tmp, data, i, flags, args.budget)
            print(f"{name:55s} {r['val']:9.4f} {r['tokens_per_s']:9,.0f} {r['iters']:7d}", flush=True)


if __name__ == "__main__":
    main()
