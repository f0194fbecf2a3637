"""`pocketgpt sample` / `chat` with the sampling flags: stop strings, repetition penalty, EOS, errors."""

from __future__ import annotations

import io

import pytest
from helpers import run_cli, tiny_config

from pocketgpt.trainer import train


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    train(tiny_config(max_iters=60, eval_interval=60), data_dir, out, echo=lambda s: None)
    return out


def _greedy(capsys, run, *extra):
    code, out, err = run_cli(capsys, "sample", "--model", run, "--prompt", "The", "--temperature", "0",
                             "--max-new-tokens", "60", *extra)
    assert code == 0, err
    assert out.startswith("The") and out.endswith("\n")
    return out[len("The"):-1]


def test_a_stop_string_spanning_tokens_ends_the_sample_and_is_not_printed(capsys, run):
    full = _greedy(capsys, run)
    stop = full[5:8]  # three characters: three tokens of a char model
    cut = full.index(stop)
    assert _greedy(capsys, run, "--stop", stop) == full[:cut]
    # several stops: the first one completed wins
    assert _greedy(capsys, run, "--stop", "never-there", "--stop", stop) == full[:cut]


def test_repetition_penalty_changes_greedy_output_and_bad_values_are_named(capsys, run):
    plain = _greedy(capsys, run)
    assert _greedy(capsys, run, "--repetition-penalty", "1.0") == plain
    assert _greedy(capsys, run, "--repetition-penalty", "3.0") != plain
    code, _, err = run_cli(capsys, "sample", "--model", run, "--repetition-penalty", "0")
    assert code == 2 and "--repetition-penalty must be positive" in err


def test_stop_at_eos_is_a_no_op_for_a_char_model(capsys, run):
    assert _greedy(capsys, run, "--stop-at-eos") == _greedy(capsys, run)


def test_chat_honours_stop_strings(capsys, run, monkeypatch):
    full = _greedy(capsys, run)
    stop = full[4:6]
    monkeypatch.setattr("sys.stdin", io.StringIO("The\n"))
    code, out, err = run_cli(capsys, "chat", "--model", run, "--temperature", "0", "--max-new-tokens", "60",
                             "--stop", stop)
    assert code == 0, err
    assert out == "The" + full[: full.index(stop)] + "\n"
