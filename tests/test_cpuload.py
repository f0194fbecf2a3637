"""threads = 0 follows the machine's load (cpuload.py): /proc read, the decision, and real training runs."""

from __future__ import annotations

import pytest
import torch

from pocketgpt import cpuload
from pocketgpt.checkpoint import read_last_state
from pocketgpt.cpuload import CpuTimes, LoadWatch, choose, read_times, window
from pocketgpt.distributed import Group
from pocketgpt.runtime import Runtime
from pocketgpt.trainer import train

from helpers import losses_by_iter, tiny_config

WALL = 1.5  # seconds a simulated window lasts


class Machine:
    """A simulated CPU: `cores` cores, our `threads` (None: torch's count, as the trainer sets it) and `busy`
    other busy loops, all runnable all the time, each getting a fair share of the cores as the scheduler
    gives it. Each read() is one WALL later and returns the cumulative CpuTimes /proc would show."""

    def __init__(self, cores: int, busy: int, threads: int | None = None):
        self.cores, self.busy, self.threads = cores, busy, threads
        self.times = CpuTimes(busy=0.0, idle=0.0, own=0.0, threads={1: 0.0, 2: 0.0})
        self.now = 0.0

    def read(self, *args) -> CpuTimes:
        n, t = self.threads or torch.get_num_threads(), self.times
        runnable = n + self.busy
        each = min(1.0, self.cores / runnable) * WALL  # CPU seconds per runnable thread this window
        used = each * runnable
        ran = {tid: s + (each if i < n else 0.0) for i, (tid, s) in enumerate(t.threads.items())}
        self.times = CpuTimes(t.busy + used, t.idle + self.cores * WALL - used, t.own + each * n, ran)
        self.now += WALL
        return self.times

    def clock(self) -> float:
        return self.now


def _watch(machine: Machine) -> LoadWatch:
    return LoadWatch(machine.cores, machine.read, machine.clock, interval=0.0)  # each read is one WALL


def _follow(watch: LoadWatch, machine: Machine, windows: int, ceiling: int = 2) -> tuple[int, list[str]]:
    """The count a run on `machine` ends at after `windows` windows (what the trainer does), and what it said."""
    said = []
    for _ in range(windows):
        change = watch.check(machine.threads, ceiling)
        if change:
            machine.threads = change[0]
            said.append(change[1])
    return machine.threads, said


@pytest.mark.parametrize("busy,expected", [(0, 2), (1, 1), (2, 1)])
def test_the_count_is_the_cores_other_programs_leave(busy, expected):
    machine = Machine(cores=2, busy=busy, threads=2)
    threads, said = _follow(_watch(machine), machine, windows=6)
    assert threads == expected
    dropped = f"threads: 1 (other programs are using ~{busy:.1f} of this machine's cores); was 2"
    assert said == ([] if busy == 0 else [dropped])


def test_what_others_wanted_is_read_through_the_share_they_got():
    """2 of our threads beside one busy loop on 2 cores: each of 3 runnable threads gets 2/3 of a core."""
    before = CpuTimes(0.0, 0.0, 0.0, {1: 0.0, 2: 0.0})
    after = CpuTimes(3.0, 0.0, 2.0, {1: 1.0, 2: 1.0})
    w = window(before, after, cores=2)
    assert w.others == pytest.approx(2 / 3) and w.share == pytest.approx(2 / 3) and w.idle == 0
    assert w.wanted() == pytest.approx(1.0)
    quiet_but_ours_idle = window(before, CpuTimes(1.2, 1.8, 1.0, {1: 1.0, 2: 0.0}), cores=2)
    assert quiet_but_ours_idle.wanted() == pytest.approx(0.2 / 1.5)  # idle cores: others got what they wanted


def test_back_up_when_the_other_program_stops():
    machine = Machine(cores=2, busy=1, threads=2)
    watch = _watch(machine)
    assert _follow(watch, machine, windows=4)[0] == 1
    machine.busy = 0
    assert _follow(watch, machine, windows=4) == (2, ["threads: 2 (the cores are free again); was 1"])


def test_hysteresis_keeps_the_count_near_a_boundary_and_through_a_burst():
    assert choose(2, 1.5, 2) == 2 and choose(1, 1.5, 2) == 1  # half a core busy: either count stays
    assert choose(2, 1.35, 2) == 2 and choose(1, 1.65, 2) == 1  # within half a thread and MARGIN: kept
    assert choose(2, 1.25, 2) == 1 and choose(1, 1.75, 2) == 2  # beyond it the count moves
    assert choose(2, 2.0, 1) == 1 == choose(1, 8.0, 1)  # never above the ceiling
    assert choose(8, 4.2, 8) == 4 and choose(4, 0.0, 8) == 1
    machine = Machine(cores=2, busy=1, threads=2)
    watch = _watch(machine)
    assert watch.check(2, 2) is None  # one busy window is a burst: CONFIRM windows must agree
    machine.busy = 0
    assert _follow(watch, machine, windows=6) == (2, [])


def test_the_ceiling_holds_a_quiet_machine_to_autotunes_choice():
    machine = Machine(cores=4, busy=0, threads=1)
    assert _follow(_watch(machine), machine, windows=4, ceiling=1) == (1, [])


def _fake_proc(root, cpus=((0, 100, 200), (1, 300, 400)), threads=((11, 5, 2), (12, 1, 1))):
    """A /proc with /proc/stat's cpu lines (cpu, user, idle) and this process's stat files (tid, utime, stime)."""
    lines = ["cpu  400 0 0 600 0 0 0 0 0 0"] + [f"cpu{c} {u} 0 0 {i} 0 0 0 0 0 0" for c, u, i in cpus]
    root.mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text("\n".join(lines + ["procs_running 3"]) + "\n")
    stat = "{} (py thon) R " + " ".join(["0"] * 10) + " {} {} 0 0 20 0 2\n"
    (root / "self" / "task").mkdir(parents=True)
    (root / "self" / "stat").write_text(stat.format(11, sum(t[1] for t in threads), sum(t[2] for t in threads)))
    for tid, u, s in threads:
        (root / "self" / "task" / str(tid)).mkdir()
        (root / "self" / "task" / str(tid) / "stat").write_text(stat.format(tid, u, s))


def test_proc_is_read_for_this_process_cpus_only(tmp_path):
    _fake_proc(tmp_path)
    tick = cpuload._tick_s()
    t = read_times(tmp_path, cpus={1})
    assert t.busy == pytest.approx(300 / tick) and t.idle == pytest.approx(400 / tick)
    assert t.own == pytest.approx(9 / tick) and t.threads == pytest.approx({11: 7 / tick, 12: 2 / tick})
    assert read_times(tmp_path, cpus={5}) is None  # no line for a CPU we may use


def test_without_proc_nothing_changes(tmp_path, monkeypatch):
    assert read_times(tmp_path / "no-proc") is None
    assert not LoadWatch(2, lambda: None).working
    assert LoadWatch(2, lambda: None).check(2, 2) is None
    monkeypatch.setattr(cpuload, "PROC", tmp_path / "no-proc")
    assert cpuload.for_run(tiny_config().run, _cpu(), Group(), 2) is None


def _cpu() -> Runtime:
    return Runtime(torch.device("cpu"), torch.float32, "test")


def test_asked_threads_torchrun_and_gpus_keep_their_count(monkeypatch):
    monkeypatch.delenv("POCKETGPT_THREADS", raising=False)
    monkeypatch.setattr(cpuload, "read_times", Machine(2, 1).read)
    assert cpuload.for_run(tiny_config().run, _cpu(), Group(), 2) is not None  # the default follows the load
    assert cpuload.for_run(tiny_config(threads=2).run, _cpu(), Group(), 2) is None  # --threads 2: kept
    assert cpuload.for_run(tiny_config().run, _cpu(), Group(), 1) is None  # one thread: nothing to give up
    gpu = Runtime(torch.device("cuda"), torch.float32, "test")
    assert cpuload.for_run(tiny_config().run, gpu, Group(), 2) is None
    monkeypatch.setenv("POCKETGPT_THREADS", "2")
    assert cpuload.for_run(tiny_config().run, _cpu(), Group(), 2) is None


@pytest.fixture
def busy_machine(monkeypatch):
    """Every run sees a 2-core machine with one busy loop beside it, checked at every step."""
    monkeypatch.delenv("POCKETGPT_THREADS", raising=False)
    monkeypatch.setattr(cpuload, "INTERVAL_S", 0.0)
    monkeypatch.setattr(cpuload, "my_cpus", lambda: {0, 1})
    machines = []

    def reader(*args):
        if not machines:
            machines.append(Machine(cores=2, busy=1))
        return machines[-1].read()

    monkeypatch.setattr(cpuload, "read_times", reader)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the process's count: 2 cores' worth, wherever the test runs
    yield machines
    torch.set_num_threads(before)


def test_a_busy_machine_drops_a_thread_and_resumes_exactly(data_dir, tmp_path, busy_machine):
    kw = dict(dropout=0.1, lr_decay_iters=40, eval_interval=10)
    said: list[str] = []
    train(tiny_config(max_iters=40, **kw), data_dir, tmp_path / "straight", echo=said.append)
    assert "threads: 1 (other programs are using ~1.0 of this machine's cores); was 2" in said
    assert torch.get_num_threads() == 2  # the process's own count again after the run
    busy_machine.clear()
    train(tiny_config(max_iters=20, **kw), data_dir, tmp_path / "resumed", echo=lambda s: None)
    busy_machine.clear()
    said = []
    train(tiny_config(max_iters=40, **kw), data_dir, tmp_path / "resumed", resume=True, echo=said.append)
    assert any(s.startswith("threads: 1 (") for s in said)  # a resume follows the load anew
    a, b = losses_by_iter(tmp_path / "straight"), losses_by_iter(tmp_path / "resumed")
    assert list(a) == list(b) == list(range(1, 41))
    for it in a:  # what test_train's exact resume asks
        assert abs(a[it] - b[it]) <= 1e-5, it
    assert read_last_state(tmp_path / "resumed")["threads"] in (0, 2)  # autotune's, never the load's count


def test_asked_threads_are_kept_on_a_busy_machine(data_dir, tmp_path, busy_machine):
    said: list[str] = []
    train(tiny_config(max_iters=8, threads=2), data_dir, tmp_path / "run", echo=said.append)
    assert not any(s.startswith("threads: ") for s in said) and not busy_machine
