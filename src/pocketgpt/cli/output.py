"""What the CLI gives back: its text on stdout, flushed, so pipes and terminals see each line at once;
and its exit codes, defined here once for main() and the commands that return one themselves."""

from __future__ import annotations

import sys

EXIT_USER_ERROR = 2  # a PocketError: the user can fix it, one line says how
EXIT_DIVERGED = 3  # TrainingDiverged (a NaN or infinite loss): no mistake in the command, so not 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C


def say(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()
