import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketgpt.errors import PocketError
from pocketgpt.tokenizer import CharTokenizer, StreamDecoder, load_tokenizer, save_tokenizer, tokenizer_from_dict


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
