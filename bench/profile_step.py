"""Where a training step's time goes, per op class, at the demo and cpu-hour shapes (torch profiler).

    python bench/profile_step.py                      # both presets, their own dtype (auto), ~1 min
    python bench/profile_step.py --presets demo --steps 20 --dtype float32

Each preset builds a real pocketgpt Trainer (its step(): sampler, autocast, clipping, optimizer) on the
bundled Tiny Shakespeare (char tokenizer) and times steps without the profiler first (the step's
wall time), then profiles as many steps again. Every op's *self* CPU time goes to one class by its
name; ops run inside an optimizer's step() are the optimizer's whatever they are (Muon's
Newton-Schulz matmuls included). "host / not in ops" is the unprofiled step time minus the ops'
self time: Python, the dispatcher between ops, the sampler, waiting.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

from pocketgpt.config import build_train_config  # noqa: E402
from pocketgpt.metrics import MetricsLog  # noqa: E402
from pocketgpt.runtime import resolve  # noqa: E402
from pocketgpt.trainer import Trainer  # noqa: E402

# first match wins; names are aten ops (forward and their backward kernels alike)
CLASSES: list[tuple[str, tuple[str, ...]]] = [
    ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention", "softmax")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("norm", ("layer_norm", "rms_norm", "aten::norm", "linalg_vector_norm")),
    ("activation", ("gelu", "relu", "silu", "tanh")),
    ("dropout", ("dropout", "bernoulli")),
    ("cross-entropy", ("cross_entropy", "nll_loss", "log_softmax")),
    ("casts and copies", ("aten::to", "_to_copy", "aten::copy_", "aten::clone", "contiguous")),
    ("embedding", ("embedding",)),
]


def classify(name: str, in_optimizer: bool) -> str:
    if in_optimizer:
        return "optimizer"
    for label, keys in CLASSES:
        if any(k in name for k in keys):
            return label
    return "other ops (elementwise, views, reductions)"


def _in_optimizer(event: "torch.autograd.profiler_util.FunctionEvent") -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return True
        parent = parent.cpu_parent
    return False


def trainer_for(preset: str, dtype: str, out: Path) -> Trainer:
    data_dir = out.parent / "data"
    if not data_dir.exists():
        common.prepare_bundled(data_dir)
    cfg = build_train_config(preset, None, {"dtype": dtype, "max_time": 0})
    runtime = resolve("cpu", dtype)
    out.mkdir(parents=True)
    return Trainer.create(cfg, data_dir, out, runtime, MetricsLog(out / "metrics.jsonl", echo=lambda s: None))


def profile(preset: str, dtype: str, steps: int, root: Path) -> tuple[dict[str, float], float, str]:
    """(ms per step by class, unprofiled ms per step, the runtime said)."""
    trainer = trainer_for(preset, dtype, root / preset)
    lr = trainer.cfg.optim.learning_rate
    for it in range(3):  # warm-up: allocator, kernel choice, optimizer state
        trainer.step(it, lr)
    times = []
    for it in range(3, 3 + steps):
        start = time.perf_counter()
        trainer.step(it, lr)
        times.append(time.perf_counter() - start)
    wall_ms = 1000 * statistics.median(times)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for it in range(3 + steps, 3 + 2 * steps):
            trainer.step(it, lr)
    by_class: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.name.startswith(("Optimizer.", "autograd::", "ProfilerStep")):
            continue  # ranges, not ops: their ops are counted themselves
        by_class[classify(ev.name, _in_optimizer(ev))] += ev.self_cpu_time_total / 1000 / steps
    ops_ms = sum(by_class.values())
    by_class["host / not in ops"] = max(wall_ms - ops_ms, 0.0)
    return dict(by_class), wall_ms, trainer.runtime.describe()


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--presets", nargs="+", default=["demo", "cpu-hour"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    from pocketgpt.probe import cpu_name

    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            by_class, wall_ms, rt = profile(preset, args.dtype, args.steps, Path(tmp))
            print(f"\n{preset}: {wall_ms:.1f} ms/step unprofiled (median of {args.steps}), {rt}\n")
            rows = sorted(by_class.items(), key=lambda kv: -kv[1])
            total = sum(by_class.values())
            common.markdown_header("op class", "ms/step", "share")
            for k, v in rows:
                print(f"| {k} | {v:.1f} | {100 * v / total:.0f}% |")


if __name__ == "__main__":
    main()
