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
from pocketgpt.corpus import BUNDLED  # noqa: E402


@pytest.fixture(scope="session")
def corpus_text() -> str:
    import gzip

    with gzip.open(BUNDLED, "rt", encoding="utf-8") as f:
        return f.read()[:60_000]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_text) -> Path:
    from pocketgpt.corpus import prepare

    src = tmp_path_factory.mktemp("corpus") / "book.txt"
    src.write_text(corpus_text, encoding="utf-8")
    return prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path_factory.mktemp("data") / "book")))


@pytest.fixture
def tiny_fs(tmp_path) -> Path:
    """A 4 MB tmpfs mounted for one test, to fill a disk for real (helpers.fill_disk); skipped where this
    process may not mount one (not root, or a container that forbids it)."""
    import shutil
    import subprocess

    mnt = tmp_path / "fs"
    mnt.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
