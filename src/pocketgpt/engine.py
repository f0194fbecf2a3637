"""Generation: prefill + cached decode over a preallocated KV cache; speaks token ids only.

The engine does not call GPT.forward per token. At batch 1 a small model's decode step is about a
hundred tiny ops, so its time is Python and op dispatch, not arithmetic; a big model's step reads
every weight once, so its time is memory bandwidth. `Decoder` below is the same network as
model.py written as flat functions over the model's own tensors (no module calls, no mask for a
single token, in-place cache writes, fused residual matmuls), and for big models on a CPU it can
hold its step matrices in float16 or bfloat16, half the bytes per token, when a probe shows the
logits stay within LOGIT_TOLERANCE of float32. tests/test_engine.py checks it against GPT.forward
for every architecture option.

When the context window is full, the window slides: the cache is rebuilt from the newest
block_size // 2 tokens (one prefill) and decoding continues. Learned absolute positions make a
rolling cache inexact (every cached key would need a new position), so the rebuild keeps exactness;
it costs one prefill per block_size // 2 tokens.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import PocketError
from .model import GPT, KVCache, RMSNorm, rotate
from .runtime import cpu_has_fast_bf16

DECODE_DTYPES = ("auto", "float32", "float16", "bfloat16")

# A low-precision decode must give logits this close (max abs difference) to float32 on a probe input.
LOGIT_TOLERANCE = 1e-2

# Below this many parameters a CPU decode step is a chain of tiny matmuls where waking a second
# thread costs more than it saves (bench/RESULTS.md, "Generation").
SINGLE_THREAD_PARAMS = 5_000_000

# From about this many parameters a decode step is bound by memory bandwidth, so 16-bit step
# matrices (half the bytes) pay; below it the casts only add ops. Measured one-token steps, float32
# vs float16, 1 thread, this 2-core AVX-512 machine (busy): 0.8M 0.30 vs 0.48 ms, 1.8M 0.49 vs 0.59,
# 3.2M 1.0 vs 0.8, 10.7M 5.1 vs 2.2, 29.5M 13.2 vs 5.5, GPT-2-small 48 vs 21 (bench_generate.py).
LOW_PRECISION_MIN_PARAMS = 5_000_000


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    if temperature < 0:
        raise PocketError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k < 0:
        raise PocketError(f"--top-k must be 0 (off) or positive, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise PocketError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise PocketError(f"--max-new-tokens must be zero or positive, got {max_new_tokens}")


def pick_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top-k keeps exactly k tokens."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        # keep the k best by index, so ties at the k-th value cannot let more than k through
        values, indices = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:  # only then is a sort needed
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the best token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return sample(probs, generator)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of probs (B, V), which need not sum to 1 -> ids (B,); zero-mass ids never come.

    Inverse-CDF sampling: the first id whose running mass exceeds a uniform draw. Same distribution
    as torch.multinomial, one random number per row, and 17x faster at a 50k vocabulary (76 us vs
    1.3 ms a token, which was 7% of a GPT-2-small decode step). The running sum is float64 so
    rounding cannot shift any id's probability noticeably.
    """
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    u = torch.rand(probs.size(0), 1, generator=generator, dtype=torch.float64, device=probs.device)
    ids = torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True)
    return ids.squeeze(-1).clamp_(max=probs.size(-1) - 1)  # u * total can round up to total itself


def decode_threads(model: GPT) -> int | None:
    """Threads for generating on a CPU: one for small models or on a two-core machine, else torch's default.

    A small model's step is tiny ops where a second thread costs more than it saves. A big model's
    step reads every weight once: on this 2-core machine one thread already moves as many bytes per
    second as two (measured, float32 and 16-bit alike), and two OpenMP threads fall ~10x behind as
    soon as another process wants a core (GPT-2-small: 18 vs 3 tok/s). With more cores a single
    thread may not saturate memory bandwidth, so torch's default stays.
    """
    if model.num_params() < SINGLE_THREAD_PARAMS or torch.get_num_threads() <= 2:
        return 1
    return None


@contextlib.contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def low_precision_candidates() -> list[torch.dtype]:
    """16-bit dtypes with fast one-row matmuls on this CPU, most precise first.

    float16 (10-bit mantissa) rounds 8x finer than bfloat16 (7 bits); its matrix-vector product is
    fast on AVX-512 (measured: as fast as bf16, half the time of float32) although its many-row
    matmuls are slow (hence float32 prefills). bf16 needs native support (AVX512-BF16 or AMX).
    """
    out = []
    if "AVX512" in torch.backends.cpu.get_cpu_capability():
        out.append(torch.float16)
    if cpu_has_fast_bf16():
        out.append(torch.bfloat16)
    return out


_MATRICES = ("attn_w", "attn_b", "attn_proj_w", "attn_proj_b", "fc_w", "fc_b", "mlp_proj_w", "mlp_proj_b")


@dataclass
class _Layer:
    """One block's tensors, read once from the modules so a decode step makes no module calls."""

    ln_1: tuple[torch.Tensor, torch.Tensor | None]
    ln_2: tuple[torch.Tensor, torch.Tensor | None]
    attn_w: torch.Tensor
    attn_b: torch.Tensor | None
    attn_proj_w: torch.Tensor
    attn_proj_b: torch.Tensor | None
    fc_w: torch.Tensor
    fc_b: torch.Tensor | None
    mlp_proj_w: torch.Tensor
    mlp_proj_b: torch.Tensor | None


def _norm_params(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = getattr(m, "bias", None)
    return m.weight.detach(), None if bias is None else bias.detach()


def _read_layer(block: nn.Module) -> _Layer:
    def t(p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else p.detach()

    a, m = block.attn, block.mlp
    return _Layer(
        ln_1=_norm_params(block.ln_1), ln_2=_norm_params(block.ln_2),
        attn_w=a.c_attn.weight.detach(), attn_b=t(a.c_attn.bias),
        attn_proj_w=a.c_proj.weight.detach(), attn_proj_b=t(a.c_proj.bias),
        fc_w=m.c_fc.weight.detach(), fc_b=t(m.c_fc.bias),
        mlp_proj_w=m.c_proj.weight.detach(), mlp_proj_b=t(m.c_proj.bias),
    )


def _step_layer(layer: _Layer, dtype: torch.dtype) -> _Layer:
    """The layer for one-token steps: matrices (and biases) in dtype, each matrix transposed to
    (in, out), the operand torch.mm takes without a per-call transpose; norms stay as they are."""

    def cast(k: str) -> torch.Tensor | None:
        t = getattr(layer, k)
        if t is None:
            return None
        t = t.to(dtype)  # the same tensor when dtype matches: float32 steps share the model's storage
        return t.t() if k.endswith("_w") else t

    return replace(layer, **{k: cast(k) for k in _MATRICES})


def _mm(x: torch.Tensor, wT: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (B, in) @ wT (in, out) + b; a low-precision matrix rounds x to its dtype and returns float32."""
    if wT.dtype is not x.dtype:
        return _mm(x.to(wT.dtype), wT, b).float()
    return torch.mm(x, wT) if b is None else torch.addmm(b, x, wT)


def _residual(x: torch.Tensor, y: torch.Tensor, wT: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x += y @ wT + b, in place: one addmm instead of a matmul and an add when the dtypes agree."""
    if wT.dtype is not x.dtype:
        return x.add_(_mm(y, wT, b))
    x.addmm_(y, wT)
    return x if b is None else x.add_(b)


class Decoder:
    """GPT's forward pass for generation: the last position's logits, filling a KV cache.

    Two entry points, both checked against GPT.forward by the tests: prefill (T tokens into an
    empty cache, the model's own tensors, nanoGPT-shaped code) and step (one token per sample, the
    hot loop: 2-D tensors, matrices pre-transposed for torch.mm, residual adds fused into addmm,
    no mask, cache writes in place). Steps use the model's tensors too, or, with step_dtype
    float16 / bfloat16, copies of the block matrices and the head in that dtype: a step reads every
    matrix once, so half the bytes is about half the time for models too big for the CPU caches.
    Only the matmuls' inputs and outputs are rounded; the residual stream, norms, attention and the
    KV cache stay float32. Embeddings are only indexed (one row per token), so they stay float32 at
    no bandwidth cost. Prefills stay float32: exact, and float16 matmuls of many rows are slow on CPUs.
    """

    def __init__(self, model: GPT, step_dtype: torch.dtype | None = None):
        cfg = model.config
        tr = model.transformer
        self.cfg = cfg
        self.n_head, self.head_size = cfg.n_head, cfg.n_embd // cfg.n_head
        self.wte = tr.wte.weight.detach()
        self.wpe = tr.wpe.weight.detach() if "wpe" in tr else None
        self.rope = (model.rope_cos, model.rope_sin) if self.wpe is None else None
        self.norm = self._norm_fn(tr.ln_f)
        self.ln_f = _norm_params(tr.ln_f)
        self.layers = [_read_layer(b) for b in tr.h]
        self.head = model.lm_head.weight.detach()
        self.step_dtype = step_dtype or self.wte.dtype
        self.step_layers = [_step_layer(layer, self.step_dtype) for layer in self.layers]
        self.step_headT = self.head.to(self.step_dtype).t()
        self.relu2 = cfg.mlp == "relu2"

    @staticmethod
    def _norm_fn(m: nn.Module) -> Callable[..., torch.Tensor]:
        C = m.weight.shape[0]
        if isinstance(m, RMSNorm):  # the same formula as RMSNorm.forward, as one fused op
            return lambda x, p: F.rms_norm(x, (C,), p[0], eps=m.eps)
        return lambda x, p: F.layer_norm(x, (C,), p[0], p[1], eps=m.eps)

    def new_cache(self, batch_size: int, device: torch.device) -> KVCache:
        return KVCache(self.cfg, batch_size, device, self.wte.dtype)

    def _mlp_act(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(h).square() if self.relu2 else F.gelu(h)

    def prefill(self, idx: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """idx (B, T) into an empty cache -> float32 logits (B, V) of the last position ((B, T, V) with all_logits)."""
        B, T = idx.shape
        if cache.pos != 0 or T > self.cfg.block_size:
            raise ValueError(f"prefill of {T} tokens needs an empty cache (block_size {self.cfg.block_size})")
        x = F.embedding(idx, self.wte)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe[:T]
        rope = None if self.rope is None else (self.rope[0][:T], self.rope[1][:T])
        for i, layer in enumerate(self.layers):
            h = self.norm(x, layer.ln_1)
            qkv = F.linear(h, layer.attn_w, layer.attn_b).view(B, T, 3, self.n_head, self.head_size)
            q, k, v = self._qk_prep(qkv.permute(2, 0, 3, 1, 4), rope)  # (B, nh, T, hs) each
            cache.k[i, :, :, :T] = k
            cache.v[i, :, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + F.linear(y, layer.attn_proj_w, layer.attn_proj_b)
            h = self._mlp_act(F.linear(self.norm(x, layer.ln_2), layer.fc_w, layer.fc_b))
            x = x + F.linear(h, layer.mlp_proj_w, layer.mlp_proj_b)
        cache.pos = T
        if not all_logits:
            x = x[:, -1]
        return F.linear(self.norm(x, self.ln_f), self.head)

    def step(self, tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tok (B,): one new token per sample at position cache.pos -> float32 logits (B, V)."""
        B, pos = tok.size(0), cache.pos
        if pos >= self.cfg.block_size:
            raise ValueError(f"the cache is full ({pos} tokens); slide the window first")
        x = F.embedding(tok, self.wte)  # (B, C), a new tensor: the residual adds below go in place
        if self.wpe is not None:
            x.add_(self.wpe[pos])
        rope = None if self.rope is None else (self.rope[0][pos], self.rope[1][pos])
        for k_cache, v_cache, layer in zip(cache.k, cache.v, self.step_layers):
            qkv = _mm(self.norm(x, layer.ln_1), layer.attn_w, layer.attn_b).view(B, 3, self.n_head, self.head_size)
            q, k, v = self._qk_prep(qkv.transpose(0, 1), rope)  # (B, nh, hs) each
            k_cache.select(2, pos).copy_(k)  # into the preallocated (B, nh, block_size, hs) cache
            v_cache.select(2, pos).copy_(v)
            # one query sees every cached key: no mask
            keys, values = k_cache.narrow(2, 0, pos + 1), v_cache.narrow(2, 0, pos + 1)
            y = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values)
            x = _residual(x, y.reshape(B, -1), layer.attn_proj_w, layer.attn_proj_b)  # (B, nh, 1, hs) -> (B, C)
            h = self._mlp_act(_mm(self.norm(x, layer.ln_2), layer.fc_w, layer.fc_b))
            x = _residual(x, h, layer.mlp_proj_w, layer.mlp_proj_b)
        cache.pos = pos + 1
        return _mm(self.norm(x, self.ln_f), self.step_headT, None)

    def _qk_prep(
        self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv (3, ...) -> q, k, v with QK-norm and rotary positions applied to q and k together."""
        qk, v = qkv[:2], qkv[2]
        if self.cfg.qk_norm:
            qk = F.rms_norm(qk, (self.head_size,))
        if rope is not None:
            qk = rotate(qk, *rope)
        return qk[0], qk[1], v


class Engine:
    """Samples from a GPT with a KV cache. One Engine per model; not thread-safe.

    decode_dtype is the dtype of the matrices in one-token decode steps (prefills are float32):
    "float32"; "float16" or "bfloat16" (asked for: used without a check); or "auto", which tries a
    low precision only on a CPU, for a model of at least LOW_PRECISION_MIN_PARAMS parameters
    (there a step is bound by memory bandwidth, not overhead), float16 where the CPU has fast
    float16 matrix-vector kernels (AVX-512), then bfloat16 where it has native bf16 (AVX512-BF16 /
    AMX), and keeps the first whose logits on a probe stay within LOGIT_TOLERANCE of float32; float32
    otherwise. The choice is made at the first generation (the probe costs a few decode steps) and
    made again if the model's weights have changed since. Same seed, same choice, same output.
    """

    def __init__(self, model: GPT, device: torch.device | None = None, decode_dtype: str = "auto"):
        if decode_dtype not in DECODE_DTYPES:
            raise PocketError(f"decode_dtype must be one of {', '.join(DECODE_DTYPES)}, got '{decode_dtype}'")
        self.model = model.eval()
        self.cfg = model.config
        self.device = device or next(model.parameters()).device
        self.decode_dtype = decode_dtype
        self.threads = decode_threads(model) if self.device.type == "cpu" else None
        self._decoder: Decoder | None = None
        self._versions: list[int] = []
        self.logit_diffs: dict[str, float] = {}  # auto's probe: max |logit - float32 logit| per dtype tried

    @property
    def step_dtype(self) -> torch.dtype:
        """The dtype of the decode steps' matrices (decided at the first generation)."""
        return self.decoder().step_dtype

    def decoder(self) -> Decoder:
        versions = [p._version for p in self.model.parameters()]  # bumped by every in-place update
        if self._decoder is None or versions != self._versions:
            with _cpu_threads(self.threads), torch.inference_mode():
                self._decoder = self._build_decoder()
            self._versions = versions
        return self._decoder

    def _build_decoder(self) -> Decoder:
        if self.decode_dtype != "auto":
            return Decoder(self.model, getattr(torch, self.decode_dtype))
        big = self.model.num_params() >= LOW_PRECISION_MIN_PARAMS
        if not (self.device.type == "cpu" and big and self.model_dtype() == torch.float32):
            return Decoder(self.model)
        self.logit_diffs = {}
        for dtype in low_precision_candidates():
            dec = Decoder(self.model, dtype)
            diff = probe_logit_diff(dec, self.device)
            self.logit_diffs[str(dtype).removeprefix("torch.")] = diff
            if diff <= LOGIT_TOLERANCE:  # NaN (an overflow) fails too
                return dec
        return Decoder(self.model)

    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def stream(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        num_samples: int = 1,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every sample, (num_samples,) on CPU, max_new_tokens times."""
        with _cpu_threads(self.threads), torch.inference_mode():
            yield from self._stream(prompt_ids, max_new_tokens, num_samples, temperature, top_k, top_p, seed)

    def _stream(
        self, prompt_ids: list[int], max_new_tokens: int, num_samples: int, temperature: float, top_k: int,
        top_p: float, seed: int | None,
    ) -> Iterator[torch.Tensor]:
        check_sampling(temperature, top_k, top_p, max_new_tokens)
        T = self.cfg.block_size
        if not prompt_ids:
            raise PocketError("the prompt is empty; give at least one character or token")
        if len(prompt_ids) > T:
            raise PocketError(
                f"the prompt is {len(prompt_ids)} tokens but the model's context is {T}; "
                f"shorten it to at most {T} tokens"
            )
        dec = self.decoder()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed) if seed is not None else gen.seed()
        cache = dec.new_cache(num_samples, self.device)
        prompt = torch.tensor(prompt_ids, dtype=torch.long, device=self.device).expand(num_samples, -1)
        logits = dec.prefill(prompt, cache)
        window = list(prompt.unbind(1))  # the tokens in the context, as (B,) columns: no torch.cat per step
        keep = max(1, T // 2)
        for i in range(max_new_tokens):
            nxt = pick_next(logits, temperature, top_k, top_p, gen)
            yield nxt.cpu()
            if i == max_new_tokens - 1:
                break
            window.append(nxt)
            if cache.pos < T:
                logits = dec.step(nxt, cache)
            else:  # the window is full: slide it and rebuild the cache in one prefill
                window = window[-keep:]
                cache.reset()
                logits = dec.prefill(torch.stack(window, dim=1), cache)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, on_step: Callable[[], None] | None = None,
                 **kwargs: Any) -> list[list[int]]:
        """All samples at once: num_samples lists of new token ids; on_step() after each token (progress)."""
        steps = []
        for step in self.stream(prompt_ids, max_new_tokens, **kwargs):
            steps.append(step)
            if on_step is not None:
                on_step()
        if not steps:
            return [[] for _ in range(kwargs.get("num_samples", 1))]
        return torch.stack(steps, dim=1).tolist()


def probe_logit_diff(dec: Decoder, device: torch.device, prefill: int = 8, steps: int = 16) -> float:
    """Max |logit difference| of dec's decode steps from a float32 forward, on a fixed pseudo-random input.

    Prefills are float32 in both, so only the steps (and the keys / values they cache) can differ.
    Uses its own generator: checking must not move the global RNG (training resumes exactly).
    """
    n = min(prefill + steps, dec.cfg.block_size)
    prefill = min(prefill, n - 1) if n > 1 else 1
    gen = torch.Generator().manual_seed(1234)
    idx = torch.randint(0, dec.cfg.vocab_size, (1, n), generator=gen).to(device)
    with torch.inference_mode():
        reference = dec.prefill(idx, dec.new_cache(1, device), all_logits=True)[0, prefill:]
        cache = dec.new_cache(1, device)
        dec.prefill(idx[:, :prefill], cache)
        stepped = torch.cat([dec.step(idx[:, t], cache) for t in range(prefill, n)])
    diff = float((stepped[: len(reference)] - reference[: len(stepped)]).abs().max()) if len(reference) else 0.0
    return diff if math.isfinite(diff) else math.inf
