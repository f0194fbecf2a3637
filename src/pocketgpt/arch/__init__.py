"""Architecture families: what pocketgpt's GPT is called in other tools, one small file per family.

pocketgpt's model has one set of parameter names (GPT-2's: transformer.h.0.attn.c_attn.weight ...)
and one layout (nn.Linear's (out, in); q, k and v fused in one matrix; a gated MLP's gate and up
fused in one). A Family says how a Hugging Face family names and lays out the same tensors, as one
table read both ways (import: theirs -> ours; export: ours -> theirs), plus:
- its config.json, to and from a ModelConfig (refusing by key what pocketgpt cannot compute);
- what it cannot express (cannot(cfg): one reason per option, for a one-line refusal);
- its GGUF architecture: llama.cpp's name, its metadata keys, and any tensor fix-up llama.cpp needs;
- how peft names LoRA targets on it.
hf.py, gguf_export.py, lora.py and share.py read the family; none of them names a tensor of one.

Dispatch is on config.json's model_type / architectures (for_hf), never on a model's name; an
export picks the first family that can express the run (fitting). This module is torch-free: the
records and the dispatch; arch/convert.py does the tensor work.

Adding a family: docs/architecture.md, "Adding a family".
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import PocketError
from .family import GATE_UP, HOWS, QKV, SAME, TRANSPOSE, Family, Rename

__all__ = ["GATE_UP", "HOWS", "QKV", "SAME", "TRANSPOSE", "Family", "Rename", "families", "fitting", "for_hf"]


def families() -> dict[str, Family]:
    """Every family pocketgpt knows, by name, in the order an export tries them."""
    from . import gpt2, llama

    return {f.name: f for f in (gpt2.FAMILY, llama.LLAMA, llama.QWEN2, llama.QWEN3)}


def for_hf(raw: dict[str, Any], where: str) -> Family:
    """The family of a Hugging Face config.json: by its model_type (what transformers' AutoConfig
    reads); by its architectures (what llama.cpp's converter reads) only where it has no model_type."""
    archs = [a for a in raw.get("architectures") or [] if isinstance(a, str)]
    model_type = raw.get("model_type")
    for fam in families().values():
        if model_type in fam.hf_model_types or (model_type is None and set(archs) & set(fam.hf_architectures)):
            return fam
    known = ", ".join(t for f in families().values() for t in f.hf_model_types)
    raise PocketError(f"{where} holds a '{model_type}' model ({', '.join(archs) or 'no architectures'}); "
                      f"pocketgpt reads {known}")


def fitting(cfg: ModelConfig, gguf: bool = False) -> Family:
    """The first family that can express cfg (for Hugging Face, or for GGUF: one with a llama.cpp
    architecture), else one line saying why each cannot."""
    reasons: list[tuple[str, list[str]]] = []
    for fam in families().values():
        if gguf and not fam.gguf_arch:
            continue
        problems = fam.cannot(cfg) + (fam.gguf_cannot(cfg) if gguf else [])
        if not problems:
            return fam
        where = f"GGUF (llama.cpp's {fam.gguf_arch})" if gguf else f"Hugging Face {fam.title}"
        reasons.append((where, problems))
    if len(reasons) == 1:
        where, problems = reasons[0]
        raise PocketError(f"cannot export to {where}: this model uses {'; '.join(problems)}")
    said = " | ".join(f"{where}: {'; '.join(problems)}" for where, problems in reasons)
    raise PocketError(f"cannot export to {'GGUF' if gguf else 'Hugging Face'}: no architecture family can hold "
                      f"this model ({said})")


def export_note(cfg: ModelConfig) -> str | None:
    """What a finished run says when its model cannot leave pocketgpt whole (None: it exports to Hugging
    Face and GGUF alike): the first reason, and the way out a new run has."""
    for gguf, where in ((False, "Hugging Face or GGUF"), (True, "GGUF")):
        try:
            fitting(cfg, gguf=gguf)
        except PocketError as e:
            hint = (" (--mlp swiglu, the presets' MLP, exports as Llama or Qwen3)" if cfg.mlp == "relu2" else "")
            return f"note: this model cannot be exported to {where}: {str(e).split(': ', 1)[-1]}{hint}"
    return None
