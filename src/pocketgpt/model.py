"""The GPT: a decoder-only transformer, readable top to bottom.

Shapes: B batch, T time (tokens), C n_embd, nh query heads, nkv key/value heads (nh unless
grouped-query attention), hs head size (C // nh unless config.head_size), V vocab.
Knows nothing of training, files or sampling; the engine drives generation through KVCache.
The defaults are GPT-2's architecture; a few options (rotary positions, RMSNorm, QK-norm,
squared ReLU, an untied head, zero-initialised projections) learn faster on small budgets, and
the rest are what the open families differ in (grouped-query attention, a gated SwiGLU MLP of
its own width, a head size apart from the width, the rotary base and Llama 3's scaling of it, the
norms' epsilon, q/k/v biases, QK-norm's learned gains): config.ModelConfig's derived widths say how
wide each matrix is.

The math is written once, as the plain functions below (norms, activations, QK-norm, rotary
positions, attention); the modules call them, and so does the engine's fast decode path, which
runs the same network without module calls. The engine's one door into the model is
GPT.decode_view(): a DecodeView holding every tensor by role (per layer a LayerTensors) and the
model's own norm, activation and split_qkv functions. Parameter names (state_dict keys,
GPT-2's: transformer.h.0.attn.c_attn.weight ...) stay inside this file and the architecture
families' rename tables (arch/); the engine never reads a module attribute.

The wiring of a block is written twice, on purpose: once here as modules (training: autograd,
dropout, autocast) and once in decoder.py as flat code over DecodeView (generation).
The ops themselves (norms, activations, the q/k/v split with QK-norm and rotation) are written
once, here, and both call them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .sizing import loss_slice_rows

LAYERNORM_EPS = 1e-5  # nn.LayerNorm's and GPT-2's
RMSNORM_EPS = 1e-6

NormFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
RopeTables = tuple[torch.Tensor, torch.Tensor]
QKGains = tuple[torch.Tensor, torch.Tensor]  # a layer's learned QK-norm gains: q's, then k's


# The norms call torch.layer_norm / torch.rms_norm, the ops F.layer_norm / F.rms_norm wrap: the same
# math without the wrapper's Python checks, which the engine's decode steps pay 2 * n_layer + 1 times.
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Normalise the last dimension (weight.shape) to zero mean and unit variance, then scale and shift."""
    return torch.layer_norm(x, weight.shape, weight, bias, LAYERNORM_EPS)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x / rms(x) * gain: LayerNorm without centring or bias, a little cheaper. (bias: always None.)"""
    return torch.rms_norm(x, weight.shape, weight, RMSNORM_EPS)


NORM_FUNCTIONS: dict[str, NormFn] = {"layernorm": layer_norm, "rmsnorm": rms_norm}


def norm_function(cfg: ModelConfig) -> NormFn:
    """The config's norm: the plain function at the norm's own epsilon, else one bound to norm_eps."""
    if not cfg.norm_eps:
        return NORM_FUNCTIONS[cfg.norm]
    eps = cfg.norm_eps
    if cfg.norm == "layernorm":
        return lambda x, weight, bias: torch.layer_norm(x, weight.shape, weight, bias, eps)
    return lambda x, weight, bias=None: torch.rms_norm(x, weight.shape, weight, eps)


def gelu(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h)  # exact, with erf


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation: what GPT-2 itself uses (Hugging Face's "gelu_new")."""
    return F.gelu(h, approximate="tanh")


def relu2(h: torch.Tensor) -> torch.Tensor:
    """Squared ReLU."""
    return F.relu(h).square()


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """The gated MLP's middle: h holds the gate's and the up projection's outputs side by side
    (one fused matmul); silu(gate) * up, half as wide as h."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


# Each maps the first MLP matrix's output to the second one's input (a gated kind halves the width).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": gelu, "gelu_new": gelu_tanh, "relu2": relu2, "swiglu": swiglu}


def qk_rms_norm(qk: torch.Tensor, gain: torch.Tensor | None = None, eps: float | None = None) -> torch.Tensor:
    """QK-norm: every query / key head vector scaled to unit RMS, then by gain (head_size,) if given.
    eps None is torch's own (float32's machine epsilon): unit-gain QK-norm as it always was."""
    if gain is not None and gain.dtype != qk.dtype:  # bf16 q/k under autocast: torch's fused kernel wants one dtype
        gain = gain.to(qk.dtype)
    return torch.rms_norm(qk, qk.shape[-1:], gain, eps)


def qk_norm_eps(cfg: ModelConfig) -> float:
    """The epsilon of QK-norm with gains (Qwen3's: the norms' own, rms_norm_eps)."""
    return cfg.norm_eps or RMSNORM_EPS


class HeadNorm(nn.Module):
    """QK-norm with a learned gain per head dimension, shared by every head of q (or of k)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(cfg.head_dim))
        self.eps = qk_norm_eps(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qk_rms_norm(x, self.weight, self.eps)


class KVCache:
    """Keys and values of every layer, filled left to right during generation (the decoder writes
    them). It holds the key/value heads only (grouped-query attention's smaller cache), and room for
    `positions` tokens: what a generation will use, never more than the context (a model may declare
    40k positions; preallocating them all would cost gigabytes per sample for a short reply). The
    engine asks for a bigger one (`resized`) when a row would pass the room it has."""

    def __init__(self, cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                 positions: int | None = None):
        """positions: the tokens it has room for (capped at, and by default, cfg.block_size)."""
        positions = cfg.block_size if positions is None else min(positions, cfg.block_size)
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, positions, cfg.head_dim)
        # zeros, not empty: a slot past a row's position is masked (-inf + finite), and garbage
        # could be NaN or inf, which the mask cannot hide
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached

    @property
    def capacity(self) -> int:
        """Tokens each row has room for."""
        return self.k.size(3)

    @property
    def nbytes(self) -> int:
        """Bytes of its keys and values (a view: of its rows)."""
        return self.k.nbytes + self.v.nbytes

    def reset(self) -> None:
        self.pos = 0

    def rows(self, start: int, n: int, pos: int = 0) -> "KVCache":
        """A cache over rows start..start+n of this one: the same storage, its own position. Several
        generations share one cache this way (engine.DecodeBatch), each at its own length."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, start : start + n], self.v[:, start : start + n]
        view.pos = pos
        return view

    def resized(self, batch_size: int, positions: int) -> "KVCache":
        """A cache of batch_size rows and room for positions tokens, holding this one's keys and
        values in its first rows and positions (both at least this one's). Its position is this one's."""
        n_layer, rows, kv_heads, room, head_dim = self.k.shape
        k = self.k.new_zeros((n_layer, batch_size, kv_heads, positions, head_dim))
        v = torch.zeros_like(k)
        k[:, :rows, :, :room] = self.k
        v[:, :rows, :, :room] = self.v
        bigger = object.__new__(KVCache)
        bigger.k, bigger.v, bigger.pos = k, v, self.pos
        return bigger


class Norm(nn.Module):
    """LayerNorm (gain and, with bias, a bias) or RMSNorm (gain only): norm_function(cfg)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fn = norm_function(cfg)
        self.weight = nn.Parameter(torch.ones(cfg.n_embd))
        with_bias = cfg.bias and cfg.norm == "layernorm"
        self.bias = nn.Parameter(torch.zeros(cfg.n_embd)) if with_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight, self.bias)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _detached(self.weight), _detached(self.bias)


def _detached(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.detach()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: turn each pair (x1[i], x2[i]) of a head by a position-dependent angle.
    (The pairs are a head's two halves: Hugging Face's rotate_half convention.)"""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class QKVSplit:
    """The fused q/k/v projection's output -> queries, keys and values by head, with QK-norm and
    rotary positions applied to q and k: the model's own layout, which the engine calls as it is.

    qkv (B, T, W) gives q (B, nh, T, hs), k and v (B, nkv, T, hs); qkv (B, W) (one token per row)
    gives q (B, nh, hs), k and v (B, nkv, hs). rope: (cos, sin) broadcastable to q's shape without
    its head axis ((T, hs/2), (hs/2,) or (B, 1, hs/2)), or None. gains: a layer's QK-norm gains
    (q's, k's; LayerTensors.qk_gains) where the model has them. Without grouped-query attention or
    gains q and k are one tensor until the end, so QK-norm and the rotation run once for both (the
    decode step's per-op cost); otherwise they run apart.
    """

    __slots__ = ("n_head", "n_kv", "hs", "sizes", "qk_norm", "eps")

    def __init__(self, cfg: ModelConfig):
        self.n_head, self.n_kv, self.hs = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.sizes = list(cfg.qkv_sizes)
        self.qk_norm = qk_rms_norm if cfg.qk_norm else None
        self.eps = qk_norm_eps(cfg)

    def __call__(self, qkv: torch.Tensor, rope: RopeTables | None,
                 gains: QKGains | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lead = qkv.shape[:-1]
        if self.n_kv == self.n_head and gains is None:
            x = qkv.view(*lead, 3, self.n_head, self.hs)
            x = x.permute(2, 0, 3, 1, 4) if len(lead) == 2 else x.transpose(0, 1)  # (3, B, nh, [T,] hs)
            if self.qk_norm is None and rope is None:
                return x.unbind(0)  # type: ignore[return-value]
            qk, v = x[:2], x[2]
            if self.qk_norm is not None:
                qk = self.qk_norm(qk)
            if rope is not None:
                qk = rotate(qk, *rope)
            return qk[0], qk[1], v
        q, k, v = qkv.split(self.sizes, dim=-1)
        q, k, v = (t.view(*lead, n, self.hs) for t, n in ((q, self.n_head), (k, self.n_kv), (v, self.n_kv)))
        if len(lead) == 2:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if gains is not None:
            q, k = qk_rms_norm(q, gains[0], self.eps), qk_rms_norm(k, gains[1], self.eps)
        elif self.qk_norm is not None:
            q, k = self.qk_norm(q), self.qk_norm(k)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        return q, k, v


def repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, nkv, T, hs) keys or values -> (B, nkv * groups, T, hs): each key/value head repeated for
    the query heads it serves (query head i reads key/value head i // groups)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.qk_norm, self.groups = cfg.n_head, cfg.qk_norm, cfg.n_head // cfg.kv_heads
        self.qkv_sizes, self.hs, self.width = list(cfg.qkv_sizes), cfg.head_dim, cfg.attn_width
        self.dropout = cfg.dropout if cfg.attention_dropout else 0.0  # on the attention probabilities
        # q, k, v in one matmul
        self.c_attn = nn.Linear(cfg.n_embd, sum(self.qkv_sizes), bias=cfg.bias or cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.attn_width, cfg.n_embd, bias=cfg.bias)
        self.learned_qk_gains = cfg.qk_norm_gains
        if cfg.qk_norm_gains:  # QK-norm's learned gains, one per head dimension for q and for k
            self.q_norm, self.k_norm = HeadNorm(cfg), HeadNorm(cfg)
        self.resid_dropout = Dropout(cfg.dropout)
        self.bf16_attention = False  # under CPU bf16 autocast: attention in bf16 too (use_bf16_attention)

    def forward(self, x: torch.Tensor, rope: RopeTables | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.qkv_sizes, dim=2)
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, -1, self.hs).transpose(1, 2) for t in (k, v))  # (B, nkv, T, hs)
        if self.learned_qk_gains:
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm:  # bounded attention logits: steadier at high learning rates
            q, k = qk_rms_norm(q), qk_rms_norm(k)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
        dropout = self.dropout if self.training else 0.0
        if dropout > 0 and cpu_bf16_autocast(v):
            # with dropout, SDPA leaves its fused kernel for a slow fp32 math path (bench/RESULTS.md)
            y = attend_dropped(q, k, v, dropout).to(v.dtype)
        elif v.dtype == torch.bfloat16 and v.device.type == "cpu":
            # PyTorch's CPU attention kernels are several times slower in bf16 than in fp32 on some CPUs (its
            # backward most of all; bench/throughput.py), so under CPU autocast attention runs in fp32 unless
            # this CPU measured bf16 faster (use_bf16_attention). v decides: RoPE's fp32 tables already
            # turned q and k into fp32, v is the projection's bf16.
            if self.bf16_attention:
                y = attend(q.to(v.dtype), k.to(v.dtype), v, dropout)
            else:
                with torch.autocast("cpu", enabled=False):
                    y = attend(q.float(), k.float(), v.float(), dropout).to(v.dtype)
        else:
            y = attend(q, k, v, dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, self.width)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))

    def qk_gains(self) -> QKGains | None:
        """QK-norm's gains (q's, k's), detached; None without them."""
        if not self.learned_qk_gains:
            return None
        return self.q_norm.weight.detach(), self.k_norm.weight.detach()


def use_bf16_attention(model: nn.Module, on: bool) -> None:
    """Run every attention layer of model in bf16 (on) or fp32 (off) under CPU bf16 autocast."""
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            m.bf16_attention = on


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Causal attention of T queries over the same T positions' keys, (B, nh, T, hs) each."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)


def cpu_bf16_autocast(x: torch.Tensor) -> bool:
    """x is on the CPU inside bf16 autocast: where the cheap dropout path (keep_mask) applies."""
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def attend_dropped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Causal attention with dropout on its probabilities, written out (for CPU bf16 autocast training):
    the two products in bf16 (autocast), the softmax in fp32, the mask from keep_mask's cheap draws."""
    T = q.size(2)
    att = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.size(-1)))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    att = att.masked_fill(future, float("-inf")).softmax(dim=-1)
    keep, scale = keep_mask(att.shape, dropout, att.device)
    return (att * keep * scale) @ v


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A dropout mask (True = kept, with probability ~1 - p) and the scale 1 / P(kept).

    Four 16-bit draws per 64-bit random number: CPU RNG throughput is what dropout costs there
    (bernoulli_ draws one number per element, ~5x slower). p is rounded to a multiple of 1/65536;
    the scale is that of the rounded p, so the expectation stays exact.
    """
    n = math.prod(shape)
    cut = min(round(p * 65536), 65535)  # int16 values below -32768 + cut are dropped; one in 65536 always kept
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    keep = words.view(torch.int16)[:n].view(shape) >= -32768 + cut
    return keep, 65536 / (65536 - cut)


class Dropout(nn.Dropout):
    """nn.Dropout, but under CPU bf16 autocast its mask comes from keep_mask (the fast CPU path of the
    presets that train in bf16); float32 and GPU training keep torch's own dropout and its numbers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0 and cpu_bf16_autocast(x):
            keep, scale = keep_mask(x.shape, self.p, x.device)
            return x * keep * scale
        return super().forward(x)


class MLP(nn.Module):
    """c_proj(act(c_fc(x))); a gated kind's c_fc holds the gate's rows, then the up projection's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.fc_rows, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout)
        self.act = ACTIVATIONS[cfg.mlp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = Norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = Norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: RopeTables | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


@dataclass(frozen=True, eq=False)
class LayerTensors:
    """One block's tensors by role, detached (they share the parameters' storage).

    Matrices are (out, in) as nn.Linear holds them; a bias is None when the model has none.
    norm_1 / norm_2 are (weight, bias) for DecodeView.norm.
    """

    norm_1: tuple[torch.Tensor, torch.Tensor | None]
    attn_w: torch.Tensor  # (sum(qkv_sizes), C): q, k, v stacked, heads side by side in each
    attn_b: torch.Tensor | None
    attn_proj_w: torch.Tensor  # (C, attn_width)
    attn_proj_b: torch.Tensor | None
    norm_2: tuple[torch.Tensor, torch.Tensor | None]
    fc_w: torch.Tensor  # (fc_rows, C): a gated MLP's gate rows, then its up rows
    fc_b: torch.Tensor | None
    mlp_proj_w: torch.Tensor  # (C, mlp_hidden)
    mlp_proj_b: torch.Tensor | None
    qk_gains: QKGains | None = None  # QK-norm's (q, k) gains (head_size,) each, if learned


class LayersOnRead(Sequence[LayerTensors]):
    """Layers made one at a time as a decoder reads them, each dropped once used: a view whose matrices
    would not fit all at once (lora.MergedOnRead merges a block's adapters when it is reached)."""

    def __init__(self, count: int, make: Callable[[int], LayerTensors]):
        self.count, self.make = count, make

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> LayerTensors:  # type: ignore[override]  # no slices: one layer at a time
        if not -self.count <= i < self.count:
            raise IndexError(i)
        return self.make(i % self.count)

    def __iter__(self) -> Iterator[LayerTensors]:
        return (self.make(i) for i in range(self.count))

    def map(self, fn: Callable[[LayerTensors], LayerTensors]) -> "LayersOnRead":
        """fn applied to each layer as it is made (a decoder's step copy of it)."""
        return LayersOnRead(self.count, lambda i: fn(self.make(i)))


@dataclass(frozen=True, eq=False)
class DecodeView:
    """Everything needed to run this GPT without calling its modules (GPT.decode_view()).

    Per block: h = norm(x, *norm_1); q, k, v = split_qkv(h @ attn_w.T + attn_b, rope, qk_gains)
    (heads, QK-norm and rotary positions: QKVSplit); x += causal_attention(q, k, v) @ attn_proj_w.T +
    attn_proj_b, where each key/value head serves n_head / kv_heads query heads in a row;
    x += activation(norm(x, *norm_2) @ fc_w.T + fc_b) @ mlp_proj_w.T + mlp_proj_b.
    Then logits = norm(x, *norm_f) @ head.T. Inputs: wte[ids], plus wpe[positions] (learned
    positions) or rotary tables rope = (cos, sin), each (block_size, hs / 2).
    """

    config: ModelConfig
    wte: torch.Tensor  # (V, C)
    wpe: torch.Tensor | None  # (block_size, C), learned positions; None with rotary ones
    rope: tuple[torch.Tensor, torch.Tensor] | None
    layers: Sequence[LayerTensors]  # a list, or LayersOnRead
    norm_f: tuple[torch.Tensor, torch.Tensor | None]
    head: torch.Tensor  # (V, C); the same tensor as wte when tied
    norm: NormFn
    activation: Callable[[torch.Tensor], torch.Tensor]  # the MLP's middle, gated or not
    split_qkv: QKVSplit


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size comes from the prepared data"
        self.config = cfg
        layers = dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=Norm(cfg),
        )
        if cfg.pos_emb == "learned":
            layers["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # input and output share one matrix
        if cfg.pos_emb == "rope":  # angles are derived, not learned: kept out of the checkpoint
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        cfg = self.config
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # GPT-2: scale residual projections so the residual stream's variance stays put with depth;
        # or start them at zero, so every block begins as the identity
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if cfg.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks in order: what per-block code outside this file (FSDP's wrapping,
        gradient checkpointing, Muon's matrices, LoRA's targets) walks, instead of a module path."""
        return self.transformer.h

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.wte

    @classmethod
    def from_state(cls, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> "GPT":
        """A GPT of cfg holding the given tensors themselves (assigned, not copied): no random init to
        throw away, and a big model is never held twice. Raises ValueError naming a missing,
        unexpected or misshapen tensor."""
        with torch.device("meta"):  # the module tree alone; the tensors come next
            model = cls(cfg)
        own = model.state_dict()
        if cfg.tie_embeddings:  # the head is the embedding itself
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
            own.pop("lm_head.weight", None)
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise ValueError(f"missing {missing[:3]}, unexpected {extra[:3]}")
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ValueError(f"{k} is {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        model.load_state_dict(state, strict=False, assign=True)
        if cfg.tie_embeddings:  # assign made two Parameters of the shared matrix; one again
            model.lm_head.weight = model.transformer.wte.weight
        if cfg.pos_emb == "rope":  # derived, in no state dict: computed, not left on the meta device
            model.rope_cos, model.rope_sin = rope_tables(cfg)
        return model

    def with_vocab(self, vocab_size: int) -> "GPT":
        """This GPT with rows added to its embedding (and an untied head) for new token ids, each the mean
        of the existing rows: every existing id's embedding and logit stay as they were."""
        state = {k: v.detach() for k, v in self.state_dict().items()}
        extra = vocab_size - self.config.vocab_size
        for name in ("transformer.wte.weight", "lm_head.weight"):
            rows = state[name]
            state[name] = torch.cat([rows, rows.mean(dim=0, keepdim=True).expand(extra, -1)])
        return GPT.from_state(replace(self.config, vocab_size=vocab_size), state)

    def cropped_state(self, block_size: int) -> dict[str, torch.Tensor]:
        """The state dict for a GPT of a shorter context: a learned position table keeps its first rows
        (a small copy: safetensors saves no part-views); every other tensor is this model's own."""
        state = self.state_dict()
        if "wpe" in self.transformer and block_size < self.config.block_size:
            key = "transformer.wpe.weight"
            state[key] = state[key][:block_size].clone()
        return state

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied head is counted once
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def decode_view(self) -> DecodeView:
        """The network's tensors by role and its math functions, for a decoder (decoder.Decoder)."""
        cfg, tr = self.config, self.transformer
        layers = [
            LayerTensors(
                norm_1=b.ln_1.tensors(), attn_w=b.attn.c_attn.weight.detach(), attn_b=_detached(b.attn.c_attn.bias),
                attn_proj_w=b.attn.c_proj.weight.detach(), attn_proj_b=_detached(b.attn.c_proj.bias),
                norm_2=b.ln_2.tensors(), fc_w=b.mlp.c_fc.weight.detach(), fc_b=_detached(b.mlp.c_fc.bias),
                mlp_proj_w=b.mlp.c_proj.weight.detach(), mlp_proj_b=_detached(b.mlp.c_proj.bias),
                qk_gains=b.attn.qk_gains(),
            )
            for b in tr.h
        ]
        return DecodeView(
            config=cfg, wte=tr.wte.weight.detach(), wpe=tr.wpe.weight.detach() if "wpe" in tr else None,
            rope=(self.rope_cos, self.rope_sin) if cfg.pos_emb == "rope" else None, layers=layers,
            norm_f=tr.ln_f.tensors(), head=self.lm_head.weight.detach(), norm=norm_function(cfg),
            activation=ACTIVATIONS[cfg.mlp], split_qkv=QKVSplit(cfg),
        )

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V); the loss too if targets. (Generation runs the
        decoder (decoder.py) over decode_view(), with its KV cache, not this.)"""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        norms = self.transformer.ln_f.weight.dtype
        if x.dtype != norms:  # a bfloat16 embedding in a float32 model (a LoRA base: lora.set_base_dtype)
            x = x.to(norms)
        rope = None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        else:
            rope = (self.rope_cos[:T], self.rope_sin[:T])  # (T, hs/2)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope)
        x = self.transformer.ln_f(x)
        if targets is not None and loss_in_slices(B * T, self.config.vocab_size):
            return None, sliced_loss(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1))
        logits = linear(x, self.lm_head.weight)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def loss_in_slices(tokens: int, vocab_size: int) -> bool:
    """Whether a training forward computes its loss in slices of positions (sliced_loss) rather than
    over all logits at once: when they would be large, and never inside torch.compile (where the
    logits are small anyway: the char models it pays for)."""
    return loss_slice_rows(tokens, vocab_size) < tokens and not torch.compiler.is_compiling()


def sliced_loss(x: torch.Tensor, head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of head(x) against targets (-100: not counted, as F.cross_entropy),
    computed a slice of positions at a time: at most one slice's logits and their gradient are ever
    held (sizing.loss_slice_rows). A 151,936-token vocabulary at context 512 would otherwise hold
    3 x 311 MB of float32 at once. With gradients on, each slice's gradients (for x, and for the head
    when it trains) are computed as the slice is, so the backward pass does no head product of its own:
    two head-sized products a step for a frozen head, not the three of recomputing the logits. The same
    loss and gradients up to float rounding (sums of slices)."""
    if head.dtype != x.dtype and not head.requires_grad and not torch.is_autocast_enabled(x.device.type):
        head = head.to(x.dtype)  # a frozen bfloat16 head widened once for every slice, not twice a slice
    if torch.is_grad_enabled() and (x.requires_grad or head.requires_grad):
        return _SlicedLoss.apply(x, head, targets)
    rows = loss_slice_rows(x.size(0), head.size(0))
    total = x.new_zeros((), dtype=torch.float32)
    for i in range(0, x.size(0), rows):
        total = total + F.cross_entropy(linear(x[i:i + rows], head).float(), targets[i:i + rows], reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


class _SlicedLoss(torch.autograd.Function):
    """sliced_loss with the gradients made in the forward pass (the loss is a scalar: its backward
    only scales them). The products run in autocast's dtype where autocast is on, as F.linear would."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, head: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            w = head.to(dtype)
            count = (targets != -100).sum().clamp(min=1)
            grad_x = torch.empty_like(x) if x.requires_grad else None
            grad_w = torch.zeros(head.shape, dtype=torch.float32, device=x.device) if head.requires_grad else None
            total = x.new_zeros((), dtype=torch.float32)
            rows = loss_slice_rows(x.size(0), head.size(0))
            for i in range(0, x.size(0), rows):
                xs, ts = x[i:i + rows].to(dtype), targets[i:i + rows]
                # one log-softmax gives both the loss and, exponentiated, its gradient
                logp = torch.log_softmax((xs @ w.t()).float(), dim=-1)
                counted = ts != -100
                total -= logp[counted, ts[counted]].sum()
                # d(sum of nll)/d(logits) = softmax - one_hot, zero on rows not counted
                grad = logp.exp_()
                grad[counted, ts[counted]] -= 1.0
                grad[~counted] = 0.0
                grad = grad.to(dtype)
                if grad_x is not None:
                    grad_x[i:i + rows] = grad @ w
                if grad_w is not None:
                    if dtype == torch.float32:
                        grad_w.addmm_(grad.t(), xs)
                    else:
                        grad_w += (grad.t() @ xs).float()
        ctx.save_for_backward(*(g.div_(count) for g in (grad_x, grad_w) if g is not None))
        ctx.has = (grad_x is not None, grad_w is not None)  # type: ignore[attr-defined]
        ctx.head_dtype = head.dtype  # type: ignore[attr-defined]
        return total / count

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
        saved = list(ctx.saved_tensors)  # type: ignore[attr-defined]
        has_x, has_w = ctx.has  # type: ignore[attr-defined]
        gx = saved.pop(0) * grad_out if has_x else None
        gw = (saved.pop(0) * grad_out).to(ctx.head_dtype) if has_w else None  # type: ignore[attr-defined]
        return gx, gw, None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, also for a frozen weight stored narrower than x outside autocast (a LoRA base kept in
    bfloat16 on a CPU that computes in float32): the weight is widened for the product and again in the
    backward pass, never held wide in between (autograd would keep the wide copy of every layer)."""
    if w.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return F.linear(x, w, b)
    y = _WidenedLinear.apply(x, w)
    return y if b is None else y + b.to(y.dtype)


class _WidenedLinear(torch.autograd.Function):
    """x @ w.T with w widened to x's dtype; w is frozen (no gradient), and only its narrow self is saved."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        assert not w.requires_grad, "a narrow weight is a frozen one"
        ctx.save_for_backward(w)
        return F.linear(x, w.to(x.dtype))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (w,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad @ w.to(grad.dtype), None


def rope_tables(cfg: ModelConfig) -> RopeTables:
    """cos and sin of position * frequency, (block_size, head_size / 2) each: training's and the decoder's."""
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), rope_frequencies(cfg))
    return angles.cos(), angles.sin()


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The rotary positions' angular frequency per pair of a head's dimensions (head_size / 2,), in
    radians per position: rope_theta ** (-2i / head_size), then the config's scaling."""
    hs = cfg.head_dim
    freqs = cfg.rope_theta ** (-torch.arange(0, hs, 2, dtype=torch.float32) / hs)
    return llama3_scaled(freqs, cfg) if cfg.rope_scaling == "llama3" else freqs


def llama3_scaled(freqs: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3's per-frequency scaling (published with Llama 3.1): measured in turns over the context
    the model first trained at (rope_original_context / wavelength), a frequency that turns more than
    rope_high_freq_factor times keeps its speed, one that turns fewer than rope_low_freq_factor times
    is slowed by rope_factor (its positions then reach rope_factor times further before they wrap),
    and between the two the result moves linearly in those turns from slowed to kept."""
    turns = cfg.rope_original_context * freqs / (2 * math.pi)
    kept = ((turns - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)).clamp(0, 1)
    return (1 - kept) * freqs / cfg.rope_factor + kept * freqs
