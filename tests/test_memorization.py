"""`eval --memorization`: greedy continuations of prompts from the training text, compared with it."""

import json
import random

import numpy as np
import pytest

from helpers import run_cli, tiny_config
from pocketgpt.config import PrepareConfig
from pocketgpt.corpus import prepare
from pocketgpt.data import open_tokens
from pocketgpt.errors import PocketError
from pocketgpt.loading import load
from pocketgpt.memorize import memorization, prompt_starts, score
from pocketgpt.model import GPT
from pocketgpt.trainer import train


# 250 iterations of training, the longest setup there was in the quick loop: every test using it is slow
@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    """A tiny model trained until it knows a short passage (repeated, so it fills both splits) by heart."""
    rng = random.Random(0)
    passage = "".join(rng.choice("abcdefghij klmnop\n") for _ in range(160))
    root = tmp_path_factory.mktemp("memo")
    (root / "book.txt").write_text(passage * 25, encoding="utf-8")
    data = prepare(PrepareConfig(inputs=[str(root / "book.txt")], out=str(root / "data")))
    cfg = tiny_config(n_embd=64, max_iters=250, eval_interval=250, batch_size=16, learning_rate=1e-2,
                      min_lr=1e-3, warmup_iters=10)
    train(cfg, data, root / "run", echo=lambda line: None)
    return root / "run", data


@pytest.mark.slow
def test_trained_model_reproduces_its_text_and_untrained_does_not(memorized):
    run, data = memorized
    tokens, _ = open_tokens(data / "train.bin")
    model = load(run)
    learned = memorization(model.model, tokens, prompts=24, continuation_tokens=24)
    assert learned["exact_match"] >= 0.9 and learned["token_accuracy"] >= 0.95
    assert learned["prompt_tokens"] == model.block_size // 2 and learned["prompts"] == 24
    fresh = GPT(model.model.config)  # same shape, random weights
    blank = memorization(fresh, tokens, prompts=24, continuation_tokens=24)
    assert blank["exact_match"] == 0.0 and blank["mean_prefix_share"] < 0.2


@pytest.mark.slow
def test_cli_json_and_text(memorized, capsys):
    run, _ = memorized
    code, out, err = run_cli(capsys, "eval", "--model", run, "--memorization", "--json", "--prompts", 10,
                             "--prompt-tokens", 6, "--continuation-tokens", 12)
    assert code == 0, err
    r = json.loads(out)
    assert set(r) >= {"exact_match", "mean_prefix_tokens", "mean_prefix_share", "token_accuracy", "prompts",
                      "prompt_tokens", "continuation_tokens"}
    assert (r["prompts"], r["prompt_tokens"], r["continuation_tokens"]) == (10, 6, 12)
    assert r["mean_prefix_share"] == pytest.approx(r["mean_prefix_tokens"] / 12)
    code, out, err = run_cli(capsys, "eval", "--model", run, "--memorization", "--prompts", 4)
    assert code == 0 and "continuations exact" in out and "token accuracy" in out
    assert "\r" not in out + err  # not a terminal: no progress bar redraws


@pytest.mark.slow
@pytest.mark.parametrize("flags,message", [
    (["--prompts", "-1"], "--prompts must be at least 1"),
    (["--continuation-tokens", "0"], "--continuation-tokens must be at least 1"),
    (["--prompt-tokens", "17"], "exceeds the model's context of 16"),
    (["--prompt-tokens", "16", "--continuation-tokens", "100000"], "lower them"),
])
def test_bad_options_exit_2(memorized, capsys, flags, message):
    run, _ = memorized
    code, out, err = run_cli(capsys, "eval", "--model", run, "--memorization", *flags)
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.slow
def test_memorization_options_need_the_flag(memorized, capsys):
    code, _, err = run_cli(capsys, "eval", "--model", memorized[0], "--prompts", 4)
    assert code == 2 and "--memorization" in err


def test_score_counts_prefixes_and_tokens():
    truth = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    predicted = np.array([[1, 2, 3, 4], [1, 2, 0, 4], [0, 2, 3, 4]])
    s = score(predicted, truth)
    assert s["exact_match"] == pytest.approx(1 / 3)
    assert s["mean_prefix_tokens"] == pytest.approx((4 + 2 + 0) / 3)
    assert s["mean_prefix_share"] == pytest.approx(0.5)
    assert s["token_accuracy"] == pytest.approx(10 / 12)


def test_prompt_starts_are_even_and_in_range():
    starts = prompt_starts(1000, 5, 10, 20, block_size=16)
    assert starts.tolist() == [0, 242, 485, 728, 970]  # 0 .. 1000 - 30, evenly spaced (242.5 rounds to even)
    with pytest.raises(PocketError, match="only 20 tokens"):
        prompt_starts(20, 5, 10, 11, block_size=16)
