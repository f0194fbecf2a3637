"""CPU threads that follow the machine's load: fewer while other programs keep cores busy, back when they stop.

A laptop is rarely idle. On a 2-core CPU (issue 28) the demo made 132 iterations in 30 s at its 2 threads
beside one busy program, 303 at one thread: OpenMP's threads wait for each other at every op, so one
thread that loses its core to another program stalls them all. So a CPU run on threads = 0 (the default)
reads the load every INTERVAL_S seconds at a step boundary and trains on

    max(1, cores - cores other programs want)   (at most the run's ceiling: autotune's choice, else torch's count)

Load: CPU time from /proc/stat (the CPUs this process may run on) and from /proc/self, over the window
since the last reading. Not the load average (a minute behind) and not /proc/stat's procs_running (one
instant, the whole machine even where this process may use only a few CPUs). The time other programs ran
is what they got, not what they wanted: while the machine had no idle time they shared the cores with
this process, so what they wanted is their time over the share one of our threads got (each runnable
thread gets about the same; our busiest thread is one that was runnable throughout). Measured this way,
2 of our threads beside one busy loop on 2 cores read 0.67 core other / 0.67 a thread = 1 core wanted.

Hysteresis: the count changes only when the free cores are MARGIN beyond half a thread away from it, in
CONFIRM windows in a row, so a load near a boundary or a short burst does not make it flap. Without /proc
(macOS, Windows) read_times gives None and nothing changes. The count only changes the order floats are
summed in, and it is not saved: a resume starts at the run's own count again and follows the load anew.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from .distributed import ENV_THREADS

if TYPE_CHECKING:
    from .config import RunConfig
    from .distributed import Group
    from .runtime import Runtime

PROC = Path("/proc")
INTERVAL_S = 1.5  # wall seconds between readings: a few syscalls each, so cheap; short, so a change is seen soon
MARGIN = 0.2  # cores beyond half a thread the free cores must be from the count before it changes
CONFIRM = 2  # windows in a row that must agree on a new count
IDLE_ROOM = 0.3  # cores: with at least this idle, nobody waited for a core and other programs got what they wanted
MIN_SHARE = 0.1  # of a core: a floor for our busiest thread's share, so a near-idle window cannot blow up


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds so far: the CPUs this process may use busy (every program) and idle, this process's own
    total, and each of its threads' (by thread id)."""

    busy: float
    idle: float
    own: float
    threads: dict[int, float]


@dataclass(frozen=True)
class Window:
    """One window between two readings, in cores (CPU seconds per wall second): what other programs used,
    what stayed idle, and the share our busiest thread got."""

    others: float
    idle: float
    share: float

    def wanted(self) -> float:
        """Cores other programs wanted: what they used, or, where no core was idle, what they used over the
        share of a core each runnable thread got (ours and theirs alike)."""
        if self.idle >= IDLE_ROOM:
            return self.others
        return self.others / max(self.share, MIN_SHARE)


def _ticks(path: Path) -> float:
    """utime + stime of a /proc/.../stat file, in seconds (its name in parentheses may hold spaces)."""
    fields = path.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _tick_s()


def _tick_s() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def _cpu_lines(proc: Path, cpus: set[int]) -> tuple[float, float]:
    """(busy, idle) seconds of the given CPUs from /proc/stat. Busy: user, nice, system, irq, softirq and steal
    (a virtual machine's CPU taken by others); idle: idle and iowait. Guest time is inside user already."""
    busy = idle = 0.0
    found = False
    for line in (proc / "stat").read_text().splitlines():
        name, *values = line.split() or [""]
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue  # the all-CPU line "cpu", another CPU's, or not a CPU's
        v = [int(x) for x in values[:8]] + [0] * (8 - len(values[:8]))
        busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        idle += v[3] + v[4]
        found = True
    if not found:
        raise OSError("no line of /proc/stat names a CPU this process may use")
    return busy / _tick_s(), idle / _tick_s()


def my_cpus() -> set[int]:
    """The CPUs this process may run on (all of them where the OS does not say)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def read_times(proc: Path = PROC, cpus: Iterable[int] | None = None) -> CpuTimes | None:
    """CPU seconds so far (CpuTimes) from `proc`, for `cpus` (default: my_cpus()); None where there is no
    such /proc (macOS, Windows) or it cannot be read."""
    try:
        busy, idle = _cpu_lines(proc, set(my_cpus() if cpus is None else cpus))
        own = _ticks(proc / "self" / "stat")
        threads = {}
        for task in (proc / "self" / "task").iterdir():
            try:
                threads[int(task.name)] = _ticks(task / "stat")
            except (OSError, ValueError):  # a thread that ended while we looked
                continue
    except (OSError, ValueError, IndexError):
        return None
    return CpuTimes(busy, idle, own, threads)


def window(before: CpuTimes, after: CpuTimes, cores: int) -> Window | None:
    """The Window between two readings; None when the CPUs' clock did not move."""
    elapsed = (after.busy - before.busy) + (after.idle - before.idle)  # CPU seconds over `cores` CPUs
    if elapsed <= 0:
        return None
    wall = elapsed / cores
    others = max(0.0, (after.busy - before.busy) - (after.own - before.own)) / wall
    # a thread new in this window ran all its time in it
    share = max((t - before.threads.get(tid, 0.0) for tid, t in after.threads.items()), default=0.0) / wall
    return Window(others, max(0.0, after.idle - before.idle) / wall, min(share, 1.0))


def choose(current: int, free: float, ceiling: int) -> int:
    """The thread count for `free` cores (cores less those others want), from `current`: unchanged unless free,
    within [1, ceiling], is more than half a thread plus MARGIN away from it."""
    want = min(max(free, 1.0), float(ceiling))
    if abs(want - current) < 0.5 + MARGIN:
        return current
    return max(1, min(ceiling, round(want)))


def describe(new: int, old: int, wanted: float) -> str:
    """The log line for a change of the count."""
    if new < old:
        why = f"other programs are using ~{wanted:.1f} of this machine's cores"
    else:
        why = "the cores are free again" if wanted < 0.5 else f"other programs use only ~{wanted:.1f} cores now"
    return f"threads: {new} ({why}); was {old}"


class LoadWatch:
    """The thread count a run should use as the load changes. check(current, ceiling) at a step boundary: a new
    count (and its log line), or None to keep `current`. Reads at most every `interval` seconds of `clock`."""

    def __init__(self, cores: int, read: Callable[[], CpuTimes | None] = read_times,
                 clock: Callable[[], float] = time.monotonic, interval: float = INTERVAL_S):
        self.cores, self.read, self.clock, self.interval = cores, read, clock, interval
        self.last = read()
        self.next_at = clock() + interval
        self.pending: tuple[int, int] = (0, 0)  # (a new count the last windows agreed on, how many of them)

    @property
    def working(self) -> bool:
        """/proc could be read when the watch began: without it the count never changes."""
        return self.last is not None

    def check(self, current: int, ceiling: int) -> tuple[int, str] | None:
        """(new count, log line) when the load asks for another count than `current` (at most `ceiling`)."""
        now = self.clock()
        if self.last is None or now < self.next_at:
            return None
        self.next_at = now + self.interval
        after = self.read()
        w = window(self.last, after, self.cores) if after is not None else None
        self.last = after or self.last
        if w is None:
            return None
        wanted = w.wanted()
        new = choose(current, self.cores - wanted, ceiling)
        count = self.pending[1] + 1 if self.pending[0] == new else 1
        self.pending = (new, count) if new != current else (0, 0)
        if new == current or count < CONFIRM:
            return None
        self.pending = (0, 0)
        return new, describe(new, current, wanted)


def for_run(r: RunConfig, runtime: Runtime, group: Group, threads: int) -> LoadWatch | None:
    """A run's LoadWatch, or None where the count stays as today: not a CPU run, threads asked for (--threads N
    or POCKETGPT_THREADS: the user's number is kept), under torchrun (each rank keeps cores // ranks:
    distributed.set_threads; ranks that chose apart would wait for the slowest), a single thread (`threads`,
    the process's count, is the ceiling), or no /proc."""
    if runtime.device.type != "cpu" or r.threads or os.environ.get(ENV_THREADS) or group.enabled or threads < 2:
        return None
    cpus = my_cpus()
    watch = LoadWatch(len(cpus), functools.partial(read_times, PROC, cpus), interval=INTERVAL_S)
    return watch if watch.working else None
