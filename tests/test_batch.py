"""engine.DecodeBatch: several generations in one KV cache, stepped by one forward together.

What a server relies on: each stream's output equals what it gives alone (same seed), whatever
its neighbours do (join late, leave early, slide their window, use other settings); the batched
step equals the plain one-row step for every architecture option; rows are given back.
"""

import gc
import weakref
from typing import Callable

import pytest
import torch

from pocketgpt import decoder as decoder_mod
from pocketgpt.decoder import Decoder
from pocketgpt.engine import DecodeBatch, Engine, token_logprobs
from pocketgpt.sampling import SamplingSettings
from tests.test_engine import ARCHS, make


def alone(engine: Engine, prompt: list[int], settings: SamplingSettings) -> list[list[int]]:
    return engine.generate(prompt, settings)


def run_together(batch: DecodeBatch, jobs: dict[str, tuple[list[int], SamplingSettings]],
                 join_at: dict[str, int] | None = None, leave_at: dict[str, int] | None = None,
                 pick: bool = True, watch: Callable[[DecodeBatch], None] | None = None) -> dict[str, list[list[int]]]:
    """Step every job in one batch as a server does (one forward for all, the next ids drawn
    together per group of equal settings, then each stream takes its own); a job may join after
    some steps or be closed after some. pick=False: each stream draws alone. watch(batch): after
    each forward."""
    join_at, leave_at = join_at or {}, leave_at or {}
    streams, out, step = {}, {}, 0
    while True:
        for name, (prompt, s) in jobs.items():
            if name not in streams and join_at.get(name, 0) == step:
                streams[name], out[name] = batch.start(prompt, s), [[] for _ in range(s.num_samples)]
        for name, st in list(streams.items()):
            if leave_at.get(name) == step:
                st.close()
                del streams[name]
        if not streams and all(n in out for n in jobs):
            return out
        batch.advance()
        if watch is not None:
            watch(batch)
        if pick:
            batch.pick(list(streams.values()))
        for name, st in list(streams.items()):
            if st.done:
                st.close()
                del streams[name]
                continue
            for row, tok in zip(out[name], next(st)):
                if tok is not None:
                    row.append(tok)
        step += 1


@pytest.mark.parametrize("arch", ARCHS)
def test_step_rows_equals_one_row_steps_at_different_positions(arch):
    model = make(**ARCHS[arch])
    dec = Decoder(model)
    idx = torch.randint(0, 23, (3, 16))
    with torch.inference_mode():
        full, _ = model(idx)
        shared = dec.new_cache(5, idx.device)  # 5 rows, 3 used: rows 1, 2, 4 (not adjacent)
        lengths, rows = [3, 7, 11], [1, 2, 4]
        for r, row, n in zip(range(3), rows, lengths):
            dec.prefill(idx[r : r + 1, :n], shared.rows(row, 1))
        got = dec.step_rows(idx[[0, 1, 2], lengths], torch.tensor(lengths), shared, torch.tensor(rows))
        want = full[[0, 1, 2], lengths]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        adjacent = dec.new_cache(3, idx.device)  # the view path: rows 0..2
        for r, n in enumerate(lengths):
            dec.prefill(idx[r : r + 1, :n], adjacent.rows(r, 1))
        got = dec.step_rows(idx[[0, 1, 2], lengths], torch.tensor(lengths), adjacent, slice(0, 3))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,pick", [("gpt2", True), ("modern", True), ("gpt2", False)])
def test_streams_in_one_batch_equal_their_output_alone(arch, pick):
    engine = Engine(make(block_size=12, **ARCHS[arch]))
    jobs = {
        "greedy": ([1, 2, 3], SamplingSettings(max_new_tokens=20, temperature=0)),  # slides its window
        "greedy2": ([5], SamplingSettings(max_new_tokens=6, temperature=0)),
        "seeded": ([4, 5, 6, 7, 8, 9], SamplingSettings(max_new_tokens=9, temperature=1.0, seed=7, num_samples=3)),
        "topk": ([7], SamplingSettings(max_new_tokens=14, temperature=0.9, top_k=5, seed=3, repetition_penalty=1.3)),
        "topk2": ([3], SamplingSettings(max_new_tokens=14, temperature=0.9, top_k=5, top_p=0.8, seed=4)),
        "short": ([2, 2], SamplingSettings(max_new_tokens=2, temperature=1.0, seed=1)),
        "same": ([2, 2], SamplingSettings(max_new_tokens=8, temperature=1.0, seed=9)),
    }
    want = {name: alone(engine, *job) for name, job in jobs.items()}
    batch = DecodeBatch(engine)
    got = run_together(batch, jobs, join_at={"topk": 3, "short": 5}, pick=pick)
    assert got == want
    assert batch.used == 0 and not batch.members  # every row given back
    assert batch.cache.k.size(1) >= 5  # it grew from one row to hold them all


def test_a_growing_batch_gives_each_stream_what_it_gives_alone():
    # a model declaring 4096 positions: the shared batch starts with no room and doubles it as its
    # longest row needs (what is cached copied along), never past twice that row's tokens, while
    # rows join, leave and move down; once empty it gives the room back and keeps its rows
    engine = Engine(make(block_size=4096, **ARCHS["llama"]))
    jobs = {
        "long": ([1, 2, 3], SamplingSettings(max_new_tokens=70, temperature=1.0, seed=1)),
        "late": ([4, 5, 6, 7, 8, 9, 10], SamplingSettings(max_new_tokens=30, temperature=0.8, top_k=6, seed=2,
                                                          num_samples=2, repetition_penalty=1.2)),
        "leaves": ([2], SamplingSettings(max_new_tokens=60, temperature=0)),
        "greedy": ([5, 6], SamplingSettings(max_new_tokens=25, temperature=0)),
    }
    want = {name: alone(engine, *job) for name, job in jobs.items()}
    batch = DecodeBatch(engine)
    assert batch.cache.nbytes == 0
    rooms, longest = [], [0]

    def watch(b: DecodeBatch) -> None:
        longest[0] = max([longest[0], *(m.cache.pos for m in b.members)])
        rooms.append(b.cache.capacity)
        assert longest[0] <= b.cache.capacity <= 2 * longest[0]

    got = run_together(batch, jobs, join_at={"late": 6, "greedy": 20}, leave_at={"leaves": 30}, watch=watch)
    assert {n: got[n] for n in ("long", "late", "greedy")} == {n: want[n] for n in ("long", "late", "greedy")}
    assert got["leaves"] == [row[:30] for row in want["leaves"]]
    assert len(set(rooms)) >= 4 and max(rooms) < 2 * 72  # it grew several times, to about its longest row
    assert batch.cache.nbytes == 0 and batch.cache.k.size(1) >= 4  # empty: no room held, rows kept


def test_a_row_that_grows_to_the_context_then_slides_gives_what_it_gives_alone():
    engine = Engine(make(block_size=24, **ARCHS["modern"]))
    jobs = {"slides": ([1, 2, 3], SamplingSettings(max_new_tokens=60, temperature=1.0, seed=4)),
            "short": ([7], SamplingSettings(max_new_tokens=10, temperature=0.9, seed=5, num_samples=2))}
    want = {name: alone(engine, *job) for name, job in jobs.items()}
    rooms: list[int] = []
    got = run_together(DecodeBatch(engine), jobs, join_at={"short": 30},
                       watch=lambda b: rooms.append(b.cache.capacity))
    assert got == want
    assert rooms[0] < 24 and max(rooms) == 24  # it started short and grew to the context, never past it


def test_a_stream_leaving_early_moves_its_neighbours_without_changing_them():
    engine = Engine(make(block_size=32))
    jobs = {n: ([i + 1, i + 2], SamplingSettings(max_new_tokens=15, temperature=1.0, seed=i, num_samples=2))
            for i, n in enumerate("abcd")}
    want = {n: alone(engine, *job) for n, job in jobs.items()}
    batch = DecodeBatch(engine)
    got = run_together(batch, jobs, leave_at={"a": 4, "c": 9})
    for n in "bd":
        assert got[n] == want[n]
    for n, steps in (("a", 4), ("c", 9)):  # what they had before leaving is what they give alone
        assert got[n] == [row[:steps] for row in want[n]]


def test_finished_rows_ride_along_and_stop_tokens_end_only_their_sample():
    engine = Engine(make(block_size=32))
    s = SamplingSettings(max_new_tokens=12, temperature=1.0, seed=5, num_samples=4)
    want = engine.generate([3], s, stop_token_ids=[4])
    batch = DecodeBatch(engine)
    other = batch.start([9, 9], SamplingSettings(max_new_tokens=12, temperature=0))
    mine = batch.start([3], s, stop_token_ids=[4])
    rows = [[] for _ in range(4)]
    while not mine.done:
        batch.advance()
        batch.pick([other, mine])
        next(other)
        for row, tok in zip(rows, next(mine)):
            if tok is not None:
                row.append(tok)
    assert rows == want


def test_logprobs_are_the_models_distribution_and_its_top_ids():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    got = token_logprobs(logits, torch.tensor([1, 2]), top=2)
    lp = torch.log_softmax(logits, dim=-1)
    assert got[0][0] == pytest.approx(float(lp[0, 1]))
    assert [i for i, _ in got[0][1]] == [0, 1] and [i for i, _ in got[1][1]][0] == 2
    assert got[1][1][0][1] == pytest.approx(float(lp[1, 2]))
    assert token_logprobs(logits, torch.tensor([0, 0]), top=0)[1][1] == []


def test_stream_reports_logprobs_of_the_tokens_it_picks():
    engine = Engine(make(block_size=32))
    model = engine.model
    stream = engine.start([1, 2, 3], SamplingSettings(max_new_tokens=4, temperature=0, logprobs=3))
    ids = [1, 2, 3]
    for _ in range(4):
        (tok,) = next(stream)
        with torch.inference_mode():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0][0, -1], dim=-1)
        chosen, top = stream.last_logprobs[0]
        assert chosen == pytest.approx(float(lp[tok]), abs=1e-4)
        assert [i for i, _ in top] == lp.topk(3).indices.tolist() and top[0][0] == tok  # greedy: the best
        ids.append(tok)


def test_a_shared_batch_never_steps_in_float16_under_auto(monkeypatch):
    monkeypatch.setattr(decoder_mod, "LOW_PRECISION_MIN_PARAMS", 0)
    monkeypatch.setattr(decoder_mod, "low_precision_candidates", lambda: [torch.float16, torch.bfloat16])
    monkeypatch.setattr(decoder_mod, "LOGIT_TOLERANCE", 1.0)  # let both pass the probe
    engine = Engine(make(scale=0.1))
    assert engine.step_dtype == torch.float16  # one generation: float16 matrix-vector steps
    batch = DecodeBatch(engine)
    assert batch.dec.step_dtype == torch.bfloat16  # many rows: float16 matmuls are slow
    s = SamplingSettings(max_new_tokens=6, temperature=1.0, seed=2)
    alone_in_batch = run_together(DecodeBatch(engine), {"a": ([1, 2], s)})["a"]
    together = run_together(DecodeBatch(engine), {"a": ([1, 2], s), "b": ([3], s)})["a"]
    assert together == alone_in_batch  # the batch's dtype does not depend on its row count


def test_several_samples_of_one_generation_step_as_many_rows_under_auto(monkeypatch):
    # `sample --num-samples 64` is one generation of 64 rows: float16's many-row matmuls are slow
    monkeypatch.setattr(decoder_mod, "LOW_PRECISION_MIN_PARAMS", 0)
    monkeypatch.setattr(decoder_mod, "low_precision_candidates", lambda: [torch.float16, torch.bfloat16])
    monkeypatch.setattr(decoder_mod, "LOGIT_TOLERANCE", 1.0)
    engine = Engine(make(scale=0.1))
    few = engine.start([1, 2], SamplingSettings(max_new_tokens=4, num_samples=decoder_mod.MANY_ROWS - 1))
    many = engine.start([1, 2], SamplingSettings(max_new_tokens=4, num_samples=decoder_mod.MANY_ROWS))
    assert few.batch.dec.step_dtype == torch.float16 and many.batch.dec.step_dtype == torch.bfloat16
    assert all(len(row) == 4 for row in engine.generate([1, 2], 4, num_samples=decoder_mod.MANY_ROWS))


@pytest.mark.parametrize("arch", ARCHS)
def test_windows_filled_in_a_step_equal_their_own_prefill(arch):
    # step_rows' fills (a slid window, a deferred prompt) ride in the steps' forward: their logits
    # and the keys and values they leave in the cache are what a prefill of their own gives
    model = make(**ARCHS[arch])
    dec = Decoder(model)
    idx = torch.randint(0, 23, (6, 16))
    with torch.inference_mode():
        full, _ = model(idx)
        cache = dec.new_cache(6, idx.device)  # rows 0, 2, 3 step; rows 1 and 4..5 are filled
        lengths = {0: 5, 2: 9, 3: 12}
        for row, n in lengths.items():
            dec.prefill(idx[row : row + 1, :n], cache.rows(row, 1))
        steps = torch.tensor(list(lengths))
        fills = [(1, idx[1:2, :7]), (4, idx[4:6, :10])]
        got = dec.step_rows(idx[steps, list(lengths.values())], torch.tensor(list(lengths.values())), cache,
                            steps, fills)
        want = torch.cat([full[steps, list(lengths.values())], full[1:2, 6], full[4:6, 9]])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for first, ids in fills:
            alone = dec.new_cache(ids.size(0), idx.device)
            dec.prefill(ids, alone)
            L = ids.size(1)
            torch.testing.assert_close(cache.k[:, first : first + ids.size(0), :, :L], alone.k[:, :, :, :L],
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache.v[:, first : first + ids.size(0), :, :L], alone.v[:, :, :, :L],
                                       rtol=1e-5, atol=1e-5)


def test_a_batch_prefills_new_prompts_in_its_next_forward():
    engine = Engine(make(block_size=32))
    batch = DecodeBatch(engine)
    assert batch.merge_fills  # float32 steps: the model's own tensors, what prefill() uses
    s = SamplingSettings(max_new_tokens=5, temperature=1.0, seed=3)
    first = batch.start([1, 2, 3], s)
    assert first.rows.cache.pos == 0 and first.rows.due  # checked and given rows, not prefilled yet
    batch.advance(), batch.pick([first])
    ids = [next(first)]
    second = batch.start([4, 5], s)  # joins while the first runs: its prompt rides in the first's step
    assert batch.advance() == 2 and second.rows.cache.pos == 2 and first.rows.cache.pos == 4
    batch.pick([first, second])
    ids.append(next(first))
    want = engine.generate([1, 2, 3], s)
    assert [row for step in ids for row in step] == want[0][:2]
    with pytest.raises(Exception, match="prompt"):  # a bad prompt is still refused at start
        batch.start([], s)


@pytest.mark.parametrize("ending", ["length", "stop"])
def test_a_finished_generation_is_freed_without_the_cycle_collector(ending):
    # a generation's own batch holds its rows, not its stream: dropping the stream frees the
    # batch and its cache at once (64 GPT-2 samples: gigabytes)
    engine = Engine(make())
    gc.disable()
    try:
        tokens = engine.start([1, 2], SamplingSettings(max_new_tokens=3, num_samples=2, seed=0))
        if ending == "length":
            for _ in tokens:
                pass
        else:
            next(tokens)
            tokens.stop(0)
            tokens.stop(1)
        cache = weakref.ref(tokens.batch.cache)
        del tokens
        assert cache() is None
    finally:
        gc.enable()


def test_a_generation_stopped_early_by_its_caller_is_freed_too():
    engine = Engine(make())
    caches = []
    start = engine.start

    def watched(*args, **kwargs):
        tokens = start(*args, **kwargs)
        caches.append(weakref.ref(tokens.batch.cache))
        return tokens

    engine.start = watched
    gc.disable()
    try:
        it = engine.start([1, 2], SamplingSettings(max_new_tokens=50, num_samples=2))
        next(it)
        del it  # a `break` out of the loop: the caller drops the stream
        assert caches[0]() is None
        with pytest.raises(ZeroDivisionError):  # an exception inside generate (Ctrl-C, say)
            engine.generate([1, 2], 5, on_step=lambda: 1 / 0, num_samples=2)
        assert caches[1]() is None
    finally:
        gc.enable()
