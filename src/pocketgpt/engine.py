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
norm, activation, qk_norm and rotate functions. This file names no module attribute or parameter
of the model.

Sampling settings come as one sampling.SamplingSettings. `Engine.start` returns a TokenStream:
next() gives one new id per sample, None once that sample has ended (at a stop token id, which is
not given out, or at max_new_tokens; the text layer above ends samples at stop strings with
stop(row)); finish_reasons and completion_tokens say why and after how many tokens. Finished rows
keep riding in the batch (their ids are dropped); the loop ends when every row has finished.
Engine.stream / Engine.generate keep the older keyword-style calls.

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
it costs one prefill per block_size // 2 tokens.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Collection, Iterator

import torch
import torch.nn.functional as F

from .errors import PocketError
from .model import GPT, DecodeView, KVCache, LayerTensors
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


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (as Hugging Face's): for every id already in the text (seen, a (B, V)
    presence mask), a positive logit is divided by penalty and a negative one multiplied by it, so
    penalty > 1 always makes a seen token less likely. Whole-row tensor ops: no loop over the vocabulary."""
    logits = logits.float()
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


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
        self.n_head, self.head_size = self.cfg.n_head, self.cfg.n_embd // self.cfg.n_head
        self.wte, self.wpe, self.rope, self.head = view.wte, view.wpe, view.rope, view.head
        self.norm, self.act, self.qk_norm, self.rotate = view.norm, view.activation, view.qk_norm, view.rotate
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
            qkv = F.linear(h, layer.attn_w, layer.attn_b).view(B, T, 3, self.n_head, self.head_size)
            q, k, v = self._qk_prep(qkv.permute(2, 0, 3, 1, 4), rope)  # (B, nh, T, hs) each
            cache.k[i, :, :, :T] = k
            cache.v[i, :, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
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
        norm, act = self.norm, self.act
        for k_cache, v_cache, layer in zip(cache.k, cache.v, self.step_layers):
            qkv = _mm(norm(x, *layer.norm_1), layer.attn_w, layer.attn_b).view(B, 3, self.n_head, self.head_size)
            q, k, v = self._qk_prep(qkv.transpose(0, 1), rope)  # (B, nh, hs) each
            k_cache.select(2, pos).copy_(k)  # into the preallocated (B, nh, block_size, hs) cache
            v_cache.select(2, pos).copy_(v)
            # one query sees every cached key: no mask
            keys, values = k_cache.narrow(2, 0, pos + 1), v_cache.narrow(2, 0, pos + 1)
            y = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values)
            x = _residual(x, y.reshape(B, -1), layer.attn_proj_w, layer.attn_proj_b)  # (B, nh, 1, hs) -> (B, C)
            h = act(_mm(norm(x, *layer.norm_2), layer.fc_w, layer.fc_b))
            x = _residual(x, h, layer.mlp_proj_w, layer.mlp_proj_b)
        cache.pos = pos + 1
        return _mm(norm(x, *self.norm_f), self.step_headT, None)

    def _qk_prep(
        self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv (3, ...) -> q, k, v with QK-norm and rotary positions applied to q and k together."""
        qk, v = qkv[:2], qkv[2]
        if self.qk_norm is not None:
            qk = self.qk_norm(qk)
        if rope is not None:
            qk = self.rotate(qk, *rope)
        return qk[0], qk[1], v


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
    a sample that has ended (see the module docstring). Made by Engine.start, which checks the
    prompt and runs the prefill; every step runs under the engine's own thread count, put back
    before next() returns. Independent of other streams (own KV cache, own random generator).

    prompt_tokens, completion_tokens[row] (ids generated for the row, the one that ended it
    included) and finish_reasons[row] ("stop", "length", None while running) are kept up to date.
    """

    def __init__(self, engine: "Engine", prompt_ids: list[int], settings: SamplingSettings,
                 stop_token_ids: Collection[int] = ()):
        check_prompt(prompt_ids, engine.cfg.block_size)
        B, s = settings.num_samples, settings
        self.settings, self._scope = s, _Scoped(engine.threads)
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = [0] * B
        self.finish_reasons: list[str | None] = [None if s.max_new_tokens else "length"] * B
        self._stop_ids = frozenset(stop_token_ids)
        self._running, self._steps, self._last = B if s.max_new_tokens else 0, 0, None
        with self._scope:
            self._dec = dec = engine.decoder()
            self._gen = torch.Generator(device=engine.device)
            self._gen.manual_seed(s.seed) if s.seed is not None else self._gen.seed()
            self._cache = dec.new_cache(B, engine.device)
            prompt = torch.tensor(prompt_ids, dtype=torch.long, device=engine.device).expand(B, -1)
            self._logits = dec.prefill(prompt, self._cache)
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

    def close(self) -> None:
        """End every sample now and free the KV cache (a server's cancelled request)."""
        for row, reason in enumerate(self.finish_reasons):
            if reason is None:
                self._finish(row, "stop")
        self._cache = self._window = self._logits = self._seen = None  # type: ignore[assignment]

    def next_ids(self) -> torch.Tensor:
        """The raw step: (B,) new ids on CPU, every row (ended ones too); no bookkeeping of rows."""
        s = self.settings
        if self._running == 0 or self._steps >= s.max_new_tokens:
            raise StopIteration
        with self._scope:
            if self._last is not None:
                self._advance(self._last)
            logits = self._logits if self._seen is None else penalize(self._logits, self._seen, s.repetition_penalty)
            nxt = pick_next(logits, s.temperature, s.top_k, s.top_p, self._gen)
            if self._seen is not None:
                self._seen.scatter_(1, nxt[:, None], True)
            self._last = nxt
            self._steps += 1
            return nxt.cpu()

    def _advance(self, tok: torch.Tensor) -> None:
        """Feed the last ids: one cached step, or, with the window full, slide it and prefill again."""
        T = self._dec.cfg.block_size
        self._window.append(tok)
        if self._cache.pos < T:
            self._logits = self._dec.step(tok, self._cache)
        else:
            self._window = self._window[-max(1, T // 2):]
            self._cache.reset()
            self._logits = self._dec.prefill(torch.stack(self._window, dim=1), self._cache)


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
            with _Scoped(self.threads):
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

    def start(self, prompt_ids: list[int], settings: SamplingSettings,
              stop_token_ids: Collection[int] = ()) -> TokenStream:
        """Check the prompt, prefill, and return the generation's TokenStream. settings.stop and
        settings.stop_at_eos are text-level (sampling.TextStream); the engine ends a sample at any
        of stop_token_ids (e.g. a tokenizer's end-of-text id) and does not give that id out."""
        return TokenStream(self, prompt_ids, settings, stop_token_ids)

    def stream(self, prompt_ids: list[int], settings: SamplingSettings | int | None = None, num_samples: int | None = None,
               **changes: Any) -> Iterator[torch.Tensor]:
        """Yield the next token of every sample, (num_samples,) on CPU, max_new_tokens times.

        The older form: stream(ids, max_new_tokens, num_samples, temperature=..., seed=...); a
        SamplingSettings works as the second argument too. Checks run at the first next()."""
        tokens = self.start(prompt_ids, as_settings(settings, num_samples=num_samples, **changes))
        while True:
            try:
                yield tokens.next_ids()
            except StopIteration:
                return

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
