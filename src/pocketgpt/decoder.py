"""The network for generation: GPT's forward pass over a KV cache, fast at one token a step.

The engine does not call GPT.forward per token. At batch 1 a small model's decode step is about a
hundred tiny ops, so its time is Python and op dispatch, not arithmetic; a big model's step reads
every weight once, so its time is memory bandwidth. `Decoder` runs the same network as model.py
as flat code over the model's own tensors (no module calls, no mask for a single token, in-place
cache writes, fused residual matmuls), and for big models on a CPU it can hold its step matrices
in float16 or bfloat16, half the bytes per token, when a probe shows the logits stay within
LOGIT_TOLERANCE of float32 (`build_decoder`). tests/test_engine.py checks it against GPT.forward
for every architecture option.

The model's math is not written twice: the Decoder takes everything from GPT.decode_view(), its
one door into the model: the tensors by role (per layer a model.LayerTensors) and the model's own
norm, activation and q/k/v split (heads, QK-norm, rotary positions). This file names no module
attribute or parameter of the model, and no architecture: the widths come from the config's derived
values, and grouped-query attention is a layout (each key/value head read by a group of query heads).

A block's wiring (norm, q/k/v, attention, projection, residual, norm, MLP, residual) is written once,
in `Decoder.blocks`, for the prefill, the one-token step and the many-rows step alike; each brings
its own attention (what its cache layout needs) and its matmuls (the model's tensors, or the step
matrices). That costs one Python call per layer more than three hand-written loops did, within
the noise of a decode step at both ends of the size range (bench/RESULTS.md, "One block wiring").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .model import GPT, DecodeView, KVCache, LayersOnRead, LayerTensors, QKGains, repeat_kv
from .runtime import cpu_has_fast_bf16

DECODE_DTYPES = ("auto", "float32", "float16", "bfloat16")

# A low-precision decode must give logits this close (max abs difference) to float32 on a probe input.
LOGIT_TOLERANCE = 1e-2

# From about this many parameters a decode step is bound by memory bandwidth, so 16-bit step
# matrices (half the bytes) pay; below it the casts only add ops. Measured one-token steps, float32
# vs float16, 1 thread, this 2-core AVX-512 machine (busy): 0.8M 0.30 vs 0.48 ms, 1.8M 0.49 vs 0.59,
# 3.2M 1.0 vs 0.8, 10.7M 5.1 vs 2.2, 29.5M 13.2 vs 5.5, GPT-2-small 48 vs 21 (bench_generate.py).
LOW_PRECISION_MIN_PARAMS = 5_000_000
# From this many rows float16 step matmuls are no faster than float32 on CPUs, so a generation of
# this many samples, or a batch shared by many generations, takes the many-rows decoder (bfloat16 or
# float32). GPT-2-small's decode matmuls against float32, bench/decode_quant.py, 1 thread, AMD Zen 4:
# float16 1.86x at 1 row, 2.14x at 2, 1.19x at 4, 1.03x at 6, 0.73x at 8, 0.31x at 64; bfloat16
# 0.85x, 1.67x, 2.08x, 2.18x, 2.01x, 2.53x (where it passes the logit probe).
MANY_ROWS = 6

# attention inside a block: (fused q/k/v output, this layer's cached keys, its cached values, its QK-norm
# gains or None: what split_qkv takes) -> the heads' outputs side by side, ready for the projection
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "QKGains | None"], torch.Tensor]
MatMul = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Residual = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


# float16 steps for many rows where their matmuls measured at least this much faster than float32 (their
# one-row products are fast wherever AVX-512 is; many rows need AVX512-FP16's arithmetic)
MIN_FLOAT16_ROWS_SPEEDUP = 1.1


def float16_rows_fast() -> bool:
    """float16 matmuls of a few rows are measured (probe.py, once per machine) clearly faster than float32."""
    from .probe import float16_rows_speedup

    return float16_rows_speedup(torch.device("cpu")) >= MIN_FLOAT16_ROWS_SPEEDUP


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


def _step_layer(layer: LayerTensors, dtype: torch.dtype) -> LayerTensors:
    """The layer for one-token steps: matrices (and biases) in dtype, each matrix transposed to
    (in, out), the operand torch.mm takes without a per-call transpose; norms stay as they are.
    (The same record type as the model's, holding the transposes: a step-only copy.)"""

    def cast(k: str) -> torch.Tensor | None:
        t = getattr(layer, k)
        if t is None:
            return None
        t = t.to(dtype)  # the same tensor when dtype matches: float32 steps share the model's storage
        return t.t() if k.endswith("_w") else t

    return replace(layer, **{k: cast(k) for k in _MATRICES})


def _each(layers: Sequence[LayerTensors], fn: Callable[[LayerTensors], LayerTensors]) -> Sequence[LayerTensors]:
    """fn over every layer: now for a list, as each layer is made for LayersOnRead (never all held)."""
    return layers.map(fn) if isinstance(layers, LayersOnRead) else [fn(layer) for layer in layers]


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


def _add_linear(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x + y @ w.T + b, a new tensor: the prefill's residual over the model's own (out, in) matrices."""
    return x + F.linear(y, w, b)


def _runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """Row indices -> runs of adjacent ones: (index of its first in rows, its first row, its length)."""
    runs: list[tuple[int, int, int]] = []
    for i, r in enumerate(rows):
        if runs and runs[-1][1] + runs[-1][2] == r:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, r, 1))
    return runs


@dataclass(frozen=True)
class _RowSteps:
    """What every layer of a many-rows step shares: one new token per row, each at its own position."""

    count: int  # rows stepping
    keys_len: int  # keys every row's attention reads (the longest row's)
    rope: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor  # (count * nkv, 1, keys_len): -inf on the slots past each row's position
    runs: list[tuple[int, int, int]]  # runs of adjacent rows (_runs)
    at: torch.Tensor  # where each row's new key goes in a layer's cache seen as (rows * nkv * T, hs)
    scale: float


class Decoder:
    """GPT's forward pass for generation: the last position's logits, filling a KV cache.

    Three entry points, all checked against GPT.forward by the tests: prefill (T tokens into an
    empty cache, the model's own tensors), step (one token per sample, the hot loop: 2-D tensors,
    matrices pre-transposed for torch.mm, residual adds fused into addmm, no mask, cache writes in
    place) and step_rows (one token for each of some rows of a shared cache, each at its own
    position, with windows prefilled in the same forward). Steps use the model's tensors too, or,
    with step_dtype float16 / bfloat16, copies of the block matrices and the head in that dtype: a
    step reads every matrix once, so half the bytes is about half the time for models too big for
    the CPU caches. Only the matmuls' inputs and outputs are rounded; the residual stream, norms,
    attention and the KV cache stay float32. Embeddings are only indexed (one row per token), so
    they stay float32 at no bandwidth cost. Prefills stay float32: exact, and float16 matmuls of
    many rows are slow on CPUs. Tensors and math come from model.decode_view() (module docstring).
    """

    def __init__(self, model: GPT, step_dtype: torch.dtype | None = None):
        view: DecodeView = model.decode_view()
        self.cfg = view.config
        self.n_head, self.n_kv, self.head_size = self.cfg.n_head, self.cfg.kv_heads, self.cfg.head_dim
        self.groups, self.width = self.n_head // self.n_kv, self.cfg.attn_width
        self.wte, self.wpe, self.rope, self.head = view.wte, view.wpe, view.rope, view.head
        self.norm, self.act, self.split_qkv = view.norm, view.activation, view.split_qkv
        self.norm_f = view.norm_f
        self.layers = view.layers
        self.step_dtype = step_dtype or self.wte.dtype
        self.step_layers = _each(self.layers, lambda layer: _step_layer(layer, self.step_dtype))
        self.step_headT = self.head.to(self.step_dtype).t()

    def new_cache(self, batch_size: int, device: torch.device, positions: int | None = None) -> KVCache:
        """A cache of batch_size rows with room for positions tokens (None: the whole context)."""
        return KVCache(self.cfg, batch_size, device, self.wte.dtype, positions)

    def blocks(self, x: torch.Tensor, cache: KVCache, attend: Attend, step: bool = True) -> torch.Tensor:
        """x (tokens, C) or (B, T, C) through every block: the one place a block's wiring is written.

        step: the step matrices (pre-transposed, maybe 16-bit; residual adds in place), else the
        model's own tensors (what prefill uses: new tensors, exact float32). attend gets each
        layer's fused q/k/v output, that layer's cache and its QK-norm gains, and gives the heads'
        outputs side by side.
        """
        layers, mm, residual = self._matmuls(step)
        norm, act = self.norm, self.act
        for k_cache, v_cache, layer in zip(cache.k, cache.v, layers):
            qkv = mm(norm(x, *layer.norm_1), layer.attn_w, layer.attn_b)
            x = residual(x, attend(qkv, k_cache, v_cache, layer.qk_gains), layer.attn_proj_w, layer.attn_proj_b)
            h = act(mm(norm(x, *layer.norm_2), layer.fc_w, layer.fc_b))
            x = residual(x, h, layer.mlp_proj_w, layer.mlp_proj_b)
        return x

    def _matmuls(self, step: bool) -> tuple[Sequence[LayerTensors], MatMul, Residual]:
        if step:
            return self.step_layers, _mm, _residual
        return self.layers, F.linear, _add_linear

    def logits(self, x: torch.Tensor, step: bool = True) -> torch.Tensor:
        """The final norm and the head: float32 logits of each row of x."""
        if step:
            return _mm(self.norm(x, *self.norm_f), self.step_headT, None)
        return F.linear(self.norm(x, *self.norm_f), self.head)

    def prefill(self, idx: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """idx (B, T) into an empty cache -> float32 logits (B, V) of the last position ((B, T, V) with all_logits)."""
        B, T = idx.shape
        if cache.pos != 0 or T > cache.capacity:
            raise ValueError(f"prefill of {T} tokens needs an empty cache with room for them (it has {cache.capacity})")
        x = F.embedding(idx, self.wte)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe[:T]
        rope = None if self.rope is None else (self.rope[0][:T], self.rope[1][:T])

        def attend(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   gains: QKGains | None) -> torch.Tensor:
            q, k, v = self.split_qkv(qkv, rope, gains)  # (B, nh or nkv, T, hs)
            k_cache[:, :, :T] = k
            v_cache[:, :, :T] = v
            return self._causal(q, k, v).transpose(1, 2).reshape(B, T, -1)

        x = self.blocks(x, cache, attend, step=False)
        cache.pos = T
        return self.logits(x if all_logits else x[:, -1], step=False)

    def step(self, tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tok (B,): one new token per sample at position cache.pos -> float32 logits (B, V)."""
        B, pos = tok.size(0), cache.pos
        if pos >= cache.capacity:
            raise ValueError(f"the cache is full ({pos} tokens); slide the window or give it more room first")
        x = F.embedding(tok, self.wte)  # (B, C), a new tensor: the residual adds go in place
        if self.wpe is not None:
            x.add_(self.wpe[pos])
        rope = None if self.rope is None else (self.rope[0][pos], self.rope[1][pos])
        split_qkv, n_kv, hs = self.split_qkv, self.n_kv, self.head_size

        def attend(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   gains: QKGains | None) -> torch.Tensor:
            q, k, v = split_qkv(qkv, rope, gains)  # (B, nh or nkv, hs)
            k_cache.select(2, pos).copy_(k)  # into the preallocated (B, nkv, block_size, hs) cache
            v_cache.select(2, pos).copy_(v)
            # one query sees every cached key: no mask. Each key/value head's group of query heads
            # rides as that head's rows of queries (one row without grouped-query attention).
            keys, values = k_cache.narrow(2, 0, pos + 1), v_cache.narrow(2, 0, pos + 1)
            y = F.scaled_dot_product_attention(q.view(B, n_kv, -1, hs), keys, values)
            return y.reshape(B, -1)  # (B, nkv, g, hs) -> (B, nh * hs)

        x = self.blocks(x, cache, attend)
        cache.pos = pos + 1
        return self.logits(x)

    def step_rows(self, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache, rows: slice | torch.Tensor,
                  fills: Sequence[tuple[int, torch.Tensor]] = ()) -> torch.Tensor:
        """One new token for each of some rows of a shared cache, each row at its own position.

        tok, pos (B,): the token of each row and the position it goes to; rows: which rows of cache
        (a slice when they are adjacent, the usual case, else their indices). Same math as step();
        keys past a row's own position (an empty slot, or a longer neighbour's) are masked out.
        fills: windows prefilled in the same forward, each (first row, ids (r, L)): ids go to
        positions 0 .. L-1 of rows first .. first + r (a stream whose window slid). Every row, a
        step's or a fill's, goes through the same matmuls: a step of 16 rows is a chain of small
        matmuls whose time is mostly per-op cost, so a slid window's 32 tokens riding along cost a
        fraction of a prefill of their own. Fills use the step matrices, so the caller passes them
        only when those are the model's float32 tensors (what prefill() uses).
        Returns float32 logits (B + sum r, V): the steps' rows, then each fill's last position.
        The caller moves each row's position on.
        """
        B = tok.size(0)
        keys_len = int(pos.max()) + 1 if B else 0
        if max([keys_len, *(ids.size(1) for _, ids in fills)]) > cache.capacity:
            raise ValueError(f"a row's cache is full (room for {cache.capacity} tokens); slide its window "
                             "or give it more room first")
        steps = self._row_steps(pos, rows, cache, keys_len) if B else None
        xs = [self._embed_rows(tok, pos)] if B else []
        xs += [self._embed_fill(ids) for _, ids in fills]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)  # (M, C): every token of this forward

        def attend(qkv: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, gains: QKGains | None) -> torch.Tensor:
            ys = [] if steps is None else self._attend_rows(qkv[:B] if fills else qkv, k_all, v_all, steps, gains)
            ys += self._attend_fills(qkv, B, k_all, v_all, fills, gains)
            return ys[0] if len(ys) == 1 else torch.cat(ys)

        x = self.blocks(x, cache, attend)
        if fills:  # the steps' rows and each fill's last position
            x = x.index_select(0, self._fill_ends(B, fills, x.device))
        return self.logits(x)

    def _embed_rows(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tok, self.wte)
        if self.wpe is not None:
            x.add_(F.embedding(pos, self.wpe))
        return x

    def _embed_fill(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.wte)  # (r, L, C)
        if self.wpe is not None:
            x = x + self.wpe[: ids.size(1)]
        return x.view(-1, self.cfg.n_embd)

    def _row_steps(self, pos: torch.Tensor, rows: slice | torch.Tensor, cache: KVCache, keys_len: int) -> _RowSteps:
        B, n_kv, dev = pos.size(0), self.n_kv, pos.device
        rope = None if self.rope is None else (self.rope[0][pos].unsqueeze(1), self.rope[1][pos].unsqueeze(1))
        # one additive mask for every layer and head: -inf on the slots past each row's position
        # (a float mask in baddbmm: SDPA turns a bool one into floats in every call)
        hidden = torch.arange(keys_len, device=dev) > pos[:, None]
        mask = torch.zeros(B, 1, keys_len, device=dev).masked_fill_(hidden[:, None], float("-inf"))
        mask = mask.repeat_interleave(n_kv, dim=0)  # (B * nkv, 1, keys_len)
        if isinstance(rows, slice):
            first = rows.start or 0
            row_ids, runs = torch.arange(first, first + B, device=dev), [(0, first, B)]
        else:
            row_ids, runs = rows, _runs(rows.tolist())
        T = cache.k.size(3)
        # one index_copy_ per tensor, half the time of an advanced-index write at 16 rows
        at = ((row_ids[:, None] * n_kv + torch.arange(n_kv, device=dev)) * T + pos[:, None]).view(-1)
        return _RowSteps(B, keys_len, rope, mask, runs, at, 1.0 / math.sqrt(self.head_size))

    def _attend_rows(self, qkv: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                     steps: _RowSteps, gains: QKGains | None) -> list[torch.Tensor]:
        """The stepping rows' attention, one output (n, W) per run of adjacent rows."""
        B, n_kv, hs, keys_len = steps.count, self.n_kv, self.head_size, steps.keys_len
        q, k, v = self.split_qkv(qkv, steps.rope, gains)  # (B, nh or nkv, hs)
        k_all.view(-1, hs).index_copy_(0, steps.at, k.reshape(-1, hs))
        v_all.view(-1, hs).index_copy_(0, steps.at, v.reshape(-1, hs))
        q = q.reshape(B * n_kv, -1, hs)  # each key/value head's group of query heads as its rows
        # one query per row and head: two batched matmuls (B * nkv small ones); SDPA's kernel
        # costs more per head here, and more again with a mask. Per run of adjacent rows, so
        # the keys are views: gathering scattered rows' keys costs more than the attention.
        ys = []
        for i, first, n in steps.runs:
            keys = k_all.narrow(0, first, n).narrow(2, 0, keys_len).flatten(0, 1)  # (n * nkv, keys_len, hs)
            values = v_all.narrow(0, first, n).narrow(2, 0, keys_len).flatten(0, 1)
            lo, hi = i * n_kv, (i + n) * n_kv
            q_run, mask_run = (q, steps.mask) if n == B else (q[lo:hi], steps.mask[lo:hi])
            att = torch.baddbmm(mask_run, q_run, keys.transpose(1, 2), alpha=steps.scale)
            ys.append(torch.bmm(att.softmax(-1), values).view(n, self.width))
        return ys

    def _attend_fills(self, qkv: torch.Tensor, off: int, k_all: torch.Tensor, v_all: torch.Tensor,
                      fills: Sequence[tuple[int, torch.Tensor]], gains: QKGains | None) -> list[torch.Tensor]:
        """Each fill's causal attention over its own window (its keys written to positions 0 .. L-1)."""
        ys = []
        for first, ids in fills:
            r, L = ids.shape
            rope = None if self.rope is None else (self.rope[0][:L], self.rope[1][:L])
            q, k, v = self.split_qkv(qkv[off : off + r * L].view(r, L, -1), rope, gains)  # (r, nh or nkv, L, hs)
            k_all[first : first + r, :, :L] = k
            v_all[first : first + r, :, :L] = v
            ys.append(self._causal(q, k, v).transpose(1, 2).reshape(r * L, self.width))
            off += r * L
        return ys

    @staticmethod
    def _fill_ends(B: int, fills: Sequence[tuple[int, torch.Tensor]], device: torch.device) -> torch.Tensor:
        """Indices of the steps' rows and of each fill's last position in a forward's tokens."""
        ends, off = [], B
        for _, ids in fills:
            r, L = ids.shape
            ends += range(off + L - 1, off + r * L, L)
            off += r * L
        return torch.tensor([*range(B), *ends], device=device)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of (r, nh, L, hs) queries over (r, nkv, L, hs) keys and values."""
        k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def build_decoder(model: GPT, decode_dtype: str, device: torch.device,
                  many_rows: bool = False) -> tuple[Decoder, dict[str, float] | None]:
    """The decoder for decode_dtype, and auto's probe results (max |logit - float32 logit| per
    dtype tried; None when no probe ran). "auto" tries a low precision only on a CPU, for a float32
    model of at least LOW_PRECISION_MIN_PARAMS parameters, in low_precision_candidates' order
    (float16 for many rows only where float16_rows_fast), and keeps the first within LOGIT_TOLERANCE; else float32."""
    if decode_dtype != "auto":
        return Decoder(model, getattr(torch, decode_dtype)), None
    big = model.num_params() >= LOW_PRECISION_MIN_PARAMS
    if not (device.type == "cpu" and big and next(model.parameters()).dtype == torch.float32):
        return Decoder(model), None
    diffs: dict[str, float] = {}
    for dtype in low_precision_candidates():
        if many_rows and dtype == torch.float16 and not float16_rows_fast():
            continue
        dec = Decoder(model, dtype)
        diffs[str(dtype).removeprefix("torch.")] = diff = probe_logit_diff(dec, device)
        if diff <= LOGIT_TOLERANCE:  # NaN (an overflow) fails too
            return dec, diffs
    return Decoder(model), diffs


def probe_logit_diff(dec: Decoder, device: torch.device, prefill: int = 8, steps: int = 16) -> float:
    """Max |logit difference| of dec's decode steps from a float32 forward, on a fixed pseudo-random input.

    Prefills are float32 in both, so only the steps (and the keys / values they cache) can differ.
    Uses its own generator: checking must not move the global RNG (training resumes exactly).
    """
    n = min(prefill + steps, dec.cfg.block_size)
    prefill = min(prefill, n - 1) if n > 1 else 1
    gen = torch.Generator().manual_seed(1234)
    idx = torch.randint(0, dec.cfg.vocab_size, (1, n), generator=gen).to(device)
    with torch.inference_mode():  # caches with room for n tokens, not the whole context
        reference = dec.prefill(idx, dec.new_cache(1, device, n), all_logits=True)[0, prefill:]
        cache = dec.new_cache(1, device, n)
        dec.prefill(idx[:, :prefill], cache)
        stepped = torch.cat([dec.step(idx[:, t], cache) for t in range(prefill, n)])
    diff = float((stepped[: len(reference)] - reference[: len(stepped)]).abs().max()) if len(reference) else 0.0
    return diff if math.isfinite(diff) else math.inf
