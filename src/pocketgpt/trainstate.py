"""What an exact resume needs, saved and restored in one place: RunState and Resumable.

Resumable gathers the model's weights, the optimizers, the gradient scaler, the RNG streams, the
loop's RunState and the data position, and writes them as RUN_DIR/last/ (checkpoint.py's format).
The data position is the iteration itself: data.BatchSampler draws batch (step, micro) from the
seed alone, so restoring RunState.iter puts the sampler exactly where an unbroken run would be.

Nothing here depends on the world size of a distributed run: the global batch is one cursor (each rank
reads its rows of it), the replicas' weights and optimizer states are equal, and rank 0 alone saves,
its own RNG state included; the other ranks draw from (seed, rank, step) instead (Trainer.step). So a
run saved by any number of processes resumes on any other number.

Under FSDP no rank holds the whole state: the ranks first gather it to rank 0 (fsdp.Sharded.gather, the
Gathered given to save), which writes the very files a single process writes; restore reads them on every
rank and each keeps its slice (fsdp.Sharded.load_weights / load_optimizer). Same files, any world size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import checkpoint as ckpt
from .errors import PocketError
from .runtime import Runtime

if TYPE_CHECKING:
    from .ema import WeightAverage
    from .fsdp import Gathered, Sharded


@dataclass
class RunState:
    """What the loop needs besides weights and optimizer to carry on exactly."""

    iter: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # training wall time, carried across resumes for --max-time
    best_val_loss: float = math.inf
    best_iter: int = -1
    evals_since_best: int = 0
    last_train_loss: float = math.nan
    history: list[dict[str, Any]] = field(default_factory=list)
    compile: str = ""  # compile = auto's decision ("on" / "off"; autotune.py): a resume keeps it
    threads: int = 0  # threads = 0's decision (CPU threads; autotune.py): a resume keeps it

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss
        d["last_train_loss"] = None if math.isnan(self.last_train_loss) else self.last_train_loss
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunState":
        s = cls()
        for key in ("iter", "tokens_seen", "elapsed", "best_iter", "evals_since_best", "history", "compile", "threads"):
            if key in d:
                setattr(s, key, d[key])
        s.compile = s.compile if s.compile in ("on", "off") else ""  # anything else: not decided
        s.threads = s.threads if isinstance(s.threads, int) and not isinstance(s.threads, bool) and s.threads > 0 else 0
        s.best_val_loss = math.inf if d.get("best_val_loss") is None else float(d["best_val_loss"])
        s.last_train_loss = math.nan if d.get("last_train_loss") is None else float(d["last_train_loss"])
        return s


class RunClock:
    """Keeps RunState.elapsed, the run's seconds (max_time's budget, carried across resumes): every second of the
    loop counts once, and the clock last/ was saved with is kept, so a run that ends at an eval stops on the
    clock it saved, and a resume sees it finished."""

    def __init__(self) -> None:
        self.last = time.perf_counter()  # the time since then is not yet in state.elapsed
        self.saved: tuple[float, float] | None = None  # (state.elapsed, last) when an eval saved last/

    def restart(self) -> None:
        """Count from now on (the loop starts)."""
        self.last = time.perf_counter()

    def tick(self, state: RunState) -> None:
        """Add the time since the last tick to state.elapsed."""
        now = time.perf_counter()
        state.elapsed += now - self.last
        self.last = now

    def mark_saved(self, state: RunState) -> None:
        """last/ is being saved with state.elapsed as of now."""
        self.tick(state)
        self.saved = (state.elapsed, self.last)

    def since_saved(self, state: RunState) -> tuple[float, float]:
        """At an eval's end: (the clock last/ was saved with, seconds since that save); now, if it saved none."""
        if self.saved is None:
            self.mark_saved(state)
        assert self.saved is not None
        (elapsed, at), self.saved = self.saved, None
        return elapsed, time.perf_counter() - at

    def take(self, state: RunState, elapsed: float, since: float) -> None:
        """Take the clock an eval saved (every rank takes rank 0's), counting the time since in the next step."""
        state.elapsed, self.last = elapsed, time.perf_counter() - since


class Resumable:
    """The model (unwrapped), optimizers, scaler and RNG of one run: save() and restore() as a whole."""

    def __init__(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                 scaler: torch.amp.GradScaler, runtime: Runtime, sharded: "Sharded | None" = None,
                 average: "WeightAverage | None" = None):
        self.model, self.optimizers, self.scaler, self.runtime = model, optimizers, scaler, runtime
        self.sharded = sharded  # FSDP: the model's parameters are this rank's shards
        self.average = average  # the weights' moving average (optim.ema_decay), saved beside them

    def save(self, out: Path, state: RunState, gathered: "Gathered | None" = None) -> None:
        """Write last/ (rank 0); under FSDP from `gathered`, the full state the ranks collected beforehand."""
        extra = {"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}
        if self.sharded is not None and (gathered is None or gathered.model is None):
            raise RuntimeError("a sharded model is saved from its gathered state, on rank 0")
        model = gathered.model if gathered is not None else self.model
        optimizers = gathered.optimizers if gathered is not None else [o.state_dict() for o in self.optimizers]
        with ckpt.disk_errors(out, "resume checkpoint (last/)"):
            ckpt.save_resume_state(out, model, {"optimizers": optimizers}, self._rng_state(),
                                   {**state.to_dict(), **extra}, self.average.model if self.average else None)

    def restore(self, out: Path) -> RunState:
        folder, state, optimizer_state, rng = ckpt.load_resume_state(out)
        if self.sharded is not None:
            self.sharded.load_weights(folder / ckpt.WEIGHTS)
        else:
            ckpt.load_weights(self.model, folder / ckpt.WEIGHTS)
        if self.average is not None:  # a run that kept no average so far starts one at its weights
            if (folder / ckpt.AVERAGE).is_file():
                ckpt.load_weights(self.average.model, folder / ckpt.AVERAGE)
            else:
                self.average.restart_from(self.model)
        try:
            saved = optimizer_state["optimizers"]
            if len(saved) != len(self.optimizers):
                raise ValueError(f"{len(saved)} optimizers saved, {len(self.optimizers)} now (was optimizer changed?)")
            for opt, sd in zip(self.optimizers, saved):
                if self.sharded is not None:
                    self.sharded.load_optimizer(opt, sd)
                else:
                    opt.load_state_dict(sd)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise PocketError(f"optimizer state in {folder} does not fit this model ({e})") from None
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self._set_rng_state(rng)
        return RunState.from_dict(state)

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"torch_cpu": torch.get_rng_state()}
        if self.runtime.is_cuda:
            state["torch_cuda"] = torch.cuda.get_rng_state(self.runtime.device)
        return state

    def _set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["torch_cpu"])
        if self.runtime.is_cuda and "torch_cuda" in state:
            torch.cuda.set_rng_state(state["torch_cuda"], self.runtime.device)
