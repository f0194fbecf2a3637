import hashlib
import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketgpt.config import PrepareConfig
from pocketgpt.data import BUNDLED, HEADER_BYTES, BatchSampler, eval_windows, open_tokens, prepare, read_meta
from pocketgpt.errors import PocketError
from pocketgpt.tokenizer import load_tokenizer


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


def test_damaged_token_file_is_reported(tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("some words here " * 30)
    out = prepare(PrepareConfig(inputs=[str(f)], out=str(tmp_path / "d")))
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-3])
    with pytest.raises(PocketError, match="truncated"):
        open_tokens(out / "train.bin")
    (out / "train.bin").write_bytes(b"garbage" * 20)
    with pytest.raises(PocketError, match="not a pocketgpt token file"):
        open_tokens(out / "train.bin")


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 3), st.integers(1, 9), st.integers(1, 6))
def test_sampler_is_a_pure_function_of_step(step, micro, block, batch):
    tokens = np.arange(300, dtype=np.uint16)
    a = BatchSampler(tokens, block, batch, seed=3)
    x, y = a.batch(step, micro)
    x2, y2 = BatchSampler(tokens, block, batch, seed=3).batch(step, micro)
    assert (x == x2).all() and (y == y2).all()
    assert x.shape == (batch, block) and (y == x + 1).all()  # targets are the next tokens
    assert x.min() >= 0 and y.max() < 300


def test_eval_windows_cover_every_target_once():
    tokens = np.arange(50)
    targets = np.concatenate([y for _, y in eval_windows(tokens, 16)])
    assert targets.tolist() == list(range(1, 50))


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
