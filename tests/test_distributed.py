"""Distributed training for real: torchrun, two gloo ranks of one thread each, against one process.

Each torchrun test starts two fresh Python processes (a few seconds of imports on 2 cores), so the runs
are the TINY model for 20 steps at most (60 once), and one run answers several questions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketgpt import autotune, checkpoint, distributed, faults, fsdp
from pocketgpt.cli import main
from pocketgpt.data import BatchSampler, open_tokens
from pocketgpt.errors import PocketError
from pocketgpt.model import GPT
from pocketgpt.rundir import read_config
from pocketgpt.trainer import train

from helpers import metrics, run_cli, tiny_config, tiny_flags

# 20 steps of 2 micro-batches (gradient accumulation composed with DDP), evals at 10 and 20; the
# schedule is fixed at 20 iters so a run stopped at 10 and resumed follows the same one
RUN = dict(max_iters=20, lr_decay_iters=20, grad_accum_steps=2, eval_interval=10)
LIMIT_S = 120  # no torchrun here may take longer: a hang is a failure, not a wait
# Muon is refused with fsdp; a sample reads rank 0's full copy; 3 eval batches on 2 ranks: every forward is a
# collective under FSDP, so the rank with one batch fewer runs one more (a hang, were it missing)
FSDP = dict(optimizer="adamw", eval_sample_tokens=8, eval_iters=3)


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


def assert_same_losses(got: Path, want: Path, iters: range, n: int = 20) -> None:
    a, b = by_iter(got, "loss"), by_iter(want, "loss")
    assert sorted(a) == sorted(b) == list(range(1, n + 1))
    for it in iters:
        assert a[it] == pytest.approx(b[it], rel=1e-5, abs=0), it
    assert by_iter(got, "val_loss") == pytest.approx(by_iter(want, "val_loss"), rel=1e-5, abs=0)


def assert_same_gradients(got: Path, want: Path, iters: range) -> None:
    """The gradient norm before clipping, step by step: ranks that summed their gradients instead of averaging
    them would show twice the norm from step 1 (the losses, clipped and under Adam, would hide it longer)."""
    a, b = by_iter(got, "grad_norm"), by_iter(want, "grad_norm")
    for it in iters:
        assert a[it] == pytest.approx(b[it], rel=1e-5, abs=0), it


def assert_same_weights(got: Path, want: Path) -> None:
    from safetensors.torch import load_file

    a, b = load_file(str(got)), load_file(str(want))
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


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


def test_fsdp_refuses_muon_lora_and_float16_in_one_line(data_dir, tmp_path, capsys):
    # the default recipe trains with Muon, which needs whole matrices: refused before anything is written
    code, _, err = run_cli(capsys, *train_flags(data_dir, tmp_path / "run"), "--parallel", "fsdp")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--parallel fsdp cannot use optimizer muon" in err and "use --optimizer adamw" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(PocketError, match="does not train LoRA adapters"):
        train(tiny_config(parallel="fsdp", optimizer="adamw", lora_rank=4), data_dir, tmp_path / "lora")
    fp16 = type("Runtime", (), {"needs_grad_scaler": True})()
    with pytest.raises(PocketError, match="does not train in float16 .*use --dtype bfloat16"):
        fsdp.check_dtype(tiny_config(parallel="fsdp"), fp16)
    fsdp.check_dtype(tiny_config(parallel="ddp"), fp16)  # DDP keeps its scaler


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

@pytest.mark.slow
@pytest.mark.distributed
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


@pytest.mark.slow
@pytest.mark.distributed
def test_a_two_rank_run_resumes_on_one_process_as_if_never_stopped(data_dir, tmp_path, reference):
    run = tmp_path / "run"
    code, out, _ = torchrun(2, *train_flags(data_dir, run, max_iters=10))
    assert code == 0, out
    cli_one_thread("train", "--out", str(run), "--resume", "--max-iters=20")
    assert_same_losses(run, reference, range(1, 21))


@pytest.mark.slow
@pytest.mark.distributed
def test_a_non_dividing_batch_is_refused_once_under_torchrun(data_dir, tmp_path):
    code, out, _ = torchrun(2, *train_flags(data_dir, tmp_path / "run", batch_size=5))
    assert code != 0
    assert out.count("error: batch_size 5 does not split over 2 processes") == 1, out
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_one_process_run_resumes_on_two_ranks_and_stays_within_1e_3_over_60_steps(data_dir, tmp_path):
    """1 -> 2: the first 10 steps on one process, the other 50 under DDP; against one unbroken process."""
    run60 = dict(max_iters=60, lr_decay_iters=60, eval_interval=30)
    unbroken, run = tmp_path / "unbroken" / "run", tmp_path / "run"
    cli_one_thread(*train_flags(data_dir, unbroken, **run60))
    cli_one_thread(*train_flags(data_dir, run, **{**run60, "max_iters": 10}))
    code, out, _ = torchrun(2, "train", "--out", str(run), "--resume", "--max-iters=60")
    assert code == 0, out
    assert "resuming" in out and "distributed (DDP): 2 processes" in out
    a, b = by_iter(run, "loss"), by_iter(unbroken, "loss")
    assert sorted(a) == sorted(b) == list(range(1, 61))
    for it in range(1, 61):  # 1e-5 over the first 20 steps (10 of them on two ranks), 1e-3 to step 60
        assert a[it] == pytest.approx(b[it], rel=1e-5 if it <= 20 else 1e-3, abs=0), it
    evals, want = by_iter(run, "val_loss"), by_iter(unbroken, "val_loss")  # the run also evaluated where it stopped
    assert sorted(want) == [30, 60] and sorted(evals) == [10, 30, 60]
    assert [evals[30], evals[60]] == pytest.approx([want[30], want[60]], rel=1e-3, abs=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_drifted_replicas_stop_every_rank_with_one_line(data_dir, tmp_path):
    """Rank 1's copy of the weights is nudged at iter 3; the check at the next eval (5) stops the run there."""
    run = tmp_path / "run"
    env = {faults.ENV_RANK_EXIT: "1:3:drift"}
    code, out, _ = torchrun(2, *train_flags(data_dir, run, max_iters=10, eval_interval=5), env=env)
    assert code != 0
    assert out.count("error: the weights differ across ranks at iter 5: transformer.wte.weight on rank 1") == 1, out
    assert str(Path(distributed.__file__).parent) not in out  # no traceback through pocketgpt (torchrun prints its own)
    assert not (run / "last").exists() and not (run / "model.safetensors").exists()  # nothing drifted was saved


@pytest.mark.slow
@pytest.mark.distributed
def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(data_dir, tmp_path):
    """Rank 1 alone goes NaN at iter 3: the global loss is NaN on both ranks, and both stop at that step."""
    run = tmp_path / "run"
    code, out, seconds = torchrun(2, *train_flags(data_dir, run), env={faults.ENV_RANK_EXIT: "1:3:nan"},
                                  timeout=60)
    assert code != 0 and seconds < 40
    assert out.count("training stopped at iter 3: the loss became nan") == 2, out  # each rank says where it stopped
    assert [m["iter"] for m in metrics(run) if "loss" in m] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_lost_rank_ends_the_run_with_a_message_naming_it(data_dir, tmp_path, how):
    """Rank 1 dies (or stops answering) at iter 3: rank 0 says so and exits within the timeout."""
    hook = "1:3" if how == "dies" else "1:3:hang"
    env = {faults.ENV_RANK_EXIT: hook, distributed.ENV_TIMEOUT: "5"}
    code, out, seconds = torchrun(2, *train_flags(data_dir, tmp_path / "run"), env=env, timeout=60)
    assert code != 0
    assert "rank 0 lost contact with rank 1" in out, out
    assert seconds < 40
    assert [m["iter"] for m in metrics(tmp_path / "run") if "loss" in m] == [1, 2, 3]  # rank 0 waited in step 4


@pytest.mark.slow
@pytest.mark.distributed
def test_an_unexpected_error_on_a_rank_reaches_torchrun_with_its_traceback(data_dir, tmp_path):
    """A bug (not a PocketError) on rank 1: torchrun's summary holds that rank's traceback (record())."""
    env = {faults.ENV_RANK_EXIT: "1:2:raise", distributed.ENV_TIMEOUT: "5"}
    code, out, _ = torchrun(2, *train_flags(data_dir, tmp_path / "run"), env=env, timeout=60)
    assert code != 0
    summary = out[out.index("Root Cause"):]
    assert "rank      : 1" in summary and "To enable traceback" not in summary, summary
    assert "RuntimeError: test: an unexpected failure on rank 1" in summary and "rank_fault" in summary


def _interrupted_after(data_dir: Path, run: Path, lines: int, env: dict[str, str] | None = None,
                       **overrides) -> tuple[str, int]:
    """A two-rank run without an end, Ctrl-C once metrics.jsonl has `lines` lines; (its output, the saved iter)."""
    flags = train_flags(data_dir, run, max_iters=10**6, eval_interval=10**6, **overrides)
    proc = subprocess.Popen(torchrun_cmd(2, *flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=torchrun_env(**(env or {})), start_new_session=True)  # killpg reaches the ranks
    try:
        deadline = time.monotonic() + LIMIT_S
        # complete lines counted, not parsed: the ranks may be writing the last one while this reads
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= lines):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # what torchrun forwards to every rank on Ctrl-C
        try:
            out = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the ranks too: they hold the output pipe
            raise AssertionError("no exit 60 s after Ctrl-C:\n" + proc.communicate(timeout=30)[0]) from None
    finally:
        with contextlib.suppress(ProcessLookupError):  # a rank left behind, if any
            os.killpg(proc.pid, signal.SIGKILL)
    state = run / "last" / "state.json"
    assert state.is_file(), f"exit {proc.returncode}, nothing saved:\n{out}"
    saved = json.loads(state.read_text())["iter"]
    assert f"interrupted at iter {saved}; saved" in out, out
    assert [m["iter"] for m in metrics(run)] == list(range(1, saved + 1))
    return out, saved


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_stop_on_the_clock_rank_0_saved(data_dir, tmp_path):
    # an eval after every step: the budget runs out inside one; every rank takes the clock rank 0 saved
    # last/ with and stops on it, so a resume of the finished run (on two ranks too) trains nothing
    run = tmp_path / "run"
    flags = train_flags(data_dir, run, max_iters=10**6, max_time=3, eval_interval=1, eval_iters=4, compile="false")
    code, out, _ = torchrun(2, *flags)
    assert code == 0, out
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["elapsed"] >= 3 and [m["iter"] for m in metrics(run) if "val_loss" in m][-1] == state["iter"], out
    code, out, _ = torchrun(2, "train", "--out", str(run), "--resume")
    assert code == 0 and "already finished" in out and "time budget" in out, out
    assert json.loads((run / "last" / "state.json").read_text())["iter"] == state["iter"]


@pytest.mark.slow
@pytest.mark.distributed
def test_ctrl_c_stops_every_rank_at_one_step_and_rank_0_saves(data_dir, tmp_path):
    # compile false: an endless run would time torch.compile first (autotune), which is not this test's subject
    _interrupted_after(data_dir, tmp_path / "run", 5, compile="false")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="torch.compile on a CPU needs a C++ compiler (apt-get install g++)")
def test_compile_auto_is_measured_and_decided_by_every_rank_together(data_dir, tmp_path):
    """An endless run has time to measure: both ranks time eager and compiled steps and take one decision
    (a rank that chose alone would wait in a different collective: a hang, not a pass). One thread a rank
    (POCKETGPT_THREADS=1), so threads are not measured here; the cache is the test's own."""
    steps = autotune.WARMUP + 2 + 2 * autotune.ROUNDS
    out, saved = _interrupted_after(data_dir, tmp_path / "run", steps + 2,
                                    env={"POCKETGPT_CACHE_DIR": str(tmp_path / "cache")})
    decided = [line for line in out.splitlines() if line.startswith("compile auto: ") and "measured here" in line]
    assert len(decided) == 1 and "failed" not in decided[0], out  # rank 0 speaks for both
    state = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    assert saved >= steps and state["compile"] == ("on" if "compile auto: compiled" in decided[0] else "off")


# ---------------------------------------------------------------- torchrun, two gloo ranks, FSDP2

@pytest.fixture(scope="module")
def fsdp_reference(data_dir, tmp_path_factory) -> Path:
    """One process with AdamW (fsdp's optimizer), 20 steps: what the sharded runs must match."""
    out = tmp_path_factory.mktemp("single-adamw") / "run"
    cli_one_thread(*train_flags(data_dir, out, **FSDP))
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_two_ranks_train_as_one_process_and_resume_on_one(data_dir, tmp_path, fsdp_reference):
    """2 -> 1: 10 sharded steps, then a single process carries on from the files rank 0 gathered and wrote."""
    run = tmp_path / "run"
    code, out, _ = torchrun(2, *train_flags(data_dir, run, max_iters=10, parallel="fsdp", **FSDP))
    assert code == 0, out
    assert "distributed (FSDP2, each rank 1/2 of the weights)" in out
    assert_same_gradients(run, fsdp_reference, range(1, 11))
    # rank 0 alone wrote, and wrote what a single process writes: full weights, tied head included
    assert [m["iter"] for m in metrics(run) if "loss" in m] == list(range(1, 11))
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in fsdp_reference.iterdir())
    assert (run / "samples.txt").read_text().count("=== iter 10") == 1
    plain = GPT(read_config(run)[0].model)
    checkpoint.load_weights(plain, run / "model.safetensors")
    assert plain.lm_head.weight is plain.transformer.wte.weight
    assert checkpoint.read_weights_metadata(run / "model.safetensors")["iter"] == "10"
    cli_one_thread("train", "--out", str(run), "--resume", "--max-iters=20")
    assert_same_losses(run, fsdp_reference, range(1, 21))
    assert_same_gradients(run, fsdp_reference, range(1, 21))
    assert_same_weights(run / "last" / "model.safetensors", fsdp_reference / "last" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.distributed
def test_a_one_process_run_resumes_sharded_on_two_ranks(data_dir, tmp_path, fsdp_reference):
    """1 -> 2: each rank reads the single process's full files and keeps its slice of weights and moments."""
    run = tmp_path / "run"
    cli_one_thread(*train_flags(data_dir, run, max_iters=10, **FSDP))
    code, out, _ = torchrun(2, "train", "--out", str(run), "--resume", "--max-iters=20", "--parallel=fsdp")
    assert code == 0, out
    assert "FSDP2" in out and out.count("eval iter 20:") == 1
    assert_same_losses(run, fsdp_reference, range(1, 21))
    assert_same_gradients(run, fsdp_reference, range(1, 21))
    assert [m["iter"] for m in metrics(run) if "loss" in m] == list(range(1, 21))
    assert_same_weights(run / "model.safetensors", fsdp_reference / "model.safetensors")
    assert_same_weights(run / "last" / "model.safetensors", fsdp_reference / "last" / "model.safetensors")


def test_replica_check_catches_nan_and_ignores_rounding_of_a_near_zero_sum():
    """In-process, with the ranks' checksum table given: no process group needed for the comparison."""
    w = torch.tensor([1.0, -1.0, 3.0])

    class TwoRanks:
        enabled = True

        def __init__(self, other):
            self.other = other

        def gathered(self, values):
            return [values, self.other(values)]

    named = [("transformer.wte.weight", w)]
    distributed.check_replicas(TwoRanks(lambda v: [v[0] + 1e-9, v[1]]), named, 5)  # sum ~3: rounding, fine
    zero = [("w", torch.tensor([1.0, -1.0]))]  # sum 0: a 1e-12 difference is rounding, not drift
    distributed.check_replicas(TwoRanks(lambda v: [v[0] + 1e-12, v[1]]), zero, 5)
    with pytest.raises(distributed.ReplicasDiffer, match="transformer.wte.weight on rank 1"):
        distributed.check_replicas(TwoRanks(lambda v: [float("nan"), v[1]]), named, 5)
    with pytest.raises(distributed.ReplicasDiffer):
        distributed.check_replicas(TwoRanks(lambda v: [v[0], v[1] * (1 + 1e-4)]), named, 5)
