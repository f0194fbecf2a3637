"""Llama (LlamaForCausalLM: SmolLM2, TinyLlama, Llama 3.2), Qwen2 (Qwen2ForCausalLM: Qwen2.5) and Qwen3
(Qwen3ForCausalLM), llama.cpp's llama, qwen2 and qwen3.

All three are the same block: RMSNorm before attention and MLP, rotary positions (a head's two
halves, Hugging Face's rotate_half, which is ours), grouped-query attention, a SwiGLU MLP of its own
width, no biases; Qwen2 adds biases on q, k and v, and Qwen3 QK-norm with learned gains (q_norm,
k_norm: one gain vector of head_dim each per layer, before the rotation). Their q, k and v are
three matrices where ours are one (rows joined on import, split on export), and so are the MLP's
gate and up. Each may scale its rotary frequencies as Llama 3 does (rope_type "llama3").

llama.cpp runs llama's rotary positions on interleaved pairs, so its converter reorders the rows
of q and k within each head (gguf_fix below); qwen2 and qwen3 it runs on halves, as we do. Llama 3's
scaling reaches llama.cpp as a tensor of per-frequency divisors (rope_freqs), which only its llama
reads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import PocketError
from .family import GATE_UP, QKV, SAME, Family, Rename

ROPE_THETA = 10000.0  # LlamaConfig's default
RMS_EPS = 1e-6
REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
# config.json's keys of Llama 3's rotary scaling -> ModelConfig's
LLAMA3_KEYS = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor", "original_max_position_embeddings": "rope_original_context"}


def renames(cfg: ModelConfig) -> list[Rename]:
    """Every tensor of a Llama / Qwen2 / Qwen3 checkpoint for cfg, in the order of their modules."""
    table = [Rename("transformer.wte.weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        qkv = tuple(f"{theirs}self_attn.{p}_proj." for p in "qkv")
        table += [
            Rename(ours + "ln_1.weight", (theirs + "input_layernorm.weight",)),
            Rename(ours + "attn.c_attn.weight", tuple(n + "weight" for n in qkv), QKV),
            *([Rename(ours + "attn.c_attn.bias", tuple(n + "bias" for n in qkv), QKV)] if cfg.qkv_bias else []),
            Rename(ours + "attn.c_proj.weight", (theirs + "self_attn.o_proj.weight",)),
            *(_qk_gains(cfg, ours, theirs) if cfg.qk_norm else []),
            Rename(ours + "ln_2.weight", (theirs + "post_attention_layernorm.weight",)),
            Rename(ours + "mlp.c_fc.weight", (theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"), GATE_UP),
            Rename(ours + "mlp.c_proj.weight", (theirs + "mlp.down_proj.weight",), SAME),
        ]
    table.append(Rename("transformer.ln_f.weight", ("model.norm.weight",)))
    if not cfg.tie_embeddings:
        table.append(Rename("lm_head.weight", ("lm_head.weight",)))
    return table


def _qk_gains(cfg: ModelConfig, ours: str, theirs: str) -> list[Rename]:
    """Qwen3's q_norm / k_norm gains: ours, or ones for a run whose QK-norm has unit gains."""
    names = [(ours + f"attn.{p}_norm.weight", theirs + f"self_attn.{p}_norm.weight") for p in "qk"]
    if cfg.qk_norm_gains:
        return [Rename(o, (t,)) for o, t in names]
    return [Rename(None, (t,), width=cfg.head_dim, fill=1.0) for _, t in names]


def _cannot(cfg: ModelConfig, name: str, qkv_bias: bool, qk_norm: bool = False) -> list[str]:
    problems = [
        (cfg.pos_emb != "rope", f"pos_emb = \"{cfg.pos_emb}\" ({name} has rotary positions)"),
        (cfg.norm != "rmsnorm", f"norm = \"{cfg.norm}\" ({name} has RMSNorm)"),
        (cfg.qk_norm != qk_norm,
         f"qk_norm = {str(cfg.qk_norm).lower()} ({name} has {'' if qk_norm else 'no '}QK-norm)"),
        (cfg.mlp != "swiglu", f"mlp = \"{cfg.mlp}\" ({name} has a SwiGLU MLP)"),
        (cfg.bias, f"bias = true ({name} has {'biases on q, k and v only' if qkv_bias else 'no biases'})"),
        (cfg.qkv_bias != qkv_bias, f"qkv_bias = {str(cfg.qkv_bias).lower()} ({name} has "
                                   f"{'biases on q, k and v' if qkv_bias else 'none'})"),
    ]
    return [what for bad, what in problems if bad]


def _rope_from_hf(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig's rotary fields from either form of config.json: rope_parameters (transformers 5),
    or rope_theta and rope_scaling (earlier). Llama 3's scaling is computed; any other is refused.
    Where both are written, rope_scaling wins, as transformers 5 reads them."""
    params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    spec = raw.get("rope_scaling") if isinstance(raw.get("rope_scaling"), dict) else params
    kind = spec.get("rope_type") or spec.get("type") or "default"
    theta = float(spec.get("rope_theta") or raw.get("rope_theta") or ROPE_THETA)
    if kind == "default":
        return {"rope_theta": theta}
    if kind != "llama3":
        raise PocketError(f"{where}: rope_type '{kind}' is not supported (pocketgpt computes the default rotary "
                          "positions and Llama 3's scaling, 'llama3')")
    missing = [k for k in LLAMA3_KEYS if not isinstance(spec.get(k), (int, float))]
    if missing:
        raise PocketError(f"{where}: its llama3 rope scaling lacks {', '.join(missing)}")
    factor, low, high, context = (float(spec[k]) for k in LLAMA3_KEYS)
    if not (factor > 0 and 0 < low < high and context >= 1):
        raise PocketError(f"{where}: its llama3 rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor "
                          f"and original_max_position_embeddings >= 1 (got {factor:g}, {low:g}, {high:g}, {context:g})")
    return {"rope_theta": theta, "rope_scaling": "llama3", "rope_factor": factor, "rope_low_freq_factor": low,
            "rope_high_freq_factor": high, "rope_original_context": int(context)}


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The rotary base and scaling in the current form (rope_parameters) and the earlier one (rope_theta,
    rope_scaling), so older transformers read them too."""
    if cfg.rope_scaling != "llama3":
        return {"rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    scaling = {"rope_type": "llama3", **{theirs: getattr(cfg, ours) for theirs, ours in LLAMA3_KEYS.items()}}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling,
            "rope_parameters": {**scaling, "rope_theta": cfg.rope_theta}}


def _config_from_hf(raw: dict[str, Any], where: str, qkv_bias: bool, qk_norm: bool = False) -> ModelConfig:
    refusals = {
        "hidden_act": raw.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(raw.get("attention_bias", False)),
        "mlp_bias": bool(raw.get("mlp_bias", False)),
        "use_sliding_window": bool(raw.get("use_sliding_window", False)),
        "pretraining_tp": int(raw.get("pretraining_tp") or 1) != 1,
        "layer_types": any(t != "full_attention" for t in raw.get("layer_types") or []),
    }
    bad = [k for k, v in refusals.items() if v]
    if bad:
        raise PocketError(f"{where}: this model sets {bad[0]}={raw.get(bad[0])!r}, which pocketgpt's GPT does not "
                          "support")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise PocketError(f"{where}: config.json lacks {', '.join(missing)}; it does not describe a whole model")
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    head_dim = int(raw.get("head_dim") or hidden // heads)
    return ModelConfig(
        vocab_size=int(raw["vocab_size"]), block_size=int(raw.get("max_position_embeddings", 2048)),
        n_layer=int(raw["num_hidden_layers"]), n_head=heads, n_embd=hidden, dropout=0.0, bias=False,
        pos_emb="rope", norm="rmsnorm", qk_norm=qk_norm, qk_norm_gains=qk_norm, mlp="swiglu",
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        n_kv_head=int(raw.get("num_key_value_heads") or heads),
        head_size=0 if head_dim * heads == hidden else head_dim,
        mlp_width=int(raw["intermediate_size"]), norm_eps=float(raw.get("rms_norm_eps", RMS_EPS)), qkv_bias=qkv_bias,
        **_rope_from_hf(raw, where),
    )


# what each family's config.json says beyond the shared keys: the options pocketgpt's math leaves off
_FAMILY_KEYS: dict[str, dict[str, Any]] = {
    "llama": {"attention_bias": False, "mlp_bias": False}, "qwen2": {"use_sliding_window": False},
    "qwen3": {"attention_bias": False, "use_sliding_window": False},
}


def _config_to_hf(cfg: ModelConfig, eot: int | None, arch: str, model_type: str) -> dict[str, Any]:
    """config.json for LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM."""
    return {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps or RMS_EPS, **_rope_to_hf(cfg),
        "attention_dropout": cfg.dropout if cfg.attention_dropout else 0.0, "initializer_range": 0.02,
        "use_cache": True, "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
        **_FAMILY_KEYS[model_type],
    }


def gguf_keys(cfg: ModelConfig) -> dict[str, Any]:
    """llama.cpp's llama / qwen2 / qwen3 metadata (GGUFWriter.add_<key>)."""
    return {"context_length": cfg.block_size, "embedding_length": cfg.n_embd, "block_count": cfg.n_layer,
            "feed_forward_length": cfg.mlp_hidden, "head_count": cfg.n_head, "head_count_kv": cfg.kv_heads,
            "rope_dimension_count": cfg.head_dim, "key_length": cfg.head_dim, "value_length": cfg.head_dim,
            "layer_norm_rms_eps": cfg.norm_eps or RMS_EPS, "rope_freq_base": cfg.rope_theta,
            "vocab_size": cfg.vocab_size}


def interleave_halves(rows: np.ndarray, heads: int) -> np.ndarray:
    """q or k rows (heads * head_dim, ...) reordered within each head from two halves (x1..., x2...)
    to pairs (x1[0], x2[0], x1[1], x2[1], ...): the rotation llama.cpp's llama applies to pairs of
    neighbours is then the one we apply to halves."""
    per_head = rows.shape[0] // heads
    shaped = rows.reshape(heads, 2, per_head // 2, *rows.shape[1:])
    return shaped.swapaxes(1, 2).reshape(rows.shape)


def llama_gguf_fix(name: str, tensor: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    if ".self_attn.q_proj." in name:
        return interleave_halves(tensor, cfg.n_head)
    if ".self_attn.k_proj." in name:
        return interleave_halves(tensor, cfg.kv_heads)
    return tensor


def rope_freqs(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """llama.cpp's llama reads Llama 3's scaling as one tensor: each rotary frequency's divisor
    (unscaled / scaled; 1 where it is kept), computed from the model's own frequencies."""
    if cfg.rope_scaling != "llama3":
        return {}
    from ..model import rope_frequencies

    divisors = rope_frequencies(replace(cfg, rope_scaling="none")) / rope_frequencies(cfg)
    return {"rope_freqs.weight": divisors.numpy().astype(np.float32)}


def _no_rope_freqs(cfg: ModelConfig, arch: str) -> list[str]:
    """llama.cpp's qwen2 and qwen3 rotate by the unscaled frequencies: a Llama-3-scaled run cannot go there."""
    if cfg.rope_scaling == "llama3":
        return [f"rope_scaling = \"llama3\" (llama.cpp's {arch} has no rotary frequency factors)"]
    return []


def _family(name: str, title: str, arch: str, qkv_bias: bool = False, qk_norm: bool = False, **gguf: Any) -> Family:
    return Family(
        name=name, title=title, hf_model_types=(name,), hf_architectures=(arch,), renames=renames,
        config_from_hf=lambda raw, where: _config_from_hf(raw, where, qkv_bias, qk_norm),
        config_to_hf=lambda cfg, eot: _config_to_hf(cfg, eot, arch, name),
        cannot=lambda cfg: _cannot(cfg, title, qkv_bias, qk_norm),
        gguf_arch=name, gguf_keys=gguf_keys, lora_block="model.layers.{i}.", **gguf,
    )


LLAMA = _family("llama", "Llama", "LlamaForCausalLM", gguf_fix=llama_gguf_fix, gguf_extra=rope_freqs)
QWEN2 = _family("qwen2", "Qwen2", "Qwen2ForCausalLM", qkv_bias=True,
                gguf_cannot=lambda cfg: _no_rope_freqs(cfg, "qwen2"))
QWEN3 = _family("qwen3", "Qwen3", "Qwen3ForCausalLM", qk_norm=True,
                gguf_cannot=lambda cfg: _no_rope_freqs(cfg, "qwen3"))
