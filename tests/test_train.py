import json
import math
import pickle
import time

import pytest
import torch

import pocketgpt
from pocketgpt import rundir
from pocketgpt.errors import PocketError, TrainingDiverged
from pocketgpt.trainer import train

from helpers import losses_by_iter, metrics, tiny_config


@pytest.mark.slow
def test_loss_falls_on_a_small_corpus(data_dir, tmp_path):
    res = train(tiny_config(max_iters=120, eval_interval=60), data_dir, tmp_path / "run", echo=lambda s: None)
    evals = [m for m in metrics(tmp_path / "run") if "val_loss" in m]
    assert math.log(pocketgpt.load(tmp_path / "run").tokenizer.vocab_size) > evals[0]["val_loss"] > evals[-1]["val_loss"]
    assert res.best_val_loss == min(e["val_loss"] for e in evals)
    assert evals[-1]["val_loss"] < 2.9  # far below uniform guessing (ln 60 ~ 4.1)


def test_metrics_lines_follow_the_contract(data_dir, tmp_path):
    train(tiny_config(max_iters=10, eval_interval=5), data_dir, tmp_path / "run", echo=lambda s: None)
    lines = metrics(tmp_path / "run")
    train_lines = [m for m in lines if "loss" in m]
    eval_lines = [m for m in lines if "val_loss" in m]
    assert [m["iter"] for m in train_lines] == list(range(1, 11))
    assert all({"iter", "loss", "lr", "tokens_per_s"} <= set(m) for m in train_lines)
    assert [m["iter"] for m in eval_lines] == [5, 10]
    assert all({"iter", "train_loss", "val_loss"} <= set(m) for m in eval_lines)


def test_exact_resume_matches_an_uninterrupted_run(data_dir, tmp_path):
    kw = dict(dropout=0.1, lr_decay_iters=40, eval_interval=10)  # dropout: the RNG state must resume too
    train(tiny_config(max_iters=40, **kw), data_dir, tmp_path / "straight", echo=lambda s: None)
    train(tiny_config(max_iters=20, **kw), data_dir, tmp_path / "resumed", echo=lambda s: None)
    train(tiny_config(max_iters=40, **kw), data_dir, tmp_path / "resumed", resume=True, echo=lambda s: None)
    a, b = losses_by_iter(tmp_path / "straight"), losses_by_iter(tmp_path / "resumed")
    assert list(a) == list(b) == list(range(1, 41))
    for it in a:
        assert abs(a[it] - b[it]) <= 1e-5, it
    assert losses_by_iter(tmp_path / "straight", "val_loss") == pytest.approx(
        losses_by_iter(tmp_path / "resumed", "val_loss"), abs=1e-5)


def test_resume_refuses_a_changed_shape_and_finishes_a_finished_run(data_dir, tmp_path):
    train(tiny_config(max_iters=10), data_dir, tmp_path / "run", echo=lambda s: None)
    with pytest.raises(PocketError, match="n_embd was 32, now 64"):
        train(tiny_config(max_iters=20, n_embd=64), data_dir, tmp_path / "run", resume=True)
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    (tmp_path / "run" / "report.md").unlink()  # as if killed after the final save, before the report
    said: list[str] = []
    result = train(tiny_config(max_iters=10), data_dir, tmp_path / "run", resume=True, echo=said.append)
    assert result.iters == 10 and any("already finished (iter 10); nothing to train" in s for s in said)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "run" / "report.md").is_file()


@pytest.mark.slow
def test_a_run_whose_time_ran_out_at_an_eval_is_finished_for_a_resume(data_dir, tmp_path, monkeypatch):
    # an eval after every step, made slow before its save, takes most of the time, so the budget runs out
    # inside an eval; the saved clock must be the one that stopped the run (once it left the eval out: a
    # resume trained a step more)
    from pocketgpt import evalsteps

    def slow_sample(ctx, ev):
        time.sleep(0.1)
        evalsteps.write_sample(ctx, ev)

    steps = tuple(slow_sample if f is evalsteps.write_sample else f for f in evalsteps.EVAL_STEPS)
    assert steps.index(slow_sample) < steps.index(evalsteps.save_last)
    monkeypatch.setattr(evalsteps, "EVAL_STEPS", steps)
    kw = dict(max_iters=10**6, eval_interval=1, eval_iters=8)
    cfg = tiny_config(max_time=1.5, **kw)
    first = train(cfg, data_dir, tmp_path / "run", echo=lambda s: None)
    state = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    assert state["iter"] == first.iters and state["elapsed"] >= 1.5
    said: list[str] = []
    again = train(cfg, data_dir, tmp_path / "run", resume=True, echo=said.append)
    assert again.iters == first.iters
    assert any("already finished" in s and "time budget (max_time 1.5 s) is spent" in s and "--max-time" in s
               for s in said), said
    # seconds beyond the clock it stopped at (on a loaded machine that clock can be well past 1.5 s)
    more = state["elapsed"] + 5
    longer = train(tiny_config(max_time=more, **kw), data_dir, tmp_path / "run", resume=True, echo=lambda s: None)
    assert longer.iters > first.iters


def test_a_budget_too_short_for_the_model_is_said_before_it_starts(data_dir, tmp_path, monkeypatch):
    import pocketgpt.plan

    monkeypatch.setattr(pocketgpt.plan, "iter_seconds", lambda *a: 0.5)  # the estimate, on any machine
    said: list[str] = []
    train(tiny_config(max_time=2), data_dir, tmp_path / "short", echo=said.append)
    notes = [s for s in said if s.startswith("note: at ~") and "fewer than 10 iterations" in s]
    assert len(notes) == 1 and "(2 batches a split)" in notes[0] and "--preset cpu-15min" in notes[0], said
    said.clear()
    train(tiny_config(max_time=60, max_iters=5), data_dir, tmp_path / "fits", echo=said.append)
    train(tiny_config(max_time=2, max_iters=3), data_dir, tmp_path / "few", echo=said.append)  # 3 of 4 fit
    assert not [s for s in said if "fewer than" in s]


def test_existing_run_is_not_overwritten_without_asking(data_dir, tmp_path):
    train(tiny_config(max_iters=10), data_dir, tmp_path / "run", echo=lambda s: None)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(PocketError, match="already holds a training run"):
        train(tiny_config(max_iters=10), data_dir, tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    train(tiny_config(max_iters=10, seed=8), data_dir, tmp_path / "run", overwrite=True, echo=lambda s: None)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() != before


def test_interrupted_checkpoint_write_keeps_the_old_one(data_dir, tmp_path, monkeypatch):
    from pocketgpt import checkpoint

    run = tmp_path / "run"
    train(tiny_config(max_iters=10), data_dir, run, echo=lambda s: None)
    old_state = json.loads((run / "last" / "state.json").read_text())

    def broken_save_file(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save_file)
    with pytest.raises(PocketError, match=r"no space left on device \(about .* needed, .* free\); last/ from iteration 10 "
                                          r"is intact: free some space and run pocketgpt train --out .* --resume$"):
        train(tiny_config(max_iters=20), data_dir, run, resume=True, echo=lambda s: None)
    monkeypatch.undo()
    assert json.loads((run / "last" / "state.json").read_text()) == old_state
    assert not [p for p in run.iterdir() if p.name.startswith(".") and p.name != rundir.LOCK]  # no temp folders left behind
    _, state, _, _ = checkpoint.load_resume_state(run)
    assert state["iter"] == 10
    train(tiny_config(max_iters=20), data_dir, run, resume=True, echo=lambda s: None)  # and it resumes fine


def test_kill_between_the_two_renames_falls_back_to_last_old(data_dir, tmp_path):
    from pocketgpt.checkpoint import resume_dir

    run = tmp_path / "run"
    train(tiny_config(max_iters=10), data_dir, run, echo=lambda s: None)
    (run / "last").rename(run / "last.old")  # what a kill between the renames leaves
    assert resume_dir(run) == run / "last.old"
    train(tiny_config(max_iters=20), data_dir, run, resume=True, echo=lambda s: None)
    assert json.loads((run / "last" / "state.json").read_text())["iter"] == 20


def poison_training_forward(monkeypatch, at_call: int) -> None:
    """The at_call-th training forward from now on returns a NaN loss."""
    from pocketgpt.model import GPT

    real_forward, calls = GPT.forward, {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)


def test_non_finite_loss_stops_without_applying_the_step(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(max_iters=10), data_dir, run, echo=lambda s: None)
    weights = (run / "model.safetensors").read_bytes()
    poison_training_forward(monkeypatch, at_call=3)
    with pytest.raises(TrainingDiverged, match=r"iter 12.*not applied.*learning rate"):
        train(tiny_config(max_iters=30), data_dir, run, resume=True, echo=lambda s: None)
    assert (run / "model.safetensors").read_bytes() == weights
    assert json.loads((run / "last" / "state.json").read_text())["iter"] == 10


def test_malicious_pickle_in_a_checkpoint_is_refused_not_run(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(max_iters=10), data_dir, run, echo=lambda s: None)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (run / "last" / "optimizer.pt").write_bytes(pickle.dumps({"state": Evil()}))
    with pytest.raises(PocketError, match="refusing to load"):
        train(tiny_config(max_iters=20), data_dir, run, resume=True, echo=lambda s: None)
    assert not marker.exists()


def test_corrupted_weights_are_a_clear_error(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(max_iters=10), data_dir, run, echo=lambda s: None)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PocketError, match="truncated or corrupted"):
        pocketgpt.load(run)
    assert pocketgpt.load(run, checkpoint="last").model is not None


@pytest.mark.slow
def test_max_time_budget_ends_the_run_with_decayed_lr(data_dir, tmp_path):
    res = train(tiny_config(max_iters=10**6, max_time=2.0, schedule="wsd", decay_fraction=1.0, warmup_iters=0,
                            eval_interval=10**6, log_interval=1), data_dir, tmp_path / "run", echo=lambda s: None)
    lines = metrics(tmp_path / "run")
    assert 2 <= res.iters < 10**6
    assert lines[-1]["iter"] == res.iters and "val_loss" in lines[-1]  # final eval + save
    lrs = [m["lr"] for m in lines if "lr" in m]
    assert lrs[0] == pytest.approx(3e-3, rel=0.2) and lrs[-1] < lrs[0]  # decay follows the clock
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    assert lines[-1]["elapsed"] >= 2.0


def test_gradient_accumulation_equals_one_big_batch(data_dir, tmp_path):
    """Two micro-batches of 4 make the same update as one batch of the same 8 sequences."""
    from pocketgpt.metrics import MetricsLog
    from pocketgpt.runtime import resolve
    from pocketgpt.trainer import Trainer

    def one_step(batch_size, accum, batches):
        cfg = tiny_config(batch_size=batch_size, grad_accum_steps=accum, weight_decay=0.0)
        t = Trainer.create(cfg, data_dir, tmp_path, resolve("cpu", "float32"), MetricsLog(tmp_path / "m.jsonl"))
        t.sampler.batch = lambda step, micro: batches[micro]
        loss, _ = t.step(0, 1e-3)
        return loss, [p.detach().clone() for p in t.model.parameters()]

    from pocketgpt.data import BatchSampler, open_tokens

    tokens, _ = open_tokens(data_dir / "train.bin")
    x, y = BatchSampler(tokens, 16, 8, seed=1).batch(0)
    big_loss, big = one_step(8, 1, {0: (x, y)})
    acc_loss, acc = one_step(4, 2, {0: (x[:4], y[:4]), 1: (x[4:], y[4:])})
    assert acc_loss == pytest.approx(big_loss, abs=1e-5)
    for a, b in zip(big, acc):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_checkpoint_from_another_format_version_is_refused(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(max_iters=10), data_dir, run, echo=lambda s: None)
    cfg = json.loads((run / "config.json").read_text())
    cfg["format_version"] = 99
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PocketError, match="format version 99"):
        pocketgpt.load(run)
    with pytest.raises(PocketError, match="format version 99"):
        train(tiny_config(max_iters=20), data_dir, run, resume=True)


def test_corpus_shorter_than_the_context_says_what_is_needed(tmp_path):
    from pocketgpt.config import PrepareConfig
    from pocketgpt.corpus import prepare

    (tmp_path / "short.txt").write_text("a tiny text of a few words, " * 4)
    data = prepare(PrepareConfig(inputs=[str(tmp_path / "short.txt")], out=str(tmp_path / "d")))
    with pytest.raises(PocketError, match=r"val split has 12 tokens but block_size 16 needs at least 17.*--val-fraction"):
        train(tiny_config(), data, tmp_path / "run")
    with pytest.raises(PocketError, match=r"train split has 100 tokens but block_size 128 needs at least 129"):
        train(tiny_config(block_size=128), data, tmp_path / "run")


@pytest.mark.slow
def test_samples_during_training_and_early_stopping(data_dir, tmp_path, capsys):
    # a big model on a small corpus with a high learning rate overfits within a few evals
    cfg = tiny_config(max_iters=400, eval_interval=10, eval_iters=4, n_embd=96, n_layer=3, n_head=3,
                      learning_rate=1e-2, min_lr=1e-2, schedule="constant", early_stop_patience=2,
                      eval_sample_tokens=40)
    lines = []
    res = train(cfg, data_dir, tmp_path / "run", echo=lines.append)
    evals = [m for m in metrics(tmp_path / "run") if "val_loss" in m]
    best = min(e["val_loss"] for e in evals)
    assert res.iters < 400 and any(l.startswith("early stop: 2 evals") for l in lines)
    assert [e["val_loss"] for e in evals][-3] == best  # stopped exactly 2 evals after the best
    saved = pocketgpt.load(tmp_path / "run").info
    assert float(saved["val_loss"]) == pytest.approx(best, abs=1e-6)
    samples = (tmp_path / "run" / "samples.txt").read_text()
    assert samples.count("=== iter") == len(evals) and "=== iter 10 " in samples
    assert sum(l.startswith("sample: ") for l in lines) == len(evals)


def test_training_draws_plots_and_writes_a_report(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(max_iters=20, plots=True), data_dir, run, echo=lambda s: None)
    pngs = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert "loss.png" in pngs and all((run / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    report = (run / "report.md").read_text()
    assert "plots/loss.png" in report and "val" in report.lower()


def test_fp16_gradient_scaler_skips_overflowing_steps_without_error(data_dir, tmp_path):
    """With float16 a step whose gradients overflow is skipped by the scaler: normal, not divergence."""
    from pocketgpt.metrics import MetricsLog
    from pocketgpt.runtime import Runtime
    from pocketgpt.trainer import Trainer

    runtime = Runtime(torch.device("cpu"), torch.float16, "test: fp16 on CPU to exercise the scaler")
    t = Trainer.create(tiny_config(), data_dir, tmp_path, runtime, MetricsLog(tmp_path / "m.jsonl"))
    assert t.scaler.is_enabled()
    t.step(0, 1e-3)
    scale = t.scaler.get_scale()
    before = [p.detach().clone() for p in t.model.parameters()]
    handle = t.model.transformer.wte.weight.register_hook(lambda g: g * float("inf"))
    loss, grad_norm = t.step(1, 1e-3)  # must not raise
    handle.remove()
    assert math.isfinite(loss) and not math.isfinite(grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))  # the step was skipped
    assert t.scaler.get_scale() < scale  # and the scale backed off
    t.step(2, 1e-3)
    assert not all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))  # training goes on


def _lazy_reads(monkeypatch):
    """Make the CPU trainer read losses the GPU way: at log and eval steps only."""
    from pocketgpt.trainer import Trainer

    real_init = Trainer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        self.read_every_step = False

    monkeypatch.setattr(Trainer, "__init__", init)


def test_reading_the_loss_only_at_log_steps_logs_the_same_losses(data_dir, tmp_path, monkeypatch):
    kw = dict(max_iters=20, eval_interval=10, log_interval=5)
    train(tiny_config(**kw), data_dir, tmp_path / "eager", echo=lambda s: None)
    _lazy_reads(monkeypatch)
    train(tiny_config(**kw), data_dir, tmp_path / "lazy", echo=lambda s: None)
    eager, lazy = losses_by_iter(tmp_path / "eager"), losses_by_iter(tmp_path / "lazy")
    assert list(lazy) == [5, 10, 15, 20]
    assert lazy == eager
    assert losses_by_iter(tmp_path / "lazy", "val_loss") == losses_by_iter(tmp_path / "eager", "val_loss")


def test_an_unread_non_finite_step_is_caught_before_anything_is_saved(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(max_iters=10, log_interval=5), data_dir, run, echo=lambda s: None)
    weights = (run / "model.safetensors").read_bytes()
    poison_training_forward(monkeypatch, at_call=2)  # iter 11: not a log step
    _lazy_reads(monkeypatch)
    with pytest.raises(TrainingDiverged, match=r"between iter 10 and iter 14"):
        train(tiny_config(max_iters=30, log_interval=5), data_dir, run, resume=True, echo=lambda s: None)
    assert (run / "model.safetensors").read_bytes() == weights
    assert json.loads((run / "last" / "state.json").read_text())["iter"] == 10


@pytest.mark.slow
def test_bf16_autocast_on_cpu_learns_like_float32(data_dir, tmp_path):
    kw = dict(max_iters=120, eval_interval=60)
    fp32 = train(tiny_config(**kw), data_dir, tmp_path / "fp32", echo=lambda s: None)
    said: list[str] = []
    bf16 = train(tiny_config(dtype="bfloat16", **kw), data_dir, tmp_path / "bf16", echo=said.append)
    assert any("cpu, bfloat16" in line and "asked for" in line for line in said)
    assert bf16.best_val_loss < 2.9
    assert abs(bf16.best_val_loss - fp32.best_val_loss) < 0.05


def test_a_ctrl_c_that_lands_while_the_ranks_agree_still_stops_the_run(data_dir, tmp_path, monkeypatch):
    """Under torchrun most of a step's idle time is the end-of-step agreement; a Ctrl-C whose handler runs
    there (after the agreement read the flag, before its answer is stored) must not be overwritten by it."""
    import os
    import signal

    from pocketgpt import distributed

    calls = []

    def agree_hit_by_ctrl_c(self, stop, elapsed):
        calls.append(stop)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside the agreement
        return stop, elapsed

    monkeypatch.setattr(distributed.Group, "agree", agree_hit_by_ctrl_c)
    res = train(tiny_config(max_iters=50, eval_interval=50), data_dir, tmp_path / "run", echo=lambda s: None)
    assert res.interrupted and res.iters == 4  # the press is agreed on at the next step's end
    assert json.loads((tmp_path / "run" / "last" / "state.json").read_text())["iter"] == 4
