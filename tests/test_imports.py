"""The package's import graph: no circle, counting every import (top level, inside functions, type-only).

An import inside a function or under TYPE_CHECKING hides a circle from Python at import time, not
from a reader: two modules that import each other are one concern split in two, or a lower one
reaching up. The package face (__init__.py of the package) is left out: it re-exports from below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pocketgpt

SRC = Path(pocketgpt.__file__).parent
PACKAGE = "pocketgpt"


def module_names() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = (PACKAGE, *path.relative_to(SRC).with_suffix("").parts)
        name = ".".join(parts).removesuffix(".__init__")
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the package that `name` imports, at any level of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import arch` names a module; `from .x import f` names x
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = module_names()
    known = set(mods)
    return {m: imports_of(m, p, known) - {PACKAGE} for m, p in mods.items() if m != PACKAGE}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_imports_at_every_level_and_the_finder_their_circles(tmp_path):
    code = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
            "def f():\n    from . import c\n    from .d.e import g\n")
    (tmp_path / "a.py").write_text(code)
    known = {"pocketgpt.a", "pocketgpt.b", "pocketgpt.c", "pocketgpt.d", "pocketgpt.d.e"}
    assert imports_of("pocketgpt.a", tmp_path / "a.py", known) == {"pocketgpt.b", "pocketgpt.c", "pocketgpt.d.e"}
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_in_the_package():
    g = graph()
    assert "pocketgpt.engine" in g and "pocketgpt.model" in g["pocketgpt.engine"]  # the reader works
    assert circles(g) == []
