"""Short contexts first (run.short_context): the schedule, the sampler's shorter windows, a run that uses them
and resumes exactly, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from pocketgpt.config import build_train_config
from pocketgpt.data import BatchSampler, context_at
from pocketgpt.errors import PocketError
from pocketgpt.trainer import train

from helpers import TINY, assert_resumes_exactly, losses_by_iter, metrics, tiny_config


def test_the_context_doubles_from_short_to_the_block_over_its_fraction():
    at = [context_at(128, 32, 0.3, p) for p in (0.0, 0.149, 0.15, 0.299, 0.3, 0.9, 1.0)]
    assert at == [32, 32, 64, 64, 128, 128, 128]
    assert [context_at(100, 16, 0.4, p) for p in (0.0, 0.11, 0.21, 0.31, 0.4)] == [16, 16, 32, 64, 100]
    assert context_at(128, 0, 0.3, 0.0) == 128  # off


def test_shorter_windows_come_as_more_rows_of_the_same_tokens():
    tokens = np.arange(10_000, dtype=np.uint16)
    full = BatchSampler(tokens, 32, 4, seed=3)
    x, y = full.batch(5, 1)
    assert np.array_equal((x, y), full.batch(5, 1, 32))  # the block's own context: the batches of before
    xs, ys = full.batch(5, 1, 8)
    assert xs.shape == ys.shape == (16, 8)  # 4 rows x 32 // 8
    assert np.array_equal(ys[:, :-1], xs[:, 1:]) and np.array_equal(xs[:, 1:] - xs[:, :-1], np.ones((16, 7)))
    assert np.array_equal(xs, full.batch(5, 1, 8)[0]) and not np.array_equal(xs, full.batch(6, 1, 8)[0])
    halves = [BatchSampler(tokens, 32, 4, seed=3, share=(rank, 2)).batch(5, 1, 8)[0] for rank in (0, 1)]
    assert np.array_equal(np.concatenate(halves), xs)  # two ranks read the global batch's rows between them


def test_a_run_with_short_contexts_first_logs_them_counts_its_tokens_and_resumes_exactly(data_dir, tmp_path):
    kw = dict(short_context=4, short_context_fraction=0.5, max_iters=20, lr_decay_iters=20, dropout=0.1)
    said: list[str] = []
    a = assert_resumes_exactly(data_dir, tmp_path, 7, echo=said.append, **kw)
    contexts = [s for s in said if s.startswith("context: ")]
    assert contexts == ["context: windows of 4 tokens, 32 rows a micro-batch (short contexts first)",
                        "context: windows of 8 tokens, 16 rows a micro-batch (short contexts first)",
                        "context: windows of 16 tokens, 8 rows a micro-batch"]
    seen = {m["iter"]: m["tokens_seen"] for m in metrics(tmp_path / "straight") if "tokens_seen" in m}
    assert seen[20] == 20 * TINY["batch_size"] * TINY["block_size"]  # every step reads the same tokens
    plain = tmp_path / "plain"
    train(tiny_config(max_iters=20, lr_decay_iters=20, dropout=0.1), data_dir, plain, echo=lambda s: None)
    later = losses_by_iter(plain)
    assert all(abs(a[it] - later[it]) > 1e-6 for it in (1, 2, 3))  # the short windows were what it trained on


@pytest.mark.parametrize("keys,message", [
    ({"short_context": 16}, "short_context must be zero .* from 1 to block_size - 1 .15., got 16"),
    ({"short_context": -1}, "short_context must be zero"),
    ({"short_context": 4, "short_context_fraction": 0.0}, r"short_context_fraction must be in \(0, 1\], got 0.0"),
])
def test_bad_short_context_settings_are_refused_by_name(keys, message):
    with pytest.raises(PocketError, match=message):
        build_train_config(preset=None, overrides={**TINY, **keys})


def test_conversations_are_refused_before_anything_is_written(capsys, tmp_path, data_dir):
    import json

    from helpers import run_cli

    base = tmp_path / "base"
    train(tiny_config(max_iters=2), data_dir, base, echo=lambda s: None)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "to be"},
                                                        {"role": "assistant", "content": "or not"}]})
                               for _ in range(20)))
    code, _, err = run_cli(capsys, "train", str(chats), "--init-from", str(base), "--out", str(tmp_path / "sft"),
                           "--short-context", "4")
    assert code == 2 and "conversations are packed whole into the context; drop --short-context" in err
    assert not (tmp_path / "sft").exists()
