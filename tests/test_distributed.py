"""Distributed training for real: torchrun, two gloo ranks of one thread each, against one process.

Each torchrun test starts two fresh Python processes (a few seconds of imports on 2 cores), so the runs
are the TINY model for 20 steps at most, and one run answers several questions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketgpt import distributed
from pocketgpt.cli import main
from pocketgpt.data import BatchSampler, open_tokens

from helpers import metrics, run_cli, tiny_flags

# 20 steps of 2 micro-batches (gradient accumulation composed with DDP), evals at 10 and 20; the
# schedule is fixed at 20 iters so a run stopped at 10 and resumed follows the same one
RUN = dict(max_iters=20, lr_decay_iters=20, grad_accum_steps=2, eval_interval=10)
LIMIT_S = 120  # no torchrun here may take longer: a hang is a failure, not a wait


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "pocketgpt", *map(str, args)]


def torchrun_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "POCKETGPT_THREADS": "1", **extra}


def torchrun(nproc: int, *args: str, env: dict[str, str] | None = None, timeout: float = LIMIT_S):
    """`torchrun --standalone --nproc_per_node=nproc -m pocketgpt ARGS`, one thread a rank; (code, out+err, s)."""
    t0 = time.perf_counter()
    res = subprocess.run(torchrun_cmd(nproc, *args), capture_output=True, text=True, env=torchrun_env(**(env or {})),
                         timeout=timeout)
    return res.returncode, res.stdout + res.stderr, time.perf_counter() - t0


def train_flags(data_dir: Path, out: Path, **overrides) -> list[str]:
    return ["train", "--data", str(data_dir), "--out", str(out), *tiny_flags(**{**RUN, **overrides})]


def cli_one_thread(*argv: str) -> None:
    """`pocketgpt ARGV` in this process at the ranks' thread count (1), as the comparison asks."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(list(argv)) == 0
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """One process, the whole batch, 20 steps, the same command line: what the distributed runs must match."""
    out = tmp_path_factory.mktemp("single") / "run"
    cli_one_thread(*train_flags(data_dir, out))
    return out


def by_iter(run: Path, key: str) -> dict[int, float]:
    return {m["iter"]: m[key] for m in metrics(run) if key in m}


def assert_same_losses(got: Path, want: Path, iters: range) -> None:
    a, b = by_iter(got, "loss"), by_iter(want, "loss")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for it in iters:
        assert a[it] == pytest.approx(b[it], rel=1e-5, abs=0), it
    assert by_iter(got, "val_loss") == pytest.approx(by_iter(want, "val_loss"), rel=1e-5, abs=0)


# ---------------------------------------------------------------- in one process

def test_each_rank_draws_its_share_of_the_global_batch(data_dir):
    tokens, _ = open_tokens(data_dir / "train.bin")
    whole = BatchSampler(tokens, 16, 8, seed=3).batch(5, 1)
    shares = [BatchSampler(tokens, 16, 8, seed=3, share=(r, 2)).batch(5, 1) for r in range(2)]
    assert all(x.shape == (4, 16) for x, _ in shares)
    np.testing.assert_array_equal(np.concatenate([x for x, _ in shares]), whole[0])
    np.testing.assert_array_equal(np.concatenate([y for _, y in shares]), whole[1])


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node=3 sets it; refused before any group
    code, _, err = run_cli(capsys, *train_flags(data_dir, tmp_path / "run"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "batch_size 8 does not split over 3 processes" in err
    assert "use batch_size 6 or 9" in err and "run 2, 4 or 8 processes" in err
    assert not (tmp_path / "run").exists()


def test_fsdp_is_refused_as_not_there_yet(data_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, *train_flags(data_dir, tmp_path / "run"), "--parallel", "fsdp")
    assert code == 2 and "--parallel fsdp (sharded weights, FSDP2) is not there yet" in err
    assert len(err.strip().splitlines()) == 1


def test_cpu_ranks_share_the_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv(distributed.ENV_THREADS, raising=False)
        monkeypatch.setattr(distributed, "_cores", lambda: 8)
        assert distributed.set_threads(3) == "2 CPU threads per rank (8 cores // 3 ranks on this machine)"
        assert torch.get_num_threads() == 2
        assert distributed.set_threads(16).startswith("1 CPU thread per rank")
        monkeypatch.setenv(distributed.ENV_THREADS, "3")
        assert distributed.set_threads(2) == "3 CPU threads per rank (POCKETGPT_THREADS=3)"
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- torchrun, two gloo ranks

def test_two_ranks_train_as_one_process_and_rank_0_alone_writes(data_dir, tmp_path, reference):
    run = tmp_path / "run"
    code, out, _ = torchrun(2, *train_flags(data_dir, run))
    assert code == 0, out
    assert_same_losses(run, reference, range(1, 21))
    # rank 0 alone writes: one line per step and per eval, the same files as a single process's run
    lines = metrics(run)
    assert [m["iter"] for m in lines if "loss" in m] == list(range(1, 21))
    assert [m["iter"] for m in lines if "val_loss" in m] == [10, 20]
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in reference.iterdir())
    # each rank computed half of every micro-batch, with one thread; the console lines came once
    assert "each rank computes 4 of the 8 rows of every micro-batch" in out
    assert "1 CPU thread per rank (POCKETGPT_THREADS=1)" in out and "(gloo" in out
    assert out.count("eval iter 20:") == 1 and out.count("done: 20 iters") == 1


def test_a_two_rank_run_resumes_on_one_process_as_if_never_stopped(data_dir, tmp_path, reference):
    run = tmp_path / "run"
    code, out, _ = torchrun(2, *train_flags(data_dir, run, max_iters=10))
    assert code == 0, out
    cli_one_thread("train", "--out", str(run), "--resume", "--max-iters=20")
    assert_same_losses(run, reference, range(1, 21))


def test_a_non_dividing_batch_is_refused_once_under_torchrun(data_dir, tmp_path):
    code, out, _ = torchrun(2, *train_flags(data_dir, tmp_path / "run", batch_size=5))
    assert code != 0
    assert out.count("error: batch_size 5 does not split over 2 processes") == 1, out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_lost_rank_ends_the_run_with_a_message_naming_it(data_dir, tmp_path, how):
    """Rank 1 dies (or stops answering) at iter 3: rank 0 says so and exits within the timeout."""
    hook = "1:3" if how == "dies" else "1:3:hang"
    env = {distributed.ENV_TEST_EXIT: hook, distributed.ENV_TIMEOUT: "5"}
    code, out, seconds = torchrun(2, *train_flags(data_dir, tmp_path / "run"), env=env, timeout=60)
    assert code != 0
    assert "rank 0 lost contact with rank 1" in out, out
    assert seconds < 40
    assert [m["iter"] for m in metrics(tmp_path / "run") if "loss" in m] == [1, 2, 3]  # rank 0 waited in step 4


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_one_step_and_rank_0_saves(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun_cmd(2, *train_flags(data_dir, run, max_iters=10**6, eval_interval=10**6)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=torchrun_env())
    try:
        deadline = time.monotonic() + LIMIT_S
        while not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= 5):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # what torchrun forwards to every rank on Ctrl-C
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    saved = json.loads((run / "last" / "state.json").read_text())["iter"]
    assert f"interrupted at iter {saved}; saved" in out, out
    assert [m["iter"] for m in metrics(run)] == list(range(1, saved + 1))
