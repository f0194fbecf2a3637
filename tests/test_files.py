"""files.py: atomic writes, JSON, folder swaps, format versions, and writes the disk refuses as one line."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from helpers import fill_disk
from pocketgpt import files
from pocketgpt.errors import PocketError
from pocketgpt.files import (
    WriteFailed,
    atomic_write,
    atomic_write_text,
    check_version,
    describe_size,
    read_json,
    read_json_or_empty,
    swap_dir,
    write_json,
)


def _only(folder):
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- atomic writes

def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"x": 1})
    write_json(path, {"x": 2, "é": "ü"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"x": 2, "é": "ü"} and _only(tmp_path) == ["a.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~files._UMASK)


def test_any_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def broken(p):
        p.write_text("half")
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug in the writer"):  # not the disk: passes through unchanged
        atomic_write(path, broken)
    assert path.read_text() == "old" and _only(tmp_path) == ["a.txt"]


def _raise(e):
    def write(p):
        p.write_bytes(b"half")
        raise e
    return write


@pytest.mark.parametrize("error,reason,fix", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device", "free some space"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded", "free some space"),
    (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only", "make it writable"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied", "fix the folder's permissions"),
    # safetensors (Rust) says the errno only in its message
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "no space left on device", "free some space"),
])
def test_a_refused_write_is_one_line_naming_the_file_and_the_fix(tmp_path, error, reason, fix):
    path = tmp_path / "model.safetensors"
    atomic_write_text(path, "old weights")
    with pytest.raises(WriteFailed) as info:
        atomic_write(path, _raise(error), size=3_400_000)
    e = info.value
    assert isinstance(e, PocketError) and "\n" not in str(e)
    assert str(e).startswith(f"could not write {path}: {reason}")
    assert str(e).endswith(f"; the earlier model.safetensors is kept: {fix} and try again")
    if e.code in (errno.ENOSPC, errno.EDQUOT):
        assert "(about 3.4 MB needed, " in str(e) and " free)" in str(e)
    assert path.read_text() == "old weights" and _only(tmp_path) == ["model.safetensors"]


def test_torch_save_on_a_full_disk_is_known_by_the_free_space_left(tmp_path, monkeypatch):
    """torch.save says only "[enforce fail at inline_container.cc] unexpected pos ..." when the disk fills."""
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 77312 vs 77200")
    monkeypatch.setattr(files, "free_bytes", lambda path: 4096)
    with pytest.raises(WriteFailed, match=r"could not write .*optimizer.pt: no space left on device \(4.1 KB free\); "
                                          "optimizer.pt was not written"):
        atomic_write(tmp_path / "optimizer.pt", _raise(torch_error))
    monkeypatch.setattr(files, "free_bytes", lambda path: 50 << 30)  # the same error with room to spare: a bug
    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic_write(tmp_path / "optimizer.pt", _raise(torch_error))
    with pytest.raises(FileNotFoundError):  # an OSError that is not the disk's refusal stays itself
        atomic_write(tmp_path / "optimizer.pt", _raise(FileNotFoundError(errno.ENOENT, "gone")))
    assert _only(tmp_path) == []


def test_a_really_full_disk(tiny_fs):
    """On a real (tmpfs) disk: torch.save, safetensors and text writes that do not fit are refused in one line,
    the earlier file stays whole, the temp file is gone and its space is free again (the message says so)."""
    path = tiny_fs / "state.pt"
    big = {"w": torch.arange(200_000, dtype=torch.float32)}  # 800 KB
    atomic_write(path, lambda p: torch.save({"w": torch.ones(10)}, p))
    before = path.read_bytes()
    filler = fill_disk(tiny_fs, 300_000)
    free = shutil.disk_usage(tiny_fs).free
    writers = [lambda p: torch.save(big, p), lambda p: save_file(big, str(p)),
               lambda p: p.write_bytes(b"x" * 800_000)]
    for write in writers:
        with pytest.raises(WriteFailed) as info:
            atomic_write(path, write, size=800_000)
        assert "no space left on device (about 800 KB needed, " in str(info.value)
        assert info.value.free == shutil.disk_usage(tiny_fs).free == free  # the half-written temp is really gone
        assert path.read_bytes() == before and _only(tiny_fs) == ["filler", "state.pt"]
    filler.unlink()
    atomic_write(path, lambda p: torch.save(big, p))  # room again: the same write succeeds
    assert torch.load(path, weights_only=True)["w"].equal(big["w"])


def test_sizes_read_as_on_a_disk():
    assert [describe_size(n) for n in (0, 999, 1000, 45_100, 235_000, 3_400_000, 12_345_678_901)] == \
        ["0 bytes", "999 bytes", "1 KB", "45.1 KB", "235 KB", "3.4 MB", "12.3 GB"]


# ---------------------------------------------------------------- folders

def test_swap_dir_puts_a_finished_folder_in_place(tmp_path):
    target, old = tmp_path / "last", tmp_path / "last.old"
    for content in ("first", "second"):
        tmp = files.temp_path(target)
        tmp.mkdir()
        (tmp / "f").write_text(content)
        swap_dir(tmp, target, old)
        assert (target / "f").read_text() == content and _only(tmp_path) == ["last"]


def test_stale_temps_are_recognised_and_removed(tmp_path):
    (tmp_path / "keep.txt").write_text("")
    (tmp_path / ".hidden").write_text("")
    files.temp_path(tmp_path / "a.json").write_text("half")
    files.temp_path(tmp_path / "last").mkdir()
    assert files.is_temp(files.temp_path(tmp_path / "x")) and not files.is_temp(tmp_path / ".hidden")
    files.remove_stale_temps(tmp_path)
    assert _only(tmp_path) == [".hidden", "keep.txt"]


def test_export_dir_refuses_a_read_only_place_in_one_line(tmp_path, monkeypatch):
    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(type(tmp_path), "mkdir", read_only)
    with pytest.raises(WriteFailed, match=r"could not write the folder .*out: the file system is read-only; nothing "
                                          "was written: make it writable and try again"):
        files.export_dir(tmp_path / "out", overwrite=False, files=())


# ---------------------------------------------------------------- reading

def test_read_json_is_strict_with_one_line_errors(tmp_path):
    p = tmp_path / "state.json"
    with pytest.raises(PocketError, match=f"resume state is missing: {p}$"):
        read_json(p, "resume state")
    p.write_text("{not json")
    with pytest.raises(PocketError, match=r"resume state at .* is not valid JSON \(.*\); retrain"):
        read_json(p, "resume state", fix="retrain")
    p.write_text("[1, 2]")
    with pytest.raises(PocketError, match="is not a JSON object"):
        read_json(p, "resume state")
    with pytest.raises(PocketError, match="cannot read resume state at"):
        read_json(tmp_path, "resume state")  # a folder
    p.write_text('{"iter": 3}')
    assert read_json(p, "resume state") == {"iter": 3}


def test_read_json_or_empty_never_fails(tmp_path):
    p = tmp_path / "meta.json"
    assert read_json_or_empty(p) == {} and read_json_or_empty(tmp_path) == {}
    for text in ("{not json", "[1]", "\xff"):
        p.write_text(text, encoding="latin-1")
        assert read_json_or_empty(p) == {}
    p.write_text('{"a": 1}')
    assert read_json_or_empty(p) == {"a": 1}


def test_check_version_names_the_file_and_what_to_do(tmp_path):
    p = tmp_path / "config.json"
    check_version({"format_version": 1}, p, 1, "run config")
    with pytest.raises(PocketError, match=rf"^{p} has run config format version 2 \(written by pocketgpt 9.0.0\), "
                                          "this pocketgpt reads version 1; upgrade pocketgpt to read it$"):
        check_version({"format_version": 2, "pocketgpt_version": "9.0.0"}, p, 1, "run config")
    with pytest.raises(PocketError, match=r"checkpoint format version None, this pocketgpt reads version 2; use the "
                                          "pocketgpt version that wrote it$"):
        check_version({}, p, 2, "checkpoint")


def test_files_is_the_floor_of_the_import_graph():
    """files.py imports no other module of the package but errors.py, so everything can use it without a circle."""
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(files.__file__).read_text())
    ours = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert ours == {"errors"} and "torch" not in {a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                                                  for a in n.names}


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any level (top, inside functions, TYPE_CHECKING)."""
    import ast
    import pathlib

    src = pathlib.Path(files.__file__).parent.parent
    mods = {".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (src / "pocketgpt").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom) and n.level:
                base = pkg.rsplit(".", n.level - 1)[0] if n.level > 1 else pkg
                target = f"{base}.{n.module}" if n.module else base
                for a in n.names:
                    found = [c for c in (f"{target}.{a.name}", target) if c in mods and c != m]
                    graph[m].update(found[:1])
    return graph


def test_the_owners_of_files_and_folders_are_in_no_import_circle():
    """files, checkpoint, rundir, data, corpus and what they stand on (config, sampling, tokenizer, metrics) once
    made a six-module circle; none of them may reach itself again through the package's imports."""
    graph = _import_graph()
    for start in ("files", "checkpoint", "rundir", "data", "corpus", "config", "sampling", "tokenizer", "metrics"):
        start = f"pocketgpt.{start}"
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            assert m != start, f"{start} imports itself back"
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
