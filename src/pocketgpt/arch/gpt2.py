"""GPT-2 (Hugging Face GPT2LMHeadModel; llama.cpp's gpt2): pocketgpt's own architecture by default.

Our parameter names are GPT-2's, so the table renames nothing; four matrices are stored
transposed there (Conv1D keeps W as (in, out), nn.Linear as (out, in)). GPT-2 has a bias on every
matrix and norm: a bias-free run exports zeros in their place (the same math). What GPT-2 cannot
hold: rotary positions, RMSNorm, QK-norm, any MLP but GELU, grouped-query attention, a head size
or MLP width of its own, another norm epsilon.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import PocketError
from .family import SAME, TRANSPOSE, Family, Rename

LAYERNORM_EPS = 1e-5  # GPT-2's and nn.LayerNorm's
VOCAB_SIZE = 50257
# GPT2Config.activation_function values and the pocketgpt mlp computing the same function.
ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}

# (our module in a block, stored transposed there); the norms before the matrices, as in the state dict
_BLOCK = (("ln_1", False), ("attn.c_attn", True), ("attn.c_proj", True), ("ln_2", False),
          ("mlp.c_fc", True), ("mlp.c_proj", True))
# the order in which the biases a bias-free model lacks are written (before this module, hf.py's)
_BIAS_ORDER = ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _has_bias(cfg: ModelConfig, module: str) -> bool:
    if module.startswith("ln_"):
        return cfg.bias and cfg.norm == "layernorm"
    return cfg.bias or (cfg.qkv_bias and module == "attn.c_attn")


def _bias_width(cfg: ModelConfig, module: str) -> int:
    return {"attn.c_attn": sum(cfg.qkv_sizes), "mlp.c_fc": cfg.fc_rows}.get(module, cfg.n_embd)


def renames(cfg: ModelConfig) -> list[Rename]:
    """Every tensor of GPT2LMHeadModel for cfg; the biases a bias-free model lacks in the order their
    zeros are written."""
    table = [Rename("transformer.wte.weight", ("transformer.wte.weight",)),
             Rename("transformer.wpe.weight", ("transformer.wpe.weight",))]
    for i in range(cfg.n_layer):
        block = f"transformer.h.{i}."
        for module, conv1d in _BLOCK:
            name = block + module
            table.append(Rename(name + ".weight", (name + ".weight",), TRANSPOSE if conv1d else SAME))
            if _has_bias(cfg, module):
                table.append(Rename(name + ".bias", (name + ".bias",)))
        table += [Rename(None, (block + m + ".bias",), width=_bias_width(cfg, m))
                  for m in _BIAS_ORDER if not _has_bias(cfg, m)]
    table.append(Rename("transformer.ln_f.weight", ("transformer.ln_f.weight",)))
    ln_f_bias = ("transformer.ln_f.bias",)
    if _has_bias(cfg, "ln_f"):
        table.append(Rename("transformer.ln_f.bias", ln_f_bias))
    else:
        table.append(Rename(None, ln_f_bias, width=cfg.n_embd))
    if not cfg.tie_embeddings:
        table.append(Rename("lm_head.weight", ("lm_head.weight",)))
    return table


def cannot(cfg: ModelConfig) -> list[str]:
    """Each option of cfg GPT-2 cannot express, said as the option and what GPT-2 has instead."""
    default_eps = cfg.norm_eps in (0.0, LAYERNORM_EPS)
    problems = [
        (cfg.pos_emb != "learned", f"pos_emb = \"{cfg.pos_emb}\" (GPT-2 has learned positions)"),
        (cfg.norm != "layernorm", f"norm = \"{cfg.norm}\" (GPT-2 has LayerNorm)"),
        (cfg.qk_norm, "qk_norm = true (GPT-2 has no QK-norm)"),
        (cfg.mlp not in ("gelu", "gelu_new"), f"mlp = \"{cfg.mlp}\" (GPT-2 has GELU)"),
        (cfg.kv_heads != cfg.n_head, f"n_kv_head = {cfg.n_kv_head} (GPT-2 has a key/value head per query head)"),
        (cfg.head_dim * cfg.n_head != cfg.n_embd, f"head_size = {cfg.head_size} (GPT-2's is n_embd / n_head)"),
        (cfg.mlp_hidden != 4 * cfg.n_embd, f"mlp_width = {cfg.mlp_width} (GPT-2's is 4 * n_embd)"),
        (not default_eps, f"norm_eps = {cfg.norm_eps:g} (GPT-2's is {LAYERNORM_EPS:g})"),
    ]
    return [what for bad, what in problems if bad]


def config_from_hf(raw: dict[str, Any], where: str) -> ModelConfig:
    """GPT2Config's fields as a ModelConfig; anything pocketgpt cannot compute is refused by name."""
    act = raw.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise PocketError(f"{where}: activation_function '{act}' is not supported (only {', '.join(ACTIVATIONS)})")
    n_embd = int(raw.get("n_embd", 768))
    # Each option below changes the math; loading such a model anyway would give wrong logits silently.
    refusals = {
        "n_inner": raw.get("n_inner") not in (None, 4 * n_embd),
        "scale_attn_weights": raw.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": bool(raw.get("scale_attn_by_inverse_layer_idx", False)),
        "add_cross_attention": bool(raw.get("add_cross_attention", False)),
        "layer_norm_epsilon": abs(float(raw.get("layer_norm_epsilon", LAYERNORM_EPS)) - LAYERNORM_EPS) > 1e-12,
    }
    bad = [k for k, v in refusals.items() if v]
    if bad:
        raise PocketError(f"{where}: this GPT-2 sets {bad[0]}={raw.get(bad[0])!r}, which pocketgpt's GPT does not "
                          "support")
    return ModelConfig(
        vocab_size=int(raw.get("vocab_size", VOCAB_SIZE)), block_size=int(raw.get("n_positions", 1024)),
        n_layer=int(raw.get("n_layer", 12)), n_head=int(raw.get("n_head", 12)), n_embd=n_embd, dropout=0.0,
        bias=True, pos_emb="learned", norm="layernorm", qk_norm=False, mlp=ACTIVATIONS[act],
        tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
    )


def config_to_hf(cfg: ModelConfig, eot: int | None) -> dict[str, Any]:
    """config.json for GPT2LMHeadModel, written without transformers so export needs only safetensors."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": cfg.mlp,  # "gelu" (exact) and "gelu_new" (tanh) are both GPT-2 options
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout if cfg.attention_dropout else 0.0,
        "layer_norm_epsilon": LAYERNORM_EPS, "initializer_range": 0.02,
        "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }


def hf_key(key: str) -> str | None:
    """A key of any GPT-2 save as GPT2LMHeadModel's: GPT2Model saves lack the transformer. prefix, and
    old saves carry GPT2Attention's causal mask buffers (attn.bias, attn.masked_bias), not weights."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] == "attn" and parts[-1] in ("bias", "masked_bias"):
        return None
    if key == "lm_head.weight" or key.startswith("transformer."):
        return key
    return "transformer." + key


def gguf_keys(cfg: ModelConfig) -> dict[str, Any]:
    """llama.cpp's gpt2 metadata (GGUFWriter.add_<key>)."""
    return {"context_length": cfg.block_size, "embedding_length": cfg.n_embd, "block_count": cfg.n_layer,
            "feed_forward_length": cfg.mlp_hidden, "head_count": cfg.n_head, "layer_norm_eps": LAYERNORM_EPS}


def gguf_notes(cfg: ModelConfig) -> list[str]:
    if cfg.mlp == "gelu":
        return ["this model uses exact GELU and llama.cpp's gpt2 its tanh approximation; the logits there "
                "differ from pocketgpt's by about as much as llama.cpp's own f16 rounding (~5e-3, "
                "bench/gguf_llamacpp.py)"]
    return []


FAMILY = Family(
    name="gpt2", title="GPT-2", hf_model_types=("gpt2",), hf_architectures=("GPT2LMHeadModel",),
    renames=renames, config_from_hf=config_from_hf, config_to_hf=config_to_hf, cannot=cannot, hf_key=hf_key,
    gguf_arch="gpt2", gguf_keys=gguf_keys, lora_block="transformer.h.{i}.", gguf_notes=gguf_notes,
)
