"""Causal attention (SDPA forward + backward) in bf16 against fp32 on this CPU, at the presets' shapes:
what the trainer's attention-dtype probe (probe.attention_bf16_speedup) measures, measured afresh.

    python bench/attention_dtype.py [--rounds 3]

Per shape and round: fp32 then bf16, each the best of three timings within ~0.1 s (the probe's own
timing, probe._attention_time); the table has the median rate of each and the median per-round ratio. The trainer runs
attention in bf16 under CPU bf16 autocast only where the ratio is >= runtime.MIN_BF16_ATTENTION_SPEEDUP.
"""

from __future__ import annotations

import argparse
import statistics

import torch

# (name, batch, heads, context, head size); probe.attention_probe_shape caps the batch as the trainer's probe does
SHAPES = [
    ("demo (4x4x128, T 64, batch 24)", 24, 4, 64, 32),
    ("auto 15m (4x6x192, T 128, batch 16)", 16, 6, 128, 32),
    ("cpu-hour (6x4x256, T 256, batch 16)", 16, 4, 256, 64),
    ("shakespeare-char (6x6x384, T 256, batch 64)", 64, 6, 256, 64),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    from pocketgpt import probe
    from pocketgpt.runtime import MIN_BF16_ATTENTION_SPEEDUP

    cpu = torch.device("cpu")
    print(f"{probe.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} rounds")
    print("| shape | probed as | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 | attention runs in |")
    print("|---|---|---|---|---|---|")
    for name, batch, heads, seq, hs in SHAPES:
        shape = probe.attention_probe_shape(batch, heads, seq, hs)
        rates: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
        for _ in range(args.rounds):
            for dt in (torch.float32, torch.bfloat16):
                seconds = probe._attention_time(cpu, dt, shape, 2 * probe.PROBE_SECONDS)  # the probe's own timing
                rates[dt].append(probe.attention_flops(shape) / seconds / 1e9)
        ratio = statistics.median(b / f for f, b in zip(rates[torch.float32], rates[torch.bfloat16]))
        where = "bf16" if ratio >= MIN_BF16_ATTENTION_SPEEDUP else "fp32"
        print(f"| {name} | {'x'.join(map(str, shape))} | {statistics.median(rates[torch.float32]):.1f} | "
              f"{statistics.median(rates[torch.bfloat16]):.1f} | {ratio:.2f}x | {where} |")


if __name__ == "__main__":
    main()
