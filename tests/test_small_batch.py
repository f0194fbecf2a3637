"""Small batches first (run.small_batch): the schedule, the samplers' smaller micro-batches, a run that uses them
(alone and with short contexts) and resumes exactly, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from pocketgpt.config import build_train_config
from pocketgpt.data import BatchSampler, ChatSampler, Packed, doubling_at
from pocketgpt.distributed import check_world
from pocketgpt.errors import PocketError
from pocketgpt.trainer import train

from helpers import TINY, assert_resumes_exactly, losses_by_iter, metrics, tiny_config


def test_the_batch_doubles_from_small_to_batch_size_over_its_fraction():
    at = [doubling_at(4, 16, 0.3, p) for p in (0.0, 0.149, 0.15, 0.299, 0.3, 1.0)]
    assert at == [4, 4, 8, 8, 16, 16]  # 4 and 8 each half of the first 0.3, then 16
    assert doubling_at(3, 16, 0.4, 0.35) == 12 and doubling_at(3, 16, 0.4, 0.4) == 16  # 3, 6, 12, then 16
    assert doubling_at(0, 16, 0.3, 0.0) == 16  # off


def test_a_small_batch_is_fewer_windows_split_over_ranks_like_a_full_one():
    tokens = np.arange(10_000, dtype=np.uint16)
    full = BatchSampler(tokens, 32, 8, seed=3)
    assert np.array_equal(full.batch(5, 1, rows=8), full.batch(5, 1))  # batch_size rows: the batches of before
    x, y = full.batch(5, 1, rows=2)
    assert x.shape == y.shape == (2, 32) and np.array_equal(y[:, :-1], x[:, 1:])
    assert np.array_equal(x, full.batch(5, 1, rows=2)[0]) and not np.array_equal(x, full.batch(6, 1, rows=2)[0])
    assert full.batch(5, 1, context=8, rows=2)[0].shape == (8, 8)  # with short contexts: 2 x 32 // 8 windows
    halves = [BatchSampler(tokens, 32, 8, seed=3, share=(rank, 2)).batch(5, 1, rows=2)[0] for rank in (0, 1)]
    assert [h.shape[0] for h in halves] == [1, 1] and np.array_equal(np.concatenate(halves), x)


def test_a_conversation_sampler_takes_fewer_rows_too():
    rows = np.arange(6 * 9, dtype=np.int64).reshape(6, 9)
    packed = Packed(rows, rows[:, 1:].copy(), cut=0, padding=0.0)
    whole = ChatSampler(packed, 4, seed=1)
    x, y = whole.batch(2, 0, rows=2)
    assert x.shape == (2, 8) and np.array_equal(y, x + 1)
    halves = [ChatSampler(packed, 4, seed=1, share=(rank, 2)).batch(2, 0, rows=2)[0] for rank in (0, 1)]
    assert np.array_equal(np.concatenate(halves), x)


def test_a_run_with_small_batches_first_logs_them_counts_its_tokens_and_resumes_exactly(data_dir, tmp_path):
    kw = dict(small_batch=2, small_batch_fraction=0.5, max_iters=20, lr_decay_iters=20, dropout=0.1)
    said: list[str] = []
    small = assert_resumes_exactly(data_dir, tmp_path, 5, echo=said.append, **kw)
    assert [s for s in said if s.startswith("batch: ")] == [
        "batch: 2 rows a micro-batch (small batches first)", "batch: 4 rows a micro-batch (small batches first)",
        "batch: 8 rows a micro-batch"]
    seen = {m["iter"]: m["tokens_seen"] for m in metrics(tmp_path / "straight") if "tokens_seen" in m}
    block, batch = TINY["block_size"], TINY["batch_size"]
    # progress by iterations after the 5 warmup steps, (it - 5) / 15: 2 rows below 0.25 (steps 0-8), 4 rows
    # below 0.5 (steps 9-12), then batch_size
    assert seen[20] == block * (9 * 2 + 4 * 4 + 7 * batch)
    plain = losses_by_iter(train(tiny_config(**{**kw, "small_batch": 0}), data_dir, tmp_path / "plain",
                                 echo=lambda s: None).out)
    assert all(abs(small[it] - plain[it]) > 1e-6 for it in (1, 2, 3))  # the small batches were what it trained on


def test_small_batches_and_short_contexts_combine(data_dir, tmp_path):
    said: list[str] = []
    train(tiny_config(small_batch=4, short_context=8, max_iters=6, lr_decay_iters=6), data_dir, tmp_path / "r",
          echo=said.append)
    # the first step: 4 rows at the block's context read as 8 windows of 8 tokens
    assert said.count("context: windows of 8 tokens, 8 rows a micro-batch (short contexts first)") == 1
    assert metrics(tmp_path / "r")[0]["tokens_seen"] == 4 * TINY["block_size"]


@pytest.mark.parametrize("keys,message", [
    ({"small_batch": 8}, r"small_batch must be zero .* from 1 to batch_size - 1 \(7\), got 8"),
    ({"small_batch": -2}, "small_batch must be zero"),
    ({"small_batch": 2, "small_batch_fraction": 1.5}, r"small_batch_fraction must be in \(0, 1\], got 1.5"),
])
def test_bad_small_batch_settings_are_refused_by_name(keys, message):
    with pytest.raises(PocketError, match=message):
        build_train_config(preset=None, overrides={**TINY, **keys})


def test_a_small_batch_that_does_not_split_over_the_processes_is_refused():
    check_world(8, world=2, small_batch=2)
    with pytest.raises(PocketError, match="small_batch 3 does not split over 2 processes.*use small_batch 2"):
        check_world(8, world=2, small_batch=3)
