"""An exponential moving average of the weights (optim.ema_decay): what a run's evals measure and what it
saves as its model, while the optimizer steps the live weights.

The average is a model of its own (a frozen copy), so evals, samples and the best checkpoint read it as
they read any model, and last/ keeps it beside the live weights for an exact resume.
"""

from __future__ import annotations

import copy

import torch

# a decay that starts low and rises to the setting, (1 + t) / (10 + t): early weights, far from where
# training goes, fade fast instead of weighing on the average for thousands of steps
WARMUP_OFFSET = 10


def decay_at(decay: float, step: int) -> float:
    """The average's decay at update `step` (0-based): min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (WARMUP_OFFSET + step))


class WeightAverage:
    """avg <- d * avg + (1 - d) * live after every optimizer step, over the parameters that train."""

    def __init__(self, live: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(live).eval().requires_grad_(False)
        self._pairs = [(a, p) for a, p in zip(self.model.parameters(), live.parameters()) if p.requires_grad]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the live weights in after optimizer step `step` (a function of the step alone: resumes exactly)."""
        averaged, live = zip(*self._pairs)
        torch._foreach_lerp_(list(averaged), list(live), 1.0 - decay_at(self.decay, step))

    @torch.no_grad()
    def restart_from(self, live: torch.nn.Module) -> None:
        """Start the average at the live weights (a resumed run whose last/ holds no average)."""
        for a, p in zip(self.model.parameters(), live.parameters()):
            a.copy_(p)
