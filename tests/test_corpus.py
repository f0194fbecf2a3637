"""corpus.py: prepare(), text -> a data folder: its inputs (folders, encodings, Gutenberg, URLs), BPE kinds, the split."""

import errno
import functools
import gzip
import hashlib
import http.server
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketgpt import corpus
from pocketgpt.config import PrepareConfig
from pocketgpt.corpus import BUNDLED, prepare, split_safely, strip_gutenberg
from pocketgpt.data import HEADER_BYTES, open_tokens, read_meta
from pocketgpt.errors import PocketError
from pocketgpt.tokenizer import load_tokenizer

from helpers import fill_disk, run_cli

EOT = 50256  # GPT-2's <|endoftext|>


def test_bundled_corpus_matches_nanogpt_split(tmp_path):
    out = prepare(PrepareConfig(out=str(tmp_path / "d")))
    meta = read_meta(out)
    assert meta["vocab_size"] == 65
    assert meta["splits"]["train"]["tokens"] == 1_003_854
    assert meta["splits"]["val"]["tokens"] == 111_540
    assert meta["sources"][0]["sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    train, vocab = open_tokens(out / "train.bin")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and vocab == 65
    tok = load_tokenizer(out / "tokenizer.json")
    with gzip.open(BUNDLED, "rt", encoding="utf-8") as f:
        text = f.read()
    assert tok.decode(train[:200].tolist()) == text[:200]
    val, _ = open_tokens(out / "val.bin")
    assert tok.decode(val[-100:].tolist()) == text[-100:]


def test_folders_and_globs_in_sorted_order(tmp_path):
    (tmp_path / "books" / "sub").mkdir(parents=True)
    (tmp_path / "books" / "b.txt").write_text("second book " * 20)
    (tmp_path / "books" / "sub" / "c.txt").write_text("third book " * 20)
    (tmp_path / "books" / "a.txt").write_text("first book " * 20)
    (tmp_path / "books" / "notes.md").write_text("ignored")
    out = prepare(PrepareConfig(inputs=[str(tmp_path / "books")], out=str(tmp_path / "d")))
    names = [s["path"] for s in read_meta(out)["sources"]]
    assert [n.split("books/")[1] for n in names] == ["a.txt", "b.txt", "sub/c.txt"]
    for s, f in zip(read_meta(out)["sources"], ["a.txt", "b.txt", "sub/c.txt"]):
        assert s["sha256"] == hashlib.sha256((tmp_path / "books" / f).read_bytes()).hexdigest()
    out2 = prepare(PrepareConfig(inputs=[str(tmp_path / "books" / "*.txt")], out=str(tmp_path / "d2")))
    assert len(read_meta(out2)["sources"]) == 2


def test_uint32_tokens_for_a_vocab_over_65535(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c <= 0xDFFF]
    (tmp_path / "wide.txt").write_text("".join(chars) * 2, encoding="utf-8")
    out = prepare(PrepareConfig(inputs=[str(tmp_path / "wide.txt")], out=str(tmp_path / "d")))
    train, vocab = open_tokens(out / "train.bin")
    assert vocab == len(chars) > 65535 and train.dtype == np.uint32
    assert int(train.max()) == vocab - 1  # ids above 65535 survive the round trip


@pytest.mark.parametrize("content,match", [
    (b"", "is empty"),
    (b"   \n\t\n  ", "only whitespace"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    (b"caf\xe9 au lait " * 10, r"not valid utf-8 at byte 3.*--encoding"),
])
def test_bad_inputs_are_clear_and_write_nothing(tmp_path, content, match):
    f = tmp_path / "in.txt"
    f.write_bytes(content)
    with pytest.raises(PocketError, match=match):
        prepare(PrepareConfig(inputs=[str(f)], out=str(tmp_path / "d")))
    assert not (tmp_path / "d").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in.txt"]


def test_other_encodings_work_when_named(tmp_path):
    f = tmp_path / "in.txt"
    f.write_bytes("café au lait, crème brûlée. ".encode("latin-1") * 10)
    out = prepare(PrepareConfig(inputs=[str(f)], out=str(tmp_path / "d"), encoding="latin-1"))
    assert "é" in load_tokenizer(out / "tokenizer.json").chars


def test_missing_paths_and_empty_folders(tmp_path):
    with pytest.raises(PocketError, match="input not found"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "nope.txt")], out=str(tmp_path / "d")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PocketError, match="has no .txt files"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "empty")], out=str(tmp_path / "d")))


def test_reprepare_replaces_but_never_clobbers_foreign_folders(tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("some words here " * 30)
    out = prepare(PrepareConfig(inputs=[str(f)], out=str(tmp_path / "d")))
    prepare(PrepareConfig(inputs=[str(f)], out=str(out)))  # a data folder may be prepared again
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(PocketError, match="not a pocketgpt data folder"):
        prepare(PrepareConfig(inputs=[str(f)], out=str(tmp_path / "mine")))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=1, max_size=400))
def test_prepare_on_random_bytes_never_crashes(tmp_path_factory, blob):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "in.txt").write_bytes(blob)
    try:
        out = prepare(PrepareConfig(inputs=[str(d / "in.txt")], out=str(d / "out")))
    except PocketError:
        assert not (d / "out").exists()
        return
    tok = load_tokenizer(out / "tokenizer.json")
    train, _ = open_tokens(out / "train.bin")
    val, _ = open_tokens(out / "val.bin")
    assert tok.decode(np.concatenate([train, val]).tolist()) == blob.decode("utf-8")
    assert (out / "train.bin").stat().st_size >= HEADER_BYTES


# ---------------------------------------------------------------- prepare with BPE kinds

def test_bpe_vocab_larger_than_the_corpus_supports(tmp_path, capfd):
    src = tmp_path / "tiny.txt"
    src.write_text("the cat sat on the mat. " * 20, encoding="utf-8")
    out = prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "d"), tokenizer="bpe", vocab_size=5000))
    err = capfd.readouterr().err
    vocab = read_meta(out)["vocab_size"]
    assert 257 < vocab < 5000
    assert "--vocab-size 5000 is more than this corpus supports" in err and f"using {vocab}" in err


@pytest.mark.parametrize("cfg,match", [
    (dict(tokenizer="bpe", vocab_size=100), "at least 257"),
    (dict(tokenizer="gpt2", vocab_size=1000), "fixed vocabulary"),
    (dict(tokenizer="wordpiece"), "unknown tokenizer 'wordpiece'"),
])
def test_bad_tokenizer_options(tmp_path, cfg, match):
    with pytest.raises(PocketError, match=match):
        prepare(PrepareConfig(out=str(tmp_path / "d"), **cfg))


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_prepare_round_trips_and_cuts_safely(tmp_path, monkeypatch, corpus_text, kind):
    # tiny pieces and batches, so that text is cut and encoded in parallel many times
    monkeypatch.setattr(corpus, "PIECE_CHARS", 300)
    monkeypatch.setattr(corpus, "BATCH_CHARS", 2000)
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 4096)
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


def test_a_full_disk_while_preparing_is_one_line_and_keeps_the_earlier_folder(tmp_path, capsys, monkeypatch):
    f = tmp_path / "in.txt"
    f.write_text("some words here " * 300)
    out = tmp_path / "d"
    assert run_cli(capsys, "prepare", f, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    f.write_text("other words there " * 300)

    def full(self, ids, n_bytes):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(corpus._SplitWriter, "_emit", full)
    code, _, err = run_cli(capsys, "prepare", f, "--out", out)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: could not write the data folder {out}: no space left on device (")
    assert err.endswith(f" free); {out} is unchanged: free some space and run the command again\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "in.txt"]  # the temp folder is gone


def test_prepare_on_a_really_full_disk(tiny_fs, tmp_path, capsys):
    f = tmp_path / "in.txt"
    f.write_text("some words here " * 20_000)  # 320,000 characters: 640 KB of uint16 ids
    filler = fill_disk(tiny_fs, 100_000)
    code, _, err = run_cli(capsys, "prepare", f, "--out", tiny_fs / "d")
    assert code == 2 and err.count("\n") == 1, err
    assert err.endswith(" free); no data folder was made: free some space and run the command again\n")
    assert [p.name for p in tiny_fs.iterdir()] == ["filler"]
    filler.unlink()
    assert run_cli(capsys, "prepare", f, "--out", tiny_fs / "d")[0] == 0
