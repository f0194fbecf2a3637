"""The GPT: a decoder-only transformer, readable top to bottom.

Shapes: B batch, T time (tokens), C n_embd, nh heads, hs head size (C // nh), V vocab.
Knows nothing of training, files or sampling; the engine drives generation through KVCache.
The defaults are GPT-2's architecture; a few options (rotary positions, RMSNorm, QK-norm,
squared ReLU, an untied head, zero-initialised projections) learn faster on small budgets.

The math is written once, as the plain functions below (norms, activations, QK-norm, rotary
positions, attention); the modules call them, and so does the engine's fast decode path, which
runs the same network without module calls. The engine's one door into the model is
GPT.decode_view(): a DecodeView holding every tensor by role (per layer a LayerTensors) and the
model's own norm, activation, qk_norm and rotate functions. Parameter names (state_dict keys,
GPT-2's: transformer.h.0.attn.c_attn.weight ...) stay inside this file; the engine never reads a
module attribute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

LAYERNORM_EPS = 1e-5  # nn.LayerNorm's and GPT-2's
RMSNORM_EPS = 1e-6

NormFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


# The norms call torch.layer_norm / torch.rms_norm, the ops F.layer_norm / F.rms_norm wrap: the same
# math without the wrapper's Python checks, which the engine's decode steps pay 2 * n_layer + 1 times.
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Normalise the last dimension (weight.shape) to zero mean and unit variance, then scale and shift."""
    return torch.layer_norm(x, weight.shape, weight, bias, LAYERNORM_EPS)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x / rms(x) * gain: LayerNorm without centring or bias, a little cheaper. (bias: always None.)"""
    return torch.rms_norm(x, weight.shape, weight, RMSNORM_EPS)


NORM_FUNCTIONS: dict[str, NormFn] = {"layernorm": layer_norm, "rmsnorm": rms_norm}


def gelu(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h)  # exact, with erf


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation: what GPT-2 itself uses (Hugging Face's "gelu_new")."""
    return F.gelu(h, approximate="tanh")


def relu2(h: torch.Tensor) -> torch.Tensor:
    """Squared ReLU."""
    return F.relu(h).square()


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": gelu, "gelu_new": gelu_tanh, "relu2": relu2}


def qk_rms_norm(qk: torch.Tensor) -> torch.Tensor:
    """QK-norm: every query / key head vector scaled to unit RMS (no gain)."""
    return torch.rms_norm(qk, qk.shape[-1:])


class KVCache:
    """Preallocated keys and values of every layer, filled left to right during generation."""

    def __init__(self, cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        hs = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached
        self.capacity = cfg.block_size

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, nh, T, hs) keys/values; return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.pos = 0

    def rows(self, start: int, n: int, pos: int = 0) -> "KVCache":
        """A cache over rows start..start+n of this one: the same storage, its own position. Several
        generations share one cache this way (engine.DecodeBatch), each at its own length."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, start : start + n], self.v[:, start : start + n]
        view.pos, view.capacity = pos, self.capacity
        return view


class Norm(nn.Module):
    """LayerNorm (gain and, with bias, a bias) or RMSNorm (gain only): NORM_FUNCTIONS[cfg.norm]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fn = NORM_FUNCTIONS[cfg.norm]
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
    """Rotary embedding: turn each pair (x1[i], x2[i]) of a head by a position-dependent angle."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.qk_norm = layer, cfg.n_head, cfg.qk_norm
        self.dropout = cfg.dropout if cfg.attention_dropout else 0.0  # on the attention probabilities
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = Dropout(cfg.dropout)
        self.bf16_attention = False  # under CPU bf16 autocast: attention in bf16 too (use_bf16_attention)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.qk_norm:  # bounded attention logits: steadier at high learning rates
            q, k = qk_rms_norm(q), qk_rms_norm(k)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, nh, start + T, hs)
        dropout = self.dropout if self.training else 0.0
        if dropout > 0 and start == 0 and cpu_bf16_autocast(v):
            # with dropout, SDPA leaves its fused kernel for a slow fp32 math path (bench/RESULTS.md)
            y = attend_dropped(q, k, v, dropout).to(v.dtype)
        elif v.dtype == torch.bfloat16 and v.device.type == "cpu":
            # PyTorch's CPU attention kernels are several times slower in bf16 than in fp32 on some CPUs (its
            # backward most of all; bench/throughput.py), so under CPU autocast attention runs in fp32 unless
            # this CPU measured bf16 faster (use_bf16_attention). v decides: RoPE's fp32 tables already
            # turned q and k into fp32, v is the projection's bf16.
            if self.bf16_attention:
                y = attend(q.to(v.dtype), k.to(v.dtype), v, start, dropout)
            else:
                with torch.autocast("cpu", enabled=False):
                    y = attend(q.float(), k.float(), v.float(), start, dropout).to(v.dtype)
        else:
            y = attend(q, k, v, start, dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


def use_bf16_attention(model: nn.Module, on: bool) -> None:
    """Run every attention layer of model in bf16 (on) or fp32 (off) under CPU bf16 autocast."""
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            m.bf16_attention = on


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, dropout: float) -> torch.Tensor:
    """Causal attention of T new queries over start + T keys (start = tokens already cached)."""
    T = q.size(2)
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    if T == 1:  # one new token sees everything before it: no mask needed
        return F.scaled_dot_product_attention(q, k, v)
    # a chunk after cached tokens: row i may see keys up to start + i
    mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout)
        self.act = ACTIVATIONS[cfg.mlp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = Norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = Norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


@dataclass(frozen=True, eq=False)
class LayerTensors:
    """One block's tensors by role, detached (they share the parameters' storage).

    Matrices are (out, in) as nn.Linear holds them; a bias is None when the model has none.
    norm_1 / norm_2 are (weight, bias) for DecodeView.norm.
    """

    norm_1: tuple[torch.Tensor, torch.Tensor | None]
    attn_w: torch.Tensor  # (3C, C): q, k, v stacked, heads side by side in each
    attn_b: torch.Tensor | None
    attn_proj_w: torch.Tensor  # (C, C)
    attn_proj_b: torch.Tensor | None
    norm_2: tuple[torch.Tensor, torch.Tensor | None]
    fc_w: torch.Tensor  # (4C, C)
    fc_b: torch.Tensor | None
    mlp_proj_w: torch.Tensor  # (C, 4C)
    mlp_proj_b: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class DecodeView:
    """Everything needed to run this GPT without calling its modules (GPT.decode_view()).

    Per block: h = norm(x, *norm_1); q, k, v = split(h @ attn_w.T + attn_b) into heads;
    q, k = qk_norm(q), qk_norm(k) if qk_norm is set; q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    with rotary positions; x += causal_attention(q, k, v) @ attn_proj_w.T + attn_proj_b;
    x += activation(norm(x, *norm_2) @ fc_w.T + fc_b) @ mlp_proj_w.T + mlp_proj_b.
    Then logits = norm(x, *norm_f) @ head.T. Inputs: wte[ids], plus wpe[positions] (learned
    positions) or rotary tables rope = (cos, sin), each (block_size, hs / 2).
    """

    config: ModelConfig
    wte: torch.Tensor  # (V, C)
    wpe: torch.Tensor | None  # (block_size, C), learned positions; None with rotary ones
    rope: tuple[torch.Tensor, torch.Tensor] | None
    layers: list[LayerTensors]
    norm_f: tuple[torch.Tensor, torch.Tensor | None]
    head: torch.Tensor  # (V, C); the same tensor as wte when tied
    norm: NormFn
    activation: Callable[[torch.Tensor], torch.Tensor]
    qk_norm: Callable[[torch.Tensor], torch.Tensor] | None  # applied to queries and keys per head
    rotate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size comes from the prepared data"
        self.config = cfg
        layers = dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=Norm(cfg),
        )
        if cfg.pos_emb == "learned":
            layers["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # input and output share one matrix
        if cfg.pos_emb == "rope":  # angles are derived, not learned: kept out of the checkpoint
            cos, sin = rope_tables(cfg.block_size, cfg.n_embd // cfg.n_head)
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

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied head is counted once
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def decode_view(self) -> DecodeView:
        """The network's tensors by role and its math functions, for a decoder (engine.Decoder)."""
        cfg, tr = self.config, self.transformer
        layers = [
            LayerTensors(
                norm_1=b.ln_1.tensors(), attn_w=b.attn.c_attn.weight.detach(), attn_b=_detached(b.attn.c_attn.bias),
                attn_proj_w=b.attn.c_proj.weight.detach(), attn_proj_b=_detached(b.attn.c_proj.bias),
                norm_2=b.ln_2.tensors(), fc_w=b.mlp.c_fc.weight.detach(), fc_b=_detached(b.mlp.c_fc.bias),
                mlp_proj_w=b.mlp.c_proj.weight.detach(), mlp_proj_b=_detached(b.mlp.c_proj.bias),
            )
            for b in tr.h
        ]
        return DecodeView(
            config=cfg, wte=tr.wte.weight.detach(), wpe=tr.wpe.weight.detach() if "wpe" in tr else None,
            rope=(self.rope_cos, self.rope_sin) if cfg.pos_emb == "rope" else None, layers=layers,
            norm_f=tr.ln_f.tensors(), head=self.lm_head.weight.detach(), norm=NORM_FUNCTIONS[cfg.norm],
            activation=ACTIVATIONS[cfg.mlp], qk_norm=qk_rms_norm if cfg.qk_norm else None, rotate=rotate,
        )

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V), or (B, 1, V) with last_only; loss if targets."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])  # (T, hs/2)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, cache)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def rope_tables(max_len: int, head_size: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, (max_len, head_size / 2) each."""
    freqs = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()
