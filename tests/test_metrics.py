"""metrics.py: mirrors to TensorBoard / W&B / trackio, progress bars, GPU keys; bits per byte in `info`."""

import json
import sys
import types

import pytest
import torch

from helpers import metrics, run_cli, tiny_config, tiny_flags
from pocketgpt.metrics import terminal_bar
from pocketgpt.trainer import train


def stand_in(name: str, calls: list) -> types.ModuleType:
    """A module with the logging API of wandb / trackio that records what it is asked to do."""
    mod = types.ModuleType(name)

    class Run:
        def log(self, values, step=None):
            calls.append(("log", dict(values), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        mod.run = Run()
        return mod.run

    mod.init = init
    mod.log = lambda values, step=None: mod.run.log(values, step)
    mod.finish = lambda: mod.run.finish()
    return mod


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, data_dir):
    """One tiny run mirrored to real TensorBoard and to stand-ins for wandb and trackio."""
    pytest.importorskip("tensorboard")
    calls = {"wandb": [], "trackio": []}
    saved = {n: sys.modules.get(n) for n in calls}
    for name in calls:
        sys.modules[name] = stand_in(name, calls[name])
    out = tmp_path_factory.mktemp("logged") / "run"
    try:
        train(tiny_config(max_iters=20, loggers="tensorboard, wandb,trackio"), data_dir, out, echo=lambda s: None)
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
    return out, calls


def test_info_shows_best_bits_per_byte(logged_run, capsys):
    out, _ = logged_run
    evals = [m for m in metrics(out) if "val_loss" in m]
    best = min(evals, key=lambda m: m["val_loss"])
    code, text, _ = run_cli(capsys, "info", "--model", out, "--json")
    info = json.loads(text)
    assert code == 0 and info["best_iter"] == best["iter"]
    assert info["best_val_bpb"] == pytest.approx(best["val_bpb"])
    code, text, _ = run_cli(capsys, "info", "--model", out)
    assert f"({best['val_bpb']:.4f} bits/byte) at iter {best['iter']}" in text


def test_tensorboard_events_hold_every_record(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = logged_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    lines = metrics(out)
    loss_steps = [m["iter"] for m in lines if "loss" in m]
    assert [e.step for e in acc.Scalars("loss")] == loss_steps
    val = [(m["iter"], m["val_loss"]) for m in lines if "val_loss" in m]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("val_loss")] == val


def test_wandb_and_trackio_stand_ins_get_the_same_records(logged_run):
    out, calls = logged_run
    lines = metrics(out)
    for name, got in calls.items():
        assert got[0][0] == "init" and got[-1] == ("finish",), name
        assert got[0][1]["config"]["model"]["n_layer"] == 2
        logged = [(c[2], c[1]) for c in got if c[0] == "log"]
        assert [step for step, _ in logged] == [m["iter"] for m in lines]
        assert [v.get("loss", v.get("val_loss")) for _, v in logged] == \
            [pytest.approx(m.get("loss", m.get("val_loss"))) for m in lines]
    assert calls["wandb"][0][1]["dir"] == str(out)


@pytest.mark.parametrize("name", ["wandb", "trackio", "tensorboard"])
def test_missing_logger_fails_before_training(tmp_path, capsys, monkeypatch, data_dir, name):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "r", *tiny_flags(),
                           "--loggers", name)
    assert code == 2 and f'pip install "pocketgpt[{name}]"' in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_unknown_logger_is_named(tmp_path, capsys, data_dir):
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "r", *tiny_flags(),
                           "--loggers", "tensorbord")
    assert code == 2 and "did you mean 'tensorboard'" in err


def test_cpu_training_lines_report_mfu_against_the_measured_ceiling(tmp_path, capsys, data_dir):
    from pocketgpt import probe, rundir
    from pocketgpt.loading import load
    from pocketgpt.runtime import resolve
    from pocketgpt.plan import matmul_params, peak_flops

    code, out, err = run_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "r", *tiny_flags(max_iters=4))
    assert code == 0, err
    assert "ms/iter estimated" in out and "MFU is against" in out and "| MFU " in out
    train_lines = [m for m in metrics(tmp_path / "r") if "loss" in m]
    assert train_lines and not any("peak_mem_mb" in m for m in train_lines)  # GPU memory only on GPUs
    cfg = rundir.read_config(tmp_path / "r")[0]
    vocab = cfg.model.vocab_size
    ceiling = peak_flops(cfg, resolve("cpu", "float32"))  # the run's own (cached) measurement
    assert ceiling == probe.matmul_rate(torch.device("cpu"), torch.float32, probe.model_shapes(cfg.model, 8 * 16))
    assert cfg.model.n_embd == 32 and vocab > 0
    model = load(tmp_path / "r").model
    fpt = cfg.model.flops_per_token(matmul_params(model))
    for m in train_lines:  # the model's FLOPs per token times the logged tokens/s, against that ceiling
        assert m["mfu"] == pytest.approx(fpt * m["tokens_per_s"] / ceiling, rel=1e-2, abs=1e-4)


@pytest.mark.parametrize("flags, speedup, probed, expected", [
    (["--dtype", "bfloat16"], 2.0, True, torch.bfloat16),
    (["--dtype", "bfloat16"], 0.3, True, torch.float32),
    (["--dtype", "float32"], 2.0, False, torch.float32),  # no autocast: nothing to choose, nothing measured
    # dropout on the attention probabilities: training takes attend_dropped (bf16 products), evals fp32
    (["--dtype", "bfloat16", "--dropout", "0.1"], 2.0, False, torch.float32),
])
def test_cpu_bf16_training_runs_attention_in_the_dtype_this_cpu_measured_faster(
        tmp_path, capsys, data_dir, monkeypatch, flags, speedup, probed, expected):
    import pocketgpt.model as model_module
    from pocketgpt import probe

    monkeypatch.delenv("POCKETGPT_CPU_ATTENTION", raising=False)
    asked = []
    monkeypatch.setattr(probe, "attention_bf16_speedup", lambda device, *shape: asked.append(shape) or speedup)
    seen = set()
    real = model_module.F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.add(q.dtype)
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    code, out, err = run_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "r",
                             *tiny_flags(max_iters=2), *flags)
    assert code == 0, err
    assert asked == ([(8, 2, 16, 16)] if probed else [])  # batch, heads, context, head size of tiny_flags' model
    assert seen == {expected}
    if probed:
        assert f"bf16 autocast: attention in {'bf16' if expected == torch.bfloat16 else 'fp32'}" in out
    else:
        assert "bf16 autocast: attention" not in out


def test_a_ceiling_below_what_the_run_reaches_is_measured_again(tmp_path, capsys, data_dir, monkeypatch):
    """A probe that met a busy machine is cached too low; a run faster than it re-measures once."""
    import json

    from pocketgpt import probe
    from pocketgpt.data import read_meta

    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path / "cache"))
    from pocketgpt.config import ModelConfig

    tiny = ModelConfig(n_embd=32, n_head=2, n_layer=2, block_size=16, vocab_size=int(read_meta(data_dir)["vocab_size"]))
    shapes = probe.model_shapes(tiny, 8 * 16)
    key = probe._key(torch.device("cpu"), torch.float32, shapes)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / probe.CACHE_FILE).write_text(json.dumps({key: {"flops_per_s": 1000.0, "load": 0.0}}))  # 1 kFLOP/s, "idle": far too low
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "r", *tiny_flags(max_iters=4))
    assert code == 0, err
    remeasured = json.loads((tmp_path / "cache" / probe.CACHE_FILE).read_text())[key]["flops_per_s"]
    assert remeasured > 1e6
    last = [m for m in metrics(tmp_path / "r") if "mfu" in m][-1]
    from pocketgpt.plan import matmul_params
    from pocketgpt.loading import load

    fpt = tiny.flops_per_token(matmul_params(load(tmp_path / "r").model))
    assert last["mfu"] == pytest.approx(fpt * last["tokens_per_s"] / remeasured, rel=1e-2, abs=1e-4)
    assert last["mfu"] < 1e3  # the old ceiling gave millions


def test_eval_bar_only_on_a_terminal(tmp_path, capsys, monkeypatch, data_dir):
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "r", *tiny_flags(max_iters=2))
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", "--model", tmp_path / "r")
    assert code == 0 and "\r" not in out + err  # captured output is not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = run_cli(capsys, "eval", "--model", tmp_path / "r")
    assert code == 0 and "\r" in err and "eval" in err and "\r" not in out


def test_terminal_bar_is_none_off_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert terminal_bar(10, "x") is None


def test_a_logger_that_fails_to_start_is_named(tmp_path, capsys, monkeypatch, data_dir):
    broken = types.ModuleType("wandb")

    def init(**kw):
        raise RuntimeError("api key needed")

    broken.init = init
    monkeypatch.setitem(sys.modules, "wandb", broken)
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "r", *tiny_flags(),
                           "--loggers", "wandb")
    assert code == 2 and "could not start wandb" in err and "api key needed" in err
