"""train(cfg) -> run dir: the loop (steps, evals, schedule, clipping, AMP, budget) and its entry point.

Who does what around the loop:
  plan                      every check a run passes before it starts (once), the memory / time / MFU estimates
  data.open_training_data   the splits, samplers and tokenizer
  stepmodel.build_model     the raw GPT (fresh, or an initial model passed in; LoRA adapters added) and the
                            StepModel around it (DDP / FSDP, eager or compiled forward)
  autotune.AutoTune         compile and threads, timed on the run's first steps
  cpuload.LoadWatch         fewer CPU threads while other programs keep cores busy (threads = 0)
  trainstate.Resumable      everything an exact resume saves and restores
  evalsteps.EVAL_STEPS      what each eval does (best weights, notes, early stop, sample, plots)
  rundir                    the run folder's layout, config and lock
The Trainer itself only steps, evaluates and keeps time.
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import autotune, cpuload, distributed, evalsteps, faults, fsdp, plan, rundir
from .checkpoint import disk_errors
from .config import RunConfig, TrainConfig
from .data import (SHORT_CONTEXT_CHATS, TOKENIZER as DATA_TOKENIZER, BatchSampler, TrainData, context_at, context_rows,
                   doubling_at)
from .data import open_training_data, read_meta
from .distributed import Group
from .ema import WeightAverage
from .errors import PocketError, TrainingDiverged
from .files import atomic_write
from .lora import describe, sampling_model, save_adapter, save_merged
from .metrics import MetricsLog, SilentLog
from .model import GPT
from .optim import lr_at, make_optimizers, muon_momentum_at, progress, set_lr, set_muon_momentum
from .plan import MemoryEstimate, TrainPlan
from .runtime import Runtime
from .stepmodel import StepModel, build_model, checkpoint_blocks, choose_cpu_attention
from .trainstate import Resumable, RunClock, RunState


class Trainer:
    """Steps, evaluates and keeps time for one run; `run()` trains to the end."""

    def __init__(self, cfg: TrainConfig, data: TrainData, model: StepModel, out: Path, runtime: Runtime,
                 log: MetricsLog):
        self.cfg, self.data, self.net, self.out, self.runtime, self.log = cfg, data, model, out, runtime, log
        self.model = model.raw
        self.group = distributed.current()
        self.lora = cfg.lora.enabled  # the model's targeted matrices are LoRALinear layers (build_model)
        self.optimizers = make_optimizers(self.model, cfg.optim, runtime.device, runtime.dtype)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
        # evals and saves read the average where one is kept (optim.ema_decay; refused with FSDP and LoRA)
        self.average = WeightAverage(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.resumable = Resumable(self.model, self.optimizers, self.scaler, runtime, model.sharded, self.average)
        # Reading a loss on a GPU waits for all queued work; read at log and eval steps only, and keep a
        # device-side flag of non-finite values for the steps in between (checked before every save).
        self.read_every_step = not runtime.is_cuda
        self.unread_bad = torch.zeros((), dtype=torch.bool, device=runtime.device)
        self.last_read_iter = 0
        self.state = RunState()
        self.clock = RunClock()
        self.interrupted = False  # written by the Ctrl-C handler alone: a flag the loop also wrote could lose it
        self.stop_requested = False  # what every rank agreed on at the end of a step
        self.early_stopped = False
        self.mfu = plan.Mfu(self.model, cfg, runtime, self.group.world_size)
        self.bf16_attention, self.attention_note = choose_cpu_attention(self.model, cfg, runtime,
                                                                        self.group.world_size)
        self.step_hooks = faults.step_hooks(self.group.rank)  # each called as hook(iter, model) before a step
        self.load: cpuload.LoadWatch | None = None  # set by run(): the thread count follows the load (cpuload.py)
        self.ceiling = 0  # the process's thread count when run() began: the load's ceiling before autotune's

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
        self.clock.tick(self.state)  # the time since the last step's tick is the run's (a Ctrl-C after an eval, say)
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

    def step(self, it: int, lr: float, context: int | None = None, rows: int | None = None) -> tuple[float, float]:
        """Forward/backward over grad_accum_steps micro-batches and one update; (loss, grad norm).
        context: the window length of a step with short contexts first (data.context_at), else block_size;
        rows: a micro-batch's rows with small batches first (data.doubling_at), else batch_size.

        On steps that do not read them (see read_every_step) both come back as NaN.
        """
        r, o = self.cfg.run, self.cfg.optim
        set_lr(self.optimizers, lr / o.learning_rate)
        if o.muon_momentum_warmup:
            set_muon_momentum(self.optimizers, muon_momentum_at(o, it))
        if self.group.rank:
            # rank 0's RNG is the run's (saved in last/); the others draw their dropout from (seed, rank, step),
            # so they need no saved state and a resume on any world size stays exact
            torch.manual_seed(int(np.random.SeedSequence([r.seed, self.group.rank, it]).generate_state(1)[0]))
        total = torch.zeros((), device=self.runtime.device)
        shape = {k: v for k, v in (("context", context), ("rows", rows)) if v}
        for micro in range(r.grad_accum_steps):
            x, y = (self._to_device(a) for a in self.sampler.batch(it, micro, **shape))
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
        if self.average is not None:
            self.average.update(it)
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
        model = self.average.model.eval() if self.average is not None else self.model
        splits, sums = list(self.data.eval_samplers), []
        rank, world = self.group.share
        n = self.cfg.run.eval_iters
        rounds = self.net.sharded.eval_rounds(n) if self.net.sharded is not None else n
        for split in splits:
            losses = []
            for k in range(rank, rounds, world):
                x, y = (self._to_device(a) for a in self.data.eval_samplers[split].batch(k % n))
                with self.runtime.autocast():
                    _, loss = model(x, y)
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
        self.clock.tick(self.state)
        stop, saved, since = self.group.main_first(lambda: self._eval_steps(ev, gathered))
        # every rank takes the clock rank 0 saved (the loop decides on it: the mean of equal clocks)
        self.clock.take(self.state, saved, since)
        self.early_stopped = self.early_stopped or stop

    def _save_counted(self, gathered: fsdp.Gathered | None) -> None:
        self.clock.mark_saved(self.state)
        self._save(gathered)

    def _eval_steps(self, ev: evalsteps.EvalResult,
                    gathered: fsdp.Gathered | None = None) -> tuple[bool, float, float]:
        """Rank 0: (stop early?, the clock last/ was saved with, seconds since that save)."""
        model, write_best = self._eval_model(ev, gathered)
        ctx = evalsteps.EvalContext(self.out, self.cfg, self.state, self.log, model, self.data.tokenizer,
                                    lambda: self._save_counted(gathered), write_best=write_best,  # _check_unread ran above
                                    examples=self.data.examples)
        for eval_step in evalsteps.EVAL_STEPS:
            eval_step(ctx, ev)
        return (ctx.stop_requested, *self.clock.since_saved(self.state))

    def _eval_model(self, ev: evalsteps.EvalResult, gathered: fsdp.Gathered | None = None
                    ) -> tuple[Any, Callable[[Path, dict[str, str]], None] | None]:
        """What the eval steps sample from, and how they write the best weights (None: that model's own).
        With LoRA: the best weights merged (W + scale B A) and streamed from the training model a tensor at a
        time, so model.safetensors loads as any run's; the sample from lora.sampling_model (a merged copy only
        where it sets no new memory peak), as the engine's decode reads plain weights; a new best adapter is
        saved first, beside them. Under FSDP: rank 0's plain copy with the gathered full weights (fsdp.Gathered)."""
        if gathered is not None and gathered.model is not None:
            return gathered.model, None
        if not self.lora:
            return (self.average.model if self.average is not None else self.model), None
        if ev.improved:
            with disk_errors(self.out, f"best adapter ({rundir.ADAPTER})"):
                save_adapter(self.model, self.out / rundir.ADAPTER, self.cfg.lora,
                             {"iter": str(ev.iter), "val_loss": f"{ev.val_loss:.6f}", "format_version": "1"})
        return sampling_model(self.model), functools.partial(save_merged, self.model)

    # -- the loop -------------------------------------------------------------
    def run(self) -> RunState:
        r, s = self.cfg.run, self.state
        self.last_read_iter = s.iter
        threads = torch.get_num_threads()
        try:
            # compile and threads as asked, or as the run's saved decisions, the cache or its first steps say
            self.tuner = autotune.for_run(self.net, self.cfg, self.state, self.runtime, self.group, self.log.say,
                                          self._steps_left, self.bf16_attention)
            self.load = cpuload.for_run(r, self.runtime, self.group, threads)
            self.ceiling = threads
            self.model.train()
            if self.runtime.is_cuda:
                torch.cuda.reset_peak_memory_stats(self.runtime.device)
            budget = (r.max_time, s.elapsed, "s") if r.max_time else (r.max_iters, s.iter, "it")
            self.log.start_progress(*budget)
            try:
                return self._loop()
            finally:
                self.log.close_progress()
        finally:
            torch.set_num_threads(threads)  # the process's own setting again (train() may be one call of many)

    def _loop(self) -> RunState:
        r, s = self.cfg.run, self.state
        window_start, window_iters, window_tokens, evaluated_at = time.perf_counter(), 0, 0, -1
        context, rows = self.cfg.model.block_size, r.batch_size
        self.clock.restart()
        while (s.iter < r.max_iters and not _time_spent(r, s) and not self.stop_requested
               and not self.early_stopped):
            for hook in self.step_hooks:
                hook(s.iter, self.model)
            p = progress(self.cfg.optim, s.iter, r.max_iters, s.elapsed, r.max_time)
            lr = lr_at(self.cfg.optim, s.iter, p)
            rows = self._rows(p, rows)
            context = self._context(p, context, rows)
            with self.tuner.step():
                loss, grad_norm = self.step(s.iter, lr, context if r.short_context else None,
                                            rows if r.small_batch else None)
            s.compile, s.threads = self.tuner.compile, self.tuner.threads
            self._follow_load()
            s.iter += 1
            tokens = context_rows(rows, self.cfg.model.block_size, context) * context * r.grad_accum_steps
            s.tokens_seen += tokens
            if not math.isnan(loss):
                s.last_train_loss = loss
            window_iters, window_tokens = window_iters + 1, window_tokens + tokens
            if s.iter % r.log_interval == 0:
                seconds = time.perf_counter() - window_start
                self._log_train(loss, lr, grad_norm, seconds, window_iters, window_tokens)
                window_start, window_iters, window_tokens = time.perf_counter(), 0, 0
            self.clock.tick(s)
            self.log.progress(s.elapsed if r.max_time else s.iter, loss=_shown(s.last_train_loss),
                              val=_shown(s.best_val_loss))
            if s.iter % r.eval_interval == 0:
                self.evaluate()  # its time up to the save is in s.elapsed now, the rest in the next step's
                evaluated_at = s.iter
                window_start, window_iters, window_tokens = time.perf_counter(), 0, 0
            # every rank leaves the loop at the same step: a stop on any rank, and one clock for max_time
            stop, s.elapsed = self.group.agree(self.interrupted, s.elapsed)
            self.stop_requested = self.stop_requested or stop
        if self.stop_requested:
            self.save_last()
            return s
        if evaluated_at != s.iter and s.iter > 0:
            self.evaluate()
        elif s.iter == 0:
            raise PocketError("nothing to train: max_iters is already reached")
        return s

    def _follow_load(self) -> None:
        """Between steps: the thread count as the machine's load asks (cpuload.py), at most autotune's choice or
        the process's count; not while autotune times steps, nor on compiled code (inductor keeps the count
        it compiled with). Not in RunState: it changes only the order floats are summed in."""
        if self.load is None or self.tuner.measuring or self.net.compiled:
            return
        change = self.load.check(torch.get_num_threads(), self.tuner.threads or self.ceiling)
        if change is not None:
            torch.set_num_threads(change[0])
            self.log.say(change[1])

    def _steps_left(self, step_s: float) -> float:
        """Steps this run has left at step_s seconds each: to max_iters, or to max_time if that comes first."""
        r, s = self.cfg.run, self.state
        left = float(r.max_iters - s.iter)
        if r.max_time:
            left = min(left, max(0.0, r.max_time - s.elapsed) / max(step_s, 1e-9))
        return left

    def _context(self, p: float, before: int, batch_rows: int) -> int:
        """The window length at progress p (short contexts first), said when it changes."""
        r, block = self.cfg.run, self.cfg.model.block_size
        now = context_at(block, r.short_context, r.short_context_fraction, p)
        if r.short_context and now != before:  # (the loop starts from block_size: a short first context is said)
            rows = context_rows(batch_rows, block, now)
            self.log.say(f"context: windows of {now} tokens, {rows} rows a micro-batch"
                         + (" (short contexts first)" if now < block else ""))
        return now

    def _rows(self, p: float, before: int) -> int:
        """A micro-batch's rows at progress p (small batches first), said when they change."""
        r = self.cfg.run
        now = doubling_at(r.small_batch, r.batch_size, r.small_batch_fraction, p)
        if r.small_batch and now != before:
            self.log.say(f"batch: {now} rows a micro-batch" + (" (small batches first)" if now < r.batch_size else ""))
        return now

    def _log_train(self, loss: float, lr: float, grad_norm: float, seconds: float, iters: int, tokens: int) -> None:
        ms = 1000 * seconds / max(iters, 1)
        tps = tokens / max(seconds, 1e-9)
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
                     f"{ms:6.1f} ms/iter | {tps:,.0f} tok/s{extra} | ETA {plan.format_duration(eta)}")

    def _hw_metrics(self, tokens_per_s: float) -> dict[str, float]:
        """Model FLOPs utilisation (each process's share of tokens/s against its own ceiling); on CUDA also
        peak memory (MB)."""
        out = {}
        if self.runtime.is_cuda:
            out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(self.runtime.device) / 2**20, 1)
        mfu = self.mfu.of(tokens_per_s)
        if mfu is not None:
            out["mfu"] = mfu
        return out


def _shown(loss: float) -> str:
    """A loss for the progress bar; '-' before there is one (unread, or no eval yet)."""
    return f"{loss:.3f}" if math.isfinite(loss) else "-"


# ---------------------------------------------------------------- entry point

@dataclass
class TrainResult:
    out: Path
    iters: int
    best_val_loss: float
    interrupted: bool
    seconds: float


def _open_data(cfg: TrainConfig, data_dir: Path, group: Group) -> TrainData:
    """The splits and samplers for this rank's share of every global batch."""
    data = open_training_data(data_dir, cfg.model.block_size, cfg.run.batch_size, cfg.run.seed, group.share)
    if cfg.run.short_context and not isinstance(data.sampler, BatchSampler):  # (small_batch suits both samplers)
        raise PocketError(SHORT_CONTEXT_CHATS)
    return data


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
    checked = plan.check(cfg, out, resume=resume, overwrite=overwrite,
                         has_base=resume or initial_model is not None)  # a resume's base is in its last/ checkpoint
    return train_plan(checked, data_dir, echo=echo, initial_model=initial_model, memory_check=memory_check,
                      record=record)


def train_plan(checked: TrainPlan, data_dir: str | Path, *, echo: Callable[[str], None] | None = None,
               initial_model: GPT | None = None, memory_check: bool = True,
               record: dict[str, Any] | None = None) -> TrainResult:
    """train() for a plan whose checks ran (plan.check: launch builds it before it prepares the data)."""
    data_dir = Path(data_dir)
    with distributed.session(checked.runtime.device) as group, contextlib.ExitStack() as held:
        claimed: list[tuple[TrainData, MemoryEstimate]] = []

        def claim() -> None:  # rank 0: the lock (held until training ends) and every refusal, before any write
            held.enter_context(rundir.locked(checked.out))
            claimed.append(_claim(checked, data_dir, memory_check, group))

        group.main_first(claim)
        data, memory = claimed[0] if claimed else (_open_data(checked.cfg, data_dir, group), None)
        return _train_locked(checked, data, data_dir, memory, echo, initial_model, record)


def _claim(checked: TrainPlan, data_dir: Path, memory_check: bool, group: Group) -> tuple[TrainData, MemoryEstimate]:
    """With the lock held: refuse what cannot train, then (--overwrite) remove the earlier run; the data,
    opened, and its memory estimate."""
    cfg, out, resume = checked.cfg, checked.out, checked.resume
    rundir.check_for_training(out, resume, checked.overwrite)  # again: another process may have started first
    if resume:
        plan.check_resume_shape(rundir.read_config(out)[0], cfg)
    # everything that can refuse the run comes before --overwrite removes the earlier one; the memory
    # guard first, from meta.json alone, so a model that cannot fit is named as such
    memory = plan.estimate_memory(cfg, int(read_meta(data_dir)["vocab_size"]), checked.runtime, group)
    if memory_check:
        plan.check_memory(memory, checked.runtime, cfg.run.gradient_checkpointing)
    data = _open_data(cfg, data_dir, group)
    if not resume and checked.overwrite and rundir.is_run_dir(out):
        rundir.clear(out)
    return data, memory


def _train_locked(checked: TrainPlan, data: TrainData, data_dir: Path, memory: MemoryEstimate | None,
                  echo: Callable[[str], None] | None, initial_model: GPT | None,
                  record: dict[str, Any] | None) -> TrainResult:
    """Every rank, the lock held by rank 0: build, restore (a resume), start the files, say the plan, train."""
    group, out, resume = distributed.current(), checked.out, checked.resume
    log = MetricsLog(out / rundir.METRICS, echo) if group.is_main else SilentLog(out / rundir.METRICS)
    trainer = Trainer.from_data(checked.cfg, data, out, checked.runtime, log, initial_model)
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
    if memory is not None:  # rank 0, which claimed the folder, says the plan
        _say_plan(trainer, memory)
    started = time.perf_counter()
    log.open_mirrors(cfg.run.loggers, out, cfg.to_dict(), trainer.state.iter)
    try:
        with _GracefulInterrupt(trainer):
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


def _say_plan(trainer: Trainer, memory: MemoryEstimate) -> None:
    """Rank 0, before the first step: the model, the device, the data and the estimates (plan.py)."""
    cfg, runtime, data, say = trainer.cfg, trainer.runtime, trainer.data, trainer.log.say
    n_params = trainer.model.num_params() - cfg.lora.trainable_params(cfg.model)  # the GPT's own, without adapters
    say(f"model: {n_params:,} parameters | {runtime.describe()} | "
        f"data: {len(data.train_tokens):,} train / {len(data.val_tokens):,} val tokens")
    for line in data.notes:
        say(line)
    if trainer.group.enabled:
        sharded = trainer.net.sharded is not None
        how = f"FSDP2, each rank 1/{trainer.group.world_size} of the weights" if sharded else "DDP"
        say(trainer.group.describe(cfg.run.batch_size, how))
    if cfg.lora.enabled:
        say(describe(cfg.lora, cfg.model, n_params))
    if trainer.mfu.peak and not runtime.is_cuda:
        say(plan.mfu_note(trainer.mfu.peak, runtime))
    if trainer.attention_note:
        say(f"bf16 autocast: {trainer.attention_note}")
    step_s = plan.iter_seconds(cfg, runtime, trainer.mfu.flops_per_token, trainer.group.world_size)
    say(plan.memory_line(memory, step_s))  # the estimate check_memory checked
    note = plan.budget_note(cfg.run, trainer.state, step_s, runtime.is_cuda)
    if note:
        say(note)


def _finish(out: Path, log: MetricsLog) -> None:
    from .report import write_report

    evalsteps.never_fatal(log, "write report.md", lambda: write_report(out))


class _GracefulInterrupt:
    """First Ctrl-C: finish the current step, save last/, stop. Second: stop at once.

    Under torchrun a Ctrl-C reaches each rank twice (from the terminal and forwarded by torchrun): a second
    one within DOUBLE_S of the first is the same press. The ranks agree on the stop (Trainer._loop).
    """

    DOUBLE_S = 2.0

    def __init__(self, trainer: Trainer):
        self.trainer, self.previous, self.first = trainer, None, 0.0

    def _handler(self, signum: int, frame: Any) -> None:
        if self.trainer.interrupted:
            if self.trainer.group.enabled and time.monotonic() - self.first < self.DOUBLE_S:
                return
            raise KeyboardInterrupt
        self.first = time.monotonic()
        self.trainer.interrupted = True
        self.trainer.log.say("\ninterrupt: finishing this step and saving (Ctrl-C again to quit at once)")

    def __enter__(self) -> "_GracefulInterrupt":
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
