"""What a training step calls: the raw GPT, built before the loop, and the forward that wraps it.

build_model makes the raw GPT (fresh, or an initial model rebuilt around its tensors; LoRA adapters
added) and wraps it in a StepModel: under torchrun in DistributedDataParallel, or sharded in place with
parallel "fsdp". The StepModel owns both forwards a step may call, eager and compiled: the trainer and
autotune ask for one with use_compiled() and never assign a forward themselves, so a compiler failure
is handled in one place.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch

from . import fsdp
from .config import LoraConfig, ModelConfig, TrainConfig
from .distributed import Group
from .errors import PocketError
from .lora import add_adapters, gpt_around
from .model import GPT, use_bf16_attention
from .config import MODEL_SHAPE_KEYS
from .plan import rank_rows
from .runtime import Runtime, cpu_attention_choice


def _quiet(line: str) -> None:
    """A say() that says nothing: autotune compiles while it measures, and reports the outcome itself."""


class StepModel:
    """The raw GPT (saved, evaluated, sampled) and the forward a training step calls.

    The eager forward is the raw model, or under torchrun DistributedDataParallel around it (its backward
    averages the gradients over the ranks); with parallel "fsdp" the raw model is sharded in place instead
    (fsdp.Sharded: its parameters become DTensors) and the eager forward is the raw model. use_compiled()
    switches to torch.compile of the eager forward (compiled at the first ask, then kept) and back; a
    compiler failure, when compiling or at the first compiled call, falls back to eager for good, with a
    warning.
    """

    def __init__(self, raw: GPT, group: Group | None = None, parallel: str = "auto"):
        self.raw = raw
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self.sharded: fsdp.Sharded | None = None
        if group is not None and group.enabled and parallel == "fsdp":
            self.sharded = fsdp.Sharded(raw, group)
        elif group is not None and group.enabled:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                raw, device_ids=[group.device] if group.device.type == "cuda" else None, **_no_buffer_sync())
        self._eager: Callable[..., Any] = self.ddp if self.ddp is not None else raw
        self._compiled: Callable[..., Any] | None = None
        self._failed = False  # compiling failed once: never tried again in this run
        self._forward = self._eager

    @property
    def compiled(self) -> bool:
        """Whether steps call the compiled forward now."""
        return self._forward is not self._eager

    def use_compiled(self, on: bool, say: Callable[[str], None] = _quiet) -> bool:
        """Call the compiled forward from now on (compiling it at the first ask) or the eager one. Returns
        whether the compiled one is in use: False when compiling failed, now or before. say hears the compile
        and a failure."""
        if on and self._compiled is None and not self._failed:
            self._compiled = self._compile(say)
        self._forward = self._compiled if on and self._compiled is not None else self._eager
        return self.compiled

    def _compile(self, say: Callable[[str], None]) -> Callable[..., Any] | None:
        try:
            compiled = torch.compile(self._eager)
        except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
            say(f"warning: torch.compile unavailable ({type(e).__name__}); training without it")
            self._failed = True
            return None
        say("compiling the model (the first steps are slow) ...")
        return compiled

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: DDP averages the gradients in the backward of the
        last micro-batch of a step only; the ones before accumulate on each rank (no_sync), one exchange a step.
        FSDP alike: its inner micro-batches neither reduce-scatter nor reshard (fsdp.Sharded.micro_step)."""
        if self.sharded is not None:
            self.sharded.micro_step(last)
            return contextlib.nullcontext()
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, say: Callable[[str], None]) -> Any:
        try:
            return self._forward(x, y)
        except Exception as e:  # noqa: BLE001 - a compiler failure shows up at the first call
            if not self.compiled:
                raise
            say(f"warning: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); training without it")
            self._failed, self._compiled = True, None
            self._forward = self._eager
            return self._eager(x, y)


def _no_buffer_sync() -> dict[str, bool]:
    """Buffers (rope tables) are constants, equal on every rank: nothing to send at each forward (the option's
    name changed in torch 2.13; older versions know only broadcast_buffers)."""
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def build_model(cfg: ModelConfig, runtime: Runtime, initial: GPT | None = None,
                lora: LoraConfig | None = None, group: Group | None = None, parallel: str = "auto") -> StepModel:
    """A fresh GPT of cfg (from torch's current RNG), or `initial` (e.g. pretrained weights), on the device.

    An initial model of exactly cfg is used as it is; one that differs only in dropout or a longer
    context (cropped: the first block_size rows of its position table) is rebuilt as a GPT of cfg around
    its very tensors. Either way nothing is copied (a second copy of a base model would be a second
    share of the memory a fine-tune has), so training changes the initial model's weights: pass a copy
    to keep one. With LoRA on, the weights are frozen and the targeted matrices wrapped (lora.add_adapters).
    In a distributed group the raw model is wrapped in DistributedDataParallel, which starts every rank
    from rank 0's weights, or with parallel "fsdp" sharded over the ranks (every rank built the same
    weights from the same seed, and keeps its slice).
    """
    raw = _raw_model(cfg, runtime, initial)
    if lora is not None and lora.enabled:
        add_adapters(raw, lora)  # after the move: the adapters are made on the weights' device
    return StepModel(raw, group, parallel)


def _raw_model(cfg: ModelConfig, runtime: Runtime, initial: GPT | None) -> GPT:
    if initial is None:
        return GPT(cfg).to(runtime.device)
    have = initial.config
    if have.vocab_size != cfg.vocab_size or have.block_size < cfg.block_size:
        raise PocketError(f"the initial model (vocab {have.vocab_size}, context "
                          f"{have.block_size}) does not fit the data (vocab {cfg.vocab_size}) "
                          f"or block_size {cfg.block_size}")
    for key in MODEL_SHAPE_KEYS:
        if key not in ("vocab_size", "block_size") and getattr(have, key) != getattr(cfg, key):
            raise PocketError(f"the initial model does not fit the config: its {key} is {getattr(have, key)}, "
                              f"the config's {getattr(cfg, key)}")
    if have == cfg:
        return initial.to(runtime.device)
    return gpt_around(cfg, initial.cropped_state(cfg.block_size), dict(initial.named_buffers())).to(runtime.device)


def checkpoint_blocks(model: GPT) -> None:
    """Gradient checkpointing: each block keeps only its input for the backward pass and runs again there.

    The block's own forward is wrapped on the instance (its parameters, names and state dict are as
    they were); torch replays the RNG state, so dropout draws the same masks and a step computes what
    it computes without checkpointing. Evals and samples are unaffected (no backward, or the engine).
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def choose_cpu_attention(model: GPT, cfg: TrainConfig, runtime: Runtime, world_size: int) -> tuple[bool, str]:
    """(attention in bf16?, why) under CPU bf16 autocast, as this CPU measured both at the shape one rank runs
    (runtime.cpu_attention_choice), applied to the model; (False, '') elsewhere (GPUs run attention in the
    autocast dtype), and fp32 unmeasured where training attention always has dropout (attend_dropped: its
    products are bf16 already) and only evals would use the choice."""
    if runtime.device.type != "cpu" or runtime.dtype != torch.bfloat16:
        return False, ""
    m = cfg.model
    if m.dropout > 0 and m.attention_dropout:
        return False, ""
    rows = rank_rows(cfg, world_size).run.batch_size
    on, why = cpu_attention_choice(rows, m.n_head, m.block_size, m.head_dim)
    use_bf16_attention(model, on)
    return on, why
