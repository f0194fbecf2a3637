"""DistributedDataParallel on a CPU: one process doing the whole batch against two doing half each.

    python bench/distributed_bench.py                 # nanoGPT's CPU shape, batch 48, 1 thread a process, ~90 s
    python bench/distributed_bench.py --batch-size 16 --iters 60 --rounds 3
    python bench/distributed_bench.py --fsdp          # also AdamW rows: 1 process, 2 DDP ranks, 2 FSDP ranks

Both contenders are real `torchrun --standalone -m pocketgpt train` runs (gloo) on the bundled Tiny
Shakespeare with the same global batch, seed and thread count per process (POCKETGPT_THREADS), so the
only difference is how many processes share each batch. A third row gives one process with the threads
of both (the same cores as the two processes). Rounds alternate the contenders, so drift on a shared
machine hits all alike; the table gives the median tokens/s (metrics.jsonl's log windows, the first
left out) over the rounds. Two processes need two free cores to show their speed-up, and a batch large
enough that the gradient exchange (a fixed cost a step: every weight's gradient) is a small part of a step.

--fsdp adds rows with --optimizer adamw (FSDP refuses Muon, which the default recipe uses): one process,
two DDP ranks and two FSDP ranks, each row compared with the one process of its optimizer. FSDP sends
more a step than DDP (each block's weights gathered in the forward, gradients reduce-scattered), so on
a CPU it is slower; it exists for models whose state does not fit one device, not for speed.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402


# (processes, threads per process, how: "ddp" with the recipe's optimizer, or "adamw" / "fsdp" with AdamW)
Contender = tuple[int, int, str]
ADAMW = ["--optimizer", "adamw"]


def torchrun_train(nproc: int, data: Path, run: Path, threads: int, options: list[str]) -> float:
    """One `torchrun --nproc_per_node=nproc` training; its median tokens/s (global: every rank's rows)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pocketgpt", "train", "--data", str(data), "--out", str(run), *options]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "POCKETGPT_THREADS": str(threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise common.failed(cmd, res.returncode, res.stderr + res.stdout)
    return common.median_tokens_per_s(run)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (both contenders)")
    p.add_argument("--fsdp", action="store_true", help="also AdamW rows: 1 process, 2 DDP and 2 FSDP ranks")
    args = p.parse_args()
    options = [*common.flags(**common.NANOGPT_SHAPE, batch_size=args.batch_size, max_iters=args.iters,
                             log_interval=5, eval_interval=10**6, eval_iters=1, dtype="float32", dropout=0.0,
                             plots=False, seed=1), *common.QUIET]
    t = args.threads
    contenders: list[Contender] = [(1, t, "ddp"), (2, t, "ddp"), (1, 2 * t, "ddp")]
    if args.fsdp:
        contenders += [(1, t, "adamw"), (2, t, "adamw"), (2, t, "fsdp")]
    extra = {"ddp": [], "adamw": ADAMW, "fsdp": [*ADAMW, "--parallel", "fsdp"]}
    results: dict[Contender, list[float]] = {c: [] for c in contenders}
    with common.scratch() as tmp:
        data = common.prepare_bundled(tmp / "data")
        for r in range(args.rounds):
            for c in contenders:
                nproc, threads, how = c
                t0 = time.perf_counter()
                tps = torchrun_train(nproc, data, tmp / f"run-{nproc}x{threads}-{how}-{r}", threads,
                                     options + extra[how])
                results[c].append(tps)
                print(f"round {r + 1}: {nproc} process(es) x {threads} thread(s), {how}: {tps:,.0f} tok/s "
                      f"({time.perf_counter() - t0:.1f}s with start-up)", file=sys.stderr, flush=True)
    medians = {c: statistics.median(v) for c, v in results.items()}
    shape = ", ".join(f"{k} {v}" for k, v in common.NANOGPT_SHAPE.items())
    print(f"\n{shape}, global batch {args.batch_size}, {args.iters} iters, median of {args.rounds} round(s)\n")
    common.markdown_header("processes", "threads each", "parallel", "optimizer", "rows per process", "tokens/s",
                           f"vs 1 x {t}, same optimizer")
    for (nproc, threads, how), tps in medians.items():
        base = medians[(1, t, "ddp" if how == "ddp" else "adamw")]
        parallel = "-" if nproc == 1 else "fsdp" if how == "fsdp" else "ddp"
        optimizer = "recipe's (muon)" if how == "ddp" else "adamw"
        print(f"| {nproc} | {threads} | {parallel} | {optimizer} | {args.batch_size // nproc} | {tps:,.0f} | "
              f"{tps / base:.2f}x |")


if __name__ == "__main__":
    main()
