"""pocketgpt vs the nanoGPT CPU recipe, side by side on this machine: one command, one table.

    python bench/compare.py                 # ~10 minutes on 2 cores
    python bench/compare.py --rounds 2      # A, B, A, B ... for medians
    python bench/compare.py --max-iters 150 --no-gen  # a smoke test of the script itself

Per round: (A) bench/nanogpt_baseline.py, nanoGPT's recipe (4x4x128, T=64, B=12, 2000 iters);
(B) pocketgpt with exactly that recipe (same model, batch, schedule: a throughput comparison) and its
default dtype (bf16 autocast on CPUs with AVX512-BF16), (B0) the same in float32, (B2) B with --compile true;
(C) pocketgpt's demo recipe with --max-time equal to A's training wall time (learning per CPU-minute).
Val losses are full passes over the last 10 % of Tiny Shakespeare. Then generation speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/common.py, wherever this is started from
import common  # noqa: E402


def nanogpt_recipe(iters: int) -> list[str]:
    """nanoGPT's CPU recipe as pocketgpt train flags (the baseline's defaults; --max-iters 2000 in full)."""
    return common.flags(**common.NANOGPT_SHAPE, batch_size=12, dropout=0, bias=False, optimizer="adamw",
                        max_iters=iters, lr_decay_iters=iters, learning_rate="1e-3", min_lr="1e-4",
                        warmup_iters=100, schedule="cosine", beta2=0.99, weight_decay=0.1, grad_clip=1,
                        max_time=0, eval_interval=250, eval_iters=20, log_interval=50)


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
        raise common.failed(cmd, res["rc"], res["err"])
    return wall, res["rss"] / 1024, res["out"]


def train_elapsed(run: Path) -> float:
    """Seconds of training the run's last state records."""
    return json.loads((run / "last" / "state.json").read_text())["elapsed"]


def one_round(tmp: Path, data: Path, r: int, iters: int) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    wall, rss, _ = run_measured([sys.executable, str(HERE / "nanogpt_baseline.py"), "--no-gen",
                                 "--max-iters", str(iters), "--lr-decay-iters", str(iters),
                                 "--json", str(tmp / f"base{r}.json")])
    base = json.loads((tmp / f"base{r}.json").read_text())
    rows["A nanoGPT recipe (baseline)"] = dict(tokens_per_s=base["tokens_per_s"], train_s=base["train_wall_s"],
                                               val=base["full_val_loss"], rss=rss)

    def pocketgpt_row(name: str, folder: str, *flags: str) -> None:
        run = tmp / f"{folder}{r}"
        _, rss, _ = run_measured(common.pocketgpt_cmd("train", "--data", str(data), "--out", str(run), *flags,
                                                      *common.QUIET))
        rows[name] = dict(tokens_per_s=common.median_tokens_per_s(run), train_s=train_elapsed(run),
                          val=common.evaluate(run)["loss"], rss=rss)

    recipe = nanogpt_recipe(iters)
    pocketgpt_row("B pocketgpt, same recipe", "same", *recipe)
    pocketgpt_row("B0 pocketgpt, same recipe, float32", "fp32", *recipe, "--dtype", "float32")
    pocketgpt_row("B2 pocketgpt, same recipe, compile", "compiled", *recipe, "--compile", "true")
    pocketgpt_row("C pocketgpt demo recipe, same time", "best", "--max-time", f"{base['train_wall_s']:.1f}")
    return rows


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-iters", type=int, default=2000, help="iterations of nanoGPT's recipe (A, B, B0, B2)")
    ap.add_argument("--no-gen", action="store_true", help="skip the generation table (bench/bench_generate.py)")
    args = ap.parse_args()
    with common.scratch() as tmp:
        data = common.prepare_bundled(tmp / "data")
        rounds = [one_round(tmp, data, r, args.max_iters) for r in range(args.rounds)]
    print(f"pocketgpt vs nanoGPT's CPU recipe, median of {args.rounds} round(s) (A, B, C interleaved)")
    print(f"{'run':38s} {'tokens/s':>9s} {'train s':>8s} {'full val':>9s} {'peak RSS MB':>12s}")
    med = {name: common.medians([r[name] for r in rounds]) for name in rounds[0]}
    for name, m in med.items():
        print(f"{name:38s} {m['tokens_per_s']:9,.0f} {m['train_s']:8.1f} {m['val']:9.4f} {m['rss']:12.0f}")
    tps = {name.split()[0]: m["tokens_per_s"] for name, m in med.items()}  # "A", "B", "B0", "B2", "C"
    a = tps["A"]
    print(f"throughput ratio B/A: {tps['B'] / a:.2f}x, B0/A: {tps['B0'] / a:.2f}x, B2/A: {tps['B2'] / a:.2f}x")
    if not args.no_gen:
        subprocess.run([sys.executable, str(HERE / "bench_generate.py")], check=True)


if __name__ == "__main__":
    main()
