"""report.py: report.md and count_parameters, on a fake run folder (no training, no torch needed)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from helpers import BLOCK, EMBD, EXPECTED_PARAMS, PLOT_NAMES, VOCAB, fake_metrics, fake_weights, make_run  # noqa: E402
from pocketgpt.plots import write_plots  # noqa: E402
from pocketgpt.report import count_parameters, write_report  # noqa: E402


def test_report(tmp_path):
    run = make_run(tmp_path)
    write_plots(run)
    text = write_report(run).read_text()
    evals = [r for r in fake_metrics(3000) if "val_loss" in r]
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

    both = {**fake_weights(), "transformer.wte.weight": np.zeros((VOCAB, EMBD), np.float32)}
    save_file(both, str(tmp_path / "both.safetensors"))
    assert count_parameters(tmp_path / "both.safetensors", tied=True) == EXPECTED_PARAMS
    assert count_parameters(tmp_path / "both.safetensors", tied=False) == EXPECTED_PARAMS + VOCAB * EMBD
    assert count_parameters(tmp_path / "missing.safetensors") is None
