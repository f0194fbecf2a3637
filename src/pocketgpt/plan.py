"""A training run's plan: its config checked once, and the numbers it is planned with.

check() runs every refusal that needs no data (the config's values, what FSDP and LoRA cannot train,
the loggers, the world size, the device and dtype, the run folder) and returns a TrainPlan. launch builds
it before it prepares anything and hands it to trainer.train_plan; trainer.train builds it from a config.
Either way each check runs once (the run folder is checked once more under its lock: another process
may have started in between).

The estimates: memory (one MemoryEstimate, from the config and the data's vocabulary, is both the number
checked against this machine and the number printed), seconds per step, the MFU ceiling, and the notes
that say them. Importing this module loads no torch; the few functions that need the device import it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import rundir
from .config import MODEL_SHAPE_KEYS, RunConfig, TrainConfig, check_lora, validate
from .errors import PocketError
from .sizing import estimate_memory_mb, gpu_peak_flops, seconds_per_iter, training_flops

if TYPE_CHECKING:
    from .distributed import Group
    from .runtime import Runtime
    from .trainstate import RunState

# LoRA settings a resume keeps (with the targeted modules): the rank shapes the adapters, alpha scales what they
# add; lora_dropout may change, as dropout may
LORA_KEYS = ("lora_rank", "lora_alpha")
FEW_STEPS = 10  # below this many estimated steps in the budget, budget_note speaks


# ---------------------------------------------------------------- the checks, once

@dataclass(frozen=True)
class TrainPlan:
    """A run that passed every check that needs no data: its config (a checked private copy: the caller's is
    never changed), the device and dtype it runs on, and its run folder."""

    cfg: TrainConfig
    runtime: Runtime
    out: Path
    resume: bool = False
    overwrite: bool = False


def check(cfg: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          has_base: bool = False) -> TrainPlan:
    """Refuse what cannot train, before anything is written: the config, then the run folder (read only; the
    lock is taken after). has_base: the run adapts a pretrained model (a fine-tune, or a resume)."""
    plan = check_config(cfg, out, resume=resume, overwrite=overwrite, has_base=has_base)
    rundir.check_for_training(plan.out, resume, overwrite)
    return plan


def check_config(cfg: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                 has_base: bool = False) -> TrainPlan:
    """check() without the run folder, for a caller that checked it already (launch does before it reads a
    resumed run's config or loads a base model), or that checks a config sized since (--preset auto)."""
    from . import distributed, fsdp
    from .metrics import check_loggers
    from .runtime import resolve

    cfg = copy.deepcopy(cfg)
    validate(cfg)
    fsdp.check(cfg)  # before check_lora: LoRA with fsdp is refused as such
    check_lora(cfg, has_base=has_base)
    check_loggers(cfg.run.loggers)
    distributed.check_world(cfg.run.batch_size, cfg.run.parallel, small_batch=cfg.run.small_batch)
    runtime = resolve(cfg.run.device, cfg.run.dtype)
    fsdp.check_dtype(cfg, runtime)
    return TrainPlan(cfg, runtime, Path(out), resume, overwrite)


def check_resume_shape(saved: TrainConfig, cfg: TrainConfig) -> None:
    """A resume trains the model it saved: refuse a config that changes its shape or its LoRA adapters."""
    for key in MODEL_SHAPE_KEYS:
        a, b = getattr(saved.model, key), getattr(cfg.model, key)
        if key != "vocab_size" and a != b:
            raise PocketError(
                f"--resume cannot change the model's shape: {key} was {a}, now {b}; "
                "drop that option or start a new run with --out"
            )
    was, now = saved.lora, cfg.lora
    if not (was.enabled or now.enabled):
        return
    changed = [(k, getattr(was, k), getattr(now, k)) for k in LORA_KEYS if getattr(was, k) != getattr(now, k)]
    if not changed and was.enabled and was.modules != now.modules:
        changed = [("lora_targets", ",".join(was.modules), ",".join(now.modules))]
    if changed:
        key, a, b = changed[0]
        raise PocketError(f"--resume cannot change LoRA: {key} was {a}, now {b}; drop that option, or start a new "
                          "run with --out (--init-from this run to build on what it learned)")


# ---------------------------------------------------------------- memory

def rank_rows(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """cfg with one rank's rows of each micro-batch: what one process holds in memory."""
    return replace(cfg, run=replace(cfg.run, batch_size=cfg.run.batch_size // world_size))


def memory_estimate_mb(cfg: TrainConfig, n_params: int, value_bytes: int) -> tuple[float, float]:
    """(weights + gradients + optimizer state, activations of one micro-batch) in MB, from sizing's rule with
    activations of value_bytes each; a LoRA run's frozen base holds its weights alone (4 bytes a parameter, 2
    kept in bfloat16: nearly all of them are the matrices narrowed), only the adapters the full 16."""
    state_mb, act_mb = estimate_memory_mb(cfg, n_params, value_bytes)
    if cfg.lora.enabled:
        base_bytes = 2 if cfg.lora.lora_base_dtype == "bfloat16" else 4
        state_mb = (n_params * base_bytes + cfg.lora.trainable_params(cfg.model) * 16) / 2**20
    m, r = cfg.model, cfg.run
    if r.gradient_checkpointing and m.n_layer > 1:  # one layer's activations, plus every block's input (fp32)
        _, head_mb = estimate_memory_mb(replace(cfg, model=replace(m, n_layer=0)), n_params, value_bytes)
        inputs_mb = m.n_layer * r.batch_size * m.block_size * m.n_embd * 4 / 2**20
        act_mb = head_mb + (act_mb - head_mb) / m.n_layer + inputs_mb
    return state_mb, act_mb


@dataclass(frozen=True)
class MemoryEstimate:
    """What training holds in memory, in MB: one rank's, and how many ranks share this machine's memory."""

    state_mb: float  # weights, gradients and optimizer state (under FSDP the rank's share)
    act_mb: float  # activations of one micro-batch (the rank's rows)
    ranks_here: int = 1  # CPU ranks on one machine share its memory; GPU ranks have one GPU each

    @property
    def rank_mb(self) -> float:
        return self.state_mb + self.act_mb

    @property
    def here_mb(self) -> float:
        """What this machine (or GPU) must hold: the number checked."""
        return self.rank_mb * self.ranks_here


def estimate_memory(cfg: TrainConfig, vocab_size: int, runtime: Runtime, group: Group) -> MemoryEstimate:
    """The run's memory, from its config and the data's vocabulary alone (before any model is built).

    In a distributed run each rank holds the whole model (under FSDP its share: the block being gathered
    at a time is small next to the rest) and its share of the rows."""
    m = cfg.model
    n_params = replace(m, vocab_size=vocab_size).param_count()  # the GPT's own: the adapters are memory_estimate_mb's
    sized = replace(rank_rows(cfg, group.world_size), model=replace(m, vocab_size=vocab_size))
    state_mb, act_mb = memory_estimate_mb(sized, n_params, runtime.dtype.itemsize)
    if cfg.run.parallel == "fsdp" and group.enabled:
        state_mb /= group.world_size
    return MemoryEstimate(state_mb, act_mb, 1 if runtime.is_cuda else group.local_world_size)


def check_memory(est: MemoryEstimate, runtime: Runtime, checkpointing: bool) -> None:
    """Refuse a run whose estimated training memory is beyond what this machine (or GPU) has."""
    from .runtime import device_memory_mb

    have = device_memory_mb(runtime)
    if not have or est.here_mb <= have:
        return
    n = est.ranks_here
    where = "this GPU has" if runtime.is_cuda else "this machine has"
    more = "" if checkpointing else ", add --gradient-checkpointing (one more forward pass a step)"
    raise PocketError(
        f"this model needs ~{est.here_mb:,.0f} MB to train ({est.state_mb * n:,.0f} MB weights and optimizer "
        f"state + {est.act_mb * n:,.0f} MB activations) but {where} {have:,.0f} MB; lower --block-size, "
        f"--batch-size (raise --grad-accum-steps to keep the batch), --n-embd or --n-layer{more}, or add "
        "--skip-memory-check if you know better"
    )


def memory_line(est: MemoryEstimate, step_s: float) -> str:
    """The plan's line: the memory estimate that was checked, and the estimated step time."""
    here = f" per rank, ~{est.here_mb:,.0f} MB for the {est.ranks_here} on this machine" if est.ranks_here > 1 else ""
    return (f"memory estimate: ~{est.rank_mb:,.0f} MB ({est.state_mb:,.0f} MB weights, gradients and "
            f"optimizer state + {est.act_mb:,.0f} MB activations per micro-batch{here}) | "
            f"~{1000 * step_s:,.0f} ms/iter estimated")


# ---------------------------------------------------------------- time and MFU

def iter_seconds(cfg: TrainConfig, runtime: Runtime, flops_token: float, world_size: int) -> float:
    """Seconds per iteration from the matmul probe and sizing's efficiency (what --preset auto assumes)."""
    import torch

    from .runtime import matmul_flops

    r = cfg.run
    flops = training_flops(matmul_flops(runtime), runtime.device.type, runtime.dtype == torch.bfloat16)
    tokens = r.batch_size * r.grad_accum_steps * cfg.model.block_size // world_size
    return seconds_per_iter(tokens, flops_token, flops)  # each rank computes its share of the tokens


def budget_note(run: RunConfig, state: RunState, step_s: float, cuda: bool) -> str:
    """A time budget too short for this model here (e.g. a GPU preset on a CPU) is said before it starts:
    the budget is checked between steps, so the run still takes its first step, and any compile."""
    need = min(FEW_STEPS, run.max_iters - state.iter)
    if not run.max_time or (run.max_time - state.elapsed) / step_s >= need:
        return ""
    compiling = " (and, with torch.compile, its compiling)" if run.compile == "true" else ""
    smaller = "; on a CPU a preset made for it trains a smaller model (--preset cpu-15min, or auto)" if not cuda else ""
    return (f"note: at ~{step_s:.3g} s/iter estimated, the time left ({run.max_time - state.elapsed:,.3g} s of "
            f"max_time) holds fewer than {need} iterations; the budget is checked after each step, so "
            f"the first one{compiling} and the eval after it ({run.eval_iters} batches a split) run whatever "
            f"they cost{smaller}")


def peak_flops(cfg: TrainConfig, runtime: Runtime, world_size: int = 1, remeasure: bool = False) -> float | None:
    """The MFU denominator of one process: a known GPU's dense peak; on a CPU, its matmul rate at this model's
    own shapes and dtype (probe.py: measured once per machine, cached), since CPUs differ too much for a table."""
    import torch

    if runtime.is_cuda:
        return gpu_peak_flops(torch.cuda.get_device_name(runtime.device), runtime.dtype != torch.float32)
    if runtime.device.type != "cpu":
        return None
    from .probe import matmul_rate, model_shapes

    m, r = cfg.model, cfg.run
    rows = r.batch_size // world_size * m.block_size
    dtype = torch.bfloat16 if runtime.dtype == torch.bfloat16 else torch.float32
    return matmul_rate(runtime.device, dtype, model_shapes(m, rows), remeasure=remeasure)


class Mfu:
    """Model FLOPs utilisation of one process: its share of the tokens/s times the model's training FLOPs per
    token, against its own ceiling (peak_flops; None for a GPU this does not know: no MFU rather than a guess)."""

    def __init__(self, model: Any, cfg: TrainConfig, runtime: Runtime, world_size: int):
        self.flops_per_token = cfg.model.flops_per_token(matmul_params(model))
        self.peak = peak_flops(cfg, runtime, world_size)
        self.cfg, self.runtime, self.world_size = cfg, runtime, world_size
        self.reprobed = False

    def of(self, tokens_per_s: float) -> float | None:
        """The MFU at tokens_per_s (all ranks together), rounded as metrics.jsonl keeps it."""
        if not self.peak:
            return None
        share = tokens_per_s / self.world_size
        if self.flops_per_token * share > self.peak and not self.runtime.is_cuda and not self.reprobed:
            # faster than the ceiling: the cached probe met a busy machine; measure again, once
            self.reprobed = True
            self.peak = peak_flops(self.cfg, self.runtime, self.world_size, remeasure=True)
        return round(self.flops_per_token * share / self.peak, 4)


def mfu_note(peak: float, runtime: Runtime) -> str:
    """What a CPU run's MFU is measured against."""
    import torch

    dtype = "bf16" if runtime.dtype == torch.bfloat16 else "fp32"
    return (f"MFU is against {peak / 1e9:,.0f} GFLOP/s: this CPU's {dtype} matmul rate at the model's shapes "
            "(measured once, cached)")


def matmul_params(model: Any) -> int:
    """Parameters of a GPT that take part in a matmul: not the position table, nor an untied input embedding."""
    n = model.num_params(non_embedding=True)
    if not model.config.tie_embeddings:
        n -= model.token_embedding.weight.numel()
    return n


def format_duration(seconds: float) -> str:
    """An ETA: '1h05m', or '4m09s' under an hour."""
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"
