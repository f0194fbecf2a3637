"""Checkpoint files: safetensors weights and the inside of last/, the resume folder.

rundir.py owns the run folder's layout; this module owns its weights and last/ (model.safetensors,
optimizer.pt, rng.safetensors, state.json), written through files.py's atomic writes.

`last/` is a folder written whole under a temp name and swapped in with two renames; if a kill falls
between them, `last.old/` is used. A save the disk refuses (full, read-only) says in one line that
last/ from the iteration it holds is intact and how to resume. Nothing is unpickled: optimizer tensors
load with torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator

from .errors import PocketError
from .files import (
    WriteFailed,
    as_refused,
    atomic_write,
    check_version,
    read_json,
    refused,
    remove_stale_temps,
    swap_dir,
    temp_path,
    write_json,
)

if TYPE_CHECKING:
    import torch

CHECKPOINT_FORMAT_VERSION = 1
LAST = "last"  # the resume folder in a run folder
LAST_OLD = "last.old"  # the previous last/ while a new one is swapped in
WEIGHTS = "model.safetensors"  # inside last/
AVERAGE = "ema.safetensors"  # inside last/: the moving average of the weights (optim.ema_decay), when kept
OPTIMIZER = "optimizer.pt"  # inside last/
RNG = "rng.safetensors"  # inside last/
STATE = "state.json"  # inside last/, written last: its presence marks a complete folder


def resume_advice(run_dir: Path) -> tuple[str, str]:
    """(what a failed save left behind, how to go on): for the one line a refused write of a run says."""
    try:
        it = read_last_state(run_dir).get("iter")
    except PocketError:
        it = None
    if it is None:
        return "no last/ was saved yet", "run the same command again with --overwrite"
    return f"last/ from iteration {it} is intact", f"run pocketgpt train --out {run_dir} --resume"


@contextlib.contextmanager
def disk_errors(run_dir: Path, what: str) -> Iterator[None]:
    """Inside a training: a write the disk refuses (full, read-only, no permission) becomes one line naming
    the file, the space it needed, that last/ is intact and the --resume that continues; old files stay."""
    try:
        yield
    except (WriteFailed, OSError) as e:
        failed = as_refused(e, what, Path(run_dir))
        if failed is None:
            raise
        kept, retry = resume_advice(run_dir)
        raise failed.reworded(what=f"the {what} in {run_dir}", kept=kept, retry=retry) from None


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in obj (dicts, lists, tuples inside), each storage once (tied weights):
    about what a file of them needs on disk."""
    import torch

    seen: set[tuple[int, int]] = set()

    def walk(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            key = (x.data_ptr(), x.nbytes)
            if key in seen:
                return 0
            seen.add(key)
            return x.nbytes
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0

    return walk(obj)


def save_weights(model: "torch.nn.Module", path: Path, metadata: dict[str, str] | None = None) -> None:
    """Weights of the unwrapped model (no `_orig_mod.` prefixes), tied tensors stored once."""
    from safetensors.torch import save_model

    atomic_write(path, lambda p: save_model(model, str(p), metadata=metadata), size=tensor_bytes(model.state_dict()))


def save_tensors(tensors: dict[str, "torch.Tensor"], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Named tensors (contiguous, none sharing memory) as one safetensors file, e.g. a LoRA adapter alone."""
    from safetensors.torch import save_file

    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata), size=tensor_bytes(tensors))


@dataclass(frozen=True)
class Pending:
    """A tensor save_streamed writes, made only when its bytes are due: dtype and shape say beforehand what
    parts() will give, one or more contiguous row blocks that together are the tensor."""

    dtype: "torch.dtype"
    shape: tuple[int, ...]
    parts: Callable[[], Iterable["torch.Tensor"]]


# safetensors' dtype names, in the order its writer sorts by (widest-aligned first: its Dtype enum, reversed)
_SAFETENSORS_DTYPES = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "I8", "U8", "BOOL")


def save_streamed(tensors: dict[str, Pending], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Named tensors as one safetensors file written a part at a time, so only the part being written is held
    (a LoRA run's merged best weights: lora.save_merged). The file is the one save_file writes for the same
    tensors, byte for byte but for the metadata's order (sorted here, a hash map's there): the header (8-byte
    little-endian length, then JSON with the metadata and each tensor's dtype, shape and data offsets, padded
    with spaces to 8 bytes), then the data in safetensors' order (dtype, then name). Atomic as every weights
    file (files.atomic_write)."""
    import torch

    codes = {name: _safetensors_dtype(p.dtype) for name, p in tensors.items()}
    order = sorted(tensors, key=lambda n: (_SAFETENSORS_DTYPES.index(codes[n]), n))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata is not None else {}
    start = 0
    for name in order:
        p = tensors[name]
        size = torch.Size(p.shape).numel() * torch.empty((), dtype=p.dtype).element_size()
        header[name] = {"dtype": codes[name], "shape": list(p.shape), "data_offsets": [start, start + size]}
        start += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for name in order:
                _write_parts(f, name, tensors[name])

    atomic_write(path, write, size=start + len(text) + 8)


def _safetensors_dtype(dtype: "torch.dtype") -> str:
    import torch

    names = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    return names[dtype]


def _write_parts(f: BinaryIO, name: str, p: Pending) -> None:
    """One tensor's bytes, part by part; a part that is not what the header said is a bug, never written."""
    import torch

    rows = 0
    for part in p.parts():
        if part.dtype != p.dtype or tuple(part.shape[1:]) != tuple(p.shape[1:]) or not part.is_contiguous():
            raise ValueError(f"{name}: a part of {part.dtype} {tuple(part.shape)} for {p.dtype} {p.shape}")
        rows += part.shape[0] if part.dim() else 1
        f.write(part.detach().cpu().reshape(-1).view(torch.uint8).numpy().data)  # the tensor's own bytes (little-endian)
    if rows != (p.shape[0] if p.shape else 1):
        raise ValueError(f"{name}: {rows} rows written for the shape {p.shape}")


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
    average: "torch.nn.Module | None" = None,
) -> None:
    """Write last/ as a whole: a fresh temp folder, then swapped in with renames. A refused write removes
    the temp folder and says so in one line; last/ is then as it was."""
    import torch
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    remove_stale_temps(run_dir)
    tmp = temp_path(run_dir / LAST)
    try:
        tmp.mkdir(parents=True)
        save_weights(model, tmp / WEIGHTS)
        if average is not None:
            save_weights(average, tmp / AVERAGE)
        atomic_write(tmp / OPTIMIZER, lambda p: torch.save(optimizer_state, p))
        atomic_write(tmp / RNG, lambda p: save_file(rng, str(p)))
        # state.json last: its presence marks a complete folder
        write_json(tmp / STATE, {"format_version": CHECKPOINT_FORMAT_VERSION, **state})
        swap_dir(tmp, run_dir / LAST, run_dir / LAST_OLD)
    except BaseException as e:
        needed = tensor_bytes(model.state_dict()) + tensor_bytes(optimizer_state) + tensor_bytes(rng)
        needed += tensor_bytes(average.state_dict()) if average is not None else 0
        failed = refused(e, run_dir / LAST, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True), needed=needed)
        if failed is None:
            raise
        kept, retry = resume_advice(run_dir)
        raise failed.reworded(what=f"the resume checkpoint ({LAST}/) in {run_dir}", kept=kept, retry=retry) from None


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
    check_version(state, d / STATE, CHECKPOINT_FORMAT_VERSION, "checkpoint")
    try:
        optimizer_state = torch.load(d / OPTIMIZER, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise PocketError(
            f"refusing to load {d / OPTIMIZER}: it is not a plain tensor file "
            f"({str(e).splitlines()[0][:120]})"
        ) from None
    try:
        rng = load_file(str(d / RNG))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise PocketError(f"cannot read {d / RNG}: {e}") from None
    return d, state, optimizer_state, rng
