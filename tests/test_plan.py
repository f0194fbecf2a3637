"""plan.py: every check a run passes before it starts, run once; one memory estimate, printed and checked."""

from __future__ import annotations

import collections
import re
import subprocess
import sys

import pytest
from helpers import TINY, tiny_config

from pocketgpt import distributed, fsdp, metrics, plan, rundir
from pocketgpt import launch as launching
from pocketgpt import runtime as runtime_module
from pocketgpt.errors import PocketError
from pocketgpt.trainer import train

# 256 rows of 16 tokens: ~20 MB of activations, so the printed estimate has digits to compare
BIG_BATCH = dict(batch_size=256, max_iters=1, eval_interval=1, eval_iters=1)
SHORT = dict(max_iters=2, eval_interval=2)


def _printed_mb(lines: list[str]) -> int:
    (line,) = [s for s in lines if s.startswith("memory estimate: ~")]
    return int(re.match(r"memory estimate: ~([\d,]+) MB", line).group(1).replace(",", ""))


def test_the_memory_estimate_printed_is_the_one_checked(data_dir, tmp_path, monkeypatch):
    checked, printed = [], []
    check, line = plan.check_memory, plan.memory_line
    monkeypatch.setattr(plan, "check_memory", lambda est, *a: checked.append(est) or check(est, *a))
    monkeypatch.setattr(plan, "memory_line", lambda est, *a: printed.append(est) or line(est, *a))
    said: list[str] = []
    train(tiny_config(**BIG_BATCH), data_dir, tmp_path / "a", echo=said.append)
    assert len(checked) == 1 and len(printed) == 1 and printed[0] is checked[0]
    mb = _printed_mb(said)
    assert mb >= 10
    monkeypatch.setattr(runtime_module, "device_memory_mb", lambda runtime: mb - 1)  # just below the number said
    with pytest.raises(PocketError, match=f"this model needs ~{mb:,} MB to train"):
        train(tiny_config(**BIG_BATCH), data_dir, tmp_path / "b", echo=lambda s: None)
    monkeypatch.setattr(runtime_module, "device_memory_mb", lambda runtime: mb + 1)  # just above it: it trains
    assert train(tiny_config(**BIG_BATCH), data_dir, tmp_path / "b", echo=lambda s: None).iters == 1


def test_cpu_ranks_on_one_machine_are_said_and_checked_together(monkeypatch):
    est = plan.MemoryEstimate(state_mb=30.0, act_mb=20.0, ranks_here=2)
    said = plan.memory_line(est, 0.1)
    assert said.startswith("memory estimate: ~50 MB (30 MB weights") and "~100 MB for the 2 on this machine" in said
    cpu = type("Runtime", (), {"is_cuda": False})()
    monkeypatch.setattr(runtime_module, "device_memory_mb", lambda runtime: 99.0)
    with pytest.raises(PocketError, match=r"needs ~100 MB to train \(60 MB weights and optimizer state \+ 40 MB "
                                          r"activations\) but this machine has 99 MB"):
        plan.check_memory(est, cpu, checkpointing=False)
    monkeypatch.setattr(runtime_module, "device_memory_mb", lambda runtime: 100.0)
    plan.check_memory(est, cpu, checkpointing=False)


def _counted(monkeypatch) -> collections.Counter:
    """Count the calls of every check a run passes before it starts (validate and check_lora as plan calls
    them: config.build_train_config validates what it builds, by its own contract)."""
    calls: collections.Counter = collections.Counter()
    for module, name in [(plan, "validate"), (fsdp, "check"), (plan, "check_lora"), (metrics, "check_loggers"),
                         (distributed, "check_world"), (runtime_module, "resolve"), (fsdp, "check_dtype"),
                         (rundir, "check_for_training")]:
        def counting(*a, _real=getattr(module, name), _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(module, name, counting)
    return calls


ONCE = {"validate": 1, "check": 1, "check_lora": 1, "check_loggers": 1, "check_world": 1, "resolve": 1,
        "check_dtype": 1,
        "check_for_training": 2}  # before the lock is taken, and under it (another process may have started)


def test_launch_and_train_run_each_check_once(data_dir, tmp_path, monkeypatch):
    calls = _counted(monkeypatch)
    req = launching.TrainRequest(data=str(data_dir), out=str(tmp_path / "launched"), overrides={**TINY, **SHORT})
    assert launching.launch(req, echo=lambda s: None).result.iters == 2
    assert dict(calls) == ONCE
    calls.clear()
    cfg = tiny_config(**SHORT)
    assert train(cfg, data_dir, tmp_path / "direct", echo=lambda s: None).iters == 2  # the Python API's path
    assert dict(calls) == ONCE


def test_importing_the_plan_loads_no_torch():
    code = "import sys, pocketgpt.plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
