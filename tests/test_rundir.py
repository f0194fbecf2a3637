"""The run folder's owner: layout, telling runs from other folders, --overwrite, the lock."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from helpers import paused_cli, run_cli, tiny_config, tiny_flags

import pocketgpt
from pocketgpt import rundir
from pocketgpt.errors import PocketError
from pocketgpt.trainer import train


def test_a_run_writes_only_names_the_owner_knows_and_overwrite_removes_them(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(max_iters=20, plots=True, eval_sample_tokens=10, loggers="tensorboard"), data_dir, run,
          echo=lambda s: None)
    written = {p.name for p in run.iterdir()}
    assert {"plots", "samples.txt", "report.md", "last", "tensorboard", "model.safetensors"} <= written
    assert written <= set(rundir.RUN_FILES) | {rundir.LOCK}, written - set(rundir.RUN_FILES)
    # a second run with plots, samples and loggers off must leave none of the first one's behind
    train(tiny_config(max_iters=10), data_dir, run, overwrite=True, echo=lambda s: None)
    names = {p.name for p in run.iterdir()}
    assert not {"plots", "samples.txt", "tensorboard"} & names
    assert json.loads((run / "last" / "state.json").read_text())["iter"] == 10


def test_overwrite_keeps_the_data_folder_train_prepared(tmp_path, capsys, corpus_text):
    book = tmp_path / "book.txt"
    book.write_text(corpus_text[:20_000], encoding="utf-8")
    run = tmp_path / "run"
    assert run_cli(capsys, "train", book, "--out", run, *tiny_flags(max_iters=10))[0] == 0
    code, _, err = run_cli(capsys, "train", "--data", run / "data", "--out", run, "--overwrite",
                           *tiny_flags(max_iters=10))
    assert code == 0, err
    assert (run / "data" / "train.bin").is_file()


def test_a_hugging_face_folder_is_not_taken_for_a_run(tmp_path):
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert not rundir.is_run_dir(hf)
    with pytest.raises(PocketError, match="not written by pocketgpt.*Hugging Face"):
        pocketgpt.load(hf)
    with pytest.raises(PocketError, match="not a pocketgpt run folder"):
        train(tiny_config(), tmp_path / "nowhere", hf)


def test_data_dir_is_found_relative_to_the_run(tmp_path):
    assert rundir.data_dir_of(tmp_path, {"data_dir": "data"}) == tmp_path / "data"
    assert rundir.data_dir_of(tmp_path, {"data_dir": str(tmp_path / "elsewhere")}) == tmp_path / "elsewhere"
    assert rundir.data_dir_of(tmp_path / "missing") == tmp_path / "missing" / "data"


_HOLD = "import sys, time; from pocketgpt import rundir\nwith rundir.locked(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n"


def _hold_lock(path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_a_second_training_on_a_locked_folder_is_refused_naming_the_holder(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(max_iters=10), data_dir, run, echo=lambda s: None)
    metrics_before = (run / "metrics.jsonl").read_bytes()
    holder = _hold_lock(run)
    try:
        res = subprocess.run([sys.executable, "-m", "pocketgpt", "train", "--out", str(run), "--resume",
                              "--max-iters", "20"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2
        assert f"in use by a training in process {holder.pid}" in res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert (run / "metrics.jsonl").read_bytes() == metrics_before  # nothing written by the refused one
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the killed holder's lock: the next training runs
    res = train(tiny_config(max_iters=20), data_dir, run, resume=True, echo=lambda s: None)
    assert res.iters == 20


def test_the_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    with rundir.locked(tmp_path):
        with rundir.locked(tmp_path):  # launch() holds it around prepare, train() takes it again
            pass
    holder = _hold_lock(tmp_path)  # released: another process can take it now
    holder.send_signal(signal.SIGKILL)
    holder.wait()


@pytest.mark.slow
def test_two_trainings_started_together_never_interleave_metrics(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(max_iters=10), data_dir, run, echo=lambda s: None)
    # each save pauses: the runs would overlap
    cmd = [*paused_cli(1), "train", "--out", str(run), "--resume", "--max-iters", "60"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    time.sleep(0.5)
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for kind in ("loss", "val_loss"):  # one run's log lines and eval lines, each in order, none twice
        iters = [m["iter"] for m in lines if kind in m]
        assert iters == sorted(set(iters)) and iters[-1] == 60


def test_an_overwrite_that_is_refused_leaves_the_earlier_run_as_it_was(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(max_iters=10), data_dir, run, echo=lambda s: None)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(PocketError, match="needs ~"):  # the memory guard
        train(tiny_config(batch_size=100_000_000), data_dir, run, overwrite=True, echo=lambda s: None)
    with pytest.raises(PocketError, match="needs at least"):  # a context longer than the data
        train(tiny_config(block_size=5_000_000, max_iters=10), data_dir, run, overwrite=True, memory_check=False,
              echo=lambda s: None)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_each_file_is_checked_against_its_own_format_version(data_dir, tmp_path, monkeypatch, capsys):
    """config.json is written with config.CONFIG_FORMAT_VERSION and last/state.json with
    checkpoint.CHECKPOINT_FORMAT_VERSION: bumping one leaves the other file readable, and a refusal names its file."""
    from pocketgpt import checkpoint, config

    run = tmp_path / "run"
    train(tiny_config(max_iters=10), data_dir, run, echo=lambda s: None)
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "CHECKPOINT_FORMAT_VERSION", 2)
        assert rundir.read_config(run)[0].run.max_iters == 10  # config.json still loads
        with pytest.raises(PocketError, match=r"last/state.json has checkpoint format version 1, this pocketgpt reads "
                                              "version 2; use the pocketgpt version that wrote it"):
            checkpoint.load_resume_state(run)
    with monkeypatch.context() as m:
        m.setattr(config, "CONFIG_FORMAT_VERSION", 2)
        assert checkpoint.load_resume_state(run)[1]["iter"] == 10  # last/state.json still loads
        with pytest.raises(PocketError, match=r"config.json has run config format version 1 \(written by pocketgpt "
                                              r".*\), this pocketgpt reads version 2"):
            rundir.read_config(run)
    # a config.json from a newer pocketgpt, as a user meets it
    raw = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**raw, "format_version": 2, "pocketgpt_version": "9.0.0"}))
    for argv in (["info", "--model", run], ["train", "--out", run, "--resume"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and err.count("\n") == 1, err
        assert err == (f"error: {run / 'config.json'} has run config format version 2 (written by pocketgpt 9.0.0), "
                       "this pocketgpt reads version 1; upgrade pocketgpt to read it\n")
