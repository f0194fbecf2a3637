"""The maps stay true: docs/architecture.md's module table names every module of the package with its
real line count, and the README's short table names the same modules."""

from __future__ import annotations

import re
from pathlib import Path

import pocketgpt

SRC = Path(pocketgpt.__file__).parent
ROOT = SRC.parent.parent
PACKAGES = ("arch", "cli", "serve")  # one row each: the folder and what its files own together
SLACK = 0.15  # line counts may drift this much between one session's edits and the map's


def modules() -> dict[str, int]:
    """Every module of the package (a sub-package as one, its files' lines summed) -> its line count."""
    out: dict[str, int] = {}
    for path in SRC.glob("*.py"):
        if path.name != "__main__.py":
            out[path.name] = len(path.read_text(encoding="utf-8").splitlines())
    for package in PACKAGES:
        files = [p for p in (SRC / package).rglob("*") if p.suffix in (".py", ".html")]
        out[package + "/"] = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in files)
    return out


def table_rows(text: str) -> dict[str, str]:
    """`name` -> the rest of its row, for every table row that starts with a code-quoted module name."""
    rows = {}
    for line in text.splitlines():
        for name in re.findall(r"`([a-z_]+(?:\.py|/))`", line.split("|")[1] if line.startswith("|") else ""):
            rows[name] = line
    return rows


def test_the_architecture_map_names_every_module_with_its_size():
    rows = table_rows((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    have = modules()
    assert sorted(set(have) - set(rows)) == [], "modules missing from docs/architecture.md's table"
    assert sorted(set(rows) - set(have)) == [], "docs/architecture.md's table names modules that do not exist"
    for name, lines in have.items():
        said = int(rows[name].split("|")[2].strip().replace(",", ""))
        assert abs(said - lines) <= SLACK * lines + 5, f"{name}: the map says {said} lines, the file has {lines}"


def test_the_readme_table_names_the_same_modules():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Development"):]
    section = section[: section.index("Benchmarks live in")]
    assert sorted(set(table_rows(section))) == sorted(modules())
