"""Sampling settings as one checked value; stop strings; the text layer over the engine (LoadedModel).

tests/test_engine.py covers the token side (stop token ids, per-row stopping, the repetition
penalty, interleaved streams); these tests cover settings, text and what callers see.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pocketgpt import sampling
from pocketgpt.config import ModelConfig, TrainConfig
from pocketgpt.errors import PocketError
from pocketgpt.loading import LoadedModel
from pocketgpt.model import GPT
from pocketgpt.sampling import (DEFAULTS, Completion, InvalidSetting, SamplingSettings, StopMatcher, TextStream,
                                as_settings)
from pocketgpt.tokenizer import EOT, ByteLevelTokenizer, CharTokenizer

# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("name,value,message", [
    ("temperature", -1, "temperature must be 0 (greedy) or positive, got -1"),
    ("temperature", math.nan, "temperature must be 0 (greedy) or positive"),
    ("temperature", "hot", "temperature must be 0 (greedy) or positive, got 'hot'"),
    ("top_k", -2, "top_k must be 0 (off) or positive, got -2"),
    ("top_k", 2.5, "top_k must be 0 (off) or positive"),
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
    ("top_p", 0, "top_p must be in (0, 1], got 0"),
    ("max_new_tokens", -1, "max_new_tokens must be zero or positive, got -1"),
    ("seed", 1.5, "seed must be an integer or None"),
    ("repetition_penalty", 0, "repetition_penalty must be positive (1 = off), got 0"),
    ("stop", ["ok", ""], "stop must hold non-empty strings"),
    ("stop", [3], "stop must hold non-empty strings"),
    ("stop_at_eos", "yes", "stop_at_eos must be true or false"),
    ("num_samples", 0, "num_samples must be at least 1, got 0"),
])
def test_a_bad_setting_is_named_in_the_error(name, value, message):
    with pytest.raises(InvalidSetting) as info:
        SamplingSettings(**{name: value})
    e = info.value
    assert isinstance(e, PocketError) and e.setting == name
    assert str(e).startswith(message) and "--" not in str(e)  # a setting, not a command-line flag


def test_settings_are_frozen_and_checked_again_when_changed():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.temperature = -1  # type: ignore[misc]
    with pytest.raises(InvalidSetting, match="top_p"):
        DEFAULTS.replace(top_p=2.0)
    assert SamplingSettings(stop="\n").stop == ("\n",) and SamplingSettings(stop=["a", "b"]).stop == ("a", "b")


def test_the_defaults_have_one_home(monkeypatch):
    assert DEFAULTS == SamplingSettings() and DEFAULTS.temperature == SamplingSettings().temperature
    m = loaded(CHARS)
    greedy = m.generate("ab", max_new_tokens=20, temperature=0)
    assert m.generate("ab", max_new_tokens=20, seed=1) != greedy  # the default samples
    monkeypatch.setattr(sampling, "DEFAULTS", DEFAULTS.replace(temperature=0.0))
    assert m.generate("ab", max_new_tokens=20, seed=1) == greedy  # and is read from there


def test_keyword_calls_become_one_settings_value():
    s = as_settings(30, temperature=0.5, top_k=None, seed=None)
    assert s == DEFAULTS.replace(max_new_tokens=30, temperature=0.5)  # None: not given, except seed
    base = SamplingSettings(max_new_tokens=9, seed=4)
    assert as_settings(base) is base and as_settings(base, num_samples=3) == base.replace(num_samples=3)
    with pytest.raises(PocketError, match="unknown sampling setting 'temprature'"):
        as_settings(10, temprature=0.5)


# ---------------------------------------------------------------- stop strings


def first_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The rule, one character at a time: the first stop string to be completed ends the text."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(map(len, done))], True
    return text, False


@given(text=st.text("ab\n", max_size=30), stops=st.lists(st.text("ab\n", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=10))
def test_stop_matcher_shows_only_text_before_the_first_stop_however_it_is_split(text, stops, cuts):
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    want, want_stopped = first_stop(text, stops)
    matcher, shown, stopped, seen = StopMatcher(stops), "", False, ""
    for a, b in zip(bounds, bounds[1:]):
        out, stopped = matcher.push(text[a:b])
        shown, seen = shown + out, seen + text[a:b]
        assert want.startswith(shown)  # nothing shown is ever part of a stop string
        if stopped:
            break
        # held back only while it could still become a stop string
        assert shown + matcher.held == seen and (not matcher.held or any(s.startswith(matcher.held) for s in stops))
    if not stopped:
        shown += matcher.flush()
    assert (shown, stopped) == (want, want_stopped)


class Script:
    """A TokenSource playing fixed ids per row (each row ends at its list's end: "length")."""

    def __init__(self, rows: list[list[int]]):
        self.rows, self.prompt_tokens = rows, 2
        self.completion_tokens = [0] * len(rows)
        self.finish_reasons: list[str | None] = [None] * len(rows)
        self.stops: list[tuple[int, int]] = []  # (row, step) of every stop() call
        self.step = -1

    def __iter__(self):
        for self.step in range(max(map(len, self.rows))):
            if all(r is not None for r in self.finish_reasons):
                return
            out = []
            for i, row in enumerate(self.rows):
                if self.finish_reasons[i] is not None:
                    out.append(None)
                    continue
                self.completion_tokens[i] += 1
                if self.step == len(row) - 1:
                    self.finish_reasons[i] = "length"
                out.append(row[self.step])
            yield out

    def stop(self, row: int) -> None:
        self.finish_reasons[row] = "stop"
        self.stops.append((row, self.step))


CHARS = CharTokenizer("abcdefgh \n|")


def test_a_stop_string_over_several_tokens_is_held_back_then_cut():
    tokens = Script([CHARS.encode("ha\n\nbed")])
    pieces = [p[0] for p in TextStream(tokens, CHARS, ["\n\n"])]
    assert pieces == ["h", "a", "", ""] and tokens.stops == [(0, 3)]  # the first \n never shows
    assert tokens.finish_reasons == ["stop"] and tokens.completion_tokens == [4]


def test_held_text_comes_out_once_it_cannot_be_a_stop_string_or_at_the_end():
    assert [p[0] for p in TextStream(Script([CHARS.encode("a\nb\n")]), CHARS, ["\n\n"])] == ["a", "", "\nb", "\n"]


def test_chunks_end_each_sample_with_its_reason_and_counts():
    tokens = Script([CHARS.encode("ab|cd"), CHARS.encode("efg")])
    chunks = list(TextStream(tokens, CHARS, ["|"]).chunks())
    texts = ["".join(c.text for c in chunks if c.index == i) for i in (0, 1)]
    finals = {c.index: (c.finish_reason, c.prompt_tokens, c.completion_tokens) for c in chunks if c.finish_reason}
    assert texts == ["ab", "efg"] and finals == {0: ("stop", 2, 3), 1: ("length", 2, 3)}
    assert [c.index for c in chunks if c.finish_reason] == [0, 1]  # each when it ends: row 0 at step 3


class Bytes(ByteLevelTokenizer):
    """256 single bytes and <|endoftext|> at id eot (the ids above it shifted by one)."""

    kind = "bytes"

    def __init__(self, eot: int = 256):
        pieces = [bytes([b]) for b in range(256)]
        pieces.insert(eot, EOT.encode())
        super().__init__(pieces, {EOT: eot})

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[b + (b >= self.eot_id) for b in t.encode()] for t in texts]


def test_split_characters_never_come_out_half_and_stops_match_decoded_text():
    tok = Bytes()
    text = "naïve ☃ snow"
    pieces = [p[0] for p in TextStream(Script([tok.encode(text)]), tok)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert "".join(p[0] for p in TextStream(Script([tok.encode(text)]), tok, ["☃"])) == "naïve "


# ---------------------------------------------------------------- LoadedModel: text in, text out


def loaded(tokenizer, block_size: int = 64) -> LoadedModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16)
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger than the init's, so samples vary
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return LoadedModel(model, tokenizer, TrainConfig(), Path("."), {})


def test_stream_chunks_complete_and_generate_agree_on_a_stop_string():
    m = loaded(CHARS)
    s = SamplingSettings(max_new_tokens=40, temperature=1.0, seed=3)
    free = m.complete("ab", s)[0]
    stop = free.text[20:22]
    cut = free.text.index(stop)
    c = m.complete("ab", s.replace(stop=[stop]))[0]
    assert (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) == (free.text[:cut], "stop", 2, cut + 2)
    assert (free.finish_reason, free.completion_tokens) == ("length", 40)
    assert "".join(p[0] for p in m.stream("ab", s.replace(stop=[stop]))) == c.text
    chunks = list(m.stream_chunks("ab", s, stop=[stop]))
    assert "".join(ch.text for ch in chunks) == c.text and chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens == cut + 2
    assert m.generate("ab", s, stop=stop) == "ab" + c.text


def test_each_sample_stops_on_its_own_and_the_batch_when_all_have():
    m = loaded(CHARS)
    s = SamplingSettings(max_new_tokens=30, temperature=1.0, seed=5, num_samples=4)
    free = [c.text for c in m.complete("a", s)]
    stop = free[0][3]
    ticks = []
    got = m.complete("a", s.replace(stop=stop), on_step=lambda: ticks.append(1))
    for f, c in zip(free, got):
        assert c.text == f.split(stop)[0] and c.finish_reason == ("stop" if stop in f else "length")
    assert len(ticks) == max(c.completion_tokens for c in got)


def test_the_old_call_forms_still_work():
    m = loaded(CHARS)
    steps = list(m.stream("ab", 10, 1, temperature=0.8, top_k=0, top_p=1.0, seed=1))  # cli.py's
    assert len(steps) == 10 and all(len(p) == 1 for p in steps)
    text = m.generate("ab", max_new_tokens=10, seed=1)
    assert "ab" + "".join(p[0] for p in steps) == text
    assert [p[0] for p in m.stream("ab", SamplingSettings(max_new_tokens=10, seed=1))] == [p[0] for p in steps]
    ticks = []
    many = m.generate_many("ab", 10, num_samples=3, on_step=lambda: ticks.append(1), seed=1)
    assert len(many) == 3 and len(set(many)) == 3 and all(t.startswith("ab") and len(t) == 12 for t in many)
    assert len(ticks) == 10
    s = SamplingSettings(max_new_tokens=10, seed=1)
    assert m.generate_many("ab", s, num_samples=3, on_step=lambda: None) == many  # the rewired CLI's


def test_stop_at_eos_ends_a_bpe_sample_at_end_of_text():
    m = loaded(Bytes())
    free = m.engine.generate(m.tokenizer.encode("hi"), 16, temperature=0)[0]
    eot = free[6]  # make the id the model writes at step 6 the end-of-text token
    k = free.index(eot)
    m.tokenizer = Bytes(eot)
    s = SamplingSettings(max_new_tokens=16, temperature=0, stop_at_eos=True)
    c = m.complete("hi", s)[0]
    assert (c.finish_reason, c.completion_tokens, c.text) == ("stop", k + 1, m.tokenizer.decode(free[:k]))
    plain = m.complete("hi", s.replace(stop_at_eos=False))[0]
    assert plain.finish_reason == "length" and plain.completion_tokens == 16 and EOT in plain.text


def test_stop_at_eos_changes_nothing_for_a_char_tokenizer():
    m = loaded(CHARS)
    s = SamplingSettings(max_new_tokens=20, seed=2)
    assert m.complete("ab", s.replace(stop_at_eos=True)) == m.complete("ab", s)


def test_bad_prompts_and_settings_fail_when_called_before_any_output():
    m = loaded(CHARS, block_size=8)
    with pytest.raises(PocketError, match="prompt is empty"):
        m.stream("", SamplingSettings())
    with pytest.raises(PocketError, match="context is 8"):
        m.stream_chunks("a" * 9)
    with pytest.raises(PocketError, match="not in this model"):
        m.stream("xyz")
    with pytest.raises(InvalidSetting, match="^temperature must"):
        m.stream("ab", 10, temperature=-1)


def test_interleaved_text_streams_give_what_each_gives_alone():
    m = loaded(CHARS, block_size=16)  # 30 tokens: the window slides
    a, b = SamplingSettings(max_new_tokens=30, seed=1), SamplingSettings(max_new_tokens=30, seed=4)
    b = b.replace(stop=m.complete("ba", b)[0].text[10:12])
    alone = [m.complete("ab", a)[0].text, m.complete("ba", b)[0].text]
    streams, got = [m.stream("ab", a), m.stream("ba", b)], ["", ""]
    while streams[0] or streams[1]:  # a step of one, then a step of the other, until both end
        for i, stream in enumerate(streams):
            pieces = next(stream, None) if stream else None
            if pieces is None:
                streams[i] = None
            else:
                got[i] += pieces[0]
    assert got == alone and len(alone[1]) <= 10  # b ended early, at its stop string


# ---------------------------------------------------------------- many generations: LoadedModel.batch()


def run_text_batch(m: LoadedModel, jobs: dict[str, tuple[str, SamplingSettings]], join_at: dict[str, int],
                   close_at: dict[str, int]) -> tuple[dict[str, list[Completion]], list[int]]:
    """Every job's generation in one TextBatch, as the server's scheduler steps them: each sample's
    text joined from its chunks, its final chunk's reason and counts; and the rows fed per step."""
    batch, handles, texts, finals, fed, step = m.batch(), {}, {}, {}, [], 0
    while len(finals) < len(jobs):
        for name, (prompt, s) in jobs.items():
            if join_at.get(name, 0) == step:
                handles[batch.add(prompt, s)] = name
                texts[name] = [""] * s.num_samples
        for g, name in list(handles.items()):
            if close_at.get(name) == step:
                batch.close(g)
                finals[name], _ = [Completion(t, "closed", 0, 0) for t in texts[name]], handles.pop(g)
        progress = batch.step()
        fed.append(batch.rows_fed)
        for p in progress:
            name = handles[p.generation]
            assert p.error is None
            for ch in p.chunks:
                texts[name][ch.index] += ch.text
                if ch.finish_reason is not None:
                    finals.setdefault(name, [None] * len(texts[name]))[ch.index] = Completion(
                        texts[name][ch.index], ch.finish_reason, ch.prompt_tokens, ch.completion_tokens)
            if p.ended:
                assert all(finals[name]) and p.generation.generated == sum(c.completion_tokens for c in finals[name])
                del handles[p.generation]
        step += 1
    return finals, fed


def test_a_text_batch_gives_each_generation_its_text_alone():
    m = loaded(CHARS, block_size=16)  # 30 tokens: windows slide inside the batch's steps
    s = SamplingSettings(max_new_tokens=30, temperature=1.0, seed=3)
    stop = m.complete("ba", s)[0].text[12:14]
    jobs = {
        "plain": ("ab", s),
        "stopped": ("ba", s.replace(stop=[stop])),
        "samples": ("h", SamplingSettings(max_new_tokens=12, temperature=0.9, top_k=4, seed=8, num_samples=3)),
        "greedy": ("cab", SamplingSettings(max_new_tokens=20, temperature=0, repetition_penalty=1.4)),
        "late": ("g", s.replace(seed=11, top_p=0.9)),
        "closed": ("ab", s.replace(seed=12)),
    }
    got, fed = run_text_batch(m, jobs, join_at={"late": 4, "greedy": 2}, close_at={"closed": 5})
    for name, (prompt, settings) in jobs.items():
        alone = m.complete(prompt, settings)
        if name == "closed":  # what it had when its client left is what it gives alone
            assert alone[0].text.startswith(got[name][0].text) and got[name][0].text
        else:
            assert got[name] == alone, name
    assert got["stopped"][0].finish_reason == "stop"
    assert fed[0] == 6 and max(fed) == 8  # a step feeds every running sample's row (or prompt) in one forward


def test_a_text_batch_refuses_a_bad_prompt_at_add_and_keeps_the_others():
    m = loaded(CHARS, block_size=8)
    batch = m.batch()
    ok = batch.add("ab", SamplingSettings(max_new_tokens=3, seed=1))
    with pytest.raises(PocketError, match="context is 8"):
        batch.add("a" * 9, SamplingSettings())
    progress = [p for _ in range(3) for p in batch.step()]
    assert {p.generation for p in progress} == {ok} and progress[-1].ended
    assert "".join(ch.text for p in progress for ch in p.chunks) == m.complete("ab", SamplingSettings(max_new_tokens=3, seed=1))[0].text


def test_a_failure_in_one_generations_text_ends_that_one_only(monkeypatch):
    m = loaded(CHARS)
    batch = m.batch()
    s = SamplingSettings(max_new_tokens=5, seed=2)
    bad, good = batch.add("ab", s), batch.add("ba", s)
    monkeypatch.setattr(bad.text, "next_chunks", lambda: 1 / 0)
    first = {p.generation: p for p in batch.step()}
    assert isinstance(first[bad].error, ZeroDivisionError) and first[bad].ended
    assert first[good].error is None and not first[good].ended
    assert [p.generation for p in batch.step()] == [good]  # the failed one gave its rows back
