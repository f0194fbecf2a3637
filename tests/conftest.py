"""Shared fixtures: a small corpus, a prepared data folder and a tiny, fast training config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocketgpt.cli import main
from pocketgpt.config import PrepareConfig, TrainConfig, build_train_config
from pocketgpt.data import BUNDLED

TINY = {
    "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0,
    "batch_size": 8, "max_iters": 30, "eval_interval": 10, "eval_iters": 2, "log_interval": 1,
    "learning_rate": 3e-3, "min_lr": 3e-4, "warmup_iters": 5, "schedule": "cosine", "max_time": 0,
    "sample_tokens": 0, "seed": 7, "plots": False, "eval_sample_tokens": 0,
    "dtype": "float32",  # the same numbers on every CPU; bf16 autocast has its own tests
}


def tiny_config(**overrides) -> TrainConfig:
    return build_train_config(preset=None, overrides={**TINY, **overrides})


def tiny_flags(**overrides) -> list[str]:
    return [f"--{k}={v}" for k, v in {**TINY, **overrides}.items()]


@pytest.fixture(scope="session")
def corpus_text() -> str:
    import gzip

    with gzip.open(BUNDLED, "rt", encoding="utf-8") as f:
        return f.read()[:60_000]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_text) -> Path:
    from pocketgpt.data import prepare

    src = tmp_path_factory.mktemp("corpus") / "book.txt"
    src.write_text(corpus_text, encoding="utf-8")
    return prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path_factory.mktemp("data") / "book")))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
