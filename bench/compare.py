"""pocketgpt vs the nanoGPT CPU recipe, side by side on this machine: one command, one table.

    python bench/compare.py                 # ~10 minutes on 2 cores
    python bench/compare.py --rounds 2      # A, B, A, B ... for medians
    python bench/compare.py --max-iters 150 --no-gen  # a smoke test of the script itself
    python bench/compare.py --nanogpt ../nanoGPT      # also the real karpathy/nanoGPT, whole process
    python bench/compare.py --nanogpt ../nanoGPT --rows A0,B --rounds 3   # only those rows, in turns

Per round: (A) bench/nanogpt_baseline.py, nanoGPT's recipe (4x4x128, T=64, B=12, 2000 iters);
(B) pocketgpt with exactly that recipe (same model, batch, schedule: a throughput comparison) and its
default dtype (bf16 autocast on CPUs with AVX512-BF16), (B0) the same in float32, (B2) B with --compile true;
(C) pocketgpt's demo recipe with --max-time equal to A's training wall time (learning per CPU-minute).
Val losses are full passes over the last 10 % of Tiny Shakespeare. Then generation speed.
With --nanogpt DIR (a karpathy/nanoGPT checkout), first in each round (A0) the real nanoGPT's
train.py with that recipe's flags, on its own data/shakespeare_char prepared from the bundled text:
its val loss is its own 20-batch estimate at the last eval (reading its checkpoint would mean a pickle).
"process s" is each whole process's wall time (start-up, data, evals and saves included): the
end-to-end comparison.
"""

from __future__ import annotations

import json
import re
import statistics
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


def run_measured(cmd: list[str], cwd: Path | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of the child, stdout); the child runs in cwd (default: this one)."""
    wrapper = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:], capture_output=True, "
               "text=True); print(json.dumps({'rc': r.returncode, 'out': r.stdout, 'err': r.stderr, "
               "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    t0 = time.perf_counter()
    res = json.loads(subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                                    check=True, cwd=cwd).stdout)
    wall = time.perf_counter() - t0
    if res["rc"] != 0:
        raise common.failed(cmd, res["rc"], res["err"])
    return wall, res["rss"] / 1024, res["out"]


def train_elapsed(run: Path) -> float:
    """Seconds of training the run's last state records."""
    return json.loads((run / "last" / "state.json").read_text())["elapsed"]


def real_nanogpt(repo: Path, out: Path, iters: int) -> dict[str, float]:
    """karpathy/nanoGPT's own train.py on its CPU recipe, as a row (process_s: the whole process)."""
    common.nanogpt_char_data(repo)
    cmd = [sys.executable, str(repo / "train.py"), "config/train_shakespeare_char.py", "--device=cpu",
           "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
           "--n_layer=4", "--n_head=4", "--n_embd=128", f"--max_iters={iters}", f"--lr_decay_iters={iters}",
           "--dropout=0.0", f"--out_dir={out}"]
    wall, rss, text = run_measured(cmd, cwd=repo)
    ms = [float(t) for t in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", text)][10:]
    if not ms:
        sys.exit("the real nanoGPT printed too few 'iter N: loss X, time Yms' lines (more --max-iters?)")
    vals = re.findall(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", text)
    return dict(tokens_per_s=12 * 64 / (statistics.median(ms) / 1000), train_s=float("nan"),
                val=float(vals[-1]) if vals else float("nan"), rss=rss, process_s=wall)


ROWS = ("A0", "A", "B", "B0", "B2", "C")


def one_round(tmp: Path, data: Path, r: int, iters: int, repo: Path | None = None,
              wanted: tuple[str, ...] = ROWS) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    if repo is not None and "A0" in wanted:
        rows["A0 real nanoGPT (train.py; val: its estimate)"] = real_nanogpt(repo, tmp / f"nanogpt{r}", iters)
    base = None
    if "A" in wanted or "C" in wanted:  # C trains for A's wall time
        wall, rss, _ = run_measured([sys.executable, str(HERE / "nanogpt_baseline.py"), "--no-gen",
                                     "--max-iters", str(iters), "--lr-decay-iters", str(iters),
                                     "--json", str(tmp / f"base{r}.json")])
        base = json.loads((tmp / f"base{r}.json").read_text())
        rows["A nanoGPT recipe (baseline)"] = dict(tokens_per_s=base["tokens_per_s"], train_s=base["train_wall_s"],
                                                   val=base["full_val_loss"], rss=rss, process_s=wall)

    def pocketgpt_row(name: str, folder: str, *flags: str) -> None:
        if name.split()[0] not in wanted:
            return
        run = tmp / f"{folder}{r}"
        wall, rss, _ = run_measured(common.pocketgpt_cmd("train", "--data", str(data), "--out", str(run), *flags,
                                                         *common.QUIET))
        rows[name] = dict(tokens_per_s=common.median_tokens_per_s(run), train_s=train_elapsed(run),
                          val=common.evaluate(run)["loss"], rss=rss, process_s=wall)

    recipe = nanogpt_recipe(iters)
    pocketgpt_row("B pocketgpt, same recipe", "same", *recipe)
    pocketgpt_row("B0 pocketgpt, same recipe, float32", "fp32", *recipe, "--dtype", "float32")
    pocketgpt_row("B2 pocketgpt, same recipe, compile", "compiled", *recipe, "--compile", "true")
    if base is not None:
        pocketgpt_row("C pocketgpt demo recipe, same time", "best", "--max-time", f"{base['train_wall_s']:.1f}")
    return rows


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-iters", type=int, default=2000, help="iterations of nanoGPT's recipe (A, B, B0, B2)")
    ap.add_argument("--no-gen", action="store_true", help="skip the generation table (bench/bench_generate.py)")
    ap.add_argument("--nanogpt", type=Path, help="a karpathy/nanoGPT checkout: run its train.py too (A0)")
    ap.add_argument("--rows", default=",".join(ROWS), help="the rows to run, comma-separated (C runs A too)")
    args = ap.parse_args()
    wanted = tuple(args.rows.split(","))
    repo = args.nanogpt.resolve() if args.nanogpt else None
    if repo is not None and not (repo / "train.py").is_file():
        sys.exit(f"--nanogpt {repo}: no train.py there; give a checkout of karpathy/nanoGPT")
    with common.scratch() as tmp:
        data = common.prepare_bundled(tmp / "data")
        rounds = [one_round(tmp, data, r, args.max_iters, repo, wanted) for r in range(args.rounds)]
    print(f"pocketgpt vs nanoGPT's CPU recipe, median of {args.rounds} round(s) (A, B, C interleaved)")
    print(f"{'run':46s} {'tokens/s':>9s} {'train s':>8s} {'process s':>10s} {'full val':>9s} {'peak RSS MB':>12s}")
    med = {name: common.medians([r[name] for r in rounds]) for name in rounds[0]}
    for name, m in med.items():
        print(f"{name:46s} {m['tokens_per_s']:9,.0f} {m['train_s']:8.1f} {m['process_s']:10.1f} {m['val']:9.4f} "
              f"{m['rss']:12.0f}")
    tps = {name.split()[0]: m["tokens_per_s"] for name, m in med.items()}  # "A0", "A", "B", "B0", "B2", "C"
    if "A" in tps:
        print("throughput ratio " + ", ".join(f"{k}/A: {tps[k] / tps['A']:.2f}x" for k in ("B", "B0", "B2") if k in tps))
    if "A0" in tps and "B" in tps:
        proc = {name.split()[0]: m["process_s"] for name, m in med.items()}
        print(f"against the real nanoGPT: step tokens/s B/A0 {tps['B'] / tps['A0']:.2f}x; whole process "
              f"A0/B {proc['A0'] / proc['B']:.2f}x (same {args.max_iters} iterations, evals included)")
    if not args.no_gen:
        subprocess.run([sys.executable, str(HERE / "bench_generate.py")], check=True)


if __name__ == "__main__":
    main()
