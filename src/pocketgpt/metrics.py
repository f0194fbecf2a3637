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
    """Appends one JSON object per line; on resume drops lines past the resumed iteration."""

    def __init__(self, path: Path, echo: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.echo = echo or (lambda line: print(line, file=sys.stdout, flush=True))

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
