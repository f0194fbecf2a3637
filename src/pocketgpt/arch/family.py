"""The records an architecture family is made of (arch/__init__.py says what a family is for)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import ModelConfig

# How one of our tensors becomes theirs (and back):
SAME = "same"  # the same tensor under another name
TRANSPOSE = "transpose"  # stored (in, out) there: GPT-2's Conv1D
QKV = "qkv"  # our fused q/k/v rows are their q, k and v matrices (split by ModelConfig.qkv_sizes)
GATE_UP = "gate_up"  # our fused gated-MLP rows are their gate and up matrices (two halves)
HOWS = (SAME, TRANSPOSE, QKV, GATE_UP)


@dataclass(frozen=True)
class Rename:
    """One of our tensors and the tensor(s) a family stores for it.

    ours: our state-dict name, or None for a tensor the family has that this config lacks: a vector
    of `width` values `fill` on export (zeros for the bias of a bias-free model, ones for the gain
    of a unit-gain norm: the same math), and on import it must hold just those values.
    theirs: one name (SAME, TRANSPOSE) or one per part of our rows (QKV: q, k, v; GATE_UP: gate, up).
    """

    ours: str | None
    theirs: tuple[str, ...]
    how: str = SAME
    width: int = 0  # ours None: the width of the vector written in its place
    fill: float = 0.0  # ours None: its every value

    def __post_init__(self) -> None:
        parts = {QKV: 3, GATE_UP: 2}.get(self.how, 1)
        if self.how not in HOWS or len(self.theirs) != parts:
            raise ValueError(f"a {self.how} rename needs {parts} names, got {self.theirs}")
        if self.ours is None and self.width <= 0:
            raise ValueError(f"{self.theirs[0]}: a tensor we lack needs the width of the vector written for it")


@dataclass(frozen=True)
class Family:
    """An architecture family as other tools know it (see the module docstring)."""

    name: str  # our name for it, e.g. "gpt2"
    hf_model_types: tuple[str, ...]  # config.json model_type values it reads
    hf_architectures: tuple[str, ...]  # config.json architectures it reads (the first is written)
    renames: Callable[[ModelConfig], list[Rename]]  # every tensor they store (what we lack: in the order written)
    config_from_hf: Callable[[dict[str, Any], str], ModelConfig]  # (config.json, where) -> config; refuses by key
    config_to_hf: Callable[[ModelConfig, "int | None"], dict[str, Any]]  # (config, end-of-text id) -> config.json
    cannot: Callable[[ModelConfig], list[str]]  # what of a config it cannot express ([]: it fits)
    title: str = ""  # how the user knows it, e.g. "GPT-2"
    hf_head: str = "lm_head.weight"  # their output head: ignored on import when the embedding is tied
    hf_key: Callable[[str], "str | None"] = lambda key: key  # a key of an older save -> today's; None: not a weight
    gguf_arch: str = ""  # llama.cpp's architecture name ("" = no GGUF export)
    gguf_keys: Callable[[ModelConfig], dict[str, Any]] = lambda cfg: {}  # GGUFWriter.add_<key>(value) metadata
    gguf_fix: Callable[[str, Any, ModelConfig], Any] = lambda name, tensor, cfg: tensor  # their name, (out, in) array
    # tensors llama.cpp reads that the model computes rather than stores (llama's rope_freqs), as numpy arrays
    gguf_extra: Callable[[ModelConfig], dict[str, Any]] = lambda cfg: {}
    # what llama.cpp's architecture cannot run beyond cannot(cfg) (Hugging Face's class can)
    gguf_cannot: Callable[[ModelConfig], list[str]] = lambda cfg: []
    lora_block: str = ""  # their name of block i's prefix, "...{i}."; peft targets are what follows it
    gguf_notes: Callable[[ModelConfig], list[str]] = field(default=lambda cfg: [])  # said after a GGUF export
