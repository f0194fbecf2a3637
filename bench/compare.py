"""pocketgpt vs the nanoGPT CPU recipe, side by side on this machine: one command, one table.

    python bench/compare.py                 # ~10 minutes on 2 cores
    python bench/compare.py --rounds 2      # A, B, A, B ... for medians

Per round: (A) bench/nanogpt_baseline.py, nanoGPT's recipe (4x4x128, T=64, B=12, 2000 iters);
(B) pocketgpt with exactly that recipe (same model, batch, schedule: a throughput comparison) and its
default dtype (bf16 autocast on CPUs with AVX512-BF16), (B0) the same in float32, (B2) B with --compile true;
(C) pocketgpt's demo recipe with --max-time equal to A's training wall time (learning per CPU-minute).
Val losses are full passes over the last 10 % of Tiny Shakespeare. Then generation speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NANOGPT_RECIPE = ["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "64", "--batch-size", "12",
                  "--dropout", "0", "--bias", "false", "--optimizer", "adamw", "--max-iters", "2000", "--lr-decay-iters", "2000",
                  "--learning-rate", "1e-3", "--min-lr", "1e-4", "--warmup-iters", "100", "--schedule", "cosine",
                  "--beta2", "0.99", "--weight-decay", "0.1", "--grad-clip", "1", "--max-time", "0",
                  "--eval-interval", "250", "--eval-iters", "20", "--log-interval", "50"]
QUIET = ["--eval-sample-tokens", "0", "--sample-tokens", "0"]


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of the child, stdout)."""
    wrapper = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:], capture_output=True, "
               "text=True); print(json.dumps({'rc': r.returncode, 'out': r.stdout, 'err': r.stderr, "
               "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    t0 = time.perf_counter()
    res = json.loads(subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                                    check=True).stdout)
    wall = time.perf_counter() - t0
    if res["rc"] != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{res['err'][-2000:]}")
    return wall, res["rss"] / 1024, res["out"]


def pocketgpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "pocketgpt", *args]


def full_val(run: Path) -> float:
    out = subprocess.run(pocketgpt("eval", "--model", str(run), "--json"), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["loss"]


def train_stats(run: Path) -> tuple[float, int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    tps = [m["tokens_per_s"] for m in lines if "tokens_per_s" in m][1:]  # the first window includes warm-up
    state = json.loads((run / "last" / "state.json").read_text())
    return statistics.median(tps), state["iter"], state["elapsed"]


def one_round(tmp: Path, data: Path, r: int) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    wall, rss, _ = run_measured([sys.executable, str(HERE / "nanogpt_baseline.py"), "--no-gen",
                                 "--json", str(tmp / f"base{r}.json")])
    base = json.loads((tmp / f"base{r}.json").read_text())
    rows["A nanoGPT recipe (baseline)"] = dict(tokens_per_s=base["tokens_per_s"], train_s=base["train_wall_s"],
                                               val=base["full_val_loss"], rss=rss)

    def pocketgpt_row(name: str, folder: str, *flags: str) -> None:
        run = tmp / f"{folder}{r}"
        _, rss, _ = run_measured(pocketgpt("train", "--data", str(data), "--out", str(run), *flags, *QUIET))
        tps, _, elapsed = train_stats(run)
        rows[name] = dict(tokens_per_s=tps, train_s=elapsed, val=full_val(run), rss=rss)

    pocketgpt_row("B pocketgpt, same recipe", "same", *NANOGPT_RECIPE)
    pocketgpt_row("B0 pocketgpt, same recipe, float32", "fp32", *NANOGPT_RECIPE, "--dtype", "float32")
    pocketgpt_row("B2 pocketgpt, same recipe, compile", "compiled", *NANOGPT_RECIPE, "--compile", "true")
    pocketgpt_row("C pocketgpt demo recipe, same time", "best", "--max-time", f"{base['train_wall_s']:.1f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = tmp / "data"
        subprocess.run(pocketgpt("prepare", "--out", str(data)), check=True, capture_output=True)
        rounds = [one_round(tmp, data, r) for r in range(args.rounds)]
    print(f"pocketgpt vs nanoGPT's CPU recipe, median of {args.rounds} round(s) (A, B, C interleaved)")
    print(f"{'run':38s} {'tokens/s':>9s} {'train s':>8s} {'full val':>9s} {'peak RSS MB':>12s}")
    for name in rounds[0]:
        med = {k: statistics.median(r[name][k] for r in rounds) for k in rounds[0][name]}
        print(f"{name:38s} {med['tokens_per_s']:9,.0f} {med['train_s']:8.1f} {med['val']:9.4f} {med['rss']:12.0f}")
    a = statistics.median(r["A nanoGPT recipe (baseline)"]["tokens_per_s"] for r in rounds)
    b = statistics.median(r["B pocketgpt, same recipe"]["tokens_per_s"] for r in rounds)
    b2 = statistics.median(r["B2 pocketgpt, same recipe, compile"]["tokens_per_s"] for r in rounds)
    b0 = statistics.median(r["B0 pocketgpt, same recipe, float32"]["tokens_per_s"] for r in rounds)
    print(f"throughput ratio B/A: {b / a:.2f}x, B0/A: {b0 / a:.2f}x, B2/A: {b2 / a:.2f}x")
    subprocess.run([sys.executable, str(HERE / "bench_generate.py")], check=True)


if __name__ == "__main__":
    main()
