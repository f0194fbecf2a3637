"""plots.py, report.py and `pocketgpt plot`, on a fake run folder (no training, no torch needed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from conftest import run_cli  # noqa: E402
from pocketgpt.errors import PocketError  # noqa: E402
from pocketgpt.plots import compare_runs, write_plots  # noqa: E402
from pocketgpt.report import count_parameters, write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOT_NAMES = ["loss.png", "lr.png", "grad_norm.png", "step_time.png", "tokens_per_s.png"]
VOCAB, EMBD, BLOCK = 65, 16, 32


def _metrics(n_iters: int, log_every: int = 10, eval_every: int = 250, scale: float = 1.0) -> list[dict]:
    """Training lines every log_every iters and eval lines every eval_every, with the oddities a real log has."""
    rng = np.random.default_rng(0)
    lines: list[dict] = []
    for it in range(log_every, n_iters + 1, log_every):
        loss = scale * (1.4 + 2.8 * math.exp(-it / 600)) + float(rng.normal(0, 0.05))
        lr = 3e-3 * min(1.0, it / 100) * (0.5 + 0.5 * math.cos(math.pi * it / n_iters))
        ms = 5000.0 if it == log_every else 70 + float(rng.normal(0, 5))  # the first window compiles
        lines.append({"iter": it, "loss": loss, "lr": lr, "tokens_per_s": 8 * BLOCK * 1000 / ms,
                      "ms_per_iter": ms, "grad_norm": 0.9 * math.exp(-it / 2000) + 0.2,
                      "tokens_seen": it * 8 * BLOCK, "elapsed": it * 0.07})
        if it % eval_every == 0:
            val = scale * (1.6 + 2.6 * math.exp(-it / 700))
            lines.append({"iter": it, "train_loss": loss - 0.02, "val_loss": val, "val_bpb": val / math.log(2),
                          "elapsed": it * 0.07, "tokens_seen": it * 8 * BLOCK})
    lines[3]["grad_norm"] = "nan"  # how MetricsLog writes a non-finite float
    lines[4]["loss"] = "inf"
    del lines[5]["lr"]
    del lines[6]["ms_per_iter"]
    return lines


def make_run(root: Path, name: str = "run", n_iters: int = 3000, scale: float = 1.0) -> Path:
    """A run folder as training leaves it: metrics, config, data meta, last/state.json, weights, samples."""
    from safetensors.numpy import save_file

    run = root / name
    (run / "last").mkdir(parents=True)
    (run / "data").mkdir()
    records = _metrics(n_iters, scale=scale)
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"iter": 99999, "loss": 1.2'  # a line cut by a kill
    (run / "metrics.jsonl").write_text(text)
    config = {"format_version": 1, "data_dir": "data",
              "model": {"vocab_size": VOCAB, "block_size": BLOCK, "n_layer": 1, "n_head": 2, "n_embd": EMBD,
                        "tie_embeddings": True},
              "optim": {"learning_rate": 3e-3, "grad_clip": 1.0, "schedule": "cosine"},
              "run": {"batch_size": 8, "grad_accum_steps": 1, "max_iters": n_iters}}
    (run / "config.json").write_text(json.dumps(config))
    (run / "data" / "meta.json").write_text(json.dumps({
        "tokenizer": "char", "vocab_size": VOCAB,
        "splits": {"train": {"tokens": 9000, "bytes": 9100}, "val": {"tokens": 1000, "bytes": 1010}},
        "sources": [{"path": "book.txt", "bytes": 10110, "sha256": "0" * 64}]}))
    evals = [r for r in records if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    (run / "last" / "state.json").write_text(json.dumps({
        "format_version": 1, "iter": n_iters, "tokens_seen": n_iters * 8 * BLOCK, "elapsed": n_iters * 0.07,
        "best_val_loss": best["val_loss"], "best_iter": best["iter"]}))
    save_file(_weights(), str(run / "model.safetensors"))  # the tied head stored once, as save_model does
    (run / "samples.txt").write_text("".join(f"=== iter {i} (val loss 1.9) ===\nROMEO:\nsample ``` {i}\n\n"
                                             for i in range(250, n_iters + 1, 250)))
    return run


def _weights() -> dict[str, np.ndarray]:
    z = np.zeros
    return {"lm_head.weight": z((VOCAB, EMBD), np.float32), "transformer.wpe.weight": z((BLOCK, EMBD), np.float32),
            "transformer.h.0.attn.c_attn.weight": z((3 * EMBD, EMBD), np.float32),
            "transformer.ln_f.weight": z((EMBD,), np.float32)}


EXPECTED_PARAMS = VOCAB * EMBD + BLOCK * EMBD + 3 * EMBD * EMBD + EMBD


def assert_png(path: Path, min_size: tuple[int, int] = (600, 350)) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    height, width = imread(path).shape[:2]
    assert width >= min_size[0] and height >= min_size[1], (path, width, height)
    assert width <= 2000 and height <= 1200, (path, width, height)


# ---------------------------------------------------------------- write_plots

def test_write_plots_draws_every_picture(tmp_path):
    run = make_run(tmp_path)
    paths = write_plots(run)
    assert [p.name for p in paths] == PLOT_NAMES
    for p in paths:
        assert p.parent == run / "plots"
        assert_png(p)
    assert not [p for p in (run / "plots").iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_write_plots_replaces_pictures_in_place(tmp_path):
    run = make_run(tmp_path)
    first = write_plots(run)
    second = write_plots(run)
    assert first == second
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(PLOT_NAMES)


def test_empty_metrics_draws_nothing_and_does_not_crash(tmp_path):
    run = make_run(tmp_path)
    (run / "metrics.jsonl").write_text("")
    assert write_plots(run) == []
    assert not (run / "plots").exists()
    text = write_report(run).read_text()
    assert "**Best val loss:**" in text and "at iter" in text  # from last/state.json when the log is empty
    (run / "last" / "state.json").unlink()
    assert "no evaluation yet" in write_report(run).read_text()


def test_one_line_metrics_draws_what_it_can(tmp_path):
    run = make_run(tmp_path)
    (run / "metrics.jsonl").write_text(json.dumps({"iter": 10, "loss": 4.1, "lr": 1e-4, "grad_norm": "nan",
                                                   "tokens_per_s": 1000.0, "ms_per_iter": 70.0}) + "\n")
    names = [p.name for p in write_plots(run)]
    assert names == ["loss.png", "lr.png", "step_time.png", "tokens_per_s.png"]  # grad_norm has no finite value
    for name in names:
        assert_png(run / "plots" / name)


def test_only_eval_lines(tmp_path):
    run = make_run(tmp_path)
    (run / "metrics.jsonl").write_text(json.dumps({"iter": 250, "train_loss": 2.0, "val_loss": 2.1}) + "\n")
    assert [p.name for p in write_plots(run)] == ["loss.png"]


def test_bits_per_byte_after_the_data_changed(tmp_path):
    """A resume on other data changes bytes per token: bpb gets its own line instead of a derived axis."""
    run = make_run(tmp_path)
    lines = [{"iter": 250 * i, "train_loss": 2.0, "val_loss": 2.1, "val_bpb": 3.0 + i} for i in range(1, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert_png(write_plots(run)[0])


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(PocketError, match="pip install"):
        write_plots(make_run(tmp_path))


def test_a_folder_without_metrics_is_refused(tmp_path):
    with pytest.raises(PocketError, match="not a pocketgpt run folder"):
        write_plots(tmp_path)
    with pytest.raises(PocketError, match="not a folder"):
        write_plots(tmp_path / "missing")


# ---------------------------------------------------------------- compare_runs

def test_compare_runs_writes_one_png(tmp_path):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", n_iters=2000, scale=0.9)
    out = compare_runs([a, b], tmp_path / "figs" / "cmp.png")
    assert out == tmp_path / "figs" / "cmp.png"
    assert_png(out, min_size=(1000, 400))


def test_compare_runs_without_tokens_seen_uses_the_config(tmp_path):
    run = make_run(tmp_path)
    old = [{k: v for k, v in r.items() if k != "tokens_seen"} for r in _metrics(1000)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert_png(compare_runs([run, make_run(tmp_path, "other")], tmp_path / "c.png"), min_size=(1000, 400))


def test_compare_runs_refuses_a_non_run(tmp_path):
    with pytest.raises(PocketError, match="no metrics.jsonl"):
        compare_runs([make_run(tmp_path), tmp_path], tmp_path / "c.png")


# ---------------------------------------------------------------- report

def test_report(tmp_path):
    run = make_run(tmp_path)
    write_plots(run)
    text = write_report(run).read_text()
    evals = [r for r in _metrics(3000) if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    assert "# Training report: run" in text
    assert f"{best['val_loss']:.4f}" in text and f"{best['val_bpb']:.4f} bits per byte" in text
    assert f"{EXPECTED_PARAMS:,} parameters" in text
    assert "3,000 iterations" in text and f"{3000 * 8 * BLOCK:,} tokens seen" in text
    for name in PLOT_NAMES:
        assert f"](plots/{name})" in text
    assert "| `grad_clip` | 1.0 |" in text and "| `schedule` | cosine |" in text
    assert "**Tokenizer:** char, vocabulary 65" in text and "`book.txt`" in text
    assert "```` text" not in text and "````text\n=== iter" in text  # samples hold ``` so the fence is longer


def test_report_eval_table_is_subsampled(tmp_path):
    run = make_run(tmp_path, n_iters=20_000)  # 80 evals
    text = write_report(run).read_text()
    section = text.split("## Evaluations")[1].split("\n## ")[0]
    assert "30 of 80" in section
    table = [line for line in section.splitlines() if line.startswith("| ") and "loss" not in line]
    assert 30 <= len(table) <= 31  # 30 evenly spaced, plus the best when it falls between them
    assert table[0].startswith("| 250 |")
    assert table[-1].startswith("| 20,000 |")
    assert "(best)" in text


def test_report_survives_missing_files(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iter": 1, "loss": 4.0}\n')
    text = write_report(run).read_text()
    assert "No readable `config.json`" in text and "None yet" in text


def test_count_parameters_counts_a_tied_head_once(tmp_path):
    from safetensors.numpy import save_file

    both = {**_weights(), "transformer.wte.weight": np.zeros((VOCAB, EMBD), np.float32)}
    save_file(both, str(tmp_path / "both.safetensors"))
    assert count_parameters(tmp_path / "both.safetensors", tied=True) == EXPECTED_PARAMS
    assert count_parameters(tmp_path / "both.safetensors", tied=False) == EXPECTED_PARAMS + VOCAB * EMBD
    assert count_parameters(tmp_path / "missing.safetensors") is None


# ---------------------------------------------------------------- CLI

def test_plot_cli_one_run(tmp_path, capsys):
    run = make_run(tmp_path)
    code, out, err = run_cli(capsys, "plot", run)
    assert code == 0, err
    printed = out.split()
    assert printed == [str(run / "plots" / n) for n in PLOT_NAMES] + [str(run / "report.md")]


def test_plot_cli_several_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, "a"), make_run(tmp_path, "b")
    code, out, err = run_cli(capsys, "plot", "a", "b")
    assert code == 0, err
    assert out.strip() == "runs-compare.png"
    assert_png(tmp_path / "runs-compare.png", min_size=(1000, 400))
    code, out, _ = run_cli(capsys, "plot", "a", "b", "--out", "x/cmp.png")
    assert code == 0 and out.strip() == "x/cmp.png"
    assert_png(tmp_path / "x" / "cmp.png", min_size=(1000, 400))


def test_plot_cli_refuses_a_non_run_in_one_line(tmp_path, capsys):
    code, out, err = run_cli(capsys, "plot", tmp_path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "not a pocketgpt run folder" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "plot", make_run(tmp_path), tmp_path / "nope")
    assert code == 2 and err.count("\n") == 1


def test_plot_cli_does_not_import_torch(tmp_path):
    run = make_run(tmp_path)
    code = ("import sys; from pocketgpt.cli import main; rc = main(['plot', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
