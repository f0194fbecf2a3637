"""data.py: the data folder's names and format: token files, meta.json, renumbering ids, batches."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketgpt import data
from pocketgpt.config import PrepareConfig
from pocketgpt.corpus import prepare
from pocketgpt.data import BatchSampler, eval_windows, open_tokens, read_meta, remap_ids, split_path
from pocketgpt.errors import PocketError
from pocketgpt.tokenizer import CharTokenizer, load_tokenizer


def test_the_data_folder_is_named_in_one_place(tmp_path):
    (tmp_path / "in.txt").write_text("some words here " * 30)
    out = prepare(PrepareConfig(inputs=[str(tmp_path / "in.txt")], out=str(tmp_path / "d")))
    assert sorted(p.name for p in out.iterdir()) == sorted([data.TOKENIZER, data.META,
                                                           *(split_path(out, s).name for s in data.SPLITS)])
    assert data.is_data_dir(out) and not data.is_data_dir(tmp_path)
    with pytest.raises(PocketError, match=f"no {data.META}.*pocketgpt prepare"):
        read_meta(tmp_path)


def test_remap_ids_renumbers_every_split_into_another_vocabulary(tmp_path):
    (tmp_path / "in.txt").write_text("abc cab " * 40)
    out = prepare(PrepareConfig(inputs=[str(tmp_path / "in.txt")], out=str(tmp_path / "d")))
    own = load_tokenizer(out / data.TOKENIZER)
    before = {s: open_tokens(split_path(out, s))[0].copy() for s in data.SPLITS}
    wide = "".join(chr(c) for c in range(0x400, 0x400 + 70_000) if not 0xD800 <= c <= 0xDFFF)
    base = CharTokenizer.from_text(wide + "abc ")  # over 65536 ids: the files become uint32
    lut = np.asarray(base.encode("".join(own.chars)), dtype=np.int64)
    remap_ids(out, lut, base)
    for s in data.SPLITS:
        tokens, vocab = open_tokens(split_path(out, s))
        assert vocab == base.vocab_size and tokens.dtype == np.uint32
        assert base.decode(tokens.tolist()) == own.decode(before[s].tolist())  # the same text, in the base's ids
    meta = read_meta(out)
    assert meta["vocab_size"] == base.vocab_size and meta["dtype"] == "uint32"
    assert load_tokenizer(out / data.TOKENIZER).to_dict() == base.to_dict()


def test_damaged_token_file_is_reported(tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("some words here " * 30)
    out = prepare(PrepareConfig(inputs=[str(f)], out=str(tmp_path / "d")))
    raw = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(raw[:-3])
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
