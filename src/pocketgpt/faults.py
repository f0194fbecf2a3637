"""Faults that tests inject into a training run, named here, read once when a run starts.

A test that runs ranks under torchrun cannot reach into them, so it asks through the environment; this
module turns what it asks into step hooks, and the trainer only calls the hooks it was handed
(Trainer.step_hooks, each called as hook(iteration, model) before a step). A test in this process may
append a hook of its own instead. With no switch set a run has no hooks: nothing is read per step.

  POCKETGPT_TEST_RANK_EXIT=RANK:ITER[:HOW]  at iteration ITER, rank RANK exits at once (no HOW), stops
      answering (hang), raises an unexpected error (raise: a bug, whose traceback must reach torchrun),
      nudges its first weight (drift: its replica drifts) or makes it NaN (nan: that rank alone diverges),
      so the tests see the other ranks end with a message rather than wait forever.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable

import torch

ENV_RANK_EXIT = "POCKETGPT_TEST_RANK_EXIT"

StepHook = Callable[[int, torch.nn.Module], None]


def step_hooks(rank: int) -> list[StepHook]:
    """The hooks a run on this rank steps with: what the environment asks for, read now."""
    raw = os.environ.get(ENV_RANK_EXIT)
    if not raw:
        return []
    parts = raw.split(":")
    if int(parts[0]) != rank:
        return []
    return [functools.partial(rank_fault, int(parts[1]), parts[2] if len(parts) > 2 else "exit", rank)]


def rank_fault(at: int, how: str, rank: int, it: int, model: torch.nn.Module) -> None:
    """At iteration `at`, this rank fails as `how` says (ENV_RANK_EXIT)."""
    if it != at:
        return
    if how == "hang":
        time.sleep(10**6)
    if how == "raise":
        raise RuntimeError(f"test: an unexpected failure on rank {rank}")
    if how in ("drift", "nan"):
        with torch.no_grad():
            first = next(model.parameters())
            first.add_(1e-3) if how == "drift" else first.fill_(float("nan"))
        return
    os._exit(17)
