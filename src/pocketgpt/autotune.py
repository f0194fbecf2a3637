"""CPU threads and torch.compile, chosen by timing the run's own first steps (threads = 0, compile = auto).

What they buy depends on the machine and the shape. On the 2-core AMD Zen 4 of bench/RESULTS.md
compiling made the cpu-hour step no faster for ~40 s of compiling, and the demo's and cpu-15min's
steps 1.16-1.2x faster for 26-52 s; GPUs usually gain more. Half the threads ran those steps 1.45-1.7x
slower there, while a tiny model on a many-core machine can run faster on fewer. A fixed default is
wrong somewhere, so a run long enough to afford it (MEASURE_MIN_S of steps left, and steps enough for
every phase twice over) times its steps:

  WARMUP eager steps;
  threads (CPU only, eager): ROUNDS steps at this process's thread count and ROUNDS at half of it,
    in turns;
  compile: the compile and one compiled warm-up step, then ROUNDS eager and ROUNDS compiled steps,
    in turns;

and trains on with the faster of each. Turns, because a busy patch of a shared machine slows both
sides alike; every one of these steps is a real training step. Threads come first because inductor
writes the thread count into the code it compiles. The timings are kept per machine and shape (in
probe.py's cache folder, with the machine's load when measured: a quieter machine measures again),
so a later run of that shape decides at once; it compiles only when the saving over its remaining
steps outweighs the compile measured. The decisions are saved in the run's state, so a resume
follows the numeric path of the run it continues.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from . import probe
from .distributed import ENV_THREADS

if TYPE_CHECKING:
    from .config import TrainConfig
    from .distributed import Group
    from .runtime import Runtime
    from .stepmodel import StepModel
    from .trainstate import RunState

CACHE_FILE = "autotune.json"
# the faster side must win by this much: below it the difference is noise, and a changed numeric path
# should buy something
MIN_GAIN = 0.03
# a run with less eager time left than this is not measured: one compile (6-50 s on a 2-core CPU) would
# be too large a share of it (the 5-minute demo, measured, lost 35 s to compiling for 1.09x faster steps)
MEASURE_MIN_S = 480.0
WARMUP = 2
ROUNDS = 4
ON, OFF = "on", "off"  # RunState.compile: a run's decision ("" before it is made)


@dataclass(frozen=True)
class Timing:
    """Seconds per training step eager and compiled (None: torch.compile failed here), and the compile's cost."""

    eager_s: float
    compiled_s: float | None
    compile_s: float

    def faster(self) -> bool:
        """Compiled steps are faster by MIN_GAIN at least."""
        return self.compiled_s is not None and self.compiled_s < self.eager_s * (1 - MIN_GAIN)

    def pays(self, steps: float) -> bool:
        """faster(), and over `steps` steps compiled ones save more than one compile costs."""
        return self.faster() and (self.eager_s - (self.compiled_s or 0.0)) * steps > self.compile_s

    def describe(self) -> str:
        if self.compiled_s is None:
            return "torch.compile failed on this machine"
        return (f"{1000 * self.compiled_s:.1f} ms/step compiled vs {1000 * self.eager_s:.1f} eager, "
                f"compiling {self.compile_s:.0f} s")


def shape_key(device: torch.device, what: dict[str, Any]) -> str:
    """A cache key: the machine (probe.machine_key, with its thread count) and what shapes a step's cost."""
    text = json.dumps(what, sort_keys=True, default=str)
    return f"{probe.machine_key(device)} | {hashlib.sha1(text.encode()).hexdigest()[:16]}"


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _kept(key: str, what: str) -> dict[str, Any] | None:
    """The cache entry, unless missing, without a load, or measured on a busier machine than this one is now."""
    got = probe.read_json(CACHE_FILE).get(f"{key} | {what}")
    if not isinstance(got, dict) or not _number(got.get("load")):
        return None
    return got if probe.load_now() >= got["load"] - probe.LOAD_MARGIN else None


def read_compile(key: str) -> Timing | None:
    """The compile timing kept under key, or None (missing, malformed or stale: measured again, never an error)."""
    got = _kept(key, "compile")
    if got is None or not _number(got.get("eager_s")) or not _number(got.get("compile_s")):
        return None
    compiled = got.get("compiled_s")
    if compiled is not None and not (_number(compiled) and compiled > 0):
        return None
    t = Timing(float(got["eager_s"]), None if compiled is None else float(compiled), float(got["compile_s"]))
    return t if t.eager_s > 0 and t.compile_s >= 0 else None


def read_threads(key: str) -> int:
    """The thread count kept under key, or 0."""
    got = _kept(key, "threads")
    n = None if got is None else got.get("threads")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def _write(key: str, what: str, entry: dict[str, Any]) -> None:
    with probe.locked():
        probe.write_json(CACHE_FILE, {**probe.read_json(CACHE_FILE),
                                      f"{key} | {what}": {**entry, "load": probe.load_now()}})


def write_compile(key: str, t: Timing) -> None:
    _write(key, "compile", {"eager_s": t.eager_s, "compiled_s": t.compiled_s, "compile_s": t.compile_s})


def write_threads(key: str, threads: int, seconds: dict[int, float]) -> None:
    _write(key, "threads", {"threads": threads, "step_s": {str(n): s for n, s in seconds.items()}})


def step_key(cfg: TrainConfig, runtime: Runtime, world_size: int, bf16_attention: bool) -> str:
    """The cache key of a run's step: what its cost (eager, compiled, at a thread count) depends on besides the
    machine: the model, one rank's rows, the recipe."""
    return shape_key(runtime.device, {
        "model": cfg.model.__dict__, "rows": cfg.run.batch_size // world_size,
        "accum": cfg.run.grad_accum_steps, "dtype": str(runtime.dtype), "optimizer": cfg.optim.optimizer,
        "checkpointing": cfg.run.gradient_checkpointing, "lora": cfg.lora.__dict__,
        "world": world_size, "parallel": cfg.run.parallel, "bf16_attention": bf16_attention})


@dataclass
class Plan:
    """What a run leaves to measurement, and what the run being resumed decided.

    compile: ON or OFF as asked (compile true / false), or "" for auto; threads: this process's thread
    count, to be measured against half of it (0: not measured); saved_*: a resumed run's decisions
    ("" / 0 where it made none)."""

    compile: str
    threads: int
    saved_compile: str = ""
    saved_threads: int = 0


class AutoTune:
    """Which forward and how many threads each of a run's first steps gets, until every choice is made.

    key(): the cache key of a step at the current thread count; steps_left(step_s): how many steps the
    run has left at step_s seconds a step. Under torchrun every rank runs the same steps and the ranks
    decide together from their mean timings; the first rank of each machine keeps them in its cache.
    The forward is net's to switch (StepModel.use_compiled): this only asks for one."""

    def __init__(self, net: StepModel, key: Callable[[], str], steps_left: Callable[[float], float],
                 say: Callable[[str], None], group: Group, device: torch.device):
        self.net, self.key, self.steps_left, self.say = net, key, steps_left, say
        self.group, self.device = group, device
        self.compile = ""  # ON / OFF once decided
        self.threads = 0  # the thread count once decided (0: not a choice of this run)
        self.plan = Plan("", 0)
        self.phase = ""  # the phase of timed steps under way: warmup, threads or compile
        self.queue: list[tuple[str, int]] = []  # (kind, threads) of the phase's steps still to run
        self.times: list[tuple[str, int, float]] = []  # the phase's (kind, threads, seconds)
        self.warmed = False
        self.failed = False  # compiling failed in a timed step: no step asks for it again

    @property
    def measuring(self) -> bool:
        """Timed steps are queued: some choice is still open."""
        return bool(self.queue)

    def start(self, plan: Plan) -> None:
        """Decide what was asked for, what the saved decisions or the cache say; queue timed steps for the rest."""
        self.plan = plan
        if plan.compile:
            self.compile = plan.compile
        elif plan.saved_compile in (ON, OFF):
            self._decide_compile(plan.saved_compile == ON, "as in the run being resumed")
        if plan.threads:
            n = plan.saved_threads or self._same_on_all(read_threads(self.key()))
            if n:
                self._set_threads(min(n, plan.threads), "as in the run being resumed" if plan.saved_threads
                                  else "measured before on this machine")
            elif self.compile == ON:  # compiled code keeps the thread count it was compiled with
                self._set_threads(plan.threads, "", quiet=True)
        self._advance()

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Around one training step: its forward and thread count, and its time while measuring."""
        if not self.queue:
            yield
            return
        kind, threads = self.queue.pop(0)
        compiled = kind != "eager" and not self.failed  # the first "compile" step compiles (quietly)
        if not self.compile:  # once decided (or asked for), the forward stays what the decision made it
            self.net.use_compiled(compiled)
        torch.set_num_threads(threads)
        probe.sync(self.device)
        t0 = time.perf_counter()
        yield
        probe.sync(self.device)
        self.times.append((kind, threads, time.perf_counter() - t0))
        if compiled and not self.net.compiled:  # compiling failed, at the compile or at the step's call
            self.failed = True
        if not self.queue:
            self._phase_done()

    def _advance(self) -> None:
        """Decide from the cache what needs no timing, else queue the next phase of timed steps."""
        p = self.plan
        need_threads = bool(p.threads) and not self.threads
        if not self.compile and not need_threads:
            self._compile_from_cache()  # its key holds the thread count, so only once that is settled
        if not need_threads and self.compile:
            return
        n = torch.get_num_threads()
        if not self.warmed:
            self._queue("warmup", [("eager", n)] * WARMUP)
        elif need_threads:
            half = max(1, p.threads // 2)
            self._queue("threads", [("eager", p.threads), ("eager", half)] * ROUNDS)
            self.say(f"threads auto: timing {p.threads} threads against {half} over the next {len(self.queue)} steps")
        else:
            self._queue("compile", [("compile", n), ("compiled", n)] + [("eager", n), ("compiled", n)] * ROUNDS)
            self.say(f"compile auto: timing eager against compiled steps over the next {len(self.queue)} steps "
                     "(the first compiles), to keep the faster")

    def _queue(self, phase: str, steps: list[tuple[str, int]]) -> None:
        self.phase, self.queue, self.times = phase, steps, []

    def _phase_done(self) -> None:
        if self.phase == "warmup":
            self.warmed = True
            (step_s,) = self._mean([self.times[-1][2]])  # the second eager step: past the first-call costs
            steps = self.steps_left(step_s)
            phases = 2 * ROUNDS * bool(self.plan.threads and not self.threads) + (2 + 2 * ROUNDS) * (not self.compile)
            if steps * step_s < MEASURE_MIN_S or steps < 2 * phases:
                self._skip(f"~{steps * step_s:.0f} s of steps left: measuring needs {MEASURE_MIN_S:.0f} s "
                           f"and {2 * phases} steps")
                return
        elif self.phase == "threads":
            self._finish_threads()
        else:
            self._finish_compile()
        self._advance()

    def _skip(self, why: str) -> None:
        """Too short to measure: the process's thread count, and compile as the cache says, else eager."""
        if self.plan.threads and not self.threads:
            self._set_threads(self.plan.threads, why, quiet=True)
        if not self.compile:
            self._compile_from_cache()
        if not self.compile:
            self._decide_compile(False, why + "; --compile true forces it")

    def _finish_threads(self) -> None:
        full, half = self.plan.threads, max(1, self.plan.threads // 2)
        full_s, half_s = self._mean([statistics.median(s for _, t, s in self.times if t == n) for n in (full, half)])
        best = half if half_s < full_s * (1 - MIN_GAIN) else full
        torch.set_num_threads(full)  # the key of a threads choice is the process's own thread count
        if self.group.local_rank == 0:
            write_threads(self.key(), best, {full: full_s, half: half_s})
        self._set_threads(best, f"measured here: {1000 * full_s:.1f} ms/step at {full} threads, "
                                f"{1000 * half_s:.1f} at {half}")

    def _finish_compile(self) -> None:
        # the compile step and the compiled warm-up after it (which may compile again): compiling and two steps
        first = self.times[0][2] + self.times[1][2]
        eager = statistics.median(s for kind, _, s in self.times if kind == "eager")
        compiled = [s for kind, _, s in self.times[2:] if kind == "compiled"]
        mine = statistics.median(compiled) if compiled and not self.failed else eager
        eager, compiled_s, first = self._mean([eager, mine, first])
        failed = self.group.any_true(self.failed)
        t = Timing(eager, None if failed else compiled_s, 0.0 if failed else max(0.0, first - 2 * compiled_s))
        if self.group.local_rank == 0:
            write_compile(self.key(), t)
        self._decide_compile(t.faster(), f"measured here: {t.describe()}")  # the compile is paid already

    def _compile_from_cache(self) -> None:
        """Decide compile from a kept timing at the current thread count, if every rank has one."""
        cached = read_compile(self.key())
        if self.group.sums([float(cached is not None)])[0] != self.group.world_size:
            return
        assert cached is not None
        eager, compiled, cost = self._mean([cached.eager_s, cached.compiled_s or 0.0, cached.compile_s])
        t = Timing(eager, None if self.group.any_true(cached.compiled_s is None) else compiled, cost)
        steps = self.steps_left(t.eager_s)
        on = t.pays(steps)
        short = f"; the ~{steps:,.0f} steps left do not earn the compile back" if t.faster() and not on else ""
        self._decide_compile(on, f"measured before on this machine: {t.describe()}{short}")

    def _decide_compile(self, on: bool, why: str) -> None:
        if on and not self.net.use_compiled(True, self.say):  # torch.compile is not there at all (said by net)
            on, why = False, "torch.compile unavailable"
        self.compile = ON if on else OFF
        self.net.use_compiled(on)
        self.say(f"compile auto: {'compiled' if on else 'eager'} ({why})")

    def _set_threads(self, n: int, why: str, quiet: bool = False) -> None:
        self.threads = n
        torch.set_num_threads(n)
        if not quiet:
            self.say(f"threads auto: {n} ({why})")

    def _same_on_all(self, n: int) -> int:
        """n when every rank has the same n, else 0."""
        return n if all(row[0] == n for row in self.group.gathered([float(n)])) else 0

    def _mean(self, values: list[float]) -> list[float]:
        return [v / self.group.world_size for v in self.group.sums(values)]


def for_run(net: StepModel, cfg: TrainConfig, state: RunState, runtime: Runtime, group: Group,
            say: Callable[[str], None], steps_left: Callable[[float], float], bf16_attention: bool) -> AutoTune:
    """A run's AutoTune, started: compile and threads as asked, or (compile auto, threads 0) as the run's saved
    decisions, the cache or a measurement of its first steps say. steps_left as AutoTune's."""
    r = cfg.run
    key = functools.partial(step_key, cfg, runtime, group.world_size, bf16_attention)
    tuner = AutoTune(net, key, steps_left, say, group, runtime.device)
    if r.threads:
        torch.set_num_threads(r.threads)
    if r.compile == "true":
        net.use_compiled(True, say)
    mine = (runtime.device.type == "cpu" and not r.threads and torch.get_num_threads() > 1
            and not os.environ.get(ENV_THREADS))
    # every rank measures or none does (a rank alone would wait in other collectives); a resumed run
    # that trained at the process's count (threads not measured then) stays at it
    measured = group.sums([float(mine)])[0] == group.world_size and (state.threads or not state.iter)
    asked = {"true": ON, "false": OFF}.get(r.compile, "")
    tuner.start(Plan(asked, torch.get_num_threads() if measured else 0, state.compile, state.threads))
    return tuner
