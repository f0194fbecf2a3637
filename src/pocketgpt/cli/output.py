"""Where the CLI's text goes: stdout, flushed, so pipes and terminals see each line at once."""

from __future__ import annotations

import sys


def say(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()
