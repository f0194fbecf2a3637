"""The learning-rate schedule (optim.progress and optim.lr_at): warmup, cosine, wsd, constant, lr_decay_iters.

Expected values are worked out by hand from the schedule's definition (peak 1.0, floor 0.1, 4 warmup steps,
100 steps of decay after them), not by calling the code under test another way.
"""

from __future__ import annotations

import pytest

from pocketgpt.config import OptimConfig
from pocketgpt.optim import lr_at, progress

MAX_ITERS = 104  # 4 warmup steps, then 100 of decay: step 4 + k is k % of the way


def _cfg(**kw) -> OptimConfig:
    return OptimConfig(**{"learning_rate": 1.0, "min_lr": 0.1, "warmup_iters": 4, **kw})


def _lr(cfg: OptimConfig, it: int, max_iters: int = MAX_ITERS) -> float:
    return lr_at(cfg, it, progress(cfg, it, max_iters))


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_climbs_linearly_to_the_peak_whatever_the_schedule(schedule):
    cfg = _cfg(schedule=schedule)
    # step i of 4 warmup steps runs at (i + 1) / 5 of the peak; step 4 is the first past the warmup
    assert [_lr(cfg, it) for it in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_progress_counts_the_decay_after_the_warmup():
    cfg = _cfg()
    assert progress(cfg, 2, MAX_ITERS) == 0.0  # inside the warmup: nothing decayed yet
    assert progress(cfg, 4, MAX_ITERS) == 0.0
    assert progress(cfg, 29, MAX_ITERS) == pytest.approx(0.25)
    assert progress(cfg, 54, MAX_ITERS) == pytest.approx(0.5)
    assert progress(cfg, 104, MAX_ITERS) == 1.0
    assert progress(cfg, 500, MAX_ITERS) == 1.0  # never past the end


def test_cosine_falls_from_the_peak_to_min_lr():
    cfg = _cfg(schedule="cosine")
    # min_lr + (1 + cos(pi p)) / 2 * (peak - min_lr): p = 0.25 -> 0.1 + 0.45 * (1 + 0.7071068) = 0.8681981
    assert _lr(cfg, 29) == pytest.approx(0.8681981, abs=1e-7)
    assert _lr(cfg, 54) == pytest.approx(0.55)  # halfway: the mean of peak and floor
    assert _lr(cfg, 79) == pytest.approx(0.2318019, abs=1e-7)  # p = 0.75: 0.1 + 0.45 * (1 - 0.7071068)
    assert _lr(cfg, 104) == pytest.approx(0.1) and _lr(cfg, 150) == pytest.approx(0.1)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_decay_fraction():
    cfg = _cfg(schedule="wsd", decay_fraction=0.4)
    assert _lr(cfg, 4) == 1.0 and _lr(cfg, 63) == 1.0  # p = 0.59: still stable (the decay starts at 0.6)
    assert _lr(cfg, 74) == pytest.approx(0.775)  # p = 0.7: a quarter of the decay, 1 - 0.9 / 4
    assert _lr(cfg, 84) == pytest.approx(0.55)  # p = 0.8: half of it
    assert _lr(cfg, 104) == pytest.approx(0.1)


def test_wsd_without_a_stable_phase_decays_from_the_first_step_after_warmup():
    cfg = _cfg(schedule="wsd", decay_fraction=1.0)
    assert _lr(cfg, 4) == 1.0 and _lr(cfg, 54) == pytest.approx(0.55)


def test_constant_stays_at_the_peak_after_the_warmup():
    cfg = _cfg(schedule="constant")
    assert [_lr(cfg, it) for it in (4, 54, 104, 1000)] == [1.0, 1.0, 1.0, 1.0]


def test_lr_decay_iters_ends_the_decay_early_and_holds_min_lr_after():
    cfg = _cfg(schedule="cosine", lr_decay_iters=54)  # decay over steps 4..54, of a 104-step run
    assert progress(cfg, 29, MAX_ITERS) == pytest.approx(0.5)
    assert _lr(cfg, 29) == pytest.approx(0.55)
    assert _lr(cfg, 54) == pytest.approx(0.1) and _lr(cfg, 80) == pytest.approx(0.1)


def test_a_decay_horizon_inside_the_warmup_goes_to_min_lr_after_it():
    cfg = _cfg(schedule="cosine", lr_decay_iters=3)
    assert progress(cfg, 0, MAX_ITERS) == 1.0
    assert _lr(cfg, 3) == pytest.approx(0.8) and _lr(cfg, 4) == pytest.approx(0.1)  # warmup first, then the floor


def test_a_time_budget_decays_by_the_clock_or_the_steps_whichever_is_further():
    cfg = _cfg(schedule="cosine")
    assert progress(cfg, 10, 1000, elapsed=25.0, max_time=100.0) == pytest.approx(0.25)  # by the clock
    assert progress(cfg, 500, 1000, elapsed=10.0, max_time=100.0) == pytest.approx(0.5)  # by the steps
    assert progress(cfg, 10, 1000, elapsed=150.0, max_time=100.0) == 1.0
    assert lr_at(cfg, 10, progress(cfg, 10, 1000, elapsed=50.0, max_time=100.0)) == pytest.approx(0.55)
