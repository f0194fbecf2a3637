"""CPU threads that follow the load (cpuload.py) against a fixed count, beside 0, 1 and 2 busy programs.

    python bench/busy_threads.py                      # 3 conditions x 4 runs of 30 s (~8 minutes)
    python bench/busy_threads.py --budget 5s --repeats 1   # a smoke test of the script itself

Issue 28: the demo preset on 2 threads made 132 iterations in 30 s beside one busy program and 303 on
one thread. Each condition starts its busy programs (`python -c "while True: pass"`, one per busy core),
then trains the demo preset on the bundled corpus for --budget, in turns A B B A per repeat:
  old: `--threads N`, N the count torch takes by default here (what threads = 0 trained on before the
       count followed the load; a run under 8 minutes never times threads, so nothing else differs);
  new: the default (threads = 0), which follows the machine's load.
Prints iterations reached and iterations/s per run and their medians, and the count changes the new
runs logged. Samples and plots are off (QUIET, NO_PLOTS), and the probes' cache is a fresh folder (one
for the whole benchmark, so no timing kept from earlier runs decides a count).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

CONDITIONS = {"quiet": 0, "one busy core": 1, "both busy": 2}


@contextlib.contextmanager
def busy(n: int) -> Iterator[None]:
    """n busy loops in their own processes for the body's time."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def default_threads() -> int:
    """The thread count torch starts with on this machine, asked of a fresh interpreter (as a run starts)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def one_run(data: Path, run: Path, budget: str, extra: list[str]) -> dict[str, float]:
    """Train the demo preset for `budget`; iterations, iterations/s over the run's own clock, count changes."""
    log = common.train(data, run, "--preset", "demo", "--max-time", budget, *common.QUIET, *common.NO_PLOTS,
                       *extra)
    records = common.metrics(run)
    timed = max((m for m in records if m.get("elapsed")), key=lambda m: m["iter"])  # the last train record
    changes = sum(line.startswith("threads: ") for line in log.splitlines())
    return {"iters": max(m["iter"] for m in records), "it_s": timed["iter"] / timed["elapsed"], "changes": changes}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--budget", default="30s", help="training time per run (seconds or 30s / 1m)")
    ap.add_argument("--repeats", type=int, default=2, help="A B B A rounds per condition (default 2: 4 runs each)")
    args = ap.parse_args()
    n = default_threads()
    kinds = {"old": ["--threads", str(n)], "new": []}
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    with common.scratch() as tmp:
        os.environ["POCKETGPT_CACHE_DIR"] = str(tmp / "cache")
        data = common.prepare_bundled(tmp / "data")
        for condition, programs in CONDITIONS.items():
            with busy(programs):
                for r in range(args.repeats):
                    for kind in ("old", "new", "new", "old"):
                        run = tmp / f"{condition}-{kind}-{r}-{len(rows.get((condition, kind), []))}"
                        rows.setdefault((condition, kind), []).append(one_run(data, run, args.budget, kinds[kind]))
    print(f"demo preset, {args.budget} a run, {os.cpu_count()} CPUs; old = --threads {n}, new = threads 0 "
          "following the load\n")
    common.markdown_header("condition", "threads", "iterations (each run)", "median iterations", "median it/s",
                           "new / old", "count changes (new)")
    for condition in CONDITIONS:
        old_it = statistics.median(x["it_s"] for x in rows[(condition, "old")])
        for kind in ("old", "new"):
            got = rows[(condition, kind)]
            it_s = statistics.median(x["it_s"] for x in got)
            ratio = f"{it_s / old_it:.2f}x" if kind == "new" and old_it else ""
            changes = ", ".join(str(x["changes"]) for x in got) if kind == "new" else ""
            print(f"| {condition} | {kind} | {', '.join(str(x['iters']) for x in got)} | "
                  f"{statistics.median(x['iters'] for x in got):.0f} | {it_s:.2f} | {ratio} | {changes} |")


if __name__ == "__main__":
    main()
