"""compile = auto: the plan of timed steps, the decision, the per-machine cache, and real training runs."""

from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import torch

from pocketgpt import autocompile
from pocketgpt.autocompile import AutoCompile, Timing
from pocketgpt.checkpoint import read_last_state
from pocketgpt.distributed import Group
from pocketgpt.trainer import train

from helpers import metrics, tiny_config


class FakeNet:
    """TrainModel's compile contract: compile() makes `forward` a compiled callable; a failure at a call sets
    forward back to eager (as TrainModel.__call__ does)."""

    def __init__(self):
        self.eager = object()
        self.forward = self.eager
        self.compiles = 0

    def compile(self, say):
        self.compiles += 1
        self.forward = object()


def _single() -> Group:
    return Group()  # one process: rank 0 of 1


def _choice(net, key, steps_left=1e6, said=None):
    return AutoCompile(net, key, lambda step_s: steps_left, (said if said is not None else []).append, _single(),
                       torch.device("cpu"))


def _run_steps(choice, net, eager_s, compiled_s, n=20, fail=False):
    """Steps that take eager_s or compiled_s seconds, as the forward the chooser set says."""
    used = []
    for _ in range(n):
        with choice.step():
            compiled = net.forward is not net.eager
            used.append(compiled)
            if compiled and fail:
                net.forward = net.eager  # what TrainModel does when the compiled call raised
            time.sleep(compiled_s if compiled and not fail else eager_s)
    return used


def test_timing_pays_only_when_clearly_faster_and_earned_back():
    t = Timing(eager_s=0.2, compiled_s=0.17, compile_s=30.0)
    assert t.faster() and t.pays(2000) and not t.pays(500)  # 0.03 s saved a step: 1,000 steps earn 30 s back
    assert not Timing(0.2, 0.197, 0.0).faster()  # 1.5 % is within MIN_GAIN's noise
    assert not Timing(0.2, None, 0.0).pays(1e9)  # compiling failed


def test_a_faster_compiled_step_is_measured_kept_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    net, said = FakeNet(), []
    choice = _choice(net, "k", said=said)
    choice.start("")
    used = _run_steps(choice, net, eager_s=0.012, compiled_s=0.003)
    plan = autocompile.WARMUP + 2 + 2 * autocompile.ROUNDS
    # warm-up eager, the compile and a compiled warm-up, then eager and compiled in turns, then compiled on
    assert used[:plan] == [False] * autocompile.WARMUP + [True, True] + [False, True] * autocompile.ROUNDS
    assert all(used[plan:]) and choice.decided == autocompile.ON and net.compiles == 1
    kept = json.loads((tmp_path / autocompile.CACHE_FILE).read_text())["k"]
    assert kept["compiled_s"] < kept["eager_s"] / 2 and kept["compile_s"] >= 0
    assert any("compile auto: compiled (measured here" in s for s in said)

    again, said2 = FakeNet(), []
    second = _choice(again, "k", said=said2)
    second.start("")  # from the cache: decided before any step, nothing timed
    assert second.decided == autocompile.ON and again.compiles == 1 and not second.times
    assert any("measured before on this machine" in s for s in said2)


@pytest.mark.parametrize("steps_left,decided", [(2000, autocompile.ON), (500, autocompile.OFF)])
def test_a_kept_timing_compiles_only_where_the_steps_left_earn_the_compile_back(tmp_path, monkeypatch,
                                                                                steps_left, decided):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    autocompile.write("k", Timing(eager_s=0.2, compiled_s=0.17, compile_s=30.0))
    net, said = FakeNet(), []
    choice = _choice(net, "k", steps_left=steps_left, said=said)
    choice.start("")
    assert choice.decided == decided and net.compiles == (decided == autocompile.ON) and not choice.times
    assert ("do not earn the compile back" in said[-1]) == (decided == autocompile.OFF)


def test_a_slower_compiled_step_goes_back_to_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    net = FakeNet()
    choice = _choice(net, "slow")
    choice.start("")
    used = _run_steps(choice, net, eager_s=0.003, compiled_s=0.012)
    plan = autocompile.WARMUP + 2 + 2 * autocompile.ROUNDS
    assert choice.decided == autocompile.OFF and not any(used[plan:])
    assert net.forward is net.eager


def test_a_failing_compile_is_kept_as_failed_and_not_tried_again(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    net = FakeNet()
    choice = _choice(net, "broken")
    choice.start("")
    used = _run_steps(choice, net, eager_s=0.002, compiled_s=0.001, fail=True)
    assert choice.decided == autocompile.OFF and used.count(True) == 1  # tried once, then eager throughout
    assert autocompile.read("broken").compiled_s is None
    again = FakeNet()
    second = _choice(again, "broken")
    second.start("")
    assert second.decided == autocompile.OFF and again.compiles == 0


def test_a_short_run_is_not_measured_and_a_resume_keeps_the_decision(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    net, said = FakeNet(), []
    choice = _choice(net, "short", steps_left=100, said=said)
    choice.start("")
    _run_steps(choice, net, eager_s=0.001, compiled_s=0.001, n=5)
    assert choice.decided == autocompile.OFF and net.compiles == 0 and len(choice.times) == autocompile.WARMUP
    assert any("too short to measure" in s for s in said)
    assert not (tmp_path / autocompile.CACHE_FILE).exists()  # nothing was measured, so nothing is kept
    resumed = FakeNet()
    r = _choice(resumed, "short", steps_left=100)
    r.start(autocompile.ON)  # the run being resumed had compiled: so does the resume, unmeasured
    assert r.decided == autocompile.ON and resumed.compiles == 1


def test_an_unreadable_cache_entry_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    (tmp_path / autocompile.CACHE_FILE).write_text(json.dumps({"k": {"eager_s": "x"}, "j": [1]}))
    assert autocompile.read("k") is None and autocompile.read("j") is None
    (tmp_path / autocompile.CACHE_FILE).write_text("{not json")
    assert autocompile.read("k") is None


def test_a_tiny_cli_run_stays_eager_and_saves_its_decision(data_dir, tmp_path):
    said: list[str] = []
    train(tiny_config(max_iters=8, eval_interval=4), data_dir, tmp_path / "run", echo=said.append)
    assert tiny_config().run.compile == "auto"  # the default
    assert any("compile auto: eager" in s and "too short to measure" in s for s in said)
    assert read_last_state(tmp_path / "run")["compile"] == autocompile.OFF


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="torch.compile on a CPU needs a C++ compiler (apt-get install g++)")
def test_a_real_run_measures_torch_compile_and_trains_on(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(autocompile, "MEASURE_MIN_S", 0.0)  # measure even this short run
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path / "cache"))
    said: list[str] = []
    cfg = tiny_config(n_layer=1, max_iters=16, eval_interval=16, log_interval=1)
    train(cfg, data_dir, tmp_path / "run", echo=said.append)
    decided = [s for s in said if s.startswith("compile auto: compiled") or s.startswith("compile auto: eager")]
    assert len(decided) == 1 and "measured here" in decided[0], said
    assert "failed" not in decided[0]  # a real compile happened and its steps were timed
    losses = [m["loss"] for m in metrics(tmp_path / "run") if "loss" in m]
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    kept = json.loads((tmp_path / "cache" / autocompile.CACHE_FILE).read_text())
    assert any(v["compiled_s"] is not None and v["compile_s"] > 0 for v in kept.values())
