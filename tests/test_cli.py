"""The command line end to end on a small corpus: prepare -> train -> sample -> eval -> info."""

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from helpers import fill_disk, metrics, paused_cli, run_cli, tiny_flags

from pocketgpt import rundir
from pocketgpt.cli import build_parser, prepare_config


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pocketgpt", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kw)


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; from pocketgpt.cli import main; main(['--help']) if False else None; " \
           "import pocketgpt.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    res = cli("train", "--help")
    assert res.returncode == 0 and "demo" in res.stdout and "shakespeare-char" in res.stdout


@pytest.mark.slow
def test_end_to_end(tmp_path, capsys, corpus_text):
    book = tmp_path / "book.txt"
    book.write_text(corpus_text, encoding="utf-8")
    data = tmp_path / "data"
    code, out, _ = run_cli(capsys, "prepare", book, "--out", data)
    assert code == 0 and "vocab" in out
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--data", data, "--out", run, *tiny_flags(max_iters=40, sample_tokens=30))
    assert code == 0, err
    assert "eval iter 40" in out and "sample from" in out
    assert json.loads((run / "config.json").read_text())["model"]["n_layer"] == 2

    code, out, _ = run_cli(capsys, "sample", "--model", run, "--prompt", "ROMEO:", "--max-new-tokens", 50, "--seed", 1)
    assert code == 0 and out.startswith("ROMEO:") and len(out.rstrip("\n")) >= len("ROMEO:") + 40
    code, again, _ = run_cli(capsys, "sample", "--model", run, "--prompt", "ROMEO:", "--max-new-tokens", 50, "--seed", 1)
    assert again == out  # seeded: reproducible
    code, multi, err = run_cli(capsys, "sample", "--model", run, "--prompt", "A", "--num-samples", 3,
                               "--max-new-tokens", 10, "--seed", 2)
    assert code == 0 and multi.count("-" * 40) == 2
    assert re.search(r"3 samples, 30 new tokens in [\d.]+s: [\d,]+ tokens/s together", err)  # the batch's rate
    assert "tokens/s" not in multi  # stdout: the samples alone

    code, out, _ = run_cli(capsys, "eval", "--model", run, "--json")
    first = json.loads(out)
    assert set(first) >= {"loss", "perplexity", "bits_per_byte", "tokens"}
    assert first["perplexity"] == pytest.approx(2.718281828 ** first["loss"], rel=1e-6)
    assert first["bits_per_byte"] == pytest.approx(first["loss"] / 0.693147, rel=1e-3)  # ASCII: 1 byte/token
    code, out, _ = run_cli(capsys, "eval", "--model", run, "--json")
    assert json.loads(out) == first  # a full deterministic pass, not a random sample
    other = tmp_path / "other.txt"
    other.write_text(corpus_text[:3000], encoding="utf-8")
    code, out, _ = run_cli(capsys, "eval", "--model", run, "--file", other, "--json")
    assert code == 0 and json.loads(out)["tokens"] == 2999

    code, out, _ = run_cli(capsys, "info", "--model", run, "--json")
    info = json.loads(out)
    assert info["iters"] == 40 and info["tokens_seen"] == 40 * 8 * 16 and info["parameters"] > 0
    assert "model.safetensors" in info["files"]
    code, out, _ = run_cli(capsys, "tokenize", "--model", run, "To be")
    assert json.loads(out)["tokens"] == ["T", "o", " ", "b", "e"]

    res = cli("chat", "--model", run, "--max-new-tokens", 15, "--seed", 1, input="First\nquit\nnever read\n")
    assert res.returncode == 0 and res.stdout.startswith("First") and "never read" not in res.stdout


@pytest.mark.parametrize("argv,message", [
    (["sample", "--model", "nowhere"], "model not found"),
    (["train", "--n-layers", "2"], "did you mean '--n-layer'"),
    (["train", "--n-embd", "100", "--n-head", "3"], "divisible"),
    (["train", "--learning-rate", "-1"], "learning_rate must be positive"),
    (["train", "--max-time", "soon"], "duration"),
    (["prepare", "/definitely/not/here.txt"], "input not found"),
    (["eval"], "required: --model"),
    (["sample", "--model", "x", "--top-p", "1.5"], r"top-p must be in \(0, 1\]"),
    (["sample", "--model", "x", "--max-new-tokens", "-1"], "max-new-tokens must be zero or positive"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_prompt_problems_are_clear(tmp_path, capsys, data_dir):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--data", data_dir, "--out", run, *tiny_flags(max_iters=10))[0] == 0
    code, out, err = run_cli(capsys, "sample", "--model", run, "--prompt", "naïve ☃")
    assert code == 2 and "U+00EF" in err and out == ""
    code, out, err = run_cli(capsys, "sample", "--model", run, "--prompt", "x" * 17)
    assert code == 2 and "context is 16" in err


def test_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    code, _, err = run_cli(capsys, "sample", "--model", tmp_path / "notes")
    assert code == 2 and "not a pocketgpt run folder" in err
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "notes", "--resume")
    assert code == 2 and "not a pocketgpt run folder" in err
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "notes", *tiny_flags())
    assert code == 2 and "not a pocketgpt run folder" in err
    assert (tmp_path / "notes" / "a.txt").read_text() == "hi"


def _wait_for(proc, path, text, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {text!r}")


@pytest.mark.slow
def test_kill_9_mid_checkpoint_write_then_resume_matches(tmp_path, data_dir):
    flags = tiny_flags(max_iters=40, lr_decay_iters=40, dropout=0.1)
    straight = tmp_path / "straight"
    assert cli("train", "--data", data_dir, "--out", straight, *flags).returncode == 0

    run, log = tmp_path / "run", tmp_path / "log.txt"

    def start(pause, *extra):
        with open(log, "w") as f:
            return subprocess.Popen([*paused_cli(pause), "train", "--data", str(data_dir),
                                     "--out", str(run), *extra, *flags], stdout=f, stderr=subprocess.STDOUT, text=True)

    proc = start(30)
    _wait_for(proc, log, "pausing in checkpoint write")  # the first save (iter 10) is half written
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "last").exists()  # the half-written folder never became last/
    res = cli("train", "--out", run, "--resume")
    assert res.returncode == 2 and "no resume state" in res.stderr  # nothing to resume yet, said clearly

    proc = start(1, "--overwrite")
    _wait_for(proc, log, "eval iter 20")  # now the iter-20 save is pausing half-way: kill it there
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((run / "last" / "state.json").read_text())["iter"] == 10  # the old one, intact
    res = cli("train", "--out", run, "--resume")
    assert res.returncode == 0, res.stderr
    a = {m["iter"]: m["loss"] for m in metrics(straight) if "loss" in m}
    b = {m["iter"]: m["loss"] for m in metrics(run) if "loss" in m}
    assert list(b) == list(range(1, 41))
    assert a == pytest.approx(b, abs=1e-5)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != rundir.LOCK]  # stale temp folders cleaned


@pytest.mark.slow
def test_kill_9_during_steps_then_resume_matches(tmp_path, data_dir):
    flags = tiny_flags(max_iters=60, lr_decay_iters=60, dropout=0.1, eval_interval=10)
    straight = tmp_path / "straight"
    assert cli("train", "--data", data_dir, "--out", straight, *flags).returncode == 0
    run, log = tmp_path / "run", tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pocketgpt", "train", "--data", str(data_dir), "--out", str(run),
                                 *flags], stdout=f, stderr=subprocess.STDOUT, text=True)
    _wait_for(proc, log, "eval iter 20")
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    res = cli("train", "--out", run, "--resume")
    assert res.returncode == 0, res.stderr
    a = {m["iter"]: m["loss"] for m in metrics(straight) if "loss" in m}
    b = {m["iter"]: m["loss"] for m in metrics(run) if "loss" in m}
    assert list(b) == list(range(1, 61))
    assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.slow
def test_ctrl_c_saves_and_says_how_to_resume(tmp_path, data_dir):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    flags = tiny_flags(max_iters=100000, eval_interval=100000, log_interval=1)
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pocketgpt", "train", "--data", str(data_dir), "--out", str(run),
                                 *flags], stdout=f, stderr=subprocess.STDOUT, text=True)
    _wait_for(proc, log, "iter     30")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    text = log.read_text()
    assert "--resume" in text and "Traceback" not in text
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["iter"] >= 30
    res = cli("train", "--out", run, "--resume", "--max-iters", state["iter"] + 5)
    assert res.returncode == 0 and f"resuming {run} at iter {state['iter']}" in res.stdout


@pytest.mark.slow
def test_kill_9_at_random_moments_until_done_matches(tmp_path, data_dir):
    """Kill -9 at random times (steps, evals, checkpoint writes alike), resume each time; same losses."""
    import random

    flags = tiny_flags(max_iters=80, lr_decay_iters=80, dropout=0.1, eval_interval=10)
    straight = tmp_path / "straight"
    assert cli("train", "--data", data_dir, "--out", straight, *flags).returncode == 0
    run, rng, kills = tmp_path / "run", random.Random(1), 0
    cmd = [sys.executable, "-m", "pocketgpt", "train", "--data", str(data_dir), "--out", str(run), *flags]
    for attempt in range(12):
        resuming = (run / "last" / "state.json").exists() or (run / "last.old" / "state.json").exists()
        extra = ["--resume"] if resuming else (["--overwrite"] if (run / "config.json").exists() else [])
        logged = _lines(run / "metrics.jsonl")
        proc = subprocess.Popen(cmd + extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # the random moment is counted from this attempt's first new step, not from its start: starting
        # Python and torch alone takes seconds on a slow machine, and a kill there tests nothing
        _wait_until(lambda: proc.poll() is not None or _lines(run / "metrics.jsonl") > logged, 120)
        try:
            proc.wait(timeout=rng.uniform(0.0, 1.5))
            break  # finished before the kill came
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
    else:
        res = cli("train", "--out", run, "--resume")
        assert res.returncode == 0, res.stderr
    assert kills >= 1
    a = {m["iter"]: m["loss"] for m in metrics(straight) if "loss" in m}
    b = {m["iter"]: m["loss"] for m in metrics(run) if "loss" in m}
    assert list(b) == list(range(1, 81))
    assert a == pytest.approx(b, abs=1e-5)


def _lines(path: Path) -> int:
    """Complete lines of a file being appended to (0 when it does not exist yet)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait_until(done: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def _resume(capsys, run):
    return run_cli(capsys, "train", "--out", run, "--resume", *tiny_flags(max_iters=20))


def _assert_full_disk_said_in_one_line(err, run, what):
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: could not write the {what} in {run}: no space left on device (about "), err
    assert err.endswith(f" free); last/ from iteration 10 is intact: free some space and run pocketgpt train "
                        f"--out {run} --resume\n"), err


def _last_and_no_temps(run):
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != rundir.LOCK]  # temps removed
    return {p.name: p.read_bytes() for p in (run / "last").iterdir()}


@pytest.mark.slow
def test_a_disk_that_fills_during_a_save_is_one_line_and_a_resume_continues(tiny_fs, data_dir, capsys):
    """A real (tmpfs) disk fills at the iter-20 save: first in last/'s optimizer.pt (torch.save's own error),
    then in the best weights (safetensors'). Each time: exit 2, one line, last/ of iter 10 whole; then space
    is freed and the same --resume trains on to the end."""
    run = tiny_fs / "run"
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", run, *tiny_flags(max_iters=10))
    assert code == 0, err
    last = _last_and_no_temps(run)
    weights, optimizer = ((run / "last" / name).stat().st_size for name in ("model.safetensors", "optimizer.pt"))
    for leave, what in ((weights + optimizer // 2, "resume checkpoint (last/)"),
                        (weights // 2, "best weights (model.safetensors)")):
        filler = fill_disk(tiny_fs, leave)
        code, _, err = _resume(capsys, run)
        assert code == 2
        _assert_full_disk_said_in_one_line(err, run, what)
        assert _last_and_no_temps(run) == last
        filler.unlink()  # "free space"
    code, out, err = _resume(capsys, run)
    assert code == 0 and "eval iter 20" in out, err
    assert json.loads((run / "last" / "state.json").read_text())["iter"] == 20


def test_a_full_disk_seen_only_through_the_writers_errors(data_dir, tmp_path, capsys, monkeypatch):
    """The same without a disk to fill: the writers fail as they do on a full disk (torch.save with its
    "unexpected pos", a disk with 4 KB left) and the CLI says so in one line; the resume continues."""
    import shutil
    import types

    import torch

    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--data", data_dir, "--out", run, *tiny_flags(max_iters=10))[0] == 0
    last = _last_and_no_temps(run)
    real_save, real_usage = torch.save, shutil.disk_usage

    def full_save(obj, f, *args, **kwargs):
        open(f, "wb").write(b"PK\x03\x04 half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 77312 vs 77200")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_save)
        m.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=1 << 30, used=(1 << 30) - 4096,
                                                                       free=4096))
        code, _, err = _resume(capsys, run)
    assert code == 2
    _assert_full_disk_said_in_one_line(err, run, "resume checkpoint (last/)")
    assert "4.1 KB free" in err and _last_and_no_temps(run) == last
    assert torch.save is real_save and shutil.disk_usage is real_usage
    code, out, err = _resume(capsys, run)
    assert code == 0 and json.loads((run / "last" / "state.json").read_text())["iter"] == 20, err


def test_a_dtype_the_machine_lacks_fails_before_preparing(capsys, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("To be, or not to be, that is the question.\n" * 50, encoding="utf-8")
    code, _, err = run_cli(capsys, "train", book, "--out", tmp_path / "run", "--device", "cpu", "--dtype", "float16")
    assert code == 2
    assert err.count("\n") == 1 and "use --dtype bfloat16 or float32" in err
    assert not (tmp_path / "run").exists()  # nothing prepared, nothing written


def test_train_accepts_the_prepare_options():
    args = build_parser().parse_args(["train", "book.txt", "--tokenizer", "bpe", "--vocab-size", "512",
                                      "--strip-gutenberg", "--encoding", "latin-1"])
    cfg = prepare_config(args, "runs/x/data")
    assert (cfg.tokenizer, cfg.vocab_size, cfg.strip_gutenberg, cfg.encoding) == ("bpe", 512, True, "latin-1")


def test_each_command_defines_its_options_in_its_own_file(monkeypatch):
    """Where is --top-p defined? Beside the command: an option of COMMAND is added in the file of cmd_COMMAND,
    or in cli/options.py when several command files share it; never in parser.py, which only assembles."""
    import argparse

    from pocketgpt.cli import COMMANDS

    where = {}  # action -> the module that added it
    add_argument = argparse._ActionsContainer.add_argument  # parsers and their groups both add through it

    def recording(self, *names, **kwargs):
        action = add_argument(self, *names, **kwargs)
        frame = sys._getframe(1)
        while frame.f_globals["__name__"] == "argparse" or frame.f_code.co_name == "add_argument":
            frame = frame.f_back  # past argparse itself and Parser.add_argument, to whoever asked
        where[action] = frame.f_globals["__name__"]
        return action

    monkeypatch.setattr(argparse._ActionsContainer, "add_argument", recording)
    parser = build_parser()
    misplaced, checked = [], 0
    for name, sub in parser.commands.items():
        home = COMMANDS[name].__module__
        for action in sub._actions:
            if "--help" in action.option_strings:
                continue
            checked += 1
            if where[action] not in (home, "pocketgpt.cli.options"):
                misplaced.append(f"{name} {action.option_strings or action.dest}: in {where[action]}, not {home}")
    assert not misplaced
    assert checked > 100 and set(parser.commands) == set(COMMANDS)
