"""train(cfg) -> run dir: build the model, then the loop (steps, evals, schedule, clipping, AMP, budget).

Who does what around the loop:
  data.open_training_data   the splits, samplers and tokenizer
  build_model               the raw GPT (fresh, or an initial model passed in; LoRA adapters added) and what wraps it
  trainstate.Resumable      everything an exact resume saves and restores
  evalsteps.EVAL_STEPS      what each eval does (best weights, notes, early stop, sample, plots)
  rundir                    the run folder's layout, config and lock
The Trainer itself only steps, evaluates and keeps time.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import autotune, distributed, evalsteps, fsdp, rundir
from .checkpoint import disk_errors
from .config import MODEL_SHAPE_KEYS, LoraConfig, ModelConfig, RunConfig, TrainConfig, check_lora, validate
from .data import TOKENIZER as DATA_TOKENIZER, TrainData, open_training_data, read_meta
from .errors import PocketError, TrainingDiverged
from .files import atomic_write
from .lora import add_adapters, describe, gpt_around, merged_model, save_adapter
from .distributed import Group
from .metrics import MetricsLog, SilentLog, check_loggers
from .model import GPT, use_bf16_attention
from .optim import lr_at, make_optimizers, progress, set_lr
from .runtime import Runtime, cpu_attention_choice, device_memory_mb, matmul_flops, resolve
from .sizing import (
    estimate_memory_mb,
    gpu_peak_flops,
    seconds_per_iter,
    training_flops,
)
from .trainstate import Resumable, RunState

# LoRA settings a resume keeps (with the targeted modules): the rank shapes the adapters, alpha scales what they
# add; lora_dropout may change, as dropout may
LORA_KEYS = ("lora_rank", "lora_alpha")


# ---------------------------------------------------------------- the model, built before the loop

class TrainModel:
    """The raw GPT (saved, evaluated, sampled) and `forward`, what a training step calls.

    forward is the raw model, or under torchrun DistributedDataParallel around it (its backward averages
    the gradients over the ranks), either of them maybe compiled; a compiler failure at the first call
    falls back to the uncompiled one with a warning. Under torchrun with parallel "fsdp" the raw model is
    sharded in place instead (fsdp.Sharded: its parameters become DTensors) and forward is the raw model.
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
        self.eager: Callable[..., Any] = self.ddp if self.ddp is not None else raw
        self.forward: Callable[..., Any] = self.eager

    @property
    def wrapped(self) -> bool:
        return self.forward is not self.raw

    def compile(self, say: Callable[[str], None]) -> None:
        try:
            self.forward = torch.compile(self.eager)
            say("compiling the model (the first steps are slow) ...")
        except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
            say(f"warning: torch.compile unavailable ({type(e).__name__}); training without it")

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
            return self.forward(x, y)
        except Exception as e:  # noqa: BLE001 - a compiler failure shows up at the first call
            if self.forward is self.eager:
                raise
            say(f"warning: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); training without it")
            self.forward = self.eager
            return self.eager(x, y)


def _no_buffer_sync() -> dict[str, bool]:
    """Buffers (rope tables) are constants, equal on every rank: nothing to send at each forward (the option's
    name changed in torch 2.13; older versions know only broadcast_buffers)."""
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def build_model(cfg: ModelConfig, runtime: Runtime, initial: GPT | None = None,
                lora: LoraConfig | None = None, group: Group | None = None, parallel: str = "auto") -> TrainModel:
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
    return TrainModel(raw, group, parallel)


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
    state = initial.state_dict()
    wpe = "transformer.wpe.weight"
    if wpe in state and have.block_size > cfg.block_size:
        state[wpe] = state[wpe][: cfg.block_size].clone()  # a small copy: safetensors saves no part-views
    return gpt_around(cfg, state, dict(initial.named_buffers())).to(runtime.device)


def checkpoint_blocks(model: GPT) -> None:
    """Gradient checkpointing: each block keeps only its input for the backward pass and runs again there.

    The block's own forward is wrapped on the instance (its parameters, names and state dict are as
    they were); torch replays the RNG state, so dropout draws the same masks and a step computes what
    it computes without checkpointing. Evals and samples are unaffected (no backward, or the engine).
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


# ---------------------------------------------------------------- the loop

class Trainer:
    """Steps, evaluates and keeps time for one run; `run()` trains to the end."""

    def __init__(self, cfg: TrainConfig, data: TrainData, model: TrainModel, out: Path, runtime: Runtime,
                 log: MetricsLog):
        self.cfg, self.data, self.net, self.out, self.runtime, self.log = cfg, data, model, out, runtime, log
        self.model = model.raw
        self.group = distributed.current()
        self.lora = cfg.lora.enabled  # the model's targeted matrices are LoRALinear layers (build_model)
        self.optimizers = make_optimizers(self.model, cfg.optim, runtime.device, runtime.dtype)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
        self.resumable = Resumable(self.model, self.optimizers, self.scaler, runtime, model.sharded)
        # Reading a loss on a GPU waits for all queued work; read at log and eval steps only, and keep a
        # device-side flag of non-finite values for the steps in between (checked before every save).
        self.read_every_step = not runtime.is_cuda
        self.unread_bad = torch.zeros((), dtype=torch.bool, device=runtime.device)
        self.last_read_iter = 0
        self.state = RunState()
        self.clock = time.perf_counter()  # the time since then is not yet in state.elapsed (_tick)
        self.saved_clock: tuple[float, float] | None = None  # (state.elapsed, clock) at the eval's save
        self.stop_requested = False
        self.early_stopped = False
        m = cfg.model
        self.flops_per_token = m.flops_per_token(_matmul_params(self.model))
        self.peak_flops = peak_flops(cfg, runtime, self.group.world_size)
        self.reprobed = False
        self.attention_note = _choose_cpu_attention(self.model, cfg, runtime, self.group)

    @classmethod
    def create(cls, cfg: TrainConfig, data_dir: Path, out: Path, runtime: Runtime, log: MetricsLog,
               initial: GPT | None = None) -> "Trainer":
        """Open the data, seed, build the model and the trainer: what train() does before the loop."""
        data = _open_data(cfg, data_dir, distributed.current())
        return cls.from_data(cfg, data, out, runtime, log, initial)

    @classmethod
    def from_data(cls, cfg: TrainConfig, data: TrainData, out: Path, runtime: Runtime, log: MetricsLog,
                  initial: GPT | None = None) -> "Trainer":
        """Seed, build the model (with the data's vocab_size in a copy of cfg) and the trainer."""
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=data.vocab_size))
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model, runtime, initial, cfg.lora, distributed.current(), cfg.run.parallel)
        if cfg.run.gradient_checkpointing:
            checkpoint_blocks(model.raw)
        return cls(cfg, data, model, Path(out), runtime, log)

    @property
    def sampler(self) -> Any:
        return self.data.sampler

    # -- resume -------------------------------------------------------------
    def restore(self) -> None:
        self.state = self.resumable.restore(self.out)

    def save_last(self) -> None:
        """Every rank calls this (the unread-step check is agreed); rank 0 writes last/ while the others wait."""
        self._tick()  # the time since the last step's tick is the run's too (a Ctrl-C after an eval, say)
        self._check_unread(self.state.iter)
        gathered = self._gather()
        self.group.main_first(lambda: self._save(gathered))

    def _save(self, gathered: fsdp.Gathered | None = None) -> None:
        self.resumable.save(self.out, self.state, gathered)

    def _gather(self) -> fsdp.Gathered | None:
        """Under FSDP, the full weights and optimizer state on rank 0, gathered by every rank before rank 0
        writes alone (a collective inside main_first would wait for ranks that are not there); else None."""
        return self.net.sharded.gather(self.optimizers) if self.net.sharded is not None else None

    # -- one optimizer step -------------------------------------------------
    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.runtime.is_cuda:
            return t.pin_memory().to(self.runtime.device, non_blocking=True)
        return t.to(self.runtime.device)

    def step(self, it: int, lr: float) -> tuple[float, float]:
        """Forward/backward over grad_accum_steps micro-batches and one update; (loss, grad norm).

        On steps that do not read them (see read_every_step) both come back as NaN.
        """
        r, o = self.cfg.run, self.cfg.optim
        set_lr(self.optimizers, lr / o.learning_rate)
        if self.group.rank:
            # rank 0's RNG is the run's (saved in last/); the others draw their dropout from (seed, rank, step),
            # so they need no saved state and a resume on any world size stays exact
            torch.manual_seed(int(np.random.SeedSequence([r.seed, self.group.rank, it]).generate_state(1)[0]))
        total = torch.zeros((), device=self.runtime.device)
        for micro in range(r.grad_accum_steps):
            x, y = (self._to_device(a) for a in self.sampler.batch(it, micro))
            with self.net.sync(last=micro == r.grad_accum_steps - 1):
                with self.runtime.autocast():
                    _, loss = self.net(x, y, self.log.say)
                self.scaler.scale(loss / r.grad_accum_steps).backward()
            total += loss.detach()
        read = self.read_every_step or self._is_read_step(it + 1)
        loss_value = grad_norm = math.nan
        if read:
            self._check_unread(it)
            self.last_read_iter = it + 1
            # each rank's loss is the mean over its rows; their mean is the global batch's
            loss_value = float(self.group.mean(total)) / r.grad_accum_steps
            if not math.isfinite(loss_value):
                self._zero_grad()
                raise TrainingDiverged(self._diverged_message(it, "loss", loss_value))
        else:
            self.unread_bad |= ~torch.isfinite(total)
        if o.grad_clip > 0:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
            # under FSDP the gradients are DTensor shards and the norm is the global one (a DTensor scalar)
            norm = fsdp.plain(torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip))
            if read:
                grad_norm = float(norm)
                if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                    self._zero_grad()
                    raise TrainingDiverged(self._diverged_message(it, "gradient norm", grad_norm))
            elif not self.scaler.is_enabled():  # with fp16, overflowing steps are skipped, not fatal
                self.unread_bad |= ~torch.isfinite(norm)
        for opt in self.optimizers:
            self.scaler.step(opt)  # with fp16, skips steps whose gradients overflowed
        self.scaler.update()
        self._zero_grad()
        return loss_value, grad_norm

    def _is_read_step(self, n: int) -> bool:
        r = self.cfg.run
        return n % r.log_interval == 0 or n % r.eval_interval == 0 or n >= r.max_iters

    def _check_unread(self, it: int) -> None:
        """Raise if a step that was not read went non-finite (its update was applied: nothing is saved).

        Agreed across ranks (any rank's bad step stops them all), so every rank calls it at the same step.
        """
        if self.read_every_step or not self.group.any_true(bool(self.unread_bad)):
            return
        raise TrainingDiverged(
            f"training stopped: the loss or gradient norm became non-finite between iter {self.last_read_iter} "
            f"and iter {it}; nothing since the last save was kept, so the last good checkpoint in {self.out} is "
            f"intact. Likely cause: {self._likely_causes()}")

    def _zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def _diverged_message(self, it: int, what: str, value: float) -> str:
        return (
            f"training stopped at iter {it}: the {what} became {value}; the step was not applied and "
            f"the last good checkpoint in {self.out} is intact. Likely cause: {self._likely_causes()}"
        )

    def _likely_causes(self) -> str:
        causes = "the learning rate may be too high (try a lower --learning-rate or a longer --warmup-iters)"
        if self.runtime.dtype == torch.float16:
            causes += ", or float16 overflowed (try --dtype bfloat16 or float32)"
        return causes

    # -- evaluation ---------------------------------------------------------
    @torch.no_grad()
    def estimate_losses(self) -> dict[str, float]:
        """Mean loss over eval_iters fixed batches per split (the same batches at every eval).

        In a distributed run each rank measures every world_size-th batch; the sums are added over the
        ranks and divided once, so every rank holds the losses a single process would measure. (Under
        FSDP every forward is a collective: ranks short of a batch run one more and drop its loss.)
        """
        self.model.eval()
        splits, sums = list(self.data.eval_samplers), []
        rank, world = self.group.share
        n = self.cfg.run.eval_iters
        rounds = self.net.sharded.eval_rounds(n) if self.net.sharded is not None else n
        for split in splits:
            losses = []
            for k in range(rank, rounds, world):
                x, y = (self._to_device(a) for a in self.data.eval_samplers[split].batch(k % n))
                with self.runtime.autocast():
                    _, loss = self.model(x, y)
                if k < n:
                    losses.append(float(loss))
            sums.append(float(np.sum(losses)))
        self.model.train()
        return {split: total / self.cfg.run.eval_iters for split, total in zip(splits, self.group.sums(sums))}

    def evaluate(self) -> None:
        """Measure (every rank), then run every eval step (evalsteps.EVAL_STEPS) in order: on rank 0 alone,
        which writes the run's files, while the others wait; its early-stop decision is theirs too. DDP's
        replicas are checked to be still equal first, so drifted weights are never saved. Its time up to the
        save is in the saved clock (state.elapsed), what follows goes to the next step: the loop then stops on
        the clock that was saved, so a run that ends at an eval is one a resume sees finished."""
        self._check_unread(self.state.iter)
        if self.net.ddp is not None:
            distributed.check_replicas(self.group, list(self.model.named_parameters()), self.state.iter)
        ev = evalsteps.record(self.state, self.estimate_losses(), self.data.val_bytes_per_token)
        gathered = self._gather()
        self._tick()
        stop, saved, since = self.group.main_first(lambda: self._eval_steps(ev, gathered))
        # every rank takes the clock rank 0 saved (the loop decides on it: the mean of equal clocks) and counts
        # the time since that save in the next step
        self.state.elapsed, self.clock = saved, time.perf_counter() - since
        self.early_stopped = self.early_stopped or stop

    def _tick(self) -> None:
        """Add the time since the last tick to state.elapsed: every second of the loop counts once."""
        now = time.perf_counter()
        self.state.elapsed += now - self.clock
        self.clock = now

    def _mark_saved_clock(self) -> None:
        self._tick()
        self.saved_clock = (self.state.elapsed, self.clock)

    def _save_counted(self, gathered: fsdp.Gathered | None) -> None:
        self._mark_saved_clock()
        self._save(gathered)

    def _eval_steps(self, ev: evalsteps.EvalResult,
                    gathered: fsdp.Gathered | None = None) -> tuple[bool, float, float]:
        """Rank 0: (stop early?, the clock last/ was saved with, seconds since that save)."""
        self.saved_clock = None
        ctx = evalsteps.EvalContext(self.out, self.cfg, self.state, self.log, self._eval_model(ev, gathered),
                                    self.data.tokenizer, lambda: self._save_counted(gathered))  # _check_unread ran above
        for eval_step in evalsteps.EVAL_STEPS:
            eval_step(ctx, ev)
        if self.saved_clock is None:  # no save among the steps: the clock as it is now
            self._mark_saved_clock()
        elapsed, at = self.saved_clock
        return ctx.stop_requested, elapsed, time.perf_counter() - at

    def _eval_model(self, ev: evalsteps.EvalResult, gathered: fsdp.Gathered | None = None) -> GPT:
        """The model the eval steps save as best and sample from. With LoRA: a merged plain copy (its
        targeted matrices new, the rest shared), so model.safetensors loads as any run's and the engine's
        decode, which reads plain weights, sees the adapters; a new best adapter is saved first, beside it.
        Under FSDP: rank 0's plain copy with the gathered full weights (fsdp.Gathered)."""
        if gathered is not None and gathered.model is not None:
            return gathered.model
        if not self.lora:
            return self.model
        if ev.improved:
            with disk_errors(self.out, f"best adapter ({rundir.ADAPTER})"):
                save_adapter(self.model, self.out / rundir.ADAPTER, self.cfg.lora,
                             {"iter": str(ev.iter), "val_loss": f"{ev.val_loss:.6f}", "format_version": "1"})
        return merged_model(self.model)

    # -- the loop -------------------------------------------------------------
    def run(self) -> RunState:
        r, s = self.cfg.run, self.state
        tokens_per_iter = r.batch_size * r.grad_accum_steps * self.cfg.model.block_size
        self.last_read_iter = s.iter
        threads = torch.get_num_threads()
        try:
            self.tuner = self._tuning()
            self.model.train()
            if self.runtime.is_cuda:
                torch.cuda.reset_peak_memory_stats(self.runtime.device)
            budget = (r.max_time, s.elapsed, "s") if r.max_time else (r.max_iters, s.iter, "it")
            self.log.start_progress(*budget)
            try:
                return self._loop(tokens_per_iter)
            finally:
                self.log.close_progress()
        finally:
            torch.set_num_threads(threads)  # the process's own setting again (train() may be one call of many)

    def _loop(self, tokens_per_iter: int) -> RunState:
        r, s = self.cfg.run, self.state
        window_start, window_iters, evaluated_at = time.perf_counter(), 0, -1
        self.clock = time.perf_counter()
        while (s.iter < r.max_iters and not _time_spent(r, s) and not self.stop_requested
               and not self.early_stopped):
            distributed.exit_hook_for_tests(s.iter, self.model)
            lr = lr_at(self.cfg.optim, s.iter,
                       progress(self.cfg.optim, s.iter, r.max_iters, s.elapsed, r.max_time))
            with self.tuner.step():
                loss, grad_norm = self.step(s.iter, lr)
            s.compile, s.threads = self.tuner.compile, self.tuner.threads
            s.iter += 1
            s.tokens_seen += tokens_per_iter
            if not math.isnan(loss):
                s.last_train_loss = loss
            window_iters += 1
            if s.iter % r.log_interval == 0:
                seconds = time.perf_counter() - window_start
                self._log_train(loss, lr, grad_norm, seconds, window_iters, tokens_per_iter)
                window_start, window_iters = time.perf_counter(), 0
            self._tick()
            self.log.progress(s.elapsed if r.max_time else s.iter, loss=_shown(s.last_train_loss),
                              val=_shown(s.best_val_loss))
            if s.iter % r.eval_interval == 0:
                self.evaluate()  # its time up to the save is in s.elapsed now, the rest in the next step's
                evaluated_at = s.iter
                window_start = time.perf_counter()
            # every rank leaves the loop at the same step: a stop on any rank, and one clock for max_time
            self.stop_requested, s.elapsed = self.group.agree(self.stop_requested, s.elapsed)
        if self.stop_requested:
            self.save_last()
            return s
        if evaluated_at != s.iter and s.iter > 0:
            self.evaluate()
        elif s.iter == 0:
            raise PocketError("nothing to train: max_iters is already reached")
        return s

    def _tuning(self) -> autotune.AutoTune:
        """compile and threads as asked, or (compile auto, threads 0) as the run's saved decisions, the
        cache or a measurement of its first steps say (autotune.py)."""
        r, s = self.cfg.run, self.state
        tuner = autotune.AutoTune(self.net, self._step_key, self._steps_left, self.log.say, self.group,
                                  self.runtime.device)
        if r.threads:
            torch.set_num_threads(r.threads)
        if r.compile == "true":
            self.net.compile(self.log.say)
        mine = (self.runtime.device.type == "cpu" and not r.threads and torch.get_num_threads() > 1
                and not os.environ.get(distributed.ENV_THREADS))
        # every rank measures or none does (a rank alone would wait in other collectives); a resumed run
        # that trained at the process's count (threads not measured then) stays at it
        measured = self.group.sums([float(mine)])[0] == self.group.world_size and (s.threads or not s.iter)
        asked = {"true": autotune.ON, "false": autotune.OFF}.get(r.compile, "")
        tuner.start(autotune.Plan(asked, torch.get_num_threads() if measured else 0, s.compile, s.threads))
        return tuner

    def _step_key(self) -> str:
        """What a step's cost (eager, compiled, at a thread count) depends on besides the machine: the model, one
        rank's rows, the recipe."""
        cfg, rt = self.cfg, self.runtime
        return autotune.shape_key(rt.device, {
            "model": cfg.model.__dict__, "rows": _rank_rows(cfg, self.group).run.batch_size,
            "accum": cfg.run.grad_accum_steps, "dtype": str(rt.dtype), "optimizer": cfg.optim.optimizer,
            "checkpointing": cfg.run.gradient_checkpointing, "lora": cfg.lora.__dict__,
            "world": self.group.world_size, "parallel": cfg.run.parallel,
            "bf16_attention": self.attention_note.startswith("attention in bf16")})

    def _steps_left(self, step_s: float) -> float:
        """Steps this run has left at step_s seconds each: to max_iters, or to max_time if that comes first."""
        r, s = self.cfg.run, self.state
        left = float(r.max_iters - s.iter)
        if r.max_time:
            left = min(left, max(0.0, r.max_time - s.elapsed) / max(step_s, 1e-9))
        return left

    def _log_train(self, loss: float, lr: float, grad_norm: float, seconds: float, iters: int, tpi: int) -> None:
        ms = 1000 * seconds / max(iters, 1)
        tps = tpi * iters / max(seconds, 1e-9)
        s = self.state
        gpu = self._hw_metrics(tps)
        self.log.write({"iter": s.iter, "loss": loss, "lr": lr, "tokens_per_s": round(tps, 1),
                        "ms_per_iter": round(ms, 2), "grad_norm": grad_norm, "tokens_seen": s.tokens_seen,
                        "elapsed": round(s.elapsed, 3), **gpu})
        budget = self.cfg.run.max_time
        if budget:
            where, eta = f"{s.elapsed:5.0f}s/{budget:.0f}s", budget - s.elapsed
        else:
            where, eta = f"{s.iter}/{self.cfg.run.max_iters}", (self.cfg.run.max_iters - s.iter) * ms / 1000
        extra = f" | MFU {100 * gpu['mfu']:.1f}%" if "mfu" in gpu else ""
        extra += f" | {gpu['peak_mem_mb']:,.0f} MB peak" if "peak_mem_mb" in gpu else ""
        self.log.say(f"iter {s.iter:6d} ({where}) | loss {loss:.4f} | lr {lr:.2e} | "
                     f"{ms:6.1f} ms/iter | {tps:,.0f} tok/s{extra} | ETA {_duration(eta)}")

    def _hw_metrics(self, tokens_per_s: float) -> dict[str, float]:
        """Model FLOPs utilisation (each process's share of tokens/s against its own ceiling); on CUDA also
        peak memory (MB)."""
        out = {}
        if self.runtime.is_cuda:
            out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(self.runtime.device) / 2**20, 1)
        if self.peak_flops:  # unknown GPUs get no MFU rather than a guess
            share = tokens_per_s / self.group.world_size
            if self.flops_per_token * share > self.peak_flops and not self.runtime.is_cuda and not self.reprobed:
                # faster than the ceiling: the cached probe met a busy machine; measure again, once
                self.reprobed = True
                self.peak_flops = peak_flops(self.cfg, self.runtime, self.group.world_size, remeasure=True)
            out["mfu"] = round(self.flops_per_token * share / self.peak_flops, 4)
        return out


def _choose_cpu_attention(model: GPT, cfg: TrainConfig, runtime: Runtime, group: Group) -> str:
    """Under CPU bf16 autocast, attention in bf16 or fp32, as this CPU measured them at the shape one
    rank runs (runtime.cpu_attention_choice); '' elsewhere (GPUs run attention in the autocast dtype),
    and fp32 unmeasured where training attention always has dropout (attend_dropped: its products are
    bf16 already) and only evals would use the choice."""
    if runtime.device.type != "cpu" or runtime.dtype != torch.bfloat16:
        return ""
    m = cfg.model
    if m.dropout > 0 and m.attention_dropout:
        return ""
    rows = _rank_rows(cfg, group).run.batch_size
    on, why = cpu_attention_choice(rows, m.n_head, m.block_size, m.n_embd // m.n_head)
    use_bf16_attention(model, on)
    return why


def peak_flops(cfg: TrainConfig, runtime: Runtime, world_size: int = 1, remeasure: bool = False) -> float | None:
    """The MFU denominator of one process: a known GPU's dense peak; on a CPU, its matmul rate at this model's
    own shapes and dtype (probe.py: measured once per machine, cached), since CPUs differ too much for a table."""
    if runtime.is_cuda:
        return gpu_peak_flops(torch.cuda.get_device_name(runtime.device), runtime.dtype != torch.float32)
    if runtime.device.type != "cpu":
        return None
    from .probe import matmul_rate, model_shapes

    m, r = cfg.model, cfg.run
    rows = r.batch_size // world_size * m.block_size
    dtype = torch.bfloat16 if runtime.dtype == torch.bfloat16 else torch.float32
    return matmul_rate(runtime.device, dtype, model_shapes(m, rows), remeasure=remeasure)


def _shown(loss: float) -> str:
    """A loss for the progress bar; '-' before there is one (unread, or no eval yet)."""
    return f"{loss:.3f}" if math.isfinite(loss) else "-"


def _matmul_params(model: GPT) -> int:
    """Parameters that take part in a matmul: not the position table, nor an untied input embedding."""
    n = model.num_params(non_embedding=True)
    if not model.config.tie_embeddings:
        n -= model.token_embedding.weight.numel()
    return n


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


# ---------------------------------------------------------------- entry point

@dataclass
class TrainResult:
    out: Path
    iters: int
    best_val_loss: float
    interrupted: bool
    seconds: float


def _check_resume_shape(saved: TrainConfig, cfg: TrainConfig) -> None:
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


def memory_estimate_mb(cfg: TrainConfig, n_params: int, runtime: Runtime) -> tuple[float, float]:
    """(weights + gradients + optimizer state, activations of one micro-batch) in MB, from sizing's rule; a
    LoRA run's frozen base holds its weights alone (4 bytes a parameter), only the adapters the full 16."""
    width = 2 if runtime.dtype != torch.float32 else 4
    state_mb, act_mb = estimate_memory_mb(cfg, n_params, width)
    if cfg.lora.enabled:
        state_mb = (n_params * 4 + cfg.lora.trainable_params(cfg.model) * 16) / 2**20
    m, r = cfg.model, cfg.run
    if r.gradient_checkpointing and m.n_layer > 1:  # one layer's activations, plus every block's input (fp32)
        _, head_mb = estimate_memory_mb(replace(cfg, model=replace(m, n_layer=0)), n_params, width)
        inputs_mb = m.n_layer * r.batch_size * m.block_size * m.n_embd * 4 / 2**20
        act_mb = head_mb + (act_mb - head_mb) / m.n_layer + inputs_mb
    return state_mb, act_mb


def _open_data(cfg: TrainConfig, data_dir: Path, group: Group) -> TrainData:
    """The splits and samplers for this rank's share of every global batch."""
    return open_training_data(data_dir, cfg.model.block_size, cfg.run.batch_size, cfg.run.seed, group.share)


def _rank_state_mb(cfg: TrainConfig, group: Group, state_mb: float) -> float:
    """Weights, gradients and optimizer state one rank holds: all of them, or under FSDP its share (the
    block being gathered at a time is small next to the rest)."""
    return state_mb / group.world_size if cfg.run.parallel == "fsdp" and group.enabled else state_mb


def _rank_rows(cfg: TrainConfig, group: Group) -> TrainConfig:
    """cfg with one rank's rows of each micro-batch: what one process holds in memory."""
    return replace(cfg, run=replace(cfg.run, batch_size=cfg.run.batch_size // group.world_size))


def check_memory(cfg: TrainConfig, vocab_size: int, runtime: Runtime, group: Group | None = None) -> None:
    """Refuse a model whose estimated training memory is beyond what this machine (or GPU) has.

    In a distributed run each rank holds the whole model (under FSDP its share of it) and its share of
    the rows; CPU ranks on one machine share its memory, GPU ranks have one GPU each.
    """
    m = cfg.model
    n_params = replace(m, vocab_size=vocab_size).param_count()
    group = group or distributed.current()
    sized = replace(_rank_rows(cfg, group), model=replace(m, vocab_size=vocab_size))
    state_mb, act_mb = memory_estimate_mb(sized, n_params, runtime)
    state_mb = _rank_state_mb(cfg, group, state_mb)
    if not runtime.is_cuda:
        state_mb, act_mb = state_mb * group.local_world_size, act_mb * group.local_world_size
    have = device_memory_mb(runtime)
    if have and state_mb + act_mb > have:
        where = "this GPU has" if runtime.is_cuda else "this machine has"
        more = "" if cfg.run.gradient_checkpointing else ", add --gradient-checkpointing (one more forward pass a step)"
        raise PocketError(
            f"this model needs ~{state_mb + act_mb:,.0f} MB to train ({state_mb:,.0f} MB weights and optimizer "
            f"state + {act_mb:,.0f} MB activations) but {where} {have:,.0f} MB; lower --block-size, --batch-size "
            f"(raise --grad-accum-steps to keep the batch), --n-embd or --n-layer{more}, or add --skip-memory-check "
            "if you know better"
        )


def train(
    cfg: TrainConfig,
    data_dir: str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    echo: Callable[[str], None] | None = None,
    initial_model: GPT | None = None,
    memory_check: bool = True,
    record: dict[str, Any] | None = None,
) -> TrainResult:
    """Train cfg on the prepared data in data_dir, writing the run folder `out`; cfg itself is not changed.

    initial_model: start from these weights (a fine-tune); record: extra config.json fields saying how
    the run began (rundir.KEPT_FIELDS, e.g. init_from), kept by later resumes.

    Under torchrun (several processes) every rank calls this alike: rank 0 takes the lock and writes the
    run folder, every rank trains its share of each batch (distributed.py).
    """
    out, data_dir = Path(out), Path(data_dir)
    cfg = copy.deepcopy(cfg)
    validate(cfg)
    fsdp.check(cfg)  # before check_lora: LoRA with fsdp is refused as such
    check_lora(cfg, has_base=resume or initial_model is not None)  # a resume's base is in its last/ checkpoint
    check_loggers(cfg.run.loggers)
    distributed.check_world(cfg.run.batch_size, cfg.run.parallel)
    runtime = resolve(cfg.run.device, cfg.run.dtype)
    fsdp.check_dtype(cfg, runtime)
    with distributed.session(runtime.device) as group, contextlib.ExitStack() as held:
        opened: list[TrainData] = []

        def claim() -> None:  # rank 0: the lock (held until training ends) and every refusal, before any write
            rundir.check_for_training(out, resume, overwrite)
            held.enter_context(rundir.locked(out))
            opened.append(_claim(cfg, data_dir, out, runtime, resume, overwrite, memory_check, group))

        group.main_first(claim)
        data = opened[0] if opened else _open_data(cfg, data_dir, group)
        return _train_locked(cfg, data, data_dir, out, runtime, resume, echo, initial_model, record)


def _claim(cfg: TrainConfig, data_dir: Path, out: Path, runtime: Runtime, resume: bool, overwrite: bool,
           memory_check: bool, group: Group) -> TrainData:
    """With the lock held: refuse what cannot train, then (--overwrite) remove the earlier run; the data, opened."""
    rundir.check_for_training(out, resume, overwrite)  # again: another process may have started first
    if resume:
        _check_resume_shape(rundir.read_config(out)[0], cfg)
    # everything that can refuse the run comes before --overwrite removes the earlier one; the memory
    # guard first, from meta.json alone, so a model that cannot fit is named as such
    if memory_check:
        check_memory(cfg, int(read_meta(data_dir)["vocab_size"]), runtime, group)
    data = _open_data(cfg, data_dir, group)
    if not resume and overwrite and rundir.is_run_dir(out):
        rundir.clear(out)
    return data


def _train_locked(cfg: TrainConfig, data: TrainData, data_dir: Path, out: Path, runtime: Runtime, resume: bool,
                  echo: Callable[[str], None] | None, initial_model: GPT | None,
                  record: dict[str, Any] | None) -> TrainResult:
    group = distributed.current()
    log = MetricsLog(out / rundir.METRICS, echo) if group.is_main else SilentLog(out / rundir.METRICS)
    trainer = Trainer.from_data(cfg, data, out, runtime, log, initial_model)
    cfg = trainer.cfg  # with the data's vocab_size
    if resume:
        trainer.restore()  # every rank reads last/: rank 0 wrote it alone, whatever the world size then
        if trainer.state.iter >= cfg.run.max_iters or _time_spent(cfg.run, trainer.state):
            # A kill after the final save (while the report was written, say) leaves a finished run:
            # resuming it is not an error, there is just nothing left to train.
            log.say(f"{out} already finished (iter {trainer.state.iter}); nothing to train. {_longer(cfg, trainer.state)}")
            group.main_first(lambda: _finish(out, log))
            return TrainResult(out, trainer.state.iter, trainer.state.best_val_loss, False, 0.0)
    group.main_first(lambda: _start_files(trainer, data_dir, resume, record))
    if group.is_main:
        _say_plan(trainer)
    started = time.perf_counter()
    log.open_mirrors(cfg.run.loggers, out, cfg.to_dict(), trainer.state.iter)
    try:
        with _graceful_interrupt(trainer):
            state = trainer.run()
    finally:
        log.close_mirrors()
    if trainer.stop_requested:
        log.say(f"interrupted at iter {state.iter}; saved. Resume with: pocketgpt train --out {out} --resume")
    else:
        group.main_first(lambda: _finish(out, log))
    return TrainResult(out, state.iter, state.best_val_loss, trainer.stop_requested, time.perf_counter() - started)


def _time_spent(r: RunConfig, s: RunState) -> bool:
    """Whether a run with a time budget (max_time > 0) has used it up: the loop's stop and a resume's "finished"."""
    return bool(r.max_time) and s.elapsed >= r.max_time


def _longer(cfg: TrainConfig, state: RunState) -> str:
    """How to train a finished run further: name the limit it reached (a larger --max-iters does nothing
    for a run whose time budget is spent)."""
    r = cfg.run
    if _time_spent(r, state):
        return (f"Its time budget (max_time {r.max_time:g} s) is spent: to train longer, resume with a larger "
                "--max-time (or --max-time 0 and a larger --max-iters)")
    return f"It reached max_iters {r.max_iters}: to train longer, resume with a larger --max-iters"


def _start_files(trainer: Trainer, data_dir: Path, resume: bool, record: dict[str, Any] | None) -> None:
    """Rank 0: metrics.jsonl cut back to the resumed iter (or emptied), the tokenizer, config.json."""
    out, log = trainer.out, trainer.log
    if resume:
        log.truncate_after(trainer.state.iter)
        log.say(f"resuming {out} at iter {trainer.state.iter}")
    else:
        log.reset()
        atomic_write(out / rundir.TOKENIZER, lambda p: shutil.copyfile(data_dir / DATA_TOKENIZER, p))
    rundir.write_config(out, trainer.cfg, data_dir, record)


def _say_plan(trainer: Trainer) -> None:
    cfg, runtime, data, log = trainer.cfg, trainer.runtime, trainer.data, trainer.log
    n_params = trainer.model.num_params() - cfg.lora.trainable_params(cfg.model)  # the GPT's own, without adapters
    state_mb, act_mb = memory_estimate_mb(_rank_rows(cfg, trainer.group), n_params, runtime)  # one rank's (its share of the rows)
    state_mb = _rank_state_mb(cfg, trainer.group, state_mb)
    log.say(f"model: {n_params:,} parameters | {runtime.describe()} | "
            f"data: {len(data.train_tokens):,} train / {len(data.val_tokens):,} val tokens")
    if trainer.group.enabled:
        sharded = trainer.net.sharded is not None
        how = f"FSDP2, each rank 1/{trainer.group.world_size} of the weights" if sharded else "DDP"
        log.say(trainer.group.describe(cfg.run.batch_size, how))
    if cfg.lora.enabled:
        log.say(describe(cfg.lora, cfg.model, n_params))
    if trainer.peak_flops and not runtime.is_cuda:
        log.say(f"MFU is against {trainer.peak_flops / 1e9:,.0f} GFLOP/s: this CPU's {_dtype_name(runtime)} matmul rate "
                "at the model's shapes (measured once, cached)")
    if trainer.attention_note:
        log.say(f"bf16 autocast: {trainer.attention_note}")
    step_s = _iter_seconds(trainer)
    log.say(f"memory estimate: ~{state_mb + act_mb:,.0f} MB ({state_mb:,.0f} MB weights, gradients and "
            f"optimizer state + {act_mb:,.0f} MB activations per micro-batch) | "
            f"~{1000 * step_s:,.0f} ms/iter estimated")
    note = _budget_note(trainer, step_s)
    if note:
        log.say(note)


def _budget_note(trainer: Trainer, step_s: float) -> str:
    """A time budget too short for this model here (e.g. a GPU preset on a CPU) is said before it starts:
    the budget is checked between steps, so the run still takes its first step, and any compile."""
    r, s = trainer.cfg.run, trainer.state
    need = min(FEW_STEPS, r.max_iters - s.iter)
    if not r.max_time or (r.max_time - s.elapsed) / step_s >= need:
        return ""
    compiling = " (and, with torch.compile, its compiling)" if r.compile == "true" else ""
    smaller = "; on a CPU a preset made for it trains a smaller model (--preset cpu-15min, or auto)" \
        if not trainer.runtime.is_cuda else ""
    return (f"note: at ~{step_s:.3g} s/iter estimated, the time left ({r.max_time - s.elapsed:,.3g} s of "
            f"max_time) holds fewer than {need} iterations; the budget is checked after each step, so "
            f"the first one{compiling} and the eval after it ({r.eval_iters} batches a split) run whatever "
            f"they cost{smaller}")


FEW_STEPS = 10  # below this many estimated steps in the budget, _budget_note speaks


def _dtype_name(runtime: Runtime) -> str:
    return "bf16" if runtime.dtype == torch.bfloat16 else "fp32"


def _iter_seconds(trainer: Trainer) -> float:
    """Seconds per iteration from the matmul probe and sizing's efficiency (what --preset auto assumes)."""
    r, rt = trainer.cfg.run, trainer.runtime
    flops = training_flops(matmul_flops(rt), rt.device.type, rt.dtype == torch.bfloat16)
    tokens = r.batch_size * r.grad_accum_steps * trainer.cfg.model.block_size // trainer.group.world_size
    return seconds_per_iter(tokens, trainer.flops_per_token, flops)  # each rank computes its share of the tokens


def _finish(out: Path, log: MetricsLog) -> None:
    from .report import write_report

    evalsteps.never_fatal(log, "write report.md", lambda: write_report(out))


class _graceful_interrupt:
    """First Ctrl-C: finish the current step, save last/, stop. Second: stop at once.

    Under torchrun a Ctrl-C reaches each rank twice (from the terminal and forwarded by torchrun): a second
    one within DOUBLE_S of the first is the same press. The ranks agree on the stop (Trainer._loop).
    """

    DOUBLE_S = 2.0

    def __init__(self, trainer: Trainer):
        self.trainer, self.previous, self.first = trainer, None, 0.0

    def _handler(self, signum: int, frame: Any) -> None:
        if self.trainer.stop_requested:
            if self.trainer.group.enabled and time.monotonic() - self.first < self.DOUBLE_S:
                return
            raise KeyboardInterrupt
        self.first = time.monotonic()
        self.trainer.stop_requested = True
        self.trainer.log.say("\ninterrupt: finishing this step and saving (Ctrl-C again to quit at once)")

    def __enter__(self) -> "_graceful_interrupt":
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
