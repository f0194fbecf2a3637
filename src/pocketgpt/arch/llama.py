"""Llama (LlamaForCausalLM: SmolLM2, TinyLlama, Llama 3.2) and Qwen2 (Qwen2ForCausalLM: Qwen2.5), llama.cpp's
llama and qwen2.

Both are the same block: RMSNorm before attention and MLP, rotary positions (a head's two halves,
Hugging Face's rotate_half, which is ours), grouped-query attention, a SwiGLU MLP of its own width,
no biases, except that Qwen2 has biases on q, k and v. Their q, k and v are three matrices where
ours are one (rows joined on import, split on export), and so are the MLP's gate and up.

llama.cpp runs llama's rotary positions on interleaved pairs, so its converter reorders the rows
of q and k within each head (gguf_fix below); qwen2 it runs on halves, as we do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import PocketError
from .family import GATE_UP, QKV, SAME, Family, Rename

ROPE_THETA = 10000.0  # LlamaConfig's default
RMS_EPS = 1e-6
REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")


def renames(cfg: ModelConfig) -> list[Rename]:
    """Every tensor of a Llama / Qwen2 checkpoint for cfg, in the order of their modules."""
    table = [Rename("transformer.wte.weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        qkv = tuple(f"{theirs}self_attn.{p}_proj." for p in "qkv")
        table += [
            Rename(ours + "ln_1.weight", (theirs + "input_layernorm.weight",)),
            Rename(ours + "attn.c_attn.weight", tuple(n + "weight" for n in qkv), QKV),
            *([Rename(ours + "attn.c_attn.bias", tuple(n + "bias" for n in qkv), QKV)] if cfg.qkv_bias else []),
            Rename(ours + "attn.c_proj.weight", (theirs + "self_attn.o_proj.weight",)),
            Rename(ours + "ln_2.weight", (theirs + "post_attention_layernorm.weight",)),
            Rename(ours + "mlp.c_fc.weight", (theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"), GATE_UP),
            Rename(ours + "mlp.c_proj.weight", (theirs + "mlp.down_proj.weight",), SAME),
        ]
    table.append(Rename("transformer.ln_f.weight", ("model.norm.weight",)))
    if not cfg.tie_embeddings:
        table.append(Rename("lm_head.weight", ("lm_head.weight",)))
    return table


def _cannot(cfg: ModelConfig, name: str, qkv_bias: bool) -> list[str]:
    problems = [
        (cfg.pos_emb != "rope", f"pos_emb = \"{cfg.pos_emb}\" ({name} has rotary positions)"),
        (cfg.norm != "rmsnorm", f"norm = \"{cfg.norm}\" ({name} has RMSNorm)"),
        (cfg.qk_norm, f"qk_norm = true ({name} has no QK-norm)"),
        (cfg.mlp != "swiglu", f"mlp = \"{cfg.mlp}\" ({name} has a SwiGLU MLP)"),
        (cfg.bias, f"bias = true ({name} has {'biases on q, k and v only' if qkv_bias else 'no biases'})"),
        (cfg.qkv_bias != qkv_bias, f"qkv_bias = {str(cfg.qkv_bias).lower()} ({name} has "
                                   f"{'biases on q, k and v' if qkv_bias else 'none'})"),
    ]
    return [what for bad, what in problems if bad]


def _rope_theta(raw: dict[str, Any], where: str) -> float:
    """The rotary base from either form of config.json: rope_parameters (transformers 5), or rope_theta
    and rope_scaling (earlier); a scaled rotation (Llama 3's, YaRN's ...) is refused for now."""
    params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    scaling = raw.get("rope_scaling") if isinstance(raw.get("rope_scaling"), dict) else {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise PocketError(f"{where}: rope_type '{kind}' (a scaled rotary embedding) is not supported yet")
    return float(params.get("rope_theta") or raw.get("rope_theta") or ROPE_THETA)


def _config_from_hf(raw: dict[str, Any], where: str, qkv_bias: bool) -> ModelConfig:
    refusals = {
        "hidden_act": raw.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(raw.get("attention_bias", False)),
        "mlp_bias": bool(raw.get("mlp_bias", False)),
        "use_sliding_window": bool(raw.get("use_sliding_window", False)),
        "pretraining_tp": int(raw.get("pretraining_tp") or 1) != 1,
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
        pos_emb="rope", norm="rmsnorm", qk_norm=False, mlp="swiglu",
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        n_kv_head=int(raw.get("num_key_value_heads") or heads),
        head_size=0 if head_dim * heads == hidden else head_dim,
        mlp_width=int(raw["intermediate_size"]), rope_theta=_rope_theta(raw, where),
        norm_eps=float(raw.get("rms_norm_eps", RMS_EPS)), qkv_bias=qkv_bias,
    )


def _config_to_hf(cfg: ModelConfig, eot: int | None, arch: str, model_type: str) -> dict[str, Any]:
    """config.json for LlamaForCausalLM / Qwen2ForCausalLM; the rotary base in both the current form
    (rope_parameters) and the earlier one (rope_theta), so older transformers read it too."""
    return {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps or RMS_EPS, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_dropout": cfg.dropout if cfg.attention_dropout else 0.0, "initializer_range": 0.02,
        "use_cache": True, "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
        **({"attention_bias": False, "mlp_bias": False} if model_type == "llama" else {"use_sliding_window": False}),
    }


def gguf_keys(cfg: ModelConfig) -> dict[str, Any]:
    """llama.cpp's llama / qwen2 metadata (GGUFWriter.add_<key>)."""
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


LLAMA = Family(
    name="llama", title="Llama", hf_model_types=("llama",), hf_architectures=("LlamaForCausalLM",),
    renames=renames, config_from_hf=lambda raw, where: _config_from_hf(raw, where, qkv_bias=False),
    config_to_hf=lambda cfg, eot: _config_to_hf(cfg, eot, "LlamaForCausalLM", "llama"),
    cannot=lambda cfg: _cannot(cfg, "Llama", qkv_bias=False),
    gguf_arch="llama", gguf_keys=gguf_keys, gguf_fix=llama_gguf_fix, lora_block="model.layers.{i}.",
)

QWEN2 = Family(
    name="qwen2", title="Qwen2", hf_model_types=("qwen2",), hf_architectures=("Qwen2ForCausalLM",),
    renames=renames, config_from_hf=lambda raw, where: _config_from_hf(raw, where, qkv_bias=True),
    config_to_hf=lambda cfg, eot: _config_to_hf(cfg, eot, "Qwen2ForCausalLM", "qwen2"),
    cannot=lambda cfg: _cannot(cfg, "Qwen2", qkv_bias=True),
    gguf_arch="qwen2", gguf_keys=gguf_keys, lora_block="model.layers.{i}.",
)
