"""The run folder (the --out of `pocketgpt train`): its layout, config, data folder, lock and clean-up.

Torch-free, and the only module that knows what a run folder holds:

  config.json         resolved TrainConfig + format and package versions + where the data is
                      (+ init_from: the base model of a fine-tune, {source, kind})
  tokenizer.json      the tokenizer, as JSON (a copy of the data folder's)
  model.safetensors   weights with the best val loss so far (a LoRA run's merged: a plain GPT)
  adapter.safetensors a LoRA run's best adapter alone (lora.py; config.json's [lora] says its settings)
  last/               resume state (checkpoint.py owns it and its name: model, optimizer, rng, state.json)
  metrics.jsonl       one JSON object per log / eval line
  samples.txt         a sample at every eval
  plots/, report.md   pictures and the one-page report
  tensorboard/, wandb/  logger folders (the `loggers` key)
  data/               the prepared data, when train prepared it (kept by --overwrite)
  .lock               held while a training writes, so two trainings never share a folder (under
                      torchrun by rank 0, which alone writes any of these: trainer.train)

Whoever writes a new file or folder into a run folder adds its name to RUN_FILES, so --overwrite
never leaves a stale one behind (tests/test_rundir.py checks a real run writes nothing unlisted).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .checkpoint import LAST, LAST_OLD, read_last_state
from .errors import PocketError
from .files import check_version, is_temp, read_json, read_json_or_empty, raise_refused, remove_stale_temps, write_json
from .version import __version__

if TYPE_CHECKING:
    from .config import TrainConfig

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
BEST_WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"
METRICS = "metrics.jsonl"
SAMPLES = "samples.txt"
PLOTS = "plots"
REPORT = "report.md"
DATA = "data"
LOCK = ".lock"

# Everything a training writes into a run folder: --overwrite removes exactly these (never data/).
RUN_FILES: tuple[str, ...] = (CONFIG, TOKENIZER, BEST_WEIGHTS, ADAPTER, LAST, LAST_OLD, METRICS, SAMPLES, PLOTS,
                              REPORT, "tensorboard", "wandb")
# Names that may sit in a folder that is not yet a run: the data train prepared, our lock.
_NOT_FOREIGN = (DATA, LOCK)


def is_run_dir(path: str | Path) -> bool:
    """True for a folder whose config.json pocketgpt wrote; False for others (a Hugging Face model has one too)."""
    raw = read_json_or_empty(Path(path) / CONFIG)
    return "format_version" in raw and isinstance(raw.get("model"), dict)


def check_is_run(path: str | Path) -> Path:
    """path as a Path, or a one-line PocketError saying what it is instead."""
    path = Path(path)
    if not path.exists():
        raise PocketError(f"model not found: {path}")
    if not (path / CONFIG).is_file():
        raise PocketError(f"{path} is not a pocketgpt run folder (no {CONFIG}); give the --out folder of a "
                          "training run")
    if not is_run_dir(path):
        raise PocketError(f"{path / CONFIG} was not written by pocketgpt (is it a Hugging Face model folder?); "
                          "give the --out folder of a training run")
    return path


# ---------------------------------------------------------------- config

def read_config(run_dir: str | Path) -> tuple["TrainConfig", dict[str, Any]]:
    """(TrainConfig, raw dict) from RUN_DIR/config.json, checked against the version config.json is
    written with (config.CONFIG_FORMAT_VERSION) and for its keys."""
    from .config import CONFIG_FORMAT_VERSION, TrainConfig

    path = Path(run_dir) / CONFIG
    raw = read_json(path, "run config")
    check_version(raw, path, CONFIG_FORMAT_VERSION, "run config")
    return TrainConfig.from_dict(raw), raw


# Fields of config.json beyond the TrainConfig that describe how a run began (init_from: the base model
# of a fine-tune). A later write_config without them (a resume) keeps what the file already holds.
KEPT_FIELDS = ("init_from",)


def write_config(run_dir: Path, cfg: "TrainConfig", data_dir: Path, extra: dict[str, Any] | None = None) -> None:
    """config.json: the resolved config, where the data is (relative when it lives inside the run), and
    extra fields (KEPT_FIELDS only); those already in the file are kept unless extra replaces them."""
    from .config import CONFIG_FORMAT_VERSION

    run_dir = Path(run_dir)
    unknown = set(extra or {}) - set(KEPT_FIELDS)
    if unknown:
        raise ValueError(f"write_config: unknown extra fields {sorted(unknown)}")
    try:
        data_ref = str(Path(data_dir).resolve().relative_to(run_dir.resolve()))
    except ValueError:
        data_ref = str(Path(data_dir).resolve())
    old = read_raw_config(run_dir)
    kept = {k: old[k] for k in KEPT_FIELDS if k in old}
    write_json(run_dir / CONFIG, {"format_version": CONFIG_FORMAT_VERSION, "pocketgpt_version": __version__,
                                  "data_dir": data_ref, **cfg.to_dict(), **kept, **(extra or {})})


def read_raw_config(run_dir: str | Path) -> dict[str, Any]:
    """config.json as a dict, {} when missing or damaged: for reports and plots, which never fail."""
    return read_json_or_empty(Path(run_dir) / CONFIG)


def data_dir_of(run_dir: str | Path, raw: dict[str, Any] | None = None) -> Path:
    """The data folder a run trained on (config.json's data_dir, relative to the run folder)."""
    raw = read_raw_config(run_dir) if raw is None else raw
    ref = Path(raw.get("data_dir", DATA))
    return ref if ref.is_absolute() else Path(run_dir) / ref


def summary(run_dir: str | Path) -> dict[str, Any]:
    """What a run's training reached, for info, export and serve: iters, tokens seen, best val loss with its
    bits per byte and iteration, and the base model of a fine-tune (None where the run does not say)."""
    state = read_last_state(run_dir)
    raw = read_raw_config(run_dir)
    base = raw.get("init_from")
    return {"iters": state.get("iter"), "tokens_seen": state.get("tokens_seen"),
            "best_val_loss": state.get("best_val_loss"),
            "best_val_bpb": best_val_bpb(run_dir, state.get("best_iter")), "best_iter": state.get("best_iter"),
            "init_from": base if isinstance(base, dict) and base.get("source") else None, "lora": lora_summary(raw)}


def lora_summary(raw: dict[str, Any]) -> dict[str, Any] | None:
    """A LoRA run's rank, alpha, dropout, targeted modules and trainable parameter count; None for other runs."""
    from .config import TrainConfig

    try:
        cfg = TrainConfig.from_dict(raw)
        modules = cfg.lora.modules
    except PocketError:  # a damaged config: info and the report say less, they do not fail
        return None
    lo = cfg.lora
    if not lo.enabled:
        return None
    return {"rank": lo.lora_rank, "alpha": lo.lora_alpha, "dropout": lo.lora_dropout, "targets": list(modules),
            "trainable_parameters": lo.trainable_params(cfg.model)}


def best_val_bpb(run_dir: str | Path, best_iter: int | None) -> float | None:
    """val_bpb of the eval line at the best iteration in metrics.jsonl (None for runs without one)."""
    from .metrics import read_metrics

    evals = [m for m in read_metrics(Path(run_dir) / METRICS)
             if "val_bpb" in m and isinstance(m.get("val_loss"), (int, float))]
    at_best = [m for m in evals if m.get("iter") == best_iter] or sorted(evals, key=lambda m: m["val_loss"])[:1]
    value = at_best[-1]["val_bpb"] if at_best else None
    return value if isinstance(value, (int, float)) else None


# ---------------------------------------------------------------- starting a training

def check_for_training(out: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber anything that is not ours; reads only (clear() does the removing)."""
    out = Path(out)
    if resume:
        if not is_run_dir(out):
            raise PocketError(f"cannot resume: {out} is not a pocketgpt run folder (no {CONFIG})")
        return
    if is_run_dir(out):
        if not overwrite:
            raise PocketError(
                f"{out} already holds a training run; add --resume to continue it, "
                "--overwrite to start again, or choose another --out"
            )
        return
    if out.exists():
        if not out.is_dir():
            raise PocketError(f"{out} is a file, not a folder; choose another --out")
        if any(p.name not in _NOT_FOREIGN and not is_temp(p) for p in out.iterdir()):
            raise PocketError(f"{out} exists and is not a pocketgpt run folder; choose another --out")


def clear(out: str | Path) -> None:
    """--overwrite: remove what an earlier training wrote (RUN_FILES and half-written temps), keep data/."""
    out = Path(out)
    for name in RUN_FILES:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    remove_stale_temps(out)


# ---------------------------------------------------------------- the lock

_held: dict[str, int] = {}  # resolved path -> nesting depth, so one process can re-enter its own lock


@contextlib.contextmanager
def locked(out: str | Path) -> Iterator[None]:
    """Hold RUN_DIR/.lock exclusively while a training writes; a second training is refused.

    An OS file lock (flock): the kernel drops it when its process dies, so a lock left by a
    killed run never blocks the next one. The holder's pid is written into the file for the message.
    """
    out = Path(out)
    _make_run_dir(out)
    key = str(out.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): no lock rather than no training
        yield
        return
    fd = _open_lock(out)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            raise PocketError(f"{out} is in use by a training in process {holder}; wait for it to finish, "
                              "stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _make_run_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only or full disk: said in one line, before anything is written
        raise_refused(e, out, what=f"the run folder {out}")
        raise


def _open_lock(out: Path) -> int:
    try:
        return os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise_refused(e, out / LOCK, what=f"the run folder {out}")
        raise
