"""Sizing without torch: memory estimates, GPU peaks and `--preset auto` (parameter and FLOP counts
are the config's own: ModelConfig.param_count / flops_per_token).

`plan_auto` picks a model and a schedule for a corpus, a time budget and a memory cap. The rule:

1. Throughput: training FLOP/s = a short matmul probe on this machine (measured by the caller) times
   a per-device efficiency (the share of that matmul speed a small GPT's training step reaches;
   on the 2-core CPU of bench/RESULTS.md the demo recipe with Muon runs ~12k tokens/s ≈ 62 GFLOP/s
   against ~150 GFLOP/s for the probe, hence 0.4; CPUs that train in bf16 autocast get a further
   CPU_BF16_SPEEDUP). Tokens processed in the budget follow from the FLOPs per token of each shape.
2. Size: walk a ladder of shapes from small to large and keep the largest one that
   - sees at least TOKENS_PER_PARAM (2.5) training tokens per parameter in the budget. Chinchilla's
     ~20 is for compute-optimal large runs on fresh data; the hand presets that win on a CPU see 2.5-5
     (cpu-hour ~3, cpu-15min's model in 10 minutes 2.6, which beat auto's earlier 5-per-parameter
     choice, 0.82M at ~12, by 0.023 in full val loss: bench/RESULTS.md);
   - has at most MAX_PARAMS_PER_CORPUS_TOKEN (4) parameters per train token, so a small corpus
     gets a small model instead of one that can learn it by heart (nanoGPT's 10M-parameter model on
     Tiny Shakespeare's 1M tokens needs dropout 0.2 to hold);
   - fits the memory cap by `estimate_memory_mb` at the chosen batch.
3. Dropout 0.1 outside attention (on the residual and MLP outputs; in attention it costs ~25 % of a CPU
   step) once the budget reads the corpus more than DROPOUT_PASSES (4) times: repeated data is worth
   about as much as fresh data up to ~4 passes (Muennighoff et al. 2023), past that a model learns the
   text by heart (cpu-15min without dropout: train 1.06 against val 1.54 at ~10 passes).
4. Recipe: what bench/ablation.py measured best on a CPU: Muon on the block matrices, RoPE, RMSNorm,
   QK-norm, an untied head, zero-initialised projections and a WSD schedule whose decay ends with the
   budget; and SwiGLU at 8/3 of the width where ablation.py measured ReLU² (bench/mlp_export.py: as
   good or better at equal wall time, and Qwen3's MLP, so an auto run exports). Batch: ~2k tokens per step (bench: batch 24-48 at context 64), fewer when the
   budget would otherwise give under MIN_ITERS steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .config import ModelConfig
from .errors import PocketError

TOKENS_PER_PARAM = 2.5
DROPOUT_PASSES = 4
MAX_PARAMS_PER_CORPUS_TOKEN = 4
MIN_ITERS = 300
TOKENS_PER_STEP = 2048
DEFAULT_SECONDS = 600.0
# Share of the probe's matmul FLOP/s that a small GPT's training step reaches (see the docstring);
# GPUs run small models far from their peak, so they get a lower share.
EFFICIENCY = {"cpu": 0.4, "mps": 0.25, "cuda": 0.25}
# bf16 autocast on an AVX512-BF16 CPU against float32, whole training steps of the demo recipe
# (bench/RESULTS.md, compare.py: 40.1k vs 23.5k tokens/s); the fp32 probe does not see it.
CPU_BF16_SPEEDUP = 1.7


def training_flops(probe_flops: float, device_type: str, bf16: bool) -> float:
    """FLOP/s a small GPT's training step reaches, from the matmul probe (float32 on CPUs)."""
    flops = probe_flops * EFFICIENCY.get(device_type, 0.25)
    return flops * CPU_BF16_SPEEDUP if device_type == "cpu" and bf16 else flops

# (n_layer, n_embd, block_size), small to large; heads are 32 wide up to 256, then 64.
LADDER: tuple[tuple[int, int, int], ...] = (
    (2, 64, 64), (3, 96, 64), (4, 128, 64), (4, 128, 128), (4, 192, 128), (6, 192, 128),
    (6, 256, 128), (6, 256, 256), (8, 384, 256), (8, 512, 256), (12, 512, 512), (12, 768, 512),
    (12, 768, 1024), (24, 1024, 1024),
)

# Dense peak FLOP/s from the vendors' data sheets: (name substring, 16-bit tensor, float32).
# Checked in order, so "H200" comes before "H100" and "A100" before "A10".
GPU_PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989e12, 67e12), ("H100 PCIe", 756e12, 51e12), ("H100", 989e12, 67e12),
    ("A100", 312e12, 19.5e12), ("L40S", 362e12, 91.6e12), ("L4", 121e12, 30.3e12),
    ("A10G", 70e12, 31.2e12), ("A10", 125e12, 31.2e12), ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12), ("V100", 125e12, 15.7e12), ("T4", 65e12, 8.1e12),
)


def gpu_peak_flops(device_name: str, half_precision: bool) -> float | None:
    """The GPU's dense peak FLOP/s for bf16/fp16 (half_precision) or float32; None when unknown."""
    for key, half, single in GPU_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return half if half_precision else single
    return None


# A training step's loss holds at most about this many bytes of float32 logits at once (model.sliced_loss)
LOSS_SLICE_BYTES = 64 * 2**20


def loss_slice_rows(tokens: int, vocab_size: int) -> int:
    """Positions per slice of a training step's loss: all of them while their logits fit twice in
    LOSS_SLICE_BYTES (a char model's always do), else as many as fit once."""
    if tokens * vocab_size * 4 <= 2 * LOSS_SLICE_BYTES:
        return tokens
    return max(1, LOSS_SLICE_BYTES // (vocab_size * 4))


def estimate_memory_mb(cfg: Any, n_params: int, bytes_per_act: int = 4) -> tuple[float, float]:
    """(weights + grads + AdamW state, activations of one micro-batch) in MB, a rough guide.

    Activations per layer follow the usual transformer estimate of about 34*C + 5*nh*T values per
    token (Korthikanti et al. 2022, counted in 2-byte units; scaled here by bytes_per_act / 2).
    """
    m, r = cfg.model, cfg.run
    state = n_params * 4 * 4  # fp32 weights, grads, two Adam moments
    tokens = r.batch_size * m.block_size
    acts = m.n_layer * tokens * (34 * m.n_embd + 5 * m.n_head * m.block_size) * bytes_per_act / 2
    acts += loss_slice_rows(tokens, m.vocab_size) * m.vocab_size * 4 * 3  # logits, log-softmax, gradient (fp32)
    return state / 2**20, acts / 2**20


def parse_memory(text: str) -> float:
    """'4GB', '512MB', '1.5G', '800' (MB) -> megabytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gb|g|gib|mb|m|mib)?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise PocketError(f"--max-memory: cannot read '{text}' as a size; use e.g. 4GB or 512MB")
    return float(m.group(1)) * (1024 if (m.group(2) or "mb").startswith("g") else 1)


def seconds_per_iter(tokens_per_iter: int, flops_token: float, flops_per_s: float) -> float:
    return tokens_per_iter * flops_token / max(flops_per_s, 1.0)


@dataclass
class AutoPlan:
    """What `--preset auto` chose: flat config keys, and the numbers behind the choice."""

    keys: dict[str, Any]
    params: int
    tokens_expected: float
    memory_mb: float
    reasons: list[str] = field(default_factory=list)


def _shape(n_layer: int, n_embd: int, block: int, vocab: int, batch: int) -> Any:
    """A stand-in config for estimate_memory_mb (it reads .model and .run only)."""
    from types import SimpleNamespace

    model = SimpleNamespace(n_layer=n_layer, n_embd=n_embd, n_head=_heads(n_embd), block_size=block, vocab_size=vocab)
    return SimpleNamespace(model=model, run=SimpleNamespace(batch_size=batch))


def _heads(n_embd: int) -> int:
    return max(1, n_embd // (32 if n_embd <= 256 else 64))


def _batch(block: int, tokens_budget: float) -> int:
    """~TOKENS_PER_STEP per step, but small enough that the budget gives MIN_ITERS steps."""
    per_step = min(TOKENS_PER_STEP, max(block, tokens_budget / MIN_ITERS))
    return max(1, int(per_step // block))


def plan_auto(train_tokens: int, val_tokens: int, vocab_size: int, seconds: float, memory_mb: float,
              flops_per_s: float) -> AutoPlan:
    """Choose shape, batch, lr and schedule (see the module docstring for the rule)."""
    if seconds <= 0 or memory_mb <= 0 or flops_per_s <= 0:
        raise PocketError("--preset auto needs a positive --max-time and --max-memory")
    max_block = 1 << int(math.log2(max(2, min(train_tokens, val_tokens) - 1)))
    best = None
    for n_layer, n_embd, block in LADDER:
        block = min(block, max_block)
        m = auto_model(n_layer, n_embd, block, vocab_size)
        n = m.param_count()
        tokens = seconds * flops_per_s / m.flops_per_token()
        batch = _batch(block, tokens)
        state, acts = estimate_memory_mb(_shape(n_layer, n_embd, block, vocab_size, batch), n)
        while state + acts > memory_mb and batch > 1:  # a smaller batch before a smaller model
            batch //= 2
            state, acts = estimate_memory_mb(_shape(n_layer, n_embd, block, vocab_size, batch), n)
        fits = state + acts <= memory_mb
        if best is None and not fits:
            raise PocketError(f"--max-memory {memory_mb:,.0f} MB is below the smallest model's "
                              f"~{state + acts:,.0f} MB; allow more memory")
        if best is not None and (tokens < TOKENS_PER_PARAM * n or n > MAX_PARAMS_PER_CORPUS_TOKEN * train_tokens
                                 or not fits):
            break
        best = (n_layer, n_embd, block, batch, n, tokens, state + acts)
    assert best is not None
    return _recipe(*best, train_tokens=train_tokens, seconds=seconds, memory_cap=memory_mb)


def swiglu_width(n_embd: int) -> int:
    """A SwiGLU hidden width with the parameters of a 4x ungated MLP: 8/3 of the width (Llama's rule),
    to the nearest multiple of 32 (a whole number of SIMD lanes and cache lines)."""
    return max(32, 32 * round(8 * n_embd / 3 / 32))


def auto_model(n_layer: int, n_embd: int, block: int, vocab_size: int) -> ModelConfig:
    """The model --preset auto trains at one rung of the ladder (what bench/ablation.py measured best,
    with SwiGLU for the ReLU² it measured: Llama's and Qwen3's shape, so the run exports)."""
    return ModelConfig(vocab_size=vocab_size, block_size=block, n_layer=n_layer, n_head=_heads(n_embd),
                       n_embd=n_embd, bias=False, pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu",
                       mlp_width=swiglu_width(n_embd), tie_embeddings=False, zero_init_proj=True)


def _recipe(n_layer: int, n_embd: int, block: int, batch: int, n: int, tokens: float, mem: float, *,
            train_tokens: int, seconds: float, memory_cap: float) -> AutoPlan:
    iters = tokens / (batch * block)
    epochs = tokens / max(train_tokens, 1)
    m = auto_model(n_layer, n_embd, block, 0)
    keys: dict[str, Any] = {
        "n_layer": n_layer, "n_embd": n_embd, "n_head": m.n_head, "block_size": block,
        "dropout": 0.1 if epochs > DROPOUT_PASSES else 0.0, "attention_dropout": False, "bias": m.bias,
        "pos_emb": m.pos_emb, "norm": m.norm, "qk_norm": m.qk_norm, "mlp": m.mlp, "mlp_width": m.mlp_width, "tie_embeddings": m.tie_embeddings,
        "zero_init_proj": m.zero_init_proj, "optimizer": "muon", "muon_lr": 0.02,
        # AdamW (embeddings, head) at the lr measured best at width 128, lower for wider models
        "learning_rate": 6e-3 * min(1.0, 128 / n_embd), "min_lr": 0.0, "schedule": "wsd",
        "decay_fraction": 0.4, "warmup_iters": int(min(100, max(10, iters * 0.05))),
        "batch_size": batch, "max_time": seconds, "max_iters": 1_000_000,
        "eval_interval": int(max(50, iters // 10)), "eval_iters": 20,
    }
    reasons = [
        f"auto: ~{tokens / 1e6:,.1f}M tokens expected in {seconds:.0f}s ({epochs:,.1f} passes over "
        f"{train_tokens:,} train tokens) -> {n:,} parameters ({n_layer} layers, width {n_embd}, context {block}), "
        f"batch {batch}, ~{mem:,.0f} MB of {memory_cap:,.0f} MB",
        f"auto: rule: the largest shape with >= {TOKENS_PER_PARAM} tokens per parameter in the budget, <= "
        f"{MAX_PARAMS_PER_CORPUS_TOKEN} parameters per train token, within memory; dropout 0.1 past "
        f"{DROPOUT_PASSES} passes; Muon + rope/rmsnorm/swiglu, WSD",
    ]
    return AutoPlan(keys, n, tokens, mem, reasons)
