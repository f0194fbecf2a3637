"""The data folder (what `prepare` writes, corpus.py): its names, its token files, meta.json, and the
batches training draws from it.

A data folder holds
  train.bin, val.bin   the two splits' token ids (split_path)
  tokenizer.json       the tokenizer that made them (TOKENIZER)
  meta.json            vocab size, dtype, per-split token and byte counts, sources (META, read_meta)
and nothing else reads or writes them by hand: a fine-tune that renumbers a char vocabulary does it
through remap_ids.

Token files start with a 64-byte header so a wrong or stale file is caught with a helpful message
instead of silently training on garbage:
    magic b"PGPTTOK1" | version u32 | itemsize u32 | vocab_size u32 | reserved u32 | n_tokens u64
followed by n_tokens little-endian uint16 (vocab <= 65536) or uint32 tokens. Training reads them
memory-mapped, so a corpus larger than RAM trains.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from .errors import PocketError
from .files import atomic_write, read_json, write_json
from .tokenizer import Tokenizer, load_tokenizer, save_tokenizer

TOKENIZER = "tokenizer.json"
META = "meta.json"
SPLITS = ("train", "val")
MAGIC = b"PGPTTOK1"
DATA_FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIIIQ")
PREPARE_HINT = "run `pocketgpt prepare` to (re)create it"


def split_path(data_dir: str | Path, split: str) -> Path:
    """A split's token file: DATA_DIR/train.bin or val.bin."""
    return Path(data_dir) / f"{split}.bin"


def is_data_dir(path: str | Path) -> bool:
    """True for a folder prepare wrote (its meta.json is there)."""
    return (Path(path) / META).is_file()


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    d = Path(data_dir)
    if not is_data_dir(d):
        raise PocketError(f"{d} is not a prepared data folder (no {META}); {PREPARE_HINT}")
    return read_json(d / META, f"data {META}")


# ---------------------------------------------------------------- token files

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def write_header(f: IO[bytes], vocab_size: int, n_tokens: int) -> None:
    itemsize = token_dtype(vocab_size).itemsize
    f.write(_HEADER.pack(MAGIC, DATA_FORMAT_VERSION, itemsize, vocab_size, 0, n_tokens).ljust(HEADER_BYTES, b"\0"))


def open_tokens(path: str | Path) -> tuple[np.ndarray, int]:
    """Memory-map a token file; returns (tokens, vocab_size). Errors say how to fix things."""
    p = Path(path)
    if not p.is_file():
        raise PocketError(f"token file not found: {p}; {PREPARE_HINT}")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        raise PocketError(f"{p} is not a pocketgpt token file (bad header); {PREPARE_HINT}")
    _, version, itemsize, vocab_size, _, n_tokens = _HEADER.unpack(head[: _HEADER.size])
    if version != DATA_FORMAT_VERSION:
        raise PocketError(f"{p} has data format version {version}, expected {DATA_FORMAT_VERSION}; {PREPARE_HINT}")
    if itemsize != token_dtype(vocab_size).itemsize or size != HEADER_BYTES + n_tokens * itemsize:
        raise PocketError(f"{p} is truncated or damaged (size does not match its header); {PREPARE_HINT}")
    if n_tokens == 0:
        return np.zeros(0, dtype=token_dtype(vocab_size)), vocab_size
    tokens = np.memmap(p, dtype=token_dtype(vocab_size), mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
    return tokens, vocab_size


def write_tokens(path: Path, ids: np.ndarray, vocab_size: int) -> None:
    """A whole token file at once (header and ids, in vocab_size's dtype), written atomically."""
    ids = ids.astype(token_dtype(vocab_size), copy=False)

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            write_header(f, vocab_size, len(ids))
            f.write(ids.tobytes())

    atomic_write(path, write, size=HEADER_BYTES + ids.nbytes)


def remap_ids(data_dir: str | Path, lut: np.ndarray, tokenizer: Tokenizer) -> None:
    """Renumber a data folder in place: every id i becomes lut[i], an id of `tokenizer`, which replaces the
    folder's own (meta.json's vocab_size and dtype follow). A fine-tune of a char model uses it to put the
    text's characters into the base vocabulary's ids."""
    data_dir = Path(data_dir)
    vocab = tokenizer.vocab_size
    for split in SPLITS:
        path = split_path(data_dir, split)
        tokens, _ = open_tokens(path)
        ids = lut[np.asarray(tokens, dtype=np.int64)]
        del tokens  # the memory map closes before its file is replaced
        write_tokens(path, ids, vocab)
    save_tokenizer(tokenizer, data_dir / TOKENIZER)
    meta = read_meta(data_dir)
    write_json(data_dir / META, {**meta, "vocab_size": vocab, "dtype": str(token_dtype(vocab))})


# ---------------------------------------------------------------- batches

class BatchSampler:
    """Random windows of block_size + 1 tokens.

    The batch for (step, micro) depends only on (seed, step, micro), so the sampler's position in
    the resume state is just the step: resuming at step N draws exactly the batches an
    uninterrupted run would have drawn. With share = (rank, world) a rank of a distributed run gets
    its slice of those same batch_size rows (rows rank * batch_size / world onwards): the global
    batch, and so the data position, is one cursor whatever the world size.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 share: tuple[int, int] = (0, 1)):
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self.n_starts = len(tokens) - block_size
        if self.n_starts < 1:
            raise PocketError(f"need at least block_size + 1 = {block_size + 1} tokens, have {len(tokens)}")
        rank, world = share
        if batch_size % world:  # distributed.check_world refuses this with the sizes that work
            raise ValueError(f"batch_size {batch_size} does not split over {world} ranks")
        self.rows = batch_size // world
        self._first = rank * self.rows
        self._offsets = np.arange(block_size + 1)

    def batch(self, step: int, micro: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step, micro])
        # every rank draws all the starts (cheap) and reads only its own rows' tokens
        starts = rng.integers(0, self.n_starts, size=self.batch_size)[self._first:self._first + self.rows]
        # one fancy-indexing gather; only the touched pages of the memmap are read
        window = self.tokens[starts[:, None] + self._offsets].astype(np.int64)
        return window[:, :-1], window[:, 1:]


def eval_windows(tokens: np.ndarray, block_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows covering every token but the first once as a target."""
    n = len(tokens)
    for start in range(0, n - 1, block_size):
        chunk = np.asarray(tokens[start : min(start + block_size + 1, n)], dtype=np.int64)
        yield chunk[:-1], chunk[1:]


# ---------------------------------------------------------------- what training reads

EVAL_SEED_OFFSET = 1_000_003  # eval batches come from their own stream, never the training one


@dataclass
class TrainData:
    """A prepared data folder opened for training: both splits, their samplers and the tokenizer.

    The samplers draw a batch from (seed, step, micro) alone, so the data position in a resume
    state is just the step.
    """

    train_tokens: np.ndarray
    val_tokens: np.ndarray
    vocab_size: int
    val_bytes_per_token: float
    tokenizer: Tokenizer
    sampler: BatchSampler
    eval_samplers: dict[str, BatchSampler]


def open_training_data(data_dir: str | Path, block_size: int, batch_size: int, seed: int,
                       share: tuple[int, int] = (0, 1)) -> TrainData:
    """Open DATA_DIR for a run of this context and batch size; one-line errors when it cannot train.

    share = (rank, world): the training sampler gives this rank its rows of every micro-batch; the eval
    samplers give whole batches (the ranks split the eval batches among them instead).
    """
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    vocab_size = int(meta["vocab_size"])
    train, val = (_open_split(data_dir, split, vocab_size, block_size) for split in SPLITS)
    val_split = meta["splits"]["val"]
    return TrainData(
        train_tokens=train, val_tokens=val, vocab_size=vocab_size,
        val_bytes_per_token=val_split["bytes"] / max(val_split["tokens"], 1),
        tokenizer=load_tokenizer(data_dir / TOKENIZER),
        sampler=BatchSampler(train, block_size, batch_size, seed, share),
        eval_samplers={split: BatchSampler(toks, block_size, batch_size, seed + EVAL_SEED_OFFSET)
                       for split, toks in (("train", train), ("val", val))},
    )


def _open_split(data_dir: Path, split: str, vocab_size: int, block_size: int) -> np.ndarray:
    tokens, vs = open_tokens(split_path(data_dir, split))
    if vs != vocab_size:
        raise PocketError(f"{split_path(data_dir, split)} has vocab {vs} but {META} says {vocab_size}; prepare again")
    if len(tokens) < block_size + 1:
        raise PocketError(
            f"the {split} split has {len(tokens)} tokens but block_size {block_size} needs at least "
            f"{block_size + 1}; give more text, lower --block-size"
            + (", or raise --val-fraction when preparing" if split == "val" else "")
        )
    return tokens
