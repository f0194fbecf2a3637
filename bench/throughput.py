"""Training throughput levers, each on/off, against the nanoGPT baseline: one model, one batch, interleaved.

    python bench/throughput.py                  # nanoGPT's CPU shape (4x4x128, T=64, batch 12), ~2 min
    python bench/throughput.py --rounds 7 --steps 60

Every variant is a real pocketgpt Trainer (its step(): sampler, autocast, clipping, optimizer) on the
bundled Tiny Shakespeare, except the baseline, which is bench/nanogpt_baseline.py's model, optimizer and
get_batch. Variants run A, B, C, ... per round, so drift on a shared machine hits all of them alike;
the table gives the median ms/step over the rounds and the ratio to the baseline's median.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402
import nanogpt_baseline as nb  # noqa: E402

from pocketgpt import model as model_module  # noqa: E402
from pocketgpt.config import build_train_config  # noqa: E402
from pocketgpt.data import BatchSampler, open_tokens  # noqa: E402
from pocketgpt.metrics import MetricsLog  # noqa: E402
from pocketgpt.runtime import resolve  # noqa: E402
from pocketgpt.trainer import Trainer  # noqa: E402

SHAPE = dict(**common.NANOGPT_SHAPE, dropout=0.0, bias=False)


def pocketgpt_step(data_dir: Path, out: Path, batch: int, dtype: str, compile_: bool,
                   adamw: str = "fused", bf16_attention: bool = False) -> Callable[[int], None]:
    cfg = build_train_config("demo", None, {**SHAPE, "optimizer": "adamw", "batch_size": batch, "dtype": dtype,
                                            "compile": compile_, "learning_rate": 1e-3})
    runtime = resolve("cpu", dtype)
    out.mkdir(parents=True)
    trainer = Trainer.create(cfg, data_dir, out, runtime, MetricsLog(out / "metrics.jsonl", echo=lambda s: None))
    # the attention dtype is set, not the probe's choice: these rows compare the two on purpose
    model_module.use_bf16_attention(trainer.model, bf16_attention)
    if compile_:
        trainer.net.use_compiled(True)
        trainer.step(0, 1e-3)  # compiles now; a failure would fall back to eager without a word
        assert trainer.net.compiled, "torch.compile failed: the compile rows would be eager"
    if adamw != "fused":  # AdamW reads both switches at every step; "per-tensor" is a loop over the tensors
        for opt in trainer.optimizers:
            for g in opt.param_groups:
                g["fused"], g["foreach"] = False, adamw == "foreach"
    return lambda it: trainer.step(it, 1e-3)


def baseline_step(batch: int) -> Callable[[int], None]:
    train, _, stoi = nb.load_char_data()  # the bundled corpus
    torch.manual_seed(1337)
    model = nb.GPT(nb.ModelCfg(vocab_size=len(stoi), **SHAPE))
    t = nb.TrainCfg()
    t.batch_size = batch
    opt = nb.make_optimizer(model, t)

    def step(it: int) -> None:
        x, y = nb.get_batch(train, batch, SHAPE["block_size"])
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return step


def batch_assembly_us(tokens: np.ndarray, batch: int, block: int) -> tuple[float, float]:
    """Microseconds per batch: nanoGPT's per-row Python loop vs pocketgpt's one gather."""
    sampler = BatchSampler(tokens, block, batch, 0)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        nb.get_batch(tokens, batch, block)
    loop = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for i in range(n):
        x, y = sampler.batch(i)
        torch.from_numpy(x), torch.from_numpy(y)
    return loop, (time.perf_counter() - t0) / n * 1e6


def timed_steps(step: Callable[[int], None], ctx: Callable[[], contextlib.AbstractContextManager],
                steps: int) -> Callable[[int], None]:
    """A contender for common.interleaved: round -1 is a 20-step warm-up (compiles included), round r
    runs `steps` steps, all inside the variant's context."""
    def run(r: int) -> None:
        first, count = (0, 20) if r < 0 else (100 + r * steps, steps)
        with ctx():
            for i in range(first, first + count):
                step(i)

    return run


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50, help="steps per variant per round")
    ap.add_argument("--batch-size", type=int, default=12)
    args = ap.parse_args()
    with common.scratch() as tmp:
        data = common.prepare_bundled(tmp / "data")
        b = args.batch_size
        # name -> (step function, context it runs in)
        variants: dict[str, tuple[Callable[[int], None], Callable[[], contextlib.AbstractContextManager]]] = {
            "baseline (nanoGPT loop, fp32)": (baseline_step(b), contextlib.nullcontext),
            "pocketgpt fp32": (pocketgpt_step(data, tmp / "a", b, "float32", False), contextlib.nullcontext),
            "pocketgpt fp32, foreach AdamW (not fused)":
                (pocketgpt_step(data, tmp / "b", b, "float32", False, adamw="foreach"), contextlib.nullcontext),
            "pocketgpt fp32, per-tensor AdamW":
                (pocketgpt_step(data, tmp / "b2", b, "float32", False, adamw="per-tensor"), contextlib.nullcontext),
            "pocketgpt fp32, 1 thread": (pocketgpt_step(data, tmp / "c", b, "float32", False), lambda: common.threads(1)),
            "pocketgpt fp32 + compile": (pocketgpt_step(data, tmp / "d", b, "float32", True), contextlib.nullcontext),
            "pocketgpt bf16 autocast, bf16 attention":
                (pocketgpt_step(data, tmp / "e", b, "bfloat16", False, bf16_attention=True), contextlib.nullcontext),
            "pocketgpt bf16 autocast, fp32 attention":
                (pocketgpt_step(data, tmp / "f", b, "bfloat16", False), contextlib.nullcontext),
            "pocketgpt bf16 + compile": (pocketgpt_step(data, tmp / "g", b, "bfloat16", True), contextlib.nullcontext),
        }
        seconds = common.interleaved({name: timed_steps(step, ctx, args.steps)
                                      for name, (step, ctx) in variants.items()}, args.rounds)
        times = {name: [s / args.steps * 1000 for s in ss] for name, ss in seconds.items()}
        tokens = np.array(open_tokens(data / "train.bin")[0])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape {SHAPE}, batch {b}, "
          f"{args.rounds} rounds x {args.steps} steps, interleaved; median ms/step")
    base = statistics.median(times["baseline (nanoGPT loop, fp32)"])
    print(f"{'variant':52s} {'ms/step':>8s} {'tokens/s':>9s} {'vs baseline':>12s}")
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"{name:52s} {ms:8.2f} {b * SHAPE['block_size'] / ms * 1000:9,.0f} {base / ms:11.2f}x")
    loop, gather = batch_assembly_us(tokens, b, SHAPE["block_size"])
    print(f"batch assembly: nanoGPT per-row loop {loop:.0f} us, pocketgpt one gather {gather:.0f} us")


if __name__ == "__main__":
    main()
