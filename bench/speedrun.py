"""The speed-run headline in one command: a preset trained for each time budget on Tiny Shakespeare,
the full val loss each reaches, and the first budget that reaches nanoGPT's A100 result (1.4697).

    python bench/speedrun.py                                   # cpu-15min at 2, 5, 10 and 15 minutes (~35 min)
    python bench/speedrun.py --presets cpu-15min,auto --budgets 10m --repeats 2   # side by side, in turns
    python bench/speedrun.py --budgets 20s,40s                 # a smoke test of the script itself

Each run is `pocketgpt train --preset P --max-time B` on the bundled corpus (char-level, val = the last
10 %), a run of its own per budget: a schedule that decays to the end of its budget reaches a lower loss
at that budget than a longer run stopped there. `pocketgpt eval` then gives the full val loss of the
best checkpoint (every position of every window of the model's context). Runs go budget by budget and
repeat in turns (2m, 5m, ..., 2m, 5m, ...; with several presets each budget runs them one after the
other), so a slow patch of a shared machine does not land on one budget or preset alone. The wall time is the whole `train` process (imports, probes, compiling, evals, saving).
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

TARGET = 1.4697  # nanoGPT's shakespeare_char on an A100 (its README)


def cpu_model() -> str:
    """The CPU's model name (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def seconds(budget: str) -> float:
    from pocketgpt.config import parse_duration

    return parse_duration(budget)


def one_run(data: Path, run: Path, preset: str, budget: str, extra: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    common.train(data, run, "--preset", preset, "--max-time", budget, "--sample-tokens", "0", *extra)
    wall = time.perf_counter() - t0
    got, about = common.evaluate(run), common.info(run)
    m = about["config"]["model"]
    shape = f"{m['n_layer']}x{m['n_head']}x{m['n_embd']}, context {m['block_size']}, {about['parameters'] / 1e6:.2f}M"
    return {"loss": got["loss"], "bpb": got["bits_per_byte"], "wall": wall, "iters": about["iters"], "shape": shape}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--presets", default="cpu-15min", help="comma-separated; auto sizes its model for each budget")
    ap.add_argument("--budgets", default="2m,5m,10m,15m", help="comma-separated --max-time values")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--extra", default="", help="more train flags for every run, space-separated")
    args = ap.parse_args()
    budgets = sorted(args.budgets.split(","), key=seconds)
    extra = args.extra.split()
    import torch

    presets = args.presets.split(",")
    print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{' '.join(extra)}".rstrip("; "), flush=True)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(p, b): [] for b in budgets for p in presets}
    with common.scratch() as tmp:
        data = common.prepare_bundled(tmp / "data")
        for rep in range(args.repeats):
            for preset, b in runs:
                got = one_run(data, tmp / f"run-{preset}-{b}-{rep}", preset, b, extra)
                runs[(preset, b)].append(got)
                print(f"  {preset} {b} run {rep + 1}: full val {got['loss']:.4f}, {got['iters']} iters, "
                      f"{got['wall']:.0f} s in all ({got['shape']})", flush=True)
    print("\n| preset | budget | full val loss (median) | per run | bits per byte | iterations | whole process (s) |")
    print("|---|---|---:|---|---:|---:|---:|")
    reached: dict[str, str] = {}
    for (preset, b), rs in runs.items():
        loss = statistics.median(r["loss"] for r in rs)
        if loss <= TARGET:
            reached.setdefault(preset, b)
        each = ", ".join(f"{r['loss']:.4f}" for r in rs)
        print(f"| {preset} | {b} | {loss:.4f} | {each} | "
              f"{statistics.median(r['bpb'] for r in rs):.4f} | {statistics.median(r['iters'] for r in rs):,.0f} | "
              f"{statistics.median(r['wall'] for r in rs):,.0f} |")
    for preset in presets:
        print(f"{preset}: nanoGPT's A100 result, {TARGET}, " + (f"reached within {reached[preset]}" if preset in reached
                                                              else f"not reached within {budgets[-1]}"))


if __name__ == "__main__":
    main()
