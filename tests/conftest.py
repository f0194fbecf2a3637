"""Shared fixtures: a small corpus and a prepared data folder (helpers.py has the helper functions)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so test files can `from helpers import ...`
# probe.py's per-machine cache: one fresh folder per test session (and its torchrun children), not ~/.cache
os.environ.setdefault("POCKETGPT_CACHE_DIR", tempfile.mkdtemp(prefix="pocketgpt-cache-"))

from pocketgpt.config import PrepareConfig  # noqa: E402
from pocketgpt.data import BUNDLED  # noqa: E402


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
