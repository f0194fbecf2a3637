"""One place where training reports go: the console and RUN_DIR/metrics.jsonl."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable


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
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def reset(self) -> None:
        self.path.write_text("", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def say(self, line: str) -> None:
        self.echo(line)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    if Path(path).exists():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
