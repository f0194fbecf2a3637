"""One place where training reports go: the console, RUN_DIR/metrics.jsonl, and optional mirrors.

Mirrors (TensorBoard, Weights & Biases, trackio; the run-config key `loggers`) receive every record
written to metrics.jsonl, as numbers stepped by the record's `iter`. Each is an optional extra,
imported only when asked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from .checkpoint import disk_errors
from .errors import PocketError
from .files import atomic_write_text


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf
    return value


class MetricsLog:
    """Appends one JSON object per line; on resume drops lines past the resumed iteration.

    On a terminal (and only there) a live progress bar runs under the log lines; in CI, logs and
    notebooks' captured output the lines come plain, without carriage-return redraws.
    """

    def __init__(self, path: Path, echo: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.mirrors: list[Mirror] = []
        self.bar: Any = None
        self.use_bar = echo is None and sys.stdout.isatty()
        self.echo = echo or self._print

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=sys.stdout, flush=True)

    def start_progress(self, total: float, initial: float, unit: str) -> None:
        if self.use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=round(total), initial=round(initial), unit=unit, dynamic_ncols=True, leave=False)

    def progress(self, position: float, **postfix: str) -> None:
        if self.bar is not None:
            self.bar.update(max(0, round(position) - self.bar.n))
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def truncate_after(self, it: int) -> None:
        """Keep only lines with iter <= it, so a resumed run's file reads like an uninterrupted one."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("iter", 0) <= it:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))  # a full disk must not lose the old lines

    def reset(self) -> None:
        self.path.write_text("", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        what = f"metrics log ({self.path.name})"
        with disk_errors(self.path.parent, what), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        if self.mirrors:
            values = {k: float(v) for k, v in record.items()
                      if k != "iter" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            for mirror in self.mirrors:
                mirror.log(values, int(record.get("iter", 0)))

    def open_mirrors(self, loggers: str, run_dir: Path, config: dict[str, Any], start_iter: int = 0) -> None:
        """Start the loggers named in `loggers` (checked by check_loggers first); close with close_mirrors()."""
        from .config import logger_names

        for name in logger_names(loggers):
            try:
                self.mirrors.append(LOGGER_CLASSES[name](Path(run_dir), config, start_iter))
            except Exception as e:  # noqa: BLE001 - a login prompt refused, a bad env var: say which logger
                self.close_mirrors()
                raise PocketError(f"loggers: could not start {name} ({type(e).__name__}: {str(e)[:200]}); "
                                  f"fix that or drop it from --loggers") from None

    def close_mirrors(self) -> None:
        for mirror in self.mirrors:
            mirror.close()
        self.mirrors = []

    def say(self, line: str) -> None:
        self.echo(line)


class SilentLog(MetricsLog):
    """The log of a distributed run's other ranks: rank 0 alone writes metrics.jsonl, mirrors and the console,
    so a run's files and lines are the same whatever the world size."""

    def __init__(self, path: Path):
        super().__init__(path, echo=lambda line: None)
        self.use_bar = False

    def truncate_after(self, it: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def write(self, record: dict[str, Any]) -> None:
        pass

    def open_mirrors(self, loggers: str, run_dir: Path, config: dict[str, Any], start_iter: int = 0) -> None:
        pass


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    if Path(path).exists():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


# ---------------------------------------------------------------- optional loggers

class Mirror(Protocol):
    """A logger that receives each metrics.jsonl record: numbers by name, at a training iteration."""

    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardMirror:
    """Scalars into RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], start_iter: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, TensorBoard hides what the killed run logged past the resumed iter
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_iter or None)
        self.writer.add_text("config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "), start_iter)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbMirror:
    """A Weights & Biases run with its files in RUN_DIR/wandb; WANDB_MODE=offline and friends apply."""

    def __init__(self, run_dir: Path, config: dict[str, Any], start_iter: int = 0):
        import wandb

        self.run = wandb.init(dir=str(run_dir), project=os.environ.get("WANDB_PROJECT", "pocketgpt"),
                              name=run_dir.resolve().name, config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioMirror:
    """A trackio run (local-first; TRACKIO_DIR says where it stores), project from TRACKIO_PROJECT."""

    def __init__(self, run_dir: Path, config: dict[str, Any], start_iter: int = 0):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "pocketgpt"), name=run_dir.resolve().name,
                     config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


LOGGER_CLASSES: dict[str, Callable[[Path, dict[str, Any], int], Mirror]] = {
    "tensorboard": TensorBoardMirror, "wandb": WandbMirror, "trackio": TrackioMirror,
}
# the module each logger imports (tensorboard is used through torch.utils.tensorboard)
LOGGER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check_loggers(loggers: str) -> None:
    """Fail before training when an asked-for logger is not installed, saying how to install it."""
    from .config import logger_names

    for name in logger_names(loggers):
        module = LOGGER_MODULES.get(name)
        if module is None:
            continue  # config.validate names unknown loggers
        if module in sys.modules:  # None there means "known missing"
            present = sys.modules[module] is not None
        else:
            present = importlib.util.find_spec(module) is not None
        if not present:
            raise PocketError(f"loggers: {name} is not installed; pip install \"pocketgpt[{name}]\" "
                              f"(or drop it from --loggers)")


@contextlib.contextmanager
def terminal_progress(total: int, desc: str, unit: str = "tok") -> Iterator[Callable[..., Any] | None]:
    """terminal_bar as a context: yields its update(n=1) (None off a terminal), and closes the bar after."""
    bar = terminal_bar(total, desc, unit)
    try:
        yield bar.update if bar else None
    finally:
        if bar:
            bar.close()


def terminal_bar(total: int, desc: str, unit: str = "tok") -> Any:
    """A tqdm bar on stderr when stderr is a terminal, else None: logs and pipes never get \\r redraws."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False, file=sys.stderr)
