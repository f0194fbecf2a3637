"""Typed, torch-free configuration: one dataclass per component, presets, and overrides.

Precedence: dataclass defaults < preset < config file (TOML) < command-line flags.
Every key has one home section; flat keys (nanoGPT's names) are routed to it, so
`--n_layer 4`, `n_layer = 4` and `[model] n_layer = 4` all mean the same thing.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import PocketError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PRESET_DIR = Path(__file__).parent / "presets"
CONFIG_FORMAT_VERSION = 1
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PARALLEL = ("auto", "ddp", "fsdp")
SCHEDULES = ("cosine", "wsd", "constant")
POS_EMBS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
# gelu_new: GPT-2's own tanh approximation of GELU; swiglu: a gated MLP, silu(x W_gate) * (x W_up) (Llama, Qwen)
MLPS = ("gelu", "gelu_new", "relu2", "swiglu")
GATED_MLPS = ("swiglu",)
ROPE_SCALINGS = ("none", "llama3")
OPTIMIZERS = ("adamw", "muon")
TOKENIZERS = ("char", "gpt2", "bpe")
LOGGERS = ("tensorboard", "wandb", "trackio")
# What lora_targets may name: the four matrices of a block (our module names, which are GPT-2's), their
# bare names (c_proj: both projections, as peft matches it), and three short groups. Each maps to the
# block-relative module names, listed in model order. (A family's own names for them, peft's
# target_modules on export, come from its table: arch/.)
LORA_BASE_DTYPES = ("auto", "float32", "bfloat16")
LORA_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.c_attn",), "proj": ("attn.c_proj",), "mlp": ("mlp.c_fc", "mlp.c_proj"), "all": LORA_MODULES,
    "c_attn": ("attn.c_attn",), "c_proj": ("attn.c_proj", "mlp.c_proj"), "c_fc": ("mlp.c_fc",),
    **{name: (name,) for name in LORA_MODULES},
    # Llama's and Qwen's names (peft's target_modules for them); parts of one fused matrix go together
    "q_proj": ("attn.c_attn",), "k_proj": ("attn.c_attn",), "v_proj": ("attn.c_attn",), "o_proj": ("attn.c_proj",),
    "gate_proj": ("mlp.c_fc",), "up_proj": ("mlp.c_fc",), "down_proj": ("mlp.c_proj",),
}
# Our fused matrices and the family names of their parts: an adapter is on a whole matrix, so naming
# one part alone (q_proj without k_proj and v_proj) cannot be honoured and is refused.
LORA_FUSED_PARTS: dict[str, tuple[str, ...]] = {"attn.c_attn": ("q_proj", "k_proj", "v_proj"),
                                                "mlp.c_fc": ("gate_proj", "up_proj")}
# Each target's role in ModelConfig.matmul_shapes(), which says how wide it is.
LORA_ROLES: dict[str, str] = {"attn.c_attn": "attn", "attn.c_proj": "attn_proj", "mlp.c_fc": "fc",
                              "mlp.c_proj": "mlp_proj"}


@dataclass
class ModelConfig:
    """The network's shape. vocab_size comes from the prepared data."""

    vocab_size: int = 0
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    # dropout also on the attention probabilities (nanoGPT's way); false keeps it on the residual branches
    # only: on a CPU, dropout over the T x T probabilities is ~30 % of a cpu-hour step (bench/RESULTS.md)
    attention_dropout: bool = True
    bias: bool = False
    # architecture options (GPT-2 style by default; see the ablation in bench/RESULTS.md)
    pos_emb: str = "learned"  # learned | rope (rotary position embeddings)
    norm: str = "layernorm"  # layernorm | rmsnorm
    qk_norm: bool = False  # RMS-normalise queries and keys per head
    mlp: str = "gelu"  # gelu | relu2 (squared ReLU)
    tie_embeddings: bool = True  # share the input embedding and the output head
    zero_init_proj: bool = False  # start every residual output projection at zero
    # what the open model families differ in; each default (0: GPT-2's value) keeps every saved run as it was
    n_kv_head: int = 0  # key/value heads, fewer than n_head for grouped-query attention (0: n_head)
    head_size: int = 0  # each head's width, which need not be n_embd / n_head (0: n_embd // n_head)
    mlp_width: int = 0  # the MLP's hidden width (0: 4 * n_embd)
    rope_theta: float = 10000.0  # the rotary positions' base
    norm_eps: float = 0.0  # the norms' epsilon (0: the norm's own, 1e-5 for LayerNorm, 1e-6 for RMSNorm)
    qkv_bias: bool = False  # biases on the q/k/v projection alone (Qwen2); bias = true puts them everywhere
    # QK-norm with a learned gain per head dimension (one vector for q, one for k, in each layer) and norm_eps
    # (0: RMSNorm's 1e-6) as its epsilon (Qwen3); false keeps qk_norm's unit gains and float32's own epsilon
    qk_norm_gains: bool = False
    # Llama 3's scaled rotary positions (rope_scaling = "llama3"): wavelengths longer than
    # rope_original_context / rope_low_freq_factor are rope_factor times longer, those shorter than
    # rope_original_context / rope_high_freq_factor stay, and the ones between are blended
    rope_scaling: str = "none"  # none | llama3
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192  # the context the unscaled model was trained at

    # The derived widths: the model, the engine, sizing and the family tables read these, never a formula.
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def attn_width(self) -> int:
        """The attention's output width: every query head side by side (n_embd unless head_size says otherwise)."""
        return self.n_head * self.head_dim

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Rows of q, k and v in the fused q/k/v projection, in that order."""
        kv = self.kv_heads * self.head_dim
        return self.attn_width, kv, kv

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_width or 4 * self.n_embd

    @property
    def gated(self) -> bool:
        """The MLP multiplies two projections (gate and up, fused in one matrix of 2 * mlp_hidden rows)."""
        return self.mlp in GATED_MLPS

    @property
    def fc_rows(self) -> int:
        return self.mlp_hidden * (2 if self.gated else 1)

    def matmul_shapes(self) -> list[tuple[str, int, int]]:
        """(role, in, out) of one block's matrices, in model order: the one list every count reads."""
        C = self.n_embd
        return [("attn", C, sum(self.qkv_sizes)), ("attn_proj", self.attn_width, C),
                ("fc", C, self.fc_rows), ("mlp_proj", self.mlp_hidden, C)]

    def param_count(self) -> int:
        """Parameters of model.GPT for this config (a tied head counted once), without building it."""
        C, per_block = self.n_embd, 0
        for role, n_in, n_out in self.matmul_shapes():
            with_bias = self.bias or (self.qkv_bias and role == "attn")
            per_block += n_in * n_out + (n_out if with_bias else 0)
        norm = C * (2 if self.bias and self.norm == "layernorm" else 1)  # a gain, and a bias where LayerNorm has one
        per_block += 2 * self.head_dim if self.qk_norm_gains else 0  # q's and k's QK-norm gains
        embeddings = self.vocab_size * C * (1 if self.tie_embeddings else 2)
        positions = self.block_size * C if self.pos_emb == "learned" else 0
        return self.n_layer * (per_block + 2 * norm) + norm + embeddings + positions

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul: all but the position table and an untied input
        embedding, which are only indexed (the norms' few gains are counted, as nanoGPT's estimate does)."""
        positions = self.block_size * self.n_embd if self.pos_emb == "learned" else 0
        untied_input = 0 if self.tie_embeddings else self.vocab_size * self.n_embd
        return self.param_count() - positions - untied_input

    def flops_per_token(self, matmul_params: int | None = None) -> float:
        """Training FLOPs per token: 6 per matmul parameter (forward 2, backward 4; matmul_params, or
        this config's own count) plus attention's scores and weighted sum, 2 * T * width multiply-adds
        per layer forward, so 12 * L * width * T with the backward (PaLM's appendix B; nanoGPT's MFU)."""
        n = self.matmul_params() if matmul_params is None else matmul_params
        return 6.0 * n + 12.0 * self.n_layer * self.attn_width * self.block_size


# The fields that shape a model's tensors or math (a fine-tune's base and its config must agree on
# these; dropout, attention_dropout and zero_init_proj may differ).
MODEL_SHAPE_KEYS = tuple(f.name for f in fields(ModelConfig)
                         if f.name not in ("dropout", "attention_dropout", "zero_init_proj"))


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0: decay over the whole run (max_iters or max_time)
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_fraction: float = 0.4  # wsd only: share of the run spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    optimizer: str = "adamw"  # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_momentum_warmup: int = 0  # steps over which Muon's momentum rises from 0.85 to muon_momentum; 0 = off
    muon_weight_decay: float = 0.0  # cautious decoupled decay of Muon's matrices (where step and weight agree in sign)
    ema_decay: float = 0.0  # evals and the saved model use an exponential moving average of the weights; 0 = off


@dataclass
class RunConfig:
    """How long and how the loop runs; where it runs."""

    batch_size: int = 12
    grad_accum_steps: int = 1
    max_iters: int = 2000
    max_time: float = 0.0  # seconds; 0 = no time budget
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    # torch.compile: "true", "false", or "auto" = measured in the run's first steps (autotune.py)
    compile: str = "auto"
    # CPU threads; 0 = this process's count, or half of it where the run's first steps measure that faster (CPU
    # runs with >= 2 threads, no POCKETGPT_THREADS, and minutes of steps left; autotune.py), and fewer while other
    # programs keep cores busy (cpuload.py); N = N threads, whatever the load
    threads: int = 0
    # keep only each block's input for the backward pass and run the block again there: activations of about
    # one layer instead of all, for one more forward pass a step (bench/lora_memory.py measures both)
    gradient_checkpointing: bool = False
    # short contexts first: windows of short_context tokens (0 = off), doubling up to block_size over the first
    # short_context_fraction of the run (progress as the learning rate's: by seconds under a time budget), with
    # block_size // context times the rows, so a step reads as many tokens (data.context_at)
    short_context: int = 0
    short_context_fraction: float = 0.3
    # small batches first: micro-batches of small_batch rows (0 = off), doubling up to batch_size over the first
    # small_batch_fraction of the run (progress as above): more, cheaper updates while the gradients point one way
    small_batch: int = 0
    small_batch_fraction: float = 0.3
    sample_tokens: int = 300  # length of the sample printed when training ends
    eval_sample_tokens: int = 200  # a sample at every eval, to samples.txt and the console; 0 = off
    early_stop_patience: int = 0  # stop after this many evals without a better val loss; 0 = off
    plots: bool = True  # redraw RUN_DIR/plots/*.png at every eval
    loggers: str = ""  # also send metrics to: comma-separated tensorboard, wandb, trackio
    # several processes (torchrun): auto and ddp = DistributedDataParallel; fsdp = FSDP2 (sharded weights; AdamW only)
    parallel: str = "auto"


@dataclass
class LoraConfig:
    """LoRA: a fine-tune that trains low-rank adapters on the base model's frozen weights (lora_rank 0: off).

    Each targeted matrix W computes x W^T + (alpha / rank) * x A^T B^T, A (rank, in) and B (out, rank),
    B starting at zero; only A and B train (AdamW, never Muon). Defaults: rank 8 is the usual
    starting point when enabled; alpha 16 (a scale of 2 at rank 8); no adapter dropout (the model's own
    dropout still applies, and an adapter dropout would keep a copy of every targeted layer's input);
    every matrix of every block, which learns better than attention alone for little more memory.
    """

    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "attn,proj,mlp"  # comma-separated LORA_TARGETS names
    # the frozen base's matrices (targets, embedding, head) kept in bfloat16, half the memory, computed in the
    # run's dtype: auto = where every one of them is exactly a bfloat16 value (a base shipped in bfloat16), so
    # nothing changes but the memory; a fine-tune resolves auto before it starts (lora.narrow_base)
    lora_base_dtype: str = "auto"

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0

    @property
    def modules(self) -> tuple[str, ...]:
        """The targeted block-relative module names, in model order (lora_modules)."""
        return lora_modules(self.lora_targets)

    def trainable_params(self, model: ModelConfig) -> int:
        """Adapter parameters for this model: rank * (in + out) per targeted matrix per block (0 when off)."""
        if not self.enabled:
            return 0
        widths = {role: n_in + n_out for role, n_in, n_out in model.matmul_shapes()}
        per_block = sum(widths[LORA_ROLES[m]] for m in self.modules)
        return model.n_layer * self.lora_rank * per_block


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        cfg = cls()
        apply_overrides(cfg, {k: v for k, v in d.items() if k in SECTIONS})
        return cfg


@dataclass
class PrepareConfig:
    """What `prepare` reads and writes."""

    inputs: list[str] = field(default_factory=list)  # empty: the bundled Tiny Shakespeare
    out: str = ""
    tokenizer: str = "char"
    vocab_size: int = 0
    val_fraction: float = 0.1
    encoding: str = "utf-8"
    strip_gutenberg: bool = False  # drop Project Gutenberg's licence header and footer


def check_val_fraction(value: float) -> None:
    """--val-fraction, the share held out for val, for text and conversations alike."""
    if not 0.0 < value < 1.0:
        raise PocketError(f"--val-fraction must be between 0 and 1 (exclusive), got {value}")


SECTIONS: dict[str, type] = {"model": ModelConfig, "optim": OptimConfig, "run": RunConfig, "lora": LoraConfig}
KEY_SECTION: dict[str, str] = {f.name: s for s, c in SECTIONS.items() for f in fields(c)}
# Keys the user may set; vocab_size is derived from the data.
USER_KEYS = sorted(k for k in KEY_SECTION if k != "vocab_size")


def nearest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def lora_modules(targets: str) -> tuple[str, ...]:
    """'attn,mlp' -> ('attn.c_attn', 'mlp.c_fc', 'mlp.c_proj'); an unknown name is refused with the nearest one."""
    names = [n.strip() for n in targets.split(",") if n.strip()]
    if not names:
        raise PocketError(f"lora_targets names no module; choose from {', '.join(LORA_TARGETS)}")
    chosen: set[str] = set()
    for name in names:
        if name not in LORA_TARGETS:
            raise PocketError(f"lora_targets: unknown target '{name}'{nearest(name, list(LORA_TARGETS))}; "
                              f"choose from {', '.join(LORA_TARGETS)}")
        chosen.update(LORA_TARGETS[name])
    for module, parts in LORA_FUSED_PARTS.items():
        named = [p for p in parts if p in names]
        whole = any(module in LORA_TARGETS[n] for n in names if n not in parts)
        if named and len(named) < len(parts) and not whole:
            raise PocketError(f"lora_targets: {', '.join(parts)} are one matrix in pocketgpt ({module}), so an "
                              f"adapter covers all of them: name {' and '.join(parts)} together")
    return tuple(m for m in LORA_MODULES if m in chosen)


def normalize_key(key: str) -> str:
    return key.lstrip("-").replace("-", "_")


def parse_duration(text: str | float | int) -> float:
    """'90', '90s', '10m', '2h', '1.5h' -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
        if not m:
            raise PocketError(
                f"--max-time: cannot read '{text}' as a duration; use seconds or e.g. 90s, 10m, 2h"
            )
        seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if seconds < 0:
        raise PocketError(f"--max-time must be positive, got {text}")
    return seconds


BOOL_WORDS = ("true", "false", "1", "0", "yes", "no", "on", "off")
TRUE_WORDS = ("true", "1", "yes", "on")


def _as_bool(value: Any) -> bool | None:
    """A TOML boolean or one of BOOL_WORDS as a bool; None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in BOOL_WORDS:
        return value.lower() in TRUE_WORDS
    return None


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Turn a TOML value or a command-line string into the field's type, or say why not."""
    if key == "max_time":
        return parse_duration(value)
    if key in SWITCH_KEYS:
        return _switch(key, value)
    want = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[typ]
    if typ is bool:
        if _as_bool(value) is not None:
            return _as_bool(value)
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    raise PocketError(f"config key '{key}' must be {want}, got {value!r}")


SWITCH_KEYS = ("compile",)  # true, false or auto; stored as that word (a saved true/false still reads)


def _switch(key: str, value: Any) -> str:
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    on = _as_bool(value)
    if on is None:
        raise PocketError(f"config key '{key}' must be true, false or auto, got {value!r}")
    return "true" if on else "false"


FIELD_TYPES: dict[str, type] = {
    f.name: {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
    for c in SECTIONS.values()
    for f in fields(c)
}


def set_key(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set one flat key (nanoGPT name) on the right section, checking name and type."""
    key = normalize_key(key)
    if key not in KEY_SECTION or key == "vocab_size":
        raise PocketError(f"unknown config key '{key}'{nearest(key, USER_KEYS)}")
    section = getattr(cfg, KEY_SECTION[key])
    setattr(section, key, _coerce(key, value, FIELD_TYPES[key]))


def apply_overrides(cfg: TrainConfig, values: Mapping[str, Any]) -> None:
    """Apply flat keys and/or [model]/[optim]/[run] tables from a file or preset."""
    for key, value in values.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise PocketError(f"unknown config section [{key}]{nearest(key, list(SECTIONS))}")
            for sub_key, sub_value in value.items():
                sub_key = normalize_key(sub_key)
                if KEY_SECTION.get(sub_key) != key:
                    if sub_key in KEY_SECTION:
                        raise PocketError(
                            f"config key '{sub_key}' belongs in [{KEY_SECTION[sub_key]}], not [{key}]"
                        )
                    raise PocketError(f"unknown config key '{sub_key}'{nearest(sub_key, USER_KEYS)}")
                if sub_key == "vocab_size":  # only restored from a saved config
                    cfg.model.vocab_size = _coerce(sub_key, sub_value, int)
                else:
                    set_key(cfg, sub_key, sub_value)
        else:
            set_key(cfg, key, value)


def validate(cfg: TrainConfig) -> None:
    """Reject values that cannot train, naming the key and what would work."""
    m, o, r = cfg.model, cfg.optim, cfg.run
    checks: list[tuple[bool, str]] = [
        (m.n_layer >= 1, f"n_layer must be at least 1, got {m.n_layer}"),
        (m.n_head >= 1, f"n_head must be at least 1, got {m.n_head}"),
        (m.n_embd >= 1, f"n_embd must be at least 1, got {m.n_embd}"),
        (m.block_size >= 1, f"block_size must be at least 1, got {m.block_size}"),
        (0.0 <= m.dropout < 1.0, f"dropout must be in [0, 1), got {m.dropout}"),
        (m.n_kv_head >= 0, f"n_kv_head must be zero (n_head) or positive, got {m.n_kv_head}"),
        (m.head_size >= 0, f"head_size must be zero (n_embd / n_head) or positive, got {m.head_size}"),
        (m.mlp_width >= 0, f"mlp_width must be zero (4 * n_embd) or positive, got {m.mlp_width}"),
        (m.rope_theta > 0, f"rope_theta must be positive, got {m.rope_theta}"),
        (m.norm_eps >= 0, f"norm_eps must be zero (the norm's own) or positive, got {m.norm_eps}"),
        _choice("pos_emb", m.pos_emb, POS_EMBS),
        _choice("rope_scaling", m.rope_scaling, ROPE_SCALINGS),
        _choice("norm", m.norm, NORMS),
        _choice("mlp", m.mlp, MLPS),
        _choice("optimizer", o.optimizer, OPTIMIZERS),
        (o.muon_lr > 0, f"muon_lr must be positive, got {o.muon_lr}"),
        (0.0 <= o.muon_momentum < 1.0, f"muon_momentum must be in [0, 1), got {o.muon_momentum}"),
        (o.muon_momentum_warmup >= 0, f"muon_momentum_warmup must be zero or positive, got {o.muon_momentum_warmup}"),
        (o.muon_weight_decay >= 0, f"muon_weight_decay must be zero or positive, got {o.muon_weight_decay}"),
        (0.0 <= o.ema_decay < 1.0, f"ema_decay must be zero (off) or in (0, 1), e.g. 0.998; got {o.ema_decay}"),
        (o.learning_rate > 0, f"learning_rate must be positive, got {o.learning_rate}"),
        (o.min_lr >= 0, f"min_lr must be zero or positive, got {o.min_lr}"),
        (o.warmup_iters >= 0, f"warmup_iters must be zero or positive, got {o.warmup_iters}"),
        (o.lr_decay_iters >= 0, f"lr_decay_iters must be zero or positive, got {o.lr_decay_iters}"),
        (o.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got '{o.schedule}'"
         + nearest(o.schedule, SCHEDULES)),
        (0.0 <= o.decay_fraction <= 1.0, f"decay_fraction must be in [0, 1], got {o.decay_fraction}"),
        (o.weight_decay >= 0, f"weight_decay must be zero or positive, got {o.weight_decay}"),
        (0.0 <= o.beta1 < 1.0, f"beta1 must be in [0, 1), got {o.beta1}"),
        (0.0 <= o.beta2 < 1.0, f"beta2 must be in [0, 1), got {o.beta2}"),
        (o.grad_clip >= 0, f"grad_clip must be zero (off) or positive, got {o.grad_clip}"),
        (r.batch_size >= 1, f"batch_size must be at least 1, got {r.batch_size}"),
        (r.grad_accum_steps >= 1, f"grad_accum_steps must be at least 1, got {r.grad_accum_steps}"),
        (r.max_iters >= 1, f"max_iters must be at least 1, got {r.max_iters}"),
        (r.max_time >= 0, f"max_time must be zero (off) or positive, got {r.max_time}"),
        (r.eval_interval >= 1, f"eval_interval must be at least 1, got {r.eval_interval}"),
        (r.eval_iters >= 1, f"eval_iters must be at least 1, got {r.eval_iters}"),
        (r.threads >= 0, f"threads must be zero (measured) or positive, got {r.threads}"),
        (r.log_interval >= 1, f"log_interval must be at least 1, got {r.log_interval}"),
        (r.sample_tokens >= 0, f"sample_tokens must be zero or positive, got {r.sample_tokens}"),
        (r.eval_sample_tokens >= 0, f"eval_sample_tokens must be zero or positive, got {r.eval_sample_tokens}"),
        (r.early_stop_patience >= 0, f"early_stop_patience must be zero (off) or positive, got {r.early_stop_patience}"),
        (r.short_context == 0 or 1 <= r.short_context < m.block_size,
         f"short_context must be zero (off) or from 1 to block_size - 1 ({m.block_size - 1}), got {r.short_context}"),
        (0.0 < r.short_context_fraction <= 1.0,
         f"short_context_fraction must be in (0, 1], got {r.short_context_fraction}"),
        (r.small_batch == 0 or 1 <= r.small_batch < r.batch_size,
         f"small_batch must be zero (off) or from 1 to batch_size - 1 ({r.batch_size - 1}), got {r.small_batch}"),
        (0.0 < r.small_batch_fraction <= 1.0, f"small_batch_fraction must be in (0, 1], got {r.small_batch_fraction}"),
        (r.device in DEVICES or re.fullmatch(r"cuda:\d+", r.device) is not None,
         f"device must be one of {', '.join(DEVICES)} (or cuda:N), got '{r.device}'" + nearest(r.device, DEVICES)),
        _choice("parallel", r.parallel, PARALLEL),
        (r.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got '{r.dtype}'" + nearest(r.dtype, DTYPES)),
    ]
    for ok, message in checks + _lora_checks(cfg):
        if not ok:
            raise PocketError(message)
    lora_modules(cfg.lora.lora_targets)  # an unknown target is refused here, by name
    for name in logger_names(r.loggers):
        if name not in LOGGERS:
            raise PocketError(f"loggers: unknown logger '{name}'{nearest(name, LOGGERS)}; choose from {', '.join(LOGGERS)}")
    if m.n_head % m.kv_heads:
        raise PocketError(f"n_kv_head ({m.n_kv_head}) must divide n_head ({m.n_head}): each key/value head serves "
                          "an equal group of query heads")
    if m.n_embd % m.n_head and not m.head_size:
        lower = max(h for h in range(1, m.n_head + 1) if m.n_embd % h == 0)
        raise PocketError(
            f"n_embd ({m.n_embd}) must be divisible by n_head ({m.n_head}); "
            f"try n_head {lower} or n_embd {(m.n_embd // m.n_head + 1) * m.n_head}"
        )
    if m.pos_emb == "rope" and m.head_dim % 2:
        raise PocketError(f"pos_emb rope needs an even head size, but the head size is {m.head_dim}")
    for ok, message in _family_checks(m):
        if not ok:
            raise PocketError(message)


def _family_checks(m: ModelConfig) -> list[tuple[bool, str]]:
    """The options that refine another: each needs it, and values that compute."""
    llama3 = m.rope_scaling == "llama3"
    return [
        (m.qk_norm or not m.qk_norm_gains, "qk_norm_gains = true needs qk_norm = true (the gains scale QK-norm's "
                                           "output)"),
        (m.pos_emb == "rope" or not llama3, "rope_scaling = \"llama3\" needs pos_emb = \"rope\""),
        (not llama3 or m.rope_factor > 0, f"rope_factor must be positive, got {m.rope_factor}"),
        (not llama3 or m.rope_original_context >= 1,
         f"rope_original_context must be at least 1, got {m.rope_original_context}"),
        (not llama3 or 0 < m.rope_low_freq_factor < m.rope_high_freq_factor,
         f"rope_low_freq_factor ({m.rope_low_freq_factor}) must be positive and below rope_high_freq_factor "
         f"({m.rope_high_freq_factor}): the frequencies between the two are blended"),
    ]


def _lora_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    lo, width = cfg.lora, cfg.model.n_embd
    return [
        (lo.lora_rank >= 0, f"lora_rank must be zero (off) or positive, got {lo.lora_rank}"),
        (lo.lora_alpha > 0, f"lora_alpha must be positive, got {lo.lora_alpha}"),
        (0.0 <= lo.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {lo.lora_dropout}"),
        _choice("lora_base_dtype", lo.lora_base_dtype, LORA_BASE_DTYPES),
        # a rank as wide as the model saves nothing over training the matrices themselves
        (lo.lora_rank < width, f"lora_rank {lo.lora_rank} is not below the model's width (n_embd {width}), so the "
                               "adapters would be as big as the weights; use a smaller rank (4 to 64 is usual) or "
                               "drop lora_rank for a full fine-tune"),
    ]


def check_lora(cfg: TrainConfig, has_base: bool) -> None:
    """What LoRA needs beyond valid values: a pretrained base to adapt (a run from scratch has none; this is
    asked first, being what a user most likely missed), and AdamW. For runs about to start or resume."""
    if not cfg.lora.enabled:
        return
    if not has_base:
        raise PocketError(f"lora_rank {cfg.lora.lora_rank}: LoRA trains small adapters on a pretrained model's "
                          "frozen weights, and a model trained from scratch has nothing to adapt; add --init-from "
                          "MODEL (e.g. gpt2, a Hugging Face folder or a run folder) or drop --lora-rank")
    if cfg.optim.ema_decay:
        raise PocketError("ema_decay: a LoRA run's average would copy the whole frozen base for adapters alone; "
                          "drop --ema-decay with LoRA")
    if cfg.optim.optimizer == "muon":
        raise PocketError("optimizer muon: with LoRA only the adapters train, and they train with AdamW (Muon's "
                          "orthogonalised step is made for whole weight matrices, not rank-r factors); drop "
                          "--optimizer muon")


def logger_names(text: str) -> list[str]:
    """'tensorboard, wandb' -> ['tensorboard', 'wandb'] (empty, 'none' and 'off' mean none)."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    return [n for n in dict.fromkeys(names) if n not in ("none", "off")]


def _choice(key: str, value: str, choices: tuple[str, ...]) -> tuple[bool, str]:
    return value in choices, f"{key} must be one of {', '.join(choices)}, got '{value}'" + nearest(value, choices)


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise PocketError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PocketError(f"config file {p} is not valid TOML: {e}") from None


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description."""
    out = {}
    for p in sorted(PRESET_DIR.glob("*.toml")):
        out[p.stem] = str(tomllib.loads(p.read_text(encoding="utf-8")).get("description", ""))
    return out


def load_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        names = list(list_presets())
        raise PocketError(f"unknown preset '{name}'{nearest(name, names + ['auto'])}; presets: {', '.join(names)}, "
                          "and for pocketgpt train also auto (sized to the corpus and the time)")
    values = read_toml(path)
    values.pop("description", None)
    return values


def build_train_config(
    preset: str | None = "demo",
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: TrainConfig | None = None,
) -> TrainConfig:
    """defaults (or base) < preset < config file < overrides, then validated."""
    cfg = base if base is not None else TrainConfig()
    if preset:
        apply_overrides(cfg, load_preset(preset))
    if config_file:
        apply_overrides(cfg, read_toml(config_file))
    if overrides:
        apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def parse_config_flags(argv: list[str], reserved: set[str] | frozenset[str] = frozenset()) -> tuple[list[str], dict[str, str]]:
    """Take `--<config key> VALUE`, `--key=VALUE` and bare boolean `--key` out of argv.

    Returns (the other arguments, {key: value string}). Options in `reserved` belong to the caller
    (a command's own flags) and are left alone. The one parser of config flags: the CLI and
    parse_cli_overrides both use it, so a value is never mistaken for an input file.
    """
    rest: list[str] = []
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag = arg.split("=", 1)[0]
        key = normalize_key(flag)
        if not arg.startswith("--") or flag in reserved or key not in KEY_SECTION or key == "vocab_size":
            rest.append(arg)
            i += 1
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if "=" in arg:
            value = arg.split("=", 1)[1]
        elif nxt is not None and not nxt.startswith("--") and (
                not _bare_flag(key) or nxt.lower() in BOOL_WORDS + ("auto",) * (key in SWITCH_KEYS)):
            value = nxt
            i += 1
        elif _bare_flag(key):
            value = "true"
        else:
            raise PocketError(f"{flag} needs a value, e.g. {flag} VALUE")
        out[key] = value
        i += 1
    return rest, out


def _bare_flag(key: str) -> bool:
    """A key that `--key` alone turns on: booleans, and switches (true, false or auto)."""
    return FIELD_TYPES[key] is bool or key in SWITCH_KEYS


def parse_cli_overrides(args: list[str]) -> dict[str, str]:
    """['--n-layer', '4', '--compile=true', '--bias'] -> {'n_layer': '4', 'compile': 'true', 'bias': 'true'}."""
    rest, out = parse_config_flags(args)
    for arg in rest:
        if arg.startswith("--") and len(arg) > 2:
            key = normalize_key(arg.split("=", 1)[0])
            raise PocketError(f"unknown option --{key.replace('_', '-')}{nearest(key, USER_KEYS)}")
        raise PocketError(f"unexpected argument '{arg}'; config keys are given as --key VALUE")
    return out
