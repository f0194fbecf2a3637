"""compile = "auto": whether torch.compile pays for a run, measured in the run's own first steps.

What compiling buys depends on the device and the shape. On the 2-core AMD Zen 4 of bench/RESULTS.md
it made the cpu-hour step no faster for ~40 s of compiling, and the demo's and cpu-15min's steps
1.16-1.2x faster for 26-52 s; on GPUs it usually gains more. A fixed default is wrong somewhere, so a
run long enough to afford one compile times its own steps: WARMUP eager steps, the compile, one
compiled warm-up step, then ROUNDS eager and compiled steps in turns (a busy patch of a shared machine
slows both alike), and trains on with the faster. Every one of those is a real training step.

The medians and what the compile cost are kept per machine and shape (compile.json in probe.py's
cache folder), so a later run of that shape decides at once: compiled when the saving over its
remaining steps outweighs the compile measured. The decision is saved with the run's state, so a
resume follows the numeric path of the run it continues.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from . import probe

if TYPE_CHECKING:
    from .distributed import Group
    from .trainer import TrainModel

CACHE_FILE = "compile.json"
# compiled steps must be this much faster: below it the difference is noise, and a changed numeric path
# should buy something
MIN_GAIN = 0.03
# a run with less eager time left than this is not measured: one compile (6-50 s on a 2-core CPU) would be
# too large a share of it
MEASURE_MIN_S = 300.0
WARMUP = 2
ROUNDS = 4
ON, OFF = "on", "off"  # RunState.compile: the decision of a run ("" before it is made)


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

    def to_dict(self) -> dict[str, float | None]:
        return {"eager_s": self.eager_s, "compiled_s": self.compiled_s, "compile_s": self.compile_s}


def shape_key(device: torch.device, what: dict[str, Any]) -> str:
    """The cache key: the machine (probe.machine_key) and everything about the run that shapes a step's cost."""
    text = json.dumps(what, sort_keys=True, default=str)
    return f"{probe.machine_key(device)} | {hashlib.sha1(text.encode()).hexdigest()[:16]}"


def read(key: str) -> Timing | None:
    """The timing kept under key, or None (missing, or not a timing: measured again, never an error)."""
    got = probe.read_json(CACHE_FILE).get(key)
    if not isinstance(got, dict):
        return None
    try:
        compiled = got["compiled_s"]
        t = Timing(float(got["eager_s"]), None if compiled is None else float(compiled), float(got["compile_s"]))
    except (KeyError, TypeError, ValueError):
        return None
    return t if t.eager_s > 0 and t.compile_s >= 0 else None


def write(key: str, timing: Timing) -> None:
    with probe.locked():
        probe.write_json(CACHE_FILE, {**probe.read_json(CACHE_FILE), key: timing.to_dict()})


class AutoCompile:
    """Which forward each of a run's first steps takes, until the run has decided (`decided`: ON or OFF).

    steps_left(step_s) is how many steps the run has left at step_s seconds a step. Under torchrun every
    rank runs the same plan and the ranks decide together from their mean timings."""

    def __init__(self, net: TrainModel, key: str, steps_left: Callable[[float], float],
                 say: Callable[[str], None], group: Group, device: torch.device):
        self.net, self.key, self.steps_left, self.say = net, key, steps_left, say
        self.group, self.device = group, device
        self.decided = ""
        self.plan = ["eager"] * WARMUP
        self.times: list[tuple[str, float]] = []
        self.compiled: Callable[..., Any] | None = None
        self.failed = False

    def start(self, saved: str) -> None:
        """Decide now from the resumed run's decision or the cache, or begin measuring."""
        if saved in (ON, OFF):
            self._decide(saved == ON, "as in the run being resumed")
            return
        cached = read(self.key)
        if self.group.sums([float(cached is not None)])[0] == self.group.world_size:  # every rank knows it
            eager, compiled, cost = self._mean([cached.eager_s, cached.compiled_s or 0.0, cached.compile_s])
            failed = self.group.any_true(cached.compiled_s is None)
            t = Timing(eager, None if failed else compiled, cost)
            steps = self.steps_left(t.eager_s)
            short = f"; the ~{steps:,.0f} steps left do not earn the compile back" if t.faster() else ""
            on = t.pays(steps)
            self._decide(on, f"measured before on this machine: {t.describe()}{'' if on else short}")

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Around one training step: sets the forward it runs and times it while measuring."""
        if self.decided:
            yield
            return
        what = self.plan[len(self.times)]
        if what == "compile" and not self.failed:
            self.net.compile(lambda s: None)
            self.compiled = self.net.forward
        use_compiled = what != "eager" and not self.failed and self.compiled is not None
        self.net.forward = self.compiled if use_compiled else self.net.eager
        probe.sync(self.device)
        t0 = time.perf_counter()
        yield
        probe.sync(self.device)
        self.times.append((what, time.perf_counter() - t0))
        if use_compiled and self.net.forward is self.net.eager:  # TrainModel fell back: compiling failed
            self.failed = True
        self._next()

    def _next(self) -> None:
        n = len(self.times)
        if n == WARMUP:
            (eager,) = self._mean([self.times[-1][1]])  # the second eager step: past the first-call costs
            left = self.steps_left(eager) * eager
            if left < MEASURE_MIN_S:
                self._decide(False, f"~{left:.0f} s of steps left is too short to measure torch.compile "
                                    f"(it takes {MEASURE_MIN_S:.0f} s; --compile true forces it)")
                return
            self.plan += ["compile", "compiled"] + ["eager", "compiled"] * ROUNDS
            self.say(f"compile auto: timing eager against compiled steps over the next {len(self.plan) - n} "
                     "steps (the first compiles), to keep the faster")
        elif n == len(self.plan):
            self._finish()

    def _finish(self) -> None:
        eager = statistics.median(s for what, s in self.times[WARMUP:] if what == "eager")
        compiled = [s for what, s in self.times[WARMUP + 2:] if what == "compiled"]
        first = self.times[WARMUP][1]  # the compile step: compiling and one step
        mine = statistics.median(compiled) if compiled and not self.failed else eager
        eager, compiled_s, first = self._mean([eager, mine, first])
        failed = self.group.any_true(self.failed)
        t = Timing(eager, None if failed else compiled_s, 0.0 if failed else max(0.0, first - compiled_s))
        if self.group.is_main:
            write(self.key, t)
        self._decide(t.faster(), f"measured here: {t.describe()}")  # the compile is paid already

    def _decide(self, on: bool, why: str) -> None:
        self.decided = ON if on else OFF
        if on and self.compiled is None:
            self.net.compile(lambda s: None)
            self.compiled = self.net.forward
        self.net.forward = self.compiled if on and self.compiled is not None else self.net.eager
        self.say(f"compile auto: {'compiled' if on else 'eager'} ({why})")

    def _mean(self, values: list[float]) -> list[float]:
        return [v / self.group.world_size for v in self.group.sums(values)]
