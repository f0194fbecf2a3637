"""What a train command means (launch.py), the model built before the loop, the memory guard."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from helpers import TINY, metrics, run_cli, tiny_config, tiny_flags

from pocketgpt import launch as launching
from pocketgpt import runtime as runtime_module
from pocketgpt.config import parse_cli_overrides, parse_config_flags
from pocketgpt.errors import PocketError
from pocketgpt.metrics import MetricsLog
from pocketgpt.model import GPT
from pocketgpt.runtime import resolve
from pocketgpt.stepmodel import build_model
from pocketgpt.trainer import Trainer, train


@pytest.mark.slow
def test_launch_is_a_plain_function_that_prepares_then_trains(tmp_path, corpus_text):
    book = tmp_path / "book.txt"
    book.write_text(corpus_text[:20_000], encoding="utf-8")
    said: list[str] = []
    req = launching.TrainRequest(inputs=[str(book)], out=str(tmp_path / "run"),
                                 overrides={**TINY, "max_iters": 10})
    done = launching.launch(req, echo=said.append)
    assert done.result.iters == 10 and done.data_dir == tmp_path / "run" / "data"
    assert any(line.startswith("eval iter 10:") for line in said)  # the training's lines went to echo
    assert done.cfg.model.vocab_size == len(set(corpus_text[:20_000]))  # the config as the run saved it
    assert (done.data_dir / "train.bin").is_file()
    resumed = launching.launch(launching.TrainRequest(out=str(tmp_path / "run"), resume=True,
                                                      overrides={"max_iters": 20}))
    assert resumed.result.iters == 20 and resumed.cfg.model.n_embd == TINY["n_embd"]


def test_launch_refuses_contradictions_before_doing_anything(tmp_path):
    with pytest.raises(PocketError, match="--max-memory sizes the model of --preset auto"):
        launching.launch(launching.TrainRequest(out=str(tmp_path / "r"), max_memory="1GB"))
    with pytest.raises(PocketError, match="drop INPUT and --preset"):
        launching.launch(launching.TrainRequest(out=str(tmp_path / "r"), resume=True, preset="demo"))
    assert not (tmp_path / "r").exists()


def test_train_does_not_change_the_config_it_is_given(data_dir, tmp_path):
    cfg = tiny_config(max_iters=10)
    before = copy.deepcopy(cfg.to_dict())
    train(cfg, data_dir, tmp_path / "run", echo=lambda s: None)
    assert cfg.to_dict() == before and cfg.model.vocab_size == 0


def test_build_model_takes_an_initial_model_and_keeps_it_raw(data_dir, tmp_path):
    runtime = resolve("cpu", "float32")
    log = MetricsLog(tmp_path / "m.jsonl", echo=lambda s: None)
    vocab = Trainer.create(tiny_config(), data_dir, tmp_path, runtime, log).cfg.model.vocab_size
    shape = tiny_config().model
    shape.vocab_size = vocab
    initial = GPT(shape)
    with torch.no_grad():
        initial.transformer.wte.weight.fill_(0.125)
    t = Trainer.create(tiny_config(), data_dir, tmp_path, runtime, log, initial=initial)
    assert t.model is initial and t.net.raw is initial  # used as it is, not rebuilt
    assert t.net.ddp is None and t.net.sharded is None and not t.net.compiled  # one process: nothing around it
    assert bool((t.model.transformer.wte.weight == 0.125).all())  # not re-initialised
    with pytest.raises(PocketError, match="initial model.*does not fit"):
        build_model(shape, runtime, GPT(replace(shape, vocab_size=vocab + 1)))


@pytest.mark.slow
def test_training_from_an_initial_model_starts_from_its_weights(data_dir, tmp_path):
    """Train a run, then start a new one from its best weights: the new run's first eval is already good."""
    import pocketgpt

    first = tmp_path / "first"
    train(tiny_config(max_iters=60, eval_interval=60), data_dir, first, echo=lambda s: None)
    trained = pocketgpt.load(first).model
    second = tmp_path / "second"
    train(tiny_config(max_iters=1, eval_interval=1, learning_rate=1e-9, min_lr=0, warmup_iters=0), data_dir,
          second, initial_model=trained, echo=lambda s: None)
    scratch = tmp_path / "scratch"
    train(tiny_config(max_iters=1, eval_interval=1, learning_rate=1e-9, min_lr=0, warmup_iters=0), data_dir,
          scratch, echo=lambda s: None)
    val = {r: [m["val_loss"] for m in metrics(tmp_path / r) if "val_loss" in m] for r in ("first", "second", "scratch")}
    assert val["second"][0] == pytest.approx(val["first"][-1], abs=1e-3)
    assert val["second"][0] < val["scratch"][0] - 0.5


def test_a_model_beyond_this_machines_memory_is_refused_before_allocating(data_dir, tmp_path, capsys):
    with pytest.raises(PocketError, match=r"needs ~[\d,]+ MB to train .* this machine has [\d,]+ MB; lower --block-size"):
        train(tiny_config(block_size=100_000), data_dir, tmp_path / "run", echo=lambda s: None)
    assert not (tmp_path / "run" / "config.json").exists()
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "run2",
                           *tiny_flags(block_size=100_000))
    assert code == 2 and "--skip-memory-check" in err and len(err.strip().splitlines()) == 1


def test_the_memory_check_compares_the_estimate_with_the_device(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime_module, "device_memory_mb", lambda runtime: 0.5)  # a machine with 0.5 MB
    with pytest.raises(PocketError, match="this machine has 0 MB"):
        train(tiny_config(max_iters=5), data_dir, tmp_path / "run", echo=lambda s: None)
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "run2", "--skip-memory-check",
                           *tiny_flags(max_iters=5))
    assert code == 0, err


def test_the_last_hint_suggests_a_prompt_from_the_users_own_text(tmp_path, capsys):
    book = tmp_path / "alice.txt"
    line = "Alice was beginning to get very tired of sitting by her sister on the bank.\n"
    book.write_text(line * 400, encoding="utf-8")
    code, out, err = run_cli(capsys, "train", book, "--out", tmp_path / "run", *tiny_flags(max_iters=5))
    assert code == 0, err
    hint = out.strip().splitlines()[-1]
    assert hint.startswith("more: pocketgpt sample --model") and "ROMEO" not in hint
    assert "--prompt 'Alice was beginning to'" in hint


def test_config_flags_have_one_parser():
    rest, overrides = parse_config_flags(["book.txt", "--n-layer", "4", "--compile", "more.txt", "--bias=false",
                                          "--out", "r"], reserved=frozenset({"--out"}))
    assert rest == ["book.txt", "more.txt", "--out", "r"]
    assert overrides == {"n_layer": "4", "compile": "true", "bias": "false"}
    with pytest.raises(PocketError, match="--n-layer needs a value"):
        parse_config_flags(["--n-layer", "--compile"])
    with pytest.raises(PocketError, match="unknown option --n-layers.*n_layer"):
        parse_cli_overrides(["--n-layers", "4"])
