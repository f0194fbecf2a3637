"""Learning per CPU-minute: each option's effect on full val loss at a fixed wall-clock budget.

    python bench/ablation.py --budget 120                # the default list, ~2.5 min per row
    python bench/ablation.py --budget 120 --only muon    # rows whose name contains 'muon'

Every row trains the bundled Tiny Shakespeare (char-level, val = last 10 %) under --max-time, then
`pocketgpt eval` takes the full val loss. Each row adds one lever to the row
above, so the differences between rows are each lever's worth at this budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# nanoGPT's CPU model shape (0.8M parameters), nothing printed or drawn during the run
BASE = ["--preset", "demo", "--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "64",
        "--dropout", "0", "--eval-interval", "1000000", "--eval-sample-tokens", "0", "--sample-tokens", "0",
        "--plots", "false"]
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
    cmd = [sys.executable, "-m", "pocketgpt", "train", "--data", str(data), "--out", str(run), *BASE,
           "--max-time", str(budget), *flags]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    out = subprocess.run([sys.executable, "-m", "pocketgpt", "eval", "--model", str(run), "--json"],
                         check=True, capture_output=True, text=True)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    tps = [m["tokens_per_s"] for m in lines if "tokens_per_s" in m][1:] or [0.0]  # the first window warms up
    iters = max(m["iter"] for m in lines)
    return {"val": json.loads(out.stdout)["loss"], "tokens_per_s": statistics.median(tps), "iters": iters}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of training per row")
    ap.add_argument("--only", default="", help="run only rows whose name contains this")
    args = ap.parse_args()
    rows = [(n, f) for n, f in cumulative_rows() if args.only in n]
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = tmp / "data"
        subprocess.run([sys.executable, "-m", "pocketgpt", "prepare", "--out", str(data)], check=True,
                       capture_output=True)
        print(f"budget {args.budget:.0f} s per row; full val loss on Tiny Shakespeare (char)")
        print(f"{'option':55s} {'full val':>9s} {'tokens/s':>9s} {'iters':>7s}")
        for i, (name, flags) in enumerate(rows):
            r = run_row(tmp, data, i, flags, args.budget)
            print(f"{name:55s} {r['val']:9.4f} {r['tokens_per_s']:9,.0f} {r['iters']:7d}", flush=True)


if __name__ == "__main__":
    main()
