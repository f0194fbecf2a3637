"""Checkpoint files: safetensors weights, JSON everything else, atomic writes; the inside of last/.

rundir.py owns the run folder's layout; this module owns how its files are written and the
resume folder last/ (model.safetensors, optimizer.pt, rng.safetensors, state.json).

Every write goes to a temp file that is fsynced and renamed over the target, so a kill at any
moment leaves either the old or the new file. `last/` is a folder written whole under a temp
name and swapped in with two renames; if a kill falls between them, `last.old/` is used.
Nothing is unpickled: optimizer tensors load with torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import PocketError
from .rundir import LAST, LAST_OLD, remove_stale_temps

if TYPE_CHECKING:
    import torch

CHECKPOINT_FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"  # inside last/
STATE = "state.json"  # inside last/, written last: its presence marks a complete folder
_UMASK = os.umask(0o22)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
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


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), fsync, then rename over path. On error the old file is kept."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # some writers create 0600 files; match normal files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PocketError(f"{what} is missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PocketError(f"{what} at {path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise PocketError(f"{what} at {path} is not a JSON object")
    return d


@contextlib.contextmanager
def disk_errors(run_dir: Path, what: str) -> Iterator[None]:
    """Turn a failed write (disk full, no permission) into one clear message; old files stay."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        raise PocketError(
            f"could not write the {what} in {run_dir}: {reason}; the previous checkpoint is kept. "
            "Free disk space or fix permissions, then continue with --resume"
        ) from None


def _pause_hook(stage: str) -> None:
    """Test hook: POCKETGPT_PAUSE_IN_SAVE=<seconds> makes a save observable mid-write."""
    delay = os.environ.get("POCKETGPT_PAUSE_IN_SAVE")
    if delay:
        print(f"[pocketgpt] pausing in checkpoint write ({stage})", flush=True)
        time.sleep(float(delay))


def save_weights(model: "torch.nn.Module", path: Path, metadata: dict[str, str] | None = None) -> None:
    """Weights of the unwrapped model (no `_orig_mod.` prefixes), tied tensors stored once."""
    from safetensors.torch import save_model

    atomic_write(path, lambda p: save_model(model, str(p), metadata=metadata))


def save_tensors(tensors: dict[str, "torch.Tensor"], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Named tensors (contiguous, none sharing memory) as one safetensors file, e.g. a LoRA adapter alone."""
    from safetensors.torch import save_file

    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


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
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_weights(model: "torch.nn.Module", path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not Path(path).is_file():
        raise PocketError(f"no weights at {path}")
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PocketError(
            f"cannot read weights {path}: the file is truncated or corrupted ({str(e).splitlines()[0]}); "
            "use the other checkpoint (--checkpoint last/best) or retrain"
        ) from None
    if missing or unexpected:
        raise PocketError(
            f"weights in {path} do not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); was config.json changed?"
        )


def read_weights_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise PocketError(f"cannot read {path}: {e}") from None


def save_resume_state(
    run_dir: Path,
    model: "torch.nn.Module",
    optimizer_state: dict[str, Any],
    rng: dict[str, "torch.Tensor"],
    state: dict[str, Any],
) -> None:
    """Write last/ as a whole: a fresh temp folder, then swapped in with renames."""
    import torch
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    remove_stale_temps(run_dir)
    tmp = run_dir / f".{LAST}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        save_weights(model, tmp / WEIGHTS)
        atomic_write(tmp / "optimizer.pt", lambda p: torch.save(optimizer_state, p))
        _pause_hook("resume state")
        atomic_write(tmp / "rng.safetensors", lambda p: save_file(rng, str(p)))
        # state.json last: its presence marks a complete folder
        write_json(tmp / STATE, {"format_version": CHECKPOINT_FORMAT_VERSION, **state})
        _swap_in(run_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(run_dir: Path, tmp: Path) -> None:
    last, old = run_dir / LAST, run_dir / LAST_OLD
    if last.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(last, old)
    os.replace(tmp, last)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)


def resume_dir(run_dir: Path) -> Path | None:
    """The complete last/ folder, or last.old/ if a kill fell between the two renames."""
    for name in (LAST, LAST_OLD):
        d = Path(run_dir) / name
        if (d / STATE).is_file():
            return d
    return None


def read_last_state(run_dir: Path) -> dict[str, Any]:
    """last/state.json (iteration, tokens seen, best loss ...) as a dict; {} when the run has no last/ yet."""
    d = resume_dir(run_dir)
    return read_json(d / STATE, "resume state") if d else {}


def load_resume_state(run_dir: Path) -> tuple[Path, dict[str, Any], dict[str, Any], dict[str, "torch.Tensor"]]:
    """(folder, state, optimizer_state, rng) from last/; refuses pickles with code in them."""
    import pickle

    import torch
    from safetensors.torch import load_file

    d = resume_dir(run_dir)
    if d is None:
        raise PocketError(f"{run_dir} has no resume state (last/state.json); start it again without --resume")
    state = read_json(d / STATE, "resume state")
    check_format_version(state, d / STATE)
    try:
        optimizer_state = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise PocketError(
            f"refusing to load {d / 'optimizer.pt'}: it is not a plain tensor file "
            f"({str(e).splitlines()[0][:120]})"
        ) from None
    try:
        rng = load_file(str(d / "rng.safetensors"))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise PocketError(f"cannot read {d / 'rng.safetensors'}: {e}") from None
    return d, state, optimizer_state, rng


def check_format_version(d: dict[str, Any], path: Path) -> None:
    v = d.get("format_version")
    if v != CHECKPOINT_FORMAT_VERSION:
        raise PocketError(
            f"{path} has checkpoint format version {v}, this pocketgpt reads version "
            f"{CHECKPOINT_FORMAT_VERSION}; use the pocketgpt version that wrote it"
        )
