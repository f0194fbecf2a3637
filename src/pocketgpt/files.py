"""How pocketgpt writes and reads its files: atomic writes, JSON, folder swaps, format versions, refused writes.

Torch-free and at the bottom of the import graph (it imports only errors.py), so every module that
writes a file can use it without pulling in what that file is about.

Every write goes to a temp file in the same folder (`.NAME.tmp-PID`) that is fsynced and renamed
over the target, so a kill at any moment leaves either the old or the new file; a folder is built
whole under a temp name and swapped in (`swap_dir`). A write the disk refuses (full, read-only, no
permission) becomes one `WriteFailed` line naming the file, the space it needed where known and
what was left as it was; the temp file is removed, so nothing already written is lost.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import PocketError

_UMASK = os.umask(0o22)
os.umask(_UMASK)
TEMP_MARK = ".tmp-"

# The errors a user fixes on their side of the disk: the reason as said, and the fix.
REFUSALS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space"),
    errno.EFBIG: ("the file is too large for this file system", "write it to another file system"),
    errno.EROFS: ("the file system is read-only", "make it writable"),
    errno.EACCES: ("permission denied", "fix the folder's permissions"),
    errno.EPERM: ("operation not permitted", "fix the folder's permissions"),
}
_FULL = (errno.ENOSPC, errno.EDQUOT)
# Writers in Rust (safetensors) put the errno into their message as "(os error 28)".
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# torch.save reports a full disk only as "[enforce fail at inline_container.cc] unexpected pos ...":
# a writer that fails while its folder has less than this left is taken to have run out of space.
NEARLY_FULL = 1 << 20


# ---------------------------------------------------------------- refused writes

class WriteFailed(PocketError):
    """A write the disk refused, as one line: what, why, the space it needed (where known), what is left as
    it was, and what to do. Callers that know more (last/ and its iteration) reword it with `reworded`."""

    def __init__(self, what: str, code: int, *, needed: int | None = None, free: int | None = None,
                 kept: str = "nothing was written", retry: str = "try again"):
        self.what, self.code, self.needed, self.free, self.kept, self.retry = what, code, needed, free, kept, retry
        super().__init__(self._line())

    @property
    def fix(self) -> str:
        return REFUSALS[self.code][1]

    def reworded(self, **changes: Any) -> "WriteFailed":
        """The same failure told with other fields (what, needed, kept, retry)."""
        fields = {"what": self.what, "needed": self.needed, "free": self.free, "kept": self.kept,
                  "retry": self.retry, **changes}
        what = fields.pop("what")
        return WriteFailed(what, self.code, **fields)

    def _line(self) -> str:
        space = ""
        if self.code in _FULL and self.free is not None:
            need = f"about {describe_size(self.needed)} needed, " if self.needed else ""
            space = f" ({need}{describe_size(self.free)} free)"
        return f"could not write {self.what}: {REFUSALS[self.code][0]}{space}; {self.kept}: {self.fix} and {self.retry}"


def describe_size(n: int) -> str:
    """Bytes as people read them on a disk: '240 KB', '1.5 GB' (decimal units, as df -H)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def free_bytes(path: Path) -> int | None:
    """Space left to this user on the file system holding path (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def refused_code(e: BaseException, folder: Path) -> int | None:
    """The errno of a write the disk refused, found in e or what caused it; None for any other error.

    Call it before removing the half-written file: the free-space test needs the disk as the write left it.
    """
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in REFUSALS:
            return x.errno
        m = _OS_ERROR.search(str(x))
        if m and int(m.group(1)) in REFUSALS:
            return int(m.group(1))
    if isinstance(e, Exception) and not isinstance(e, (OSError, PocketError)):
        free = free_bytes(folder)
        if free is not None and free < NEARLY_FULL:
            return errno.ENOSPC
    return None


def as_refused(e: BaseException, what: str, folder: Path) -> WriteFailed | None:
    """e as a WriteFailed about `what` when the disk caused it (a WriteFailed stays as it is); None otherwise."""
    if isinstance(e, WriteFailed):
        return e
    code = refused_code(e, folder)
    return None if code is None else WriteFailed(what, code, free=free_bytes(folder))


def _release(e: BaseException) -> None:
    """Drop the tracebacks of e and what caused it. A writer that failed (torch.save's) keeps its file open
    from a frame of the traceback; until that frame goes, the removed temp file still takes its space."""
    for x in _chain(e):
        x.__traceback__ = None


def _chain(e: BaseException) -> Iterator[BaseException]:
    """e, then what caused it, and so on, each once."""
    seen: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and not any(x is y for y in seen):
        seen.append(x)
        yield x
        x = x.__cause__ or x.__context__


def refused(e: BaseException, target: Path, *, cleanup: Callable[[], None] | None = None, what: str | None = None,
            needed: int | None = None, kept: str | None = None, retry: str | None = None) -> WriteFailed | None:
    """For an except block around a write to target: run cleanup (removing the half-written temp), then give
    the error as a WriteFailed about target when the disk caused it (a WriteFailed from a nested write is
    retold as one about target), or None: re-raise e as it is.

    Call it from the except block itself, not from a context manager's __exit__: the free space it reports
    is measured once e's tracebacks are dropped, which __exit__'s own arguments would keep alive.
    """
    target = Path(target)
    failed = as_refused(e, str(target), target.parent)  # before cleanup: the disk as the write left it
    if cleanup is not None:
        cleanup()
    if failed is None:
        return None
    _release(e)
    given = {"what": what, "needed": needed, "kept": kept, "retry": retry}
    return failed.reworded(free=free_bytes(target.parent), **{k: v for k, v in given.items() if v is not None})


def raise_refused(e: BaseException, target: Path, **how: Any) -> None:
    """refused(e, target, **how), raised when it is a WriteFailed; else return for the caller's bare `raise`."""
    failed = refused(e, target, **how)
    if failed is not None:
        raise failed from None


# ---------------------------------------------------------------- atomic writes

def temp_path(path: Path) -> Path:
    """Where path is written before it is renamed into place (is_temp recognises it)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def is_temp(path: Path) -> bool:
    """A half-written file or folder left by a killed atomic write (ours to delete)."""
    return path.name.startswith(".") and TEMP_MARK in path.name


def remove_stale_temps(folder: Path) -> None:
    for p in Path(folder).iterdir():
        if is_temp(p):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Make a rename inside path durable; some file systems cannot, and then nothing more can be done."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None], *, size: int | None = None, fsync: bool = True) -> None:
    """Call write(tmp_path), fsync, then rename over path; on any error the old file is kept and the temp
    removed. size: the bytes the file needs, for the message when the disk is full. fsync=False for files
    that are redrawn soon anyway (plots), where a power cut costs nothing."""
    path = Path(path)
    tmp = temp_path(path)
    kept = f"the earlier {path.name} is kept" if path.exists() else f"{path.name} was not written"
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # some writers create 0600 files; match normal files
        os.replace(tmp, path)
    except BaseException as e:
        raise_refused(e, path, cleanup=lambda: tmp.unlink(missing_ok=True), needed=size, kept=kept)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), size=len(text.encode("utf-8")))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def swap_dir(tmp: Path, target: Path, old: Path) -> None:
    """Put the finished folder tmp at target. The previous target is renamed to old first and deleted
    last, so a kill between the two renames leaves old whole for a reader to fall back on."""
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_dir(out: Path, fill: Callable[[Path], None], what: str) -> None:
    """A folder written whole: fill(tmp) builds it aside, then it takes out's place (swap_dir). A failure or a
    kill leaves out as it was; a refused write says so in one line (raise_refused)."""
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    kept = f"{out} is unchanged" if out.exists() else f"no {what} was made"
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        # the earlier folder waits under a name of its own until the new one is in place
        swap_dir(tmp, out, out.with_name(f".{out.name}.old-{os.getpid()}"))
    except BaseException as e:
        raise_refused(e, out, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True), what=f"the {what} {out}",
                      kept=kept, retry="run the command again")
        raise


def export_dir(out: Path, overwrite: bool, files: tuple[str, ...]) -> Path:
    """An export's folder, made ready: new or empty, or with --overwrite cleared of `files` (only what the
    export writes, so nothing stale outlives it and nothing else is touched); a one-line refusal otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PocketError(f"{out} is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PocketError(f"{out} exists and is not empty; add --overwrite to replace the export there, "
                              "or choose another --out")
        for name in files:
            (out / name).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise_refused(e, out, what=f"the folder {out}")
        raise
    return out


# ---------------------------------------------------------------- reading

def read_json(path: Path, what: str, fix: str = "") -> dict[str, Any]:
    """The JSON object in path, or a one-line PocketError naming `what` and, when given, the fix."""
    tail = f"; {fix}" if fix else ""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PocketError(f"{what} is missing: {path}{tail}") from None
    except OSError as e:
        raise PocketError(f"cannot read {what} at {path} ({e.strerror or e}){tail}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PocketError(f"{what} at {path} is not valid JSON ({e}){tail}") from None
    if not isinstance(d, dict):
        raise PocketError(f"{what} at {path} is not a JSON object{tail}")
    return d


def read_json_or_empty(path: Path) -> dict[str, Any]:
    """The JSON object in path, or {} when it is missing, unreadable or not an object: for files that only
    inform (reports, plots, caches) and must never stop what reads them."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def check_version(data: dict[str, Any], path: Path, expected: int, what: str) -> None:
    """Refuse a file of another format version than this pocketgpt reads, naming the file and what to do."""
    v = data.get("format_version")
    if v == expected:
        return
    by = data.get("pocketgpt_version")
    writer = f" (written by pocketgpt {by})" if isinstance(by, str) else ""
    if isinstance(v, int) and not isinstance(v, bool) and v > expected:
        fix = "upgrade pocketgpt to read it"
    else:
        fix = "use the pocketgpt version that wrote it"
    raise PocketError(f"{path} has {what} format version {v}{writer}, this pocketgpt reads version {expected}; {fix}")
