"""Each eval step alone, on a hand-made context: no training loop needed."""

from __future__ import annotations

import math

import torch
from helpers import tiny_config

from pocketgpt import evalsteps
from pocketgpt.metrics import MetricsLog, read_metrics
from pocketgpt.model import GPT
from pocketgpt.tokenizer import CharTokenizer
from pocketgpt.trainstate import RunState


def _context(tmp_path, **run_keys):
    cfg = tiny_config(**run_keys)
    cfg.model.vocab_size = 5
    said: list[str] = []
    saves: list[int] = []
    state = RunState()
    torch.manual_seed(0)
    ctx = evalsteps.EvalContext(tmp_path, cfg, state, MetricsLog(tmp_path / "metrics.jsonl", said.append),
                                GPT(cfg.model), CharTokenizer(list("\nabcd")), lambda: saves.append(state.iter))
    return ctx, said, saves


def _evaluate(ctx, it, train_loss, val_loss):
    ctx.state.iter = it
    ev = evalsteps.record(ctx.state, {"train": train_loss, "val": val_loss}, val_bytes_per_token=1.0)
    for step in evalsteps.EVAL_STEPS:
        step(ctx, ev)
    return ev


def test_record_keeps_the_best_and_counts_evals_since(tmp_path):
    ctx, _, _ = _context(tmp_path)
    ev = _evaluate(ctx, 10, 2.0, 2.1)
    assert ev.improved and ctx.state.best_val_loss == 2.1 and ctx.state.best_iter == 10
    assert ev.val_bpb == 2.1 / math.log(2)
    ev = _evaluate(ctx, 20, 1.9, 2.2)
    assert not ev.improved and ctx.state.evals_since_best == 1 and ctx.state.best_iter == 10


def test_best_weights_are_written_only_when_val_improves(tmp_path):
    ctx, _, saves = _context(tmp_path)
    _evaluate(ctx, 10, 2.0, 2.1)
    best = (tmp_path / "model.safetensors").read_bytes()
    with torch.no_grad():
        ctx.model.transformer.wte.weight.add_(1.0)
    _evaluate(ctx, 20, 1.9, 2.2)
    assert (tmp_path / "model.safetensors").read_bytes() == best
    assert saves == [10, 20]  # last/ at every eval
    assert [m["iter"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [10, 20]


def test_overfitting_is_noted_and_early_stop_waits_for_its_patience(tmp_path):
    ctx, said, _ = _context(tmp_path, early_stop_patience=2)
    _evaluate(ctx, 10, 2.0, 2.0)
    _evaluate(ctx, 20, 1.8, 2.1)
    assert any(s.startswith("note: val loss has not improved for 1 eval") for s in said)
    assert not ctx.stop_requested
    _evaluate(ctx, 30, 1.6, 2.2)
    assert ctx.stop_requested and any(s.startswith("early stop: 2 evals") for s in said)


def test_no_overfitting_note_when_train_loss_rises_too(tmp_path):
    ctx, said, _ = _context(tmp_path)
    _evaluate(ctx, 10, 2.0, 2.0)
    _evaluate(ctx, 20, 2.5, 2.6)
    assert not any(s.startswith("note:") for s in said) and not ctx.stop_requested


def test_a_sample_is_written_per_eval_and_leaves_the_training_rng_alone(tmp_path):
    ctx, said, _ = _context(tmp_path, eval_sample_tokens=12)
    rng = torch.get_rng_state()
    _evaluate(ctx, 10, 2.0, 2.0)
    assert torch.equal(rng, torch.get_rng_state())
    text = (tmp_path / "samples.txt").read_text()
    assert text.startswith("=== iter 10 (val loss 2.0000) ===\n") and ctx.model.training
    assert any(s.startswith("sample: ") for s in said)
    ctx.model.eval()  # a model kept in eval mode (a moving average of the weights) stays in it
    _evaluate(ctx, 20, 1.9, 1.9)
    assert not ctx.model.training


def test_a_failing_plot_is_a_warning_not_a_stop(tmp_path, monkeypatch):
    import pocketgpt.plots

    ctx, said, _ = _context(tmp_path, plots=True)

    def broken(run_dir):
        raise RuntimeError("no backend")

    monkeypatch.setattr(pocketgpt.plots, "write_plots", broken)
    _evaluate(ctx, 10, 2.0, 2.0)
    assert any("warning: could not draw plots (RuntimeError: no backend)" in s for s in said)
