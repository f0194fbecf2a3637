"""Generation: prefill + cached decode over a preallocated KV cache; speaks token ids only.

The engine does not call GPT.forward per token. At batch 1 a small model's decode step is about a
hundred tiny ops, so its time is Python and op dispatch, not arithmetic; a big model's step reads
every weight once, so its time is memory bandwidth. `Decoder` below runs the same network as
model.py as flat code over the model's own tensors (no module calls, no mask for a single token,
in-place cache writes, fused residual matmuls), and for big models on a CPU it can hold its step
matrices in float16 or bfloat16, half the bytes per token, when a probe shows the logits stay
within LOGIT_TOLERANCE of float32. tests/test_engine.py checks it against GPT.forward for every
architecture option.

The model's math is not written twice: the Decoder takes everything from GPT.decode_view(), its
one door into the model: the tensors by role (per layer a model.LayerTensors) and the model's own
norm, activation and q/k/v split (heads, QK-norm, rotary positions). This file names no module
attribute or parameter of the model, and no architecture: the widths come from the config's derived
values, and grouped-query attention is a layout (each key/value head read by a group of query heads).

Sampling settings come as one sampling.SamplingSettings. `Engine.start` returns a TokenStream:
next() gives one new id per sample, None once that sample has ended (at a stop token id, which is
not given out, or at max_new_tokens; the text layer above ends samples at stop strings with
stop(row)); finish_reasons and completion_tokens say why and after how many tokens. Finished rows
keep riding in the batch (their ids are dropped); the loop ends when every row has finished.
Engine.generate also takes max_new_tokens with the other settings as keywords.

Many generations at once (a server): `DecodeBatch` holds one KV cache whose rows belong to several
TokenStreams, each at its own position; advance() feeds all their last tokens through the model
in one forward (Decoder.step_rows, a mask hiding each row's empty slots) and pick() draws their
next ids per group of equal settings, each stream with its own generator. Windows that must be
prefilled (a new stream's prompt, a slid window) ride in that same forward as extra rows of its
matmuls: at 16 streams a step is a chain of small matmuls, and a separate prefill per stream cost
about as much as the step itself. A stream's ids do not depend on its neighbours: they are what
Engine.start gives it alone (tests/test_batch.py).

Threads: on a 2-core CPU the decode runs on one thread (decode_threads: a second OpenMP thread
gains nothing for a small model and up to 1.5x for a 10M one on a quiet machine, and loses 2-9x
as soon as another process wants a core).
The engine sets that count only around its own work, inside each start() / next() call, and puts
the caller's back before returning (about 1 us a step), so nothing is held across a yield:
interleaved generations and the caller's own torch work each see their own setting. (Setting it
in a worker thread instead would be local to that thread's OpenMP count, but it changes torch's
default for every thread started later, and handing each token across threads costs ~25 us.)

When the context window is full, the window slides: the cache is rebuilt from the newest
block_size // 2 tokens (one prefill) and decoding continues. Learned absolute positions make a
rolling cache inexact (every cached key would need a new position), so the rebuild keeps exactness;
it costs one prefill per block_size // 2 tokens (in a batch: block_size // 2 extra rows in one step).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Collection, Sequence

import torch
import torch.nn.functional as F

from .errors import PocketError
from .model import GPT, DecodeView, KVCache, LayerTensors, repeat_kv
from .runtime import cpu_has_fast_bf16
from .sampling import SamplingSettings, as_settings

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
# From this many rows float16 step matmuls are no faster than float32 on CPUs, so a generation of
# this many samples takes the many-rows decoder (Engine.decoder: bfloat16 or float32). GPT-2-small's
# decode matmuls against float32, bench/decode_quant.py, 1 thread, AMD Zen 4: float16 1.86x at 1
# row, 2.14x at 2, 1.19x at 4, 1.03x at 6, 0.73x at 8, 0.31x at 64; bfloat16 0.85x, 1.67x, 2.08x,
# 2.18x, 2.01x, 2.53x (where it passes the logit probe).
MANY_ROWS = 6


def pick_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top-k keeps exactly k tokens.
    u: the uniform draws (uniforms()), when the caller drew them from several generators."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    return sample(distribution(logits, temperature, top_k, top_p), generator, u)


def distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """float32 logits (B, V) -> the probabilities pick_next draws from (B, V), rows need not sum to 1.
    Every operation is per row, so rows batched together get what each gets alone."""
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
    return probs


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (as Hugging Face's): for every id already in the text (seen, a (B, V)
    presence mask), a positive logit is divided by penalty and a negative one multiplied by it, so
    penalty > 1 always makes a seen token less likely. Whole-row tensor ops: no loop over the vocabulary."""
    logits = logits.float()
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def uniforms(rows: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The (rows, 1) float64 draws sample() makes: drawn apart per generator, used together."""
    return torch.rand(rows, 1, generator=generator, dtype=torch.float64, device=device)


def sample(probs: torch.Tensor, generator: torch.Generator | None, u: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row of probs (B, V), which need not sum to 1 -> ids (B,); zero-mass ids never come.

    Inverse-CDF sampling: the first id whose running mass exceeds a uniform draw. Same distribution
    as torch.multinomial, one random number per row, and 17x faster at a 50k vocabulary (76 us vs
    1.3 ms a token, which was 7% of a GPT-2-small decode step). The running sum is float64 so
    rounding cannot shift any id's probability noticeably.
    """
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    u = uniforms(probs.size(0), generator, probs.device) if u is None else u
    ids = torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True)
    return ids.squeeze(-1).clamp_(max=probs.size(-1) - 1)  # u * total can round up to total itself


def decode_threads(model: GPT) -> int | None:
    """Threads for generating on a CPU: one for small models or on a two-core machine, else torch's default.

    A small model's step is tiny ops where a second thread costs more than it saves. On a 2-core
    machine two OpenMP threads fall far behind as soon as another process wants a core. Measured
    on this 2-core EPYC (Zen 4), 1 vs 2 threads, medians of 9 interleaved runs: quiet, 0.8M params
    1.01x, 10.7M float16 steps 0.66x (there two threads win), 10.7M float32 0.99x; beside one
    busy-loop process 3.05x, 2.19x, 3.04x; on the shared machine under load ~4, 8.7x (0.8M) and
    4.9x (10.7M); GPT-2-small earlier 18 vs 3 tok/s. One thread is never much slower and often far
    faster. With more cores a single thread may not saturate memory bandwidth, so torch's default stays.
    """
    if model.num_params() < SINGLE_THREAD_PARAMS or torch.get_num_threads() <= 2:
        return 1
    return None


class _Scoped:
    """Inference mode and the engine's thread count for one piece of the engine's own work.

    torch.set_num_threads sets the calling thread's OpenMP count (and torch's default for threads
    not started yet), so it is set on entry and the caller's value put back on exit, never held
    across a yield. Setting it costs ~0.1 us. A class, not @contextmanager: this runs once a token.
    """

    __slots__ = ("threads", "before", "mode")

    def __init__(self, threads: int | None):
        self.threads, self.before, self.mode = threads, None, torch.inference_mode()

    def __enter__(self) -> None:
        self.mode.__enter__()
        n = torch.get_num_threads()
        if self.threads is not None and n != self.threads:
            self.before = n
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        if self.before is not None:
            torch.set_num_threads(self.before)
            self.before = None
        self.mode.__exit__(*exc)


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


def _runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """Row indices -> runs of adjacent ones: (index of its first in rows, its first row, its length)."""
    runs: list[tuple[int, int, int]] = []
    for i, r in enumerate(rows):
        if runs and runs[-1][1] + runs[-1][2] == r:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, r, 1))
    return runs


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
    Tensors and math come from model.decode_view() (see the module docstring).
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
        self.step_layers = [_step_layer(layer, self.step_dtype) for layer in self.layers]
        self.step_headT = self.head.to(self.step_dtype).t()

    def new_cache(self, batch_size: int, device: torch.device) -> KVCache:
        return KVCache(self.cfg, batch_size, device, self.wte.dtype)

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
            h = self.norm(x, *layer.norm_1)
            q, k, v = self.split_qkv(F.linear(h, layer.attn_w, layer.attn_b), rope)  # (B, nh or nkv, T, hs)
            cache.k[i, :, :, :T] = k
            cache.v[i, :, :, :T] = v
            y = self._causal(q, k, v).transpose(1, 2).reshape(B, T, -1)
            x = x + F.linear(y, layer.attn_proj_w, layer.attn_proj_b)
            h = self.act(F.linear(self.norm(x, *layer.norm_2), layer.fc_w, layer.fc_b))
            x = x + F.linear(h, layer.mlp_proj_w, layer.mlp_proj_b)
        cache.pos = T
        if not all_logits:
            x = x[:, -1]
        return F.linear(self.norm(x, *self.norm_f), self.head)

    def step(self, tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tok (B,): one new token per sample at position cache.pos -> float32 logits (B, V)."""
        B, pos = tok.size(0), cache.pos
        if pos >= self.cfg.block_size:
            raise ValueError(f"the cache is full ({pos} tokens); slide the window first")
        x = F.embedding(tok, self.wte)  # (B, C), a new tensor: the residual adds below go in place
        if self.wpe is not None:
            x.add_(self.wpe[pos])
        rope = None if self.rope is None else (self.rope[0][pos], self.rope[1][pos])
        norm, act, split_qkv, n_kv, hs = self.norm, self.act, self.split_qkv, self.n_kv, self.head_size
        for k_cache, v_cache, layer in zip(cache.k, cache.v, self.step_layers):
            q, k, v = split_qkv(_mm(norm(x, *layer.norm_1), layer.attn_w, layer.attn_b), rope)  # (B, nh or nkv, hs)
            k_cache.select(2, pos).copy_(k)  # into the preallocated (B, nkv, block_size, hs) cache
            v_cache.select(2, pos).copy_(v)
            # one query sees every cached key: no mask. Each key/value head's group of query heads
            # rides as that head's rows of queries (one row without grouped-query attention).
            keys, values = k_cache.narrow(2, 0, pos + 1), v_cache.narrow(2, 0, pos + 1)
            y = F.scaled_dot_product_attention(q.view(B, n_kv, -1, hs), keys, values)
            x = _residual(x, y.reshape(B, -1), layer.attn_proj_w, layer.attn_proj_b)  # (B, nkv, g, hs) -> (B, nh * hs)
            h = act(_mm(norm(x, *layer.norm_2), layer.fc_w, layer.fc_b))
            x = _residual(x, h, layer.mlp_proj_w, layer.mlp_proj_b)
        cache.pos = pos + 1
        return _mm(norm(x, *self.norm_f), self.step_headT, None)

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
        B, C, W, hs, n_kv = tok.size(0), self.cfg.n_embd, self.width, self.head_size, self.n_kv
        keys_len = int(pos.max()) + 1 if B else 0
        if keys_len > self.cfg.block_size:
            raise ValueError(f"a row's cache is full ({keys_len - 1} tokens); slide its window first")
        xs = []
        if B:
            x = F.embedding(tok, self.wte)
            if self.wpe is not None:
                x.add_(F.embedding(pos, self.wpe))
            xs.append(x)
            rope = None if self.rope is None else (self.rope[0][pos].unsqueeze(1), self.rope[1][pos].unsqueeze(1))
            # one additive mask for every layer and head: -inf on the slots past each row's position
            # (a float mask in baddbmm: SDPA turns a bool one into floats in every call)
            hidden = torch.arange(keys_len, device=pos.device) > pos[:, None]
            mask = torch.zeros(B, 1, keys_len, device=pos.device).masked_fill_(hidden[:, None], float("-inf"))
            mask = mask.repeat_interleave(n_kv, dim=0)  # (B * nkv, 1, keys_len)
            if isinstance(rows, slice):
                first = rows.start or 0
                row_ids, runs = torch.arange(first, first + B, device=pos.device), [(0, first, B)]
            else:
                row_ids, runs = rows, _runs(rows.tolist())
            T = cache.k.size(3)
            # where each row's new key goes in a layer's cache seen as (rows * nkv * T, hs): one
            # index_copy_ per tensor, half the time of an advanced-index write at 16 rows
            at = ((row_ids[:, None] * n_kv + torch.arange(n_kv, device=pos.device)) * T + pos[:, None]).view(-1)
            scale = 1.0 / math.sqrt(hs)
        for first, ids in fills:
            x = F.embedding(ids, self.wte)  # (r, L, C)
            if self.wpe is not None:
                x = x + self.wpe[: ids.size(1)]
            xs.append(x.view(-1, C))
        x = xs[0] if len(xs) == 1 else torch.cat(xs)  # (M, C): every token of this forward
        norm, act, split_qkv = self.norm, self.act, self.split_qkv
        for k_all, v_all, layer in zip(cache.k, cache.v, self.step_layers):
            qkv = _mm(norm(x, *layer.norm_1), layer.attn_w, layer.attn_b)  # (M, sum of q/k/v widths)
            ys = []
            if B:
                q, k, v = split_qkv(qkv[:B] if fills else qkv, rope)  # (B, nh or nkv, hs)
                k_all.view(-1, hs).index_copy_(0, at, k.reshape(-1, hs))
                v_all.view(-1, hs).index_copy_(0, at, v.reshape(-1, hs))
                q = q.reshape(B * n_kv, -1, hs)  # each key/value head's group of query heads as its rows
                # one query per row and head: two batched matmuls (B * nkv small ones); SDPA's kernel
                # costs more per head here, and more again with a mask. Per run of adjacent rows, so
                # the keys are views: gathering scattered rows' keys costs more than the attention.
                for i, first, n in runs:
                    keys = k_all.narrow(0, first, n).narrow(2, 0, keys_len).flatten(0, 1)  # (n * nkv, keys_len, hs)
                    values = v_all.narrow(0, first, n).narrow(2, 0, keys_len).flatten(0, 1)
                    lo, hi = i * n_kv, (i + n) * n_kv
                    q_run, mask_run = (q, mask) if n == B else (q[lo:hi], mask[lo:hi])
                    att = torch.baddbmm(mask_run, q_run, keys.transpose(1, 2), alpha=scale)
                    ys.append(torch.bmm(att.softmax(-1), values).view(n, W))
            off = B
            for first, ids in fills:
                r, L = ids.shape
                f_rope = None if self.rope is None else (self.rope[0][:L], self.rope[1][:L])
                q, k, v = split_qkv(qkv[off : off + r * L].view(r, L, -1), f_rope)  # (r, nh or nkv, L, hs)
                k_all[first : first + r, :, :L] = k
                v_all[first : first + r, :, :L] = v
                ys.append(self._causal(q, k, v).transpose(1, 2).reshape(r * L, W))
                off += r * L
            x = _residual(x, ys[0] if len(ys) == 1 else torch.cat(ys), layer.attn_proj_w, layer.attn_proj_b)
            h = act(_mm(norm(x, *layer.norm_2), layer.fc_w, layer.fc_b))
            x = _residual(x, h, layer.mlp_proj_w, layer.mlp_proj_b)
        if fills:  # the steps' rows and each fill's last position
            ends, off = [], B
            for _, ids in fills:
                r, L = ids.shape
                ends += range(off + L - 1, off + r * L, L)
                off += r * L
            x = x.index_select(0, torch.tensor([*range(B), *ends], device=x.device))
        return _mm(norm(x, *self.norm_f), self.step_headT, None)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of (r, nh, L, hs) queries over (r, nkv, L, hs) keys and values."""
        k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def check_prompt(prompt_ids: list[int], block_size: int) -> None:
    if not prompt_ids:
        raise PocketError("the prompt is empty; give at least one character or token")
    if len(prompt_ids) > block_size:
        raise PocketError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {block_size}; "
            f"shorten it to at most {block_size} tokens"
        )


class TokenStream:
    """One generation's new token ids, a step per next(): a list with one id per sample, None for
    a sample that has ended (see the module docstring). Made by Engine.start (or DecodeBatch.start),
    which checks the prompt and runs the prefill (DecodeBatch.start: maybe in the batch's next
    forward, defer_prefill); every step runs under the engine's own thread
    count, put back before next() returns. Its samples are rows of a DecodeBatch's KV cache: its
    own batch (Engine.start), or one shared with other streams, stepped together; either way it has
    its own rows, position and random generator, so its output does not depend on its neighbours.

    prompt_tokens, completion_tokens[row] (ids generated for the row, the one that ended it
    included) and finish_reasons[row] ("stop", "length", None while running) are kept up to date.
    With settings.logprobs set, last_logprobs holds, after each step, per sample the chosen id's
    log-probability and the settings.logprobs most likely (id, log-probability) pairs.
    """

    def __init__(self, engine: "Engine", prompt_ids: list[int], settings: SamplingSettings,
                 stop_token_ids: Collection[int] = (), batch: "DecodeBatch | None" = None,
                 defer_prefill: bool = False):
        check_prompt(prompt_ids, engine.cfg.block_size)
        B, s = settings.num_samples, settings
        self.settings, self._scope = s, _Scoped(engine.threads)
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = [0] * B
        self.finish_reasons: list[str | None] = [None if s.max_new_tokens else "length"] * B
        self.last_logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self._stop_ids = frozenset(stop_token_ids)
        self._running, self._steps, self._last = B if s.max_new_tokens else 0, 0, None
        self._picked: torch.Tensor | None = None  # next ids drawn ahead by the batch (DecodeBatch.pick)
        self._batch = batch if batch is not None else DecodeBatch(engine, B, shared=False)
        self.rows, self._row0 = B, 0  # its rows in the batch's cache: _row0 .. _row0 + rows
        with self._scope:
            self._dec = self._batch.dec
            self._gen = torch.Generator(device=engine.device)
            self._gen.manual_seed(s.seed) if s.seed is not None else self._gen.seed()
            # its uniform draws, taken from _gen a block at a time (on the CPU the same numbers in the
            # same order as one draw per step; CUDA's Philox cuts its stream by launch, so a seed gives
            # other numbers there than before blocks, but alone and in a batch still the same ones)
            self._draws: torch.Tensor | None = None
            self._drawn = 0
            prompt = torch.tensor(prompt_ids, dtype=torch.long, device=engine.device).expand(B, -1)
            self._cache = self._batch.join(self)
            # defer_prefill: the prompt rides in the batch's next forward (advance) with the others'
            # steps, instead of a prefill of its own that every running stream waits for
            self._fill: torch.Tensor | None = prompt if defer_prefill else None
            if self._fill is None:
                try:
                    self._logits = self._dec.prefill(prompt, self._cache)
                except BaseException:
                    self._batch.leave(self)
                    raise
            self._window = list(prompt.unbind(1))  # the context as (B,) columns: no torch.cat per step
            self._seen = None  # the repetition penalty's presence mask (B, V)
            if s.repetition_penalty != 1.0:
                self._seen = torch.zeros(B, engine.cfg.vocab_size, dtype=torch.bool, device=engine.device)
                self._seen[:, prompt[0]] = True

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> list[int | None]:
        ids = self.next_ids().tolist()
        last = self._steps == self.settings.max_new_tokens
        out: list[int | None] = []
        for row, tok in enumerate(ids):
            if self.finish_reasons[row] is None:
                self.completion_tokens[row] += 1
                if tok in self._stop_ids:
                    self._finish(row, "stop")
                    tok = None
                elif last:
                    self._finish(row, "length")
            else:
                tok = None
            out.append(tok)
        return out

    def stop(self, row: int) -> None:
        """End one sample ("stop"): the text layer found a stop string. Its row rides along unused.
        A stop string in the very last token turns that step's "length" into "stop"."""
        self._finish(row, "stop")

    def _finish(self, row: int, reason: str) -> None:
        if self.finish_reasons[row] is None:
            self._running -= 1
        self.finish_reasons[row] = reason

    @property
    def done(self) -> bool:
        """Every sample has ended: no more steps."""
        return self._running == 0 or self._steps >= self.settings.max_new_tokens

    def close(self) -> None:
        """End every sample now and give the rows back to the batch (a server's cancelled request)."""
        for row, reason in enumerate(self.finish_reasons):
            if reason is None:
                self._finish(row, "stop")
        self._batch.leave(self)
        self._cache = self._window = self._logits = self._seen = self._last = self._picked = None  # type: ignore[assignment]
        self._fill = None

    def next_ids(self) -> torch.Tensor:
        """The raw step: (B,) new ids on CPU, every row (ended ones too); no bookkeeping of rows."""
        s = self.settings
        if self.done or self._cache is None:
            raise StopIteration
        nxt = self._picked
        if nxt is not None and self._seen is None and s.logprobs is None and nxt.device.type == "cpu":
            # drawn by the batch, nothing else to compute: no torch scope (a server's per-stream cost)
            self._picked, self._last = None, nxt
            self._steps += 1
            return nxt
        with self._scope:
            if self._last is not None or self._fill is not None:  # not fed by a shared batch step: feed it alone
                self._batch.advance([self])
            nxt = self._picked if self._picked is not None else self._pick()
            self._picked = None
            if s.logprobs is not None:
                self.last_logprobs = token_logprobs(self._logits, nxt, s.logprobs)
            if self._seen is not None:
                self._seen.scatter_(1, nxt[:, None], True)
            self._last = nxt
            self._steps += 1
            return nxt.cpu()

    def _pick(self) -> torch.Tensor:
        s = self.settings
        u = None if s.temperature == 0 else self.uniform_draws()
        return pick_next(self.sampling_logits(), s.temperature, s.top_k, s.top_p, None, u)

    def uniform_draws(self) -> torch.Tensor:
        """This step's (rows, 1) float64 uniform draws from the stream's own generator. Drawn 32
        steps at a time (one torch.rand instead of 32): what one draw per step gives, in order."""
        if self._draws is None or self._drawn == self._draws.size(0):
            steps = max(1, min(32, self.settings.max_new_tokens - self._steps))
            self._draws = torch.rand(steps, self.rows, 1, generator=self._gen, dtype=torch.float64,
                                     device=self._gen.device)
            self._drawn = 0
        self._drawn += 1
        return self._draws[self._drawn - 1]

    def sampling_logits(self) -> torch.Tensor:
        """The logits the next ids are drawn from: the model's, with the repetition penalty applied."""
        if self._seen is None:
            return self._logits
        return penalize(self._logits, self._seen, self.settings.repetition_penalty)

    @property
    def due(self) -> bool:
        """It has sampled ids (or its prompt) that the model has not read yet (the next step feeds them)."""
        return (self._last is not None or self._fill is not None) and not self.done and self._cache is not None

    def _feed(self) -> bool:
        """Append the last ids to the window; True if they fit the cache (a step), else False: the
        window is cut to its newest half, to be prefilled again (by _slide or in a batch's forward)."""
        T = self._dec.cfg.block_size
        self._window.append(self._last)
        if self._cache.pos < T:
            return True
        self._window = self._window[-max(1, T // 2):]
        return False

    def _slide(self) -> None:
        """Rebuild the cache from the window (cut by _feed; or the deferred prompt) in a prefill of
        its own; the logits are ready."""
        self._cache.reset()
        self._logits = self._dec.prefill(self._refill_ids(), self._cache)
        self._fill = None

    def _refill_ids(self) -> torch.Tensor:
        """(rows, L): what the cache is to be rebuilt from: the deferred prompt, or the cut window."""
        return self._fill if self._fill is not None else torch.stack(self._window, dim=1)


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row: the chosen id's log-probability under the model's distribution (the logits before
    temperature, top-k, top-p and penalties, as OpenAI reports them) and the top most likely ids."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(1, chosen[:, None]).squeeze(1).tolist()
    if top <= 0:
        return [(p, []) for p in picked]
    values, ids = lp.topk(min(top, lp.size(-1)), dim=-1)
    return [(p, list(zip(i, v))) for p, i, v in zip(picked, ids.tolist(), values.tolist())]


class DecodeBatch:
    """One KV cache whose rows belong to several generations, stepped by one forward together.

    A server's many requests each add a TokenStream here (start); advance() feeds every stream's
    last sampled ids through the model at once, each row at its own position (Decoder.step_rows),
    and hands each stream its rows of the logits, so a step costs about one matrix read of the
    weights whatever the number of rows. Streams sample on their own (own generator and settings).
    Rows are kept packed in join order: a stream that leaves has the rows after it moved down
    (a copy of their filled keys), so the usual step reads adjacent rows as views. The cache grows
    (doubling) when a stream joins a full one, so memory follows the rows in use. Not thread-safe:
    one thread steps a batch (the server's scheduler thread).
    """

    def __init__(self, engine: "Engine", rows: int = 1, shared: bool = True):
        self.engine = engine
        with _Scoped(engine.threads):
            # one generation of several samples steps many rows too (--num-samples 64)
            self.dec = engine.decoder(many_rows=shared or rows >= MANY_ROWS)
            self.cache = self.dec.new_cache(max(1, rows), engine.device)
        # a shared batch's streams, in row order; a generation's own batch keeps none: it would be a
        # reference cycle (stream <-> batch), and its cache, gigabytes for 64 GPT-2 samples, would stay
        # until Python's cycle collector ran, after the caller dropped the stream
        self.shared = shared
        self.members: list[TokenStream] = []
        self.used = 0
        # windows (new prompts, slid windows) ride in the batch's forward only when its step
        # matrices are the model's own float32 tensors, which prefill() uses: a stream's output
        # must not depend on its neighbours (a bfloat16 step of a prompt would)
        self.merge_fills = self.dec.step_dtype == self.dec.wte.dtype

    def start(self, prompt_ids: list[int], settings: SamplingSettings,
              stop_token_ids: Collection[int] = ()) -> TokenStream:
        """A new generation in this batch, in rows of its own. Its prompt is checked now and
        prefilled in the next advance(), in the forward of the others' steps, where that forward
        may take windows (merge_fills); else prefilled now."""
        return TokenStream(self.engine, prompt_ids, settings, stop_token_ids, batch=self,
                           defer_prefill=self.merge_fills)

    def join(self, stream: TokenStream) -> KVCache:
        """Rows for a new stream (the cache grows if it must); returns the stream's cache view."""
        if self.used + stream.rows > self.cache.k.size(1):
            self._grow(max(self.used + stream.rows, 2 * self.cache.k.size(1)))
        view = self.cache.rows(self.used, stream.rows)
        stream._row0 = self.used
        if self.shared:
            self.members.append(stream)
        self.used += stream.rows
        return view

    def leave(self, stream: TokenStream) -> None:
        """Give a stream's rows back; the streams after it move down so rows stay packed."""
        if stream not in self.members:
            return
        i = self.members.index(stream)
        self.members.pop(i)
        start = stream._row0
        with _Scoped(self.engine.threads):  # the cache is an inference tensor
            for s in self.members[i:]:
                self._move(s, start)
                start += s.rows
        self.used = start

    def _move(self, s: TokenStream, to: int) -> None:
        old, n, pos = s._row0, s.rows, s._cache.pos
        if pos:
            for t in (self.cache.k, self.cache.v):
                t[:, to : to + n, :, :pos] = t[:, old : old + n, :, :pos].clone()
        s._row0, s._cache = to, self.cache.rows(to, n, pos)

    def _grow(self, rows: int) -> None:
        bigger = self.dec.new_cache(rows, self.cache.k.device)
        bigger.k[:, : self.used] = self.cache.k[:, : self.used]
        bigger.v[:, : self.used] = self.cache.v[:, : self.used]
        self.cache = bigger
        for s in self.members:
            s._cache = bigger.rows(s._row0, s.rows, s._cache.pos)

    def advance(self, streams: list[TokenStream] | None = None) -> int:
        """Feed the sampled ids of every due stream (or of the ones given) in one forward; returns
        the rows fed by it. A stream whose window is full slides (its cache rebuilt from the newest
        half): in the same forward when several streams are due and the steps are float32 (a
        window of 32 tokens then costs a little more than a step, not a prefill of its own), else
        in a prefill apart, not counted."""
        due = [s for s in (self.members if streams is None else streams) if s.due]
        if not due:
            return 0
        with _Scoped(self.engine.threads):
            stepping, sliding = [], []
            for s in due:  # a deferred prompt is a fill too (its window is the prompt already)
                (stepping if s._fill is None and s._feed() else sliding).append(s)
            if len(due) > 1 and self.merge_fills:
                self._step_together(stepping, sliding)
            else:
                for s in sliding:
                    s._slide()
                sliding = []
                if len(stepping) == 1:  # one stream: the plain step, its rows a view of their own
                    s = stepping[0]
                    s._logits = self.dec.step(s._last, s._cache)
                elif stepping:
                    self._step_together(stepping, [])
            for s in due:
                s._last = None
        return sum(s.rows for s in stepping) + sum(s.rows for s in sliding)

    def pick(self) -> None:
        """Draw the next ids of every member that will be asked for them, one sampling pass per
        group of equal settings: the distributions of all its rows at once, each stream's uniform
        draws from its own generator (what it would draw alone, so the ids are the same)."""
        groups: dict[tuple[float, int, float], list[TokenStream]] = {}
        for m in self.members:
            if m._picked is None and m._last is None and m._fill is None and not m.done and m._cache is not None:
                s = m.settings
                groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(m)
        with _Scoped(self.engine.threads):
            for (temperature, top_k, top_p), streams in groups.items():
                if len(streams) == 1:
                    continue  # picks on its own when asked
                logits = torch.cat([m.sampling_logits() for m in streams])
                u = None if temperature == 0 else torch.cat([m.uniform_draws() for m in streams])
                ids = pick_next(logits, temperature, top_k, top_p, None, u)
                for m, part in zip(streams, ids.split([m.rows for m in streams])):
                    m._picked = part

    def _step_together(self, streams: list[TokenStream], sliding: list[TokenStream]) -> None:
        """One forward: a step for each of streams, a window (slid, or a deferred prompt) for each of sliding."""
        dev = self.cache.k.device
        if streams:
            toks = torch.cat([s._last for s in streams])
            pos = torch.tensor([s._cache.pos for s in streams for _ in range(s.rows)], dtype=torch.long, device=dev)
            first = streams[0]._row0
            adjacent = all(b._row0 == a._row0 + a.rows for a, b in zip(streams, streams[1:]))
            rows: slice | torch.Tensor = (slice(first, first + len(toks)) if adjacent else
                                          torch.tensor([r for s in streams for r in range(s._row0, s._row0 + s.rows)],
                                                       dtype=torch.long, device=dev))
        else:
            toks = pos = torch.zeros(0, dtype=torch.long, device=dev)
            rows = slice(0, 0)
        fills = [(s._row0, s._refill_ids()) for s in sliding]
        logits = self.dec.step_rows(toks, pos, self.cache, rows, fills)
        everyone = streams + sliding
        for s, part in zip(everyone, logits.split([s.rows for s in everyone])):
            s._logits = part
        for s in streams:
            s._cache.pos += 1
        for s, (_, ids) in zip(sliding, fills):
            s._cache.pos, s._fill = ids.size(1), None


class Engine:
    """Samples from a GPT with a KV cache. One Engine per model; its TokenStreams may interleave.

    decode_dtype is the dtype of the matrices in one-token decode steps (prefills are float32):
    "float32"; "float16" or "bfloat16" (asked for: used without a check); or "auto", which tries a
    low precision only on a CPU, for a model of at least LOW_PRECISION_MIN_PARAMS parameters
    (there a step is bound by memory bandwidth, not overhead), float16 where the CPU has fast
    float16 matrix-vector kernels (AVX-512), then bfloat16 where it has native bf16 (AVX512-BF16 /
    AMX), and keeps the first whose logits on a probe stay within LOGIT_TOLERANCE of float32; float32
    otherwise. The choice is made at the first generation (the probe costs a few decode steps) and
    made again if the model's weights have changed since. Same seed, same choice, same output.
    `threads` is the thread count the engine's own work runs on (decode_threads), None: the caller's.
    """

    def __init__(self, model: GPT, device: torch.device | None = None, decode_dtype: str = "auto"):
        if decode_dtype not in DECODE_DTYPES:
            raise PocketError(f"decode_dtype must be one of {', '.join(DECODE_DTYPES)}, got '{decode_dtype}'")
        self.model = model.eval()
        self.cfg = model.config
        self.device = device or next(model.parameters()).device
        self.decode_dtype = decode_dtype
        self.threads = decode_threads(model) if self.device.type == "cpu" else None
        self._decoders: dict[bool, Decoder] = {}  # by many_rows
        self._versions: list[int] = []
        self.logit_diffs: dict[str, float] = {}  # auto's probe: max |logit - float32 logit| per dtype tried

    @property
    def step_dtype(self) -> torch.dtype:
        """The dtype of the decode steps' matrices (decided at the first generation)."""
        return self.decoder().step_dtype

    def decoder(self, many_rows: bool = False) -> Decoder:
        """The decoder for one generation of fewer than MANY_ROWS samples (many_rows False) or for
        many rows (a batch shared by many generations, or MANY_ROWS samples or more): "auto" never
        gives the latter float16 steps, whose matrix-vector products are fast on AVX-512 but whose
        many-row matmuls are not (GPT-2-small, 16 rows, 1 thread, this AMD machine, busy: 275 ms
        a step in float16, 115 in float32, 93 in bfloat16; 1 row: 27, 54, 62). A batch keeps its
        choice for every step, whatever its row count, so a request's output does not depend on
        how many others share its steps."""
        versions = [p._version for p in self.model.parameters()]  # bumped by every in-place update
        if versions != self._versions:
            self._decoders, self._versions = {}, versions
        many_rows = many_rows and self.decode_dtype == "auto"  # a dtype asked for: one decoder, one weight copy
        if many_rows not in self._decoders:
            with _Scoped(self.threads):
                self._decoders[many_rows] = self._build_decoder(many_rows)
        return self._decoders[many_rows]

    def _build_decoder(self, many_rows: bool = False) -> Decoder:
        if self.decode_dtype != "auto":
            return Decoder(self.model, getattr(torch, self.decode_dtype))
        big = self.model.num_params() >= LOW_PRECISION_MIN_PARAMS
        if not (self.device.type == "cpu" and big and self.model_dtype() == torch.float32):
            return Decoder(self.model)
        self.logit_diffs = {}
        candidates = [d for d in low_precision_candidates() if not (many_rows and d == torch.float16)]
        for dtype in candidates:
            dec = Decoder(self.model, dtype)
            diff = probe_logit_diff(dec, self.device)
            self.logit_diffs[str(dtype).removeprefix("torch.")] = diff
            if diff <= LOGIT_TOLERANCE:  # NaN (an overflow) fails too
                return dec
        return Decoder(self.model)

    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def start(self, prompt_ids: list[int], settings: SamplingSettings,
              stop_token_ids: Collection[int] = ()) -> TokenStream:
        """Check the prompt, prefill, and return the generation's TokenStream. settings.stop and
        settings.stop_at_eos are text-level (sampling.TextStream); the engine ends a sample at any
        of stop_token_ids (e.g. a tokenizer's end-of-text id) and does not give that id out."""
        return TokenStream(self, prompt_ids, settings, stop_token_ids)

    def generate(self, prompt_ids: list[int], settings: SamplingSettings | int | None = None,
                 on_step: Callable[[], None] | None = None, stop_token_ids: Collection[int] = (),
                 **changes: Any) -> list[list[int]]:
        """All samples at once: num_samples lists of new token ids (a sample that met a stop token
        id ends before it, without it); on_step() after each step (progress). settings: a
        SamplingSettings, or max_new_tokens with the other settings as keywords (the older form)."""
        tokens = self.start(prompt_ids, as_settings(settings, **changes), stop_token_ids)
        if not stop_token_ids:  # the fast path: every row runs to max_new_tokens
            steps = []
            for _ in range(tokens.settings.max_new_tokens):
                steps.append(tokens.next_ids())
                if on_step is not None:
                    on_step()
            return torch.stack(steps, dim=1).tolist() if steps else [[] for _ in tokens.finish_reasons]
        out: list[list[int]] = [[] for _ in tokens.finish_reasons]
        for step in tokens:
            for row, tok in zip(out, step):
                if tok is not None:
                    row.append(tok)
            if on_step is not None:
                on_step()
        return out


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
