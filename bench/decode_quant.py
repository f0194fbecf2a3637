"""Can 8-bit weights make a GPT-2-small decode step faster and still keep the engine's logit bound?

    python bench/decode_quant.py [--rounds 5] [--threads 1] [--rows 1,2,4,64]

A one-token decode step of GPT-2 small reads every matrix once, so it is bound by memory bandwidth:
fewer bytes per weight should mean a faster step. This times, at GPT-2 small's shapes (12 blocks of
768x2304, 768x768, 768x3072, 3072x768, and the 768x50257 head), one row through every matrix in each
weight format the CPU build offers, and measures how far the head's logits move from float32 on the
same input, against decoder.LOGIT_TOLERANCE (the bound a decode dtype must keep to be used). With
--rows, the same matmuls are timed for several rows at once (a batch of samples, or a server's
streams), where some 16-bit kernels stop being fast:

- float32, float16, bfloat16: torch.mm on pre-transposed weights (what decoder.Decoder does);
- int8 weights, int8 activations: fbgemm's dynamic quantized linear (per-channel weight scales,
  activations quantized per call, 8 bits);
- int8 weights only: torch's _weight_int8pack_mm (per-channel scales, bfloat16 activations);
- int8 rounding alone: the int8 weights dequantized and multiplied in float32 (the error int8
  weights bring whatever the kernel; its time is not a candidate's).

Weights are drawn as GPT's init draws them (normal, std 0.02), the input row with unit variance (a
normed hidden state). Random weights have no outlier channels, so a trained model's int8 error is
this one's or worse. Rounds interleave the formats; the table shows medians over rounds.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from pocketgpt.decoder import LOGIT_TOLERANCE

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

BLOCK = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]  # (out, in) of a block's four matrices
HEAD = (common.GPT2_VOCAB, 768)
Matmul = Callable[[torch.Tensor], torch.Tensor]  # (rows, in) float32 -> (rows, out) float32


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q (out, in) int8, scales (out,) float32)."""
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.round(w / scales[:, None]).to(torch.int8), scales


def formats(w: torch.Tensor) -> dict[str, Matmul]:
    """Every candidate's matmul for one (out, in) weight, prepared once as a decoder would."""
    wT = w.t().contiguous()
    fp16, bf16 = w.half().t(), w.bfloat16().t()
    q, scales = int8_per_channel(w)
    scales16 = scales.bfloat16()
    dequantT = (q.float() * scales[:, None]).t().contiguous()
    with warnings.catch_warnings():  # torch's quantized tensors are deprecated; this only measures them
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w, scales.double(), torch.zeros(w.size(0), dtype=torch.long), 0,
                                        torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    return {
        "float32": lambda x: torch.mm(x, wT),
        "float16": lambda x: torch.mm(x.half(), fp16).float(),
        "bfloat16": lambda x: torch.mm(x.bfloat16(), bf16).float(),
        "int8 weights + int8 activations (fbgemm)": lambda x: torch.ops.quantized.linear_dynamic(x, packed, False),
        # its fast path takes bfloat16 activations and scales (float32 ones ran ~8x slower here)
        "int8 weights only (_weight_int8pack_mm)": lambda x: torch._weight_int8pack_mm(x.bfloat16(), q,
                                                                                       scales16).float(),
        "int8 rounding alone (float32 math)": lambda x: torch.mm(x, dequantT),
    }


def median_ms(fn: Callable[[], object], calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the generation bench's 1)")
    ap.add_argument("--rows", default="1", help="comma-separated row counts to time, e.g. 1,2,4,64")
    args = ap.parse_args()
    row_counts = [int(r) for r in args.rows.split(",")]
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    gen = torch.Generator().manual_seed(0)
    blocks = [formats(torch.randn(*shape, generator=gen) * 0.02) for _ in range(12) for shape in BLOCK]
    head_w = torch.randn(*HEAD, generator=gen) * 0.02
    head = formats(head_w)
    x = torch.randn(1, 768, generator=gen)
    ref = x @ head_w.t()
    names = list(head)
    print(f"GPT-2-small decode matmuls, {args.threads} thread(s), {args.rounds} rounds, medians; logit bound "
          f"{LOGIT_TOLERANCE:g}; CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print("| weights | rows | 48 block matmuls ms | head ms | total vs float32 | head logits max abs diff | "
          "within bound |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for count in row_counts:
        inputs = {n: torch.randn(count, n, generator=gen) for n in (768, 3072)}
        chains = {n: [(f[n], inputs[BLOCK[i % 4][1]]) for i, f in enumerate(blocks)] for n in names}
        block_ms: dict[str, list[float]] = {n: [] for n in names}
        head_ms: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.rounds):
            for n in names:
                block_ms[n].append(median_ms(lambda: [mm(r) for mm, r in chains[n]], 10))
                head_ms[n].append(median_ms(lambda: head[n](inputs[768]), 30))
        fp32 = statistics.median(block_ms["float32"]) + statistics.median(head_ms["float32"])
        for n in names:
            b, h = statistics.median(block_ms[n]), statistics.median(head_ms[n])
            diff = (head[n](x) - ref).abs().max().item()
            print(f"| {n} | {count} | {b:.2f} | {h:.2f} | {fp32 / (b + h):.2f}x | {diff:.2e} | "
                  f"{'yes' if diff <= LOGIT_TOLERANCE else 'no'} |")


if __name__ == "__main__":
    main()
