"""compile = auto and threads = 0: the timed steps, the decisions, the per-machine cache, and real training runs."""

from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import torch

from pocketgpt import autotune
from pocketgpt.autotune import AutoTune, Plan, Timing
from pocketgpt.checkpoint import read_last_state
from pocketgpt.distributed import Group
from pocketgpt.stepmodel import StepModel
from pocketgpt.trainer import train

from helpers import metrics, tiny_config


class Pair(torch.nn.Module):
    """A model whose forward costs nothing: the steps below sleep what the forward in use should cost."""

    def forward(self, x, y):
        return x, y


class Compiler:
    """torch.compile's stand-in (compiling for real would take seconds a test): it counts what it compiles,
    and what it returns runs the eager forward, or raises at the call, as a compiler failure at the first
    call does. The StepModel around it is the real one, fallback included."""

    def __init__(self):
        self.compiled = []
        self.fails = False

    def __call__(self, forward):
        self.compiled.append(forward)

        def compiled(*args):
            if self.fails:
                raise RuntimeError("backend compiler failed")
            return forward(*args)

        return compiled

    def of(self, net):
        """How many times net's forward was compiled."""
        return sum(f is net.raw for f in self.compiled)


@pytest.fixture
def compiler(monkeypatch):
    c = Compiler()
    monkeypatch.setattr(torch, "compile", c)
    return c


def _net():
    """The real StepModel (ask for the compiler fixture too: its compiles are the stand-in's)."""
    return StepModel(Pair())


def _single() -> Group:
    return Group()  # one process: rank 0 of 1


def _choice(net, key, steps_left=1e6, said=None, plan=None, saved=""):
    """An AutoTune for compile alone (or `plan`), started."""
    tuner = AutoTune(net, lambda: f"{key} t{torch.get_num_threads()}", lambda step_s: steps_left,
                     (said if said is not None else []).append, _single(), torch.device("cpu"))
    tuner.start(plan or Plan(compile="", threads=0, saved_compile=saved))
    return tuner


@pytest.fixture(autouse=True)
def _threads_back():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run_steps(choice, net, eager_s, compiled_s, n=20):
    """Steps that call net and take eager_s or compiled_s seconds, as the forward in use says (a compiled call
    that fails falls back to eager inside the call)."""
    used, x = [], torch.zeros(1)
    for _ in range(n):
        with choice.step():
            used.append(net.compiled)
            net(x, x, lambda line: None)
            time.sleep(compiled_s if net.compiled else eager_s)
    return used


def test_a_compiled_forward_that_fails_at_its_first_call_falls_back_to_eager_for_good(compiler):
    net, said, x = _net(), [], torch.ones(2)
    assert net.use_compiled(True) and net.compiled and compiler.of(net) == 1
    compiler.fails = True
    out = net(x, 2 * x, said.append)  # the compiled call raises: the step runs eagerly instead
    assert torch.equal(out[1], 2 * x) and not net.compiled
    assert len(said) == 1 and said[0].startswith("warning: torch.compile failed (RuntimeError: backend compiler")
    assert not net.use_compiled(True) and compiler.of(net) == 1  # not compiled again, not switched back


def test_torch_compile_unavailable_leaves_the_eager_forward(monkeypatch):
    def unavailable(forward):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unavailable)
    net, said = _net(), []
    assert not net.use_compiled(True, said.append) and not net.compiled
    assert said == ["warning: torch.compile unavailable (RuntimeError); training without it"]
    assert not net.use_compiled(True, said.append) and len(said) == 1  # tried once
    assert net(torch.ones(1), torch.zeros(1), said.append)[1].item() == 0.0


def test_timing_pays_only_when_clearly_faster_and_earned_back():
    t = Timing(eager_s=0.2, compiled_s=0.17, compile_s=30.0)
    assert t.faster() and t.pays(2000) and not t.pays(500)  # 0.03 s saved a step: 1,000 steps earn 30 s back
    assert not Timing(0.2, 0.197, 0.0).faster()  # 1.5 % is within MIN_GAIN's noise
    assert not Timing(0.2, None, 0.0).pays(1e9)  # compiling failed


def test_a_faster_compiled_step_is_measured_kept_and_reused(tmp_path, monkeypatch, compiler):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    net, said = _net(), []
    choice = _choice(net, "k", said=said)
    used = _run_steps(choice, net, eager_s=0.012, compiled_s=0.003)
    plan = autotune.WARMUP + 2 + 2 * autotune.ROUNDS
    # warm-up eager, the compile and a compiled warm-up, then eager and compiled in turns, then compiled on
    assert used[:plan] == [False] * autotune.WARMUP + [True, True] + [False, True] * autotune.ROUNDS
    assert all(used[plan:]) and choice.compile == autotune.ON and compiler.of(net) == 1
    kept = json.loads((tmp_path / autotune.CACHE_FILE).read_text())[f"k t{torch.get_num_threads()} | compile"]
    assert kept["compiled_s"] < kept["eager_s"] / 2 and kept["compile_s"] >= 0
    assert any("compile auto: compiled (measured here" in s for s in said)

    again, said2 = _net(), []
    second = _choice(again, "k", said=said2)
    assert second.compile == autotune.ON and compiler.of(again) == 1 and not second.times
    assert any("measured before on this machine" in s for s in said2)


@pytest.mark.parametrize("steps_left,decided", [(2000, autotune.ON), (500, autotune.OFF)])
def test_a_kept_timing_compiles_only_where_the_steps_left_earn_the_compile_back(tmp_path, monkeypatch,
                                                                                steps_left, decided, compiler):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    autotune.write_compile(f"k t{torch.get_num_threads()}", Timing(eager_s=0.2, compiled_s=0.17, compile_s=30.0))
    net, said = _net(), []
    choice = _choice(net, "k", steps_left=steps_left, said=said)
    assert choice.compile == decided and compiler.of(net) == (decided == autotune.ON) and not choice.times
    assert ("do not earn the compile back" in said[-1]) == (decided == autotune.OFF)


def test_a_slower_compiled_step_goes_back_to_eager(tmp_path, monkeypatch, compiler):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    net = _net()
    choice = _choice(net, "slow")
    used = _run_steps(choice, net, eager_s=0.003, compiled_s=0.012)
    plan = autotune.WARMUP + 2 + 2 * autotune.ROUNDS
    assert choice.compile == autotune.OFF and not any(used[plan:])
    assert not net.compiled


def test_a_failing_compile_is_kept_as_failed_and_not_tried_again(tmp_path, monkeypatch, compiler):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    net = _net()
    choice = _choice(net, "broken")
    compiler.fails = True  # the compiled forward raises at its first call
    used = _run_steps(choice, net, eager_s=0.002, compiled_s=0.001)
    assert choice.compile == autotune.OFF and used.count(True) == 1  # tried once, then eager throughout
    assert autotune.read_compile(f"broken t{torch.get_num_threads()}").compiled_s is None
    again = _net()
    second = _choice(again, "broken")
    assert second.compile == autotune.OFF and compiler.of(again) == 0


def test_a_short_run_is_not_measured_and_a_resume_keeps_the_decision(tmp_path, monkeypatch, compiler):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    net, said = _net(), []
    choice = _choice(net, "short", steps_left=100, said=said)
    _run_steps(choice, net, eager_s=0.001, compiled_s=0.001, n=5)
    assert choice.compile == autotune.OFF and compiler.of(net) == 0 and len(choice.times) == autotune.WARMUP
    assert any("measuring needs" in s for s in said)
    assert not (tmp_path / autotune.CACHE_FILE).exists()  # nothing was measured, so nothing is kept
    resumed = _net()
    r = _choice(resumed, "short", steps_left=100, saved=autotune.ON)  # the run being resumed had compiled
    assert r.compile == autotune.ON and compiler.of(resumed) == 1


def test_an_unreadable_cache_entry_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    (tmp_path / autotune.CACHE_FILE).write_text(json.dumps(
        {"k | compile": {"eager_s": "x"}, "j | compile": [1], "k | threads": {"threads": "2"}}))
    assert autotune.read_compile("k") is None and autotune.read_compile("j") is None
    assert autotune.read_threads("k") == 0
    (tmp_path / autotune.CACHE_FILE).write_text("{not json")
    assert autotune.read_compile("k") is None


def test_a_tiny_cli_run_stays_eager_and_saves_its_decision(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("POCKETGPT_THREADS", raising=False)
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path / "cache"))
    said: list[str] = []
    train(tiny_config(max_iters=8, eval_interval=4), data_dir, tmp_path / "run", echo=said.append)
    assert tiny_config().run.compile == "auto" and tiny_config().run.threads == 0  # the defaults
    assert any("compile auto: eager" in s and "measuring needs" in s for s in said)
    state = read_last_state(tmp_path / "run")
    assert state["compile"] == autotune.OFF
    assert state["threads"] == (torch.get_num_threads() if torch.get_num_threads() > 1 else 0)


def _timed_by_threads(tuner, net, seconds_at, n=12):
    for _ in range(n):
        with tuner.step():
            time.sleep(seconds_at(torch.get_num_threads(), net.compiled))


@pytest.mark.parametrize("one_s,two_s,best", [(0.002, 0.008, 1), (0.008, 0.002, 2)])
def test_threads_are_timed_in_turns_and_the_faster_count_kept(tmp_path, monkeypatch, one_s, two_s, best,
                                                               compiler):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    torch.set_num_threads(2)
    net, said = _net(), []
    tuner = _choice(net, "th", said=said, plan=Plan(compile=autotune.OFF, threads=2))
    _timed_by_threads(tuner, net, lambda n, _: one_s if n == 1 else two_s)
    assert tuner.threads == best and torch.get_num_threads() == best and compiler.of(net) == 0
    assert autotune.read_threads("th t2") == best  # kept under the process's own count
    assert any(s.startswith(f"threads auto: {best} (measured here") for s in said)
    torch.set_num_threads(2)
    again = _choice(_net(), "th", plan=Plan(compile=autotune.OFF, threads=2))
    assert again.threads == best and not again.measuring and torch.get_num_threads() == best
    resumed = _choice(_net(), "th", plan=Plan(compile=autotune.OFF, threads=2, saved_threads=1))
    assert resumed.threads == 1  # a resume keeps its run's count, whatever the cache says


def test_threads_then_compile_at_the_chosen_count(tmp_path, monkeypatch, compiler):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    torch.set_num_threads(2)
    net = _net()
    tuner = _choice(net, "both", plan=Plan(compile="", threads=2))
    _timed_by_threads(tuner, net, lambda n, compiled: (0.006 if n == 1 else 0.024) / (3 if compiled else 1), n=24)
    assert tuner.threads == 1 and tuner.compile == autotune.ON and not tuner.measuring
    kept = json.loads((tmp_path / autotune.CACHE_FILE).read_text())
    assert set(kept) == {"both t2 | threads", "both t1 | compile"}  # the compile was timed at one thread


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="torch.compile on a CPU needs a C++ compiler (apt-get install g++)")
def test_a_real_run_measures_torch_compile_and_trains_on(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "MEASURE_MIN_S", 0.0)  # measure even this short run
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path / "cache"))
    said: list[str] = []
    cfg = tiny_config(n_layer=1, max_iters=40, eval_interval=40, log_interval=1)
    threads = torch.get_num_threads()
    train(cfg, data_dir, tmp_path / "run", echo=said.append)
    assert torch.get_num_threads() == threads  # the process's setting is back after the run
    decided = [s for s in said if s.startswith("compile auto: compiled") or s.startswith("compile auto: eager")]
    assert len(decided) == 1 and "measured here" in decided[0], said
    assert "failed" not in decided[0]  # a real compile happened and its steps were timed
    losses = [m["loss"] for m in metrics(tmp_path / "run") if "loss" in m]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    kept = json.loads((tmp_path / "cache" / autotune.CACHE_FILE).read_text())
    assert any(k.endswith("| compile") and v["compiled_s"] is not None and v["compile_s"] > 0 for k, v in kept.items())
    state = read_last_state(tmp_path / "run")
    assert state["compile"] in (autotune.ON, autotune.OFF)
    if threads > 1:  # threads were timed too, before the compile
        assert any(s.startswith("threads auto: ") and "measured here" in s for s in said)
        assert state["threads"] in (threads, threads // 2)


def test_a_resumed_compiled_run_stays_compiled_and_keeps_its_threads(tmp_path, monkeypatch, compiler):
    """A resume that saved compile on but no thread count: threads are not timed on compiled code (inductor
    fixes the count it compiled with), and no step goes back to eager."""
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    torch.set_num_threads(2)
    net = _net()
    tuner = _choice(net, "resumed", plan=Plan(compile="", threads=2, saved_compile=autotune.ON))
    used = _run_steps(tuner, net, eager_s=0.001, compiled_s=0.001, n=14)
    assert all(used) and net.compiled and compiler.of(net) == 1
    assert tuner.compile == autotune.ON and tuner.threads == 2 and not tuner.measuring


def test_compile_asked_for_is_kept_and_threads_are_not_timed_on_it(tmp_path, monkeypatch, compiler):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    torch.set_num_threads(2)
    net = _net()
    net.use_compiled(True)  # what the trainer does for compile true
    tuner = _choice(net, "asked", plan=Plan(compile=autotune.ON, threads=2))
    assert not tuner.measuring and tuner.threads == 2 and net.compiled and compiler.of(net) == 1


def test_a_timing_kept_on_a_busier_machine_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune.probe, "_load", lambda: 3.0)  # measured while something else ran
    autotune.write_compile("k", Timing(0.2, 0.1, 1.0))
    autotune.write_threads("k", 1, {2: 0.3, 1: 0.2})
    assert autotune.read_compile("k") is not None and autotune.read_threads("k") == 1
    monkeypatch.setattr(autotune.probe, "_load", lambda: 0.1)  # quieter now: those numbers are not trusted
    assert autotune.read_compile("k") is None and autotune.read_threads("k") == 0


def test_a_run_too_short_for_every_phase_takes_the_defaults(tmp_path, monkeypatch, compiler):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    torch.set_num_threads(2)
    net, said = _net(), []
    # long in seconds (10 s steps), but 20 steps cannot hold the 18 timed ones twice over
    tuner = AutoTune(net, lambda: "few", lambda step_s: 20, said.append, _single(), torch.device("cpu"))
    tuner.start(Plan(compile="", threads=2))
    monkeypatch.setattr(autotune, "MEASURE_MIN_S", 0.0)
    _run_steps(tuner, net, eager_s=0.001, compiled_s=0.001, n=4)
    assert tuner.compile == autotune.OFF and tuner.threads == 2 and compiler.of(net) == 0
    assert any("measuring needs" in s and "36 steps" in s for s in said)
