"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class PocketError(Exception):
    """Bad input or a state the user can fix; the message says what and how."""


class TrainingDiverged(Exception):
    """The loss or gradient norm became NaN or infinite; nothing from that point on is saved."""
