"""The data folder (what `prepare` writes, corpus.py): its names, its token files, meta.json, and the
batches training draws from it.

A data folder holds
  train.bin, val.bin   the two splits' token ids (split_path)
  tokenizer.json       the tokenizer that made them (TOKENIZER)
  meta.json            vocab size, dtype, per-split token and byte counts, sources (META, read_meta)
A chat data folder (meta.json's "format": "chat", written by conversations.py) holds the conversations
one after another in train.bin / val.bin, and beside each split
  train.mask.bin       1 where the token is trained on (an assistant's answer), 0 for context
  train.chats.json     each conversation's exchange ends (token offsets) and its source line
packed into rows of the context when training opens it (pack_chats).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

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


def mask_path(data_dir: str | Path, split: str) -> Path:
    """A chat split's loss mask: DATA_DIR/train.mask.bin (a token file of 0 and 1)."""
    return Path(data_dir) / f"{split}.mask.bin"


def chats_path(data_dir: str | Path, split: str) -> Path:
    """A chat split's conversations (exchange ends and sources): DATA_DIR/train.chats.json."""
    return Path(data_dir) / f"{split}.chats.json"


def is_chat_data(meta: dict[str, Any]) -> bool:
    return meta.get("format") == "chat"


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
        self.rows, self._mine = rank_rows(batch_size, share)
        self.share = share
        self._offsets = np.arange(block_size + 1)

    def batch(self, step: int, micro: int = 0, context: int | None = None,
              rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The (rows, context) inputs and targets of (step, micro): batch_size windows of block_size tokens, or,
        with a shorter context (short contexts first), block_size // context times as many shorter windows;
        rows: the global micro-batch's rows at the full context when smaller than batch_size (small batches first)."""
        rng = np.random.default_rng([self.seed, step, micro])
        rows = rows or self.batch_size
        if (context is None or context >= self.block_size) and rows == self.batch_size:
            n_starts, batch_size, mine, offsets = self.n_starts, self.batch_size, self._mine, self._offsets
        else:
            context = min(context or self.block_size, self.block_size)
            n_starts, batch_size = len(self.tokens) - context, context_rows(rows, self.block_size, context)
            mine, offsets = rank_rows(batch_size, self.share)[1], np.arange(context + 1)
        # every rank draws all the starts (cheap) and reads only its own rows' tokens
        starts = rng.integers(0, n_starts, size=batch_size)[mine]
        # one fancy-indexing gather; only the touched pages of the memmap are read
        window = self.tokens[starts[:, None] + offsets].astype(np.int64)
        return window[:, :-1], window[:, 1:]


SHORT_CONTEXT_CHATS = ("short_context cuts text into shorter windows, but conversations are packed whole into the "
                       "context; drop --short-context")


def context_rows(batch_size: int, block_size: int, context: int) -> int:
    """Rows of a micro-batch of windows of `context` tokens: block_size // context times batch_size, so that a
    step with short contexts first reads (about) the tokens of one at the full context."""
    return batch_size * (block_size // context)


def doubling_at(start: int, end: int, fraction: float, progress: float) -> int:
    """A size at a run's progress (0..1) that grows from `start`, doubled in equal shares of the first
    `fraction` of the run while below `end`, then `end` (start 0: `end` throughout)."""
    if not start or progress >= fraction:
        return end
    stages = [start]
    while stages[-1] * 2 < end:
        stages.append(stages[-1] * 2)
    return stages[min(len(stages) - 1, int(progress / fraction * len(stages)))]


def context_at(block_size: int, short_context: int, fraction: float, progress: float) -> int:
    """The window length at a run's progress with short contexts first (short_context 0: block_size)."""
    return doubling_at(short_context, block_size, fraction, progress)


def rank_rows(batch_size: int, share: tuple[int, int]) -> tuple[int, slice]:
    """A rank's rows of every global batch: how many, and which (rank * batch_size / world onwards)."""
    rank, world = share
    if batch_size % world:  # distributed.check_world refuses this with the sizes that work
        raise ValueError(f"batch_size {batch_size} does not split over {world} ranks")
    rows = batch_size // world
    return rows, slice(rank * rows, (rank + 1) * rows)


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
    sampler: "BatchSampler | ChatSampler"
    eval_samplers: "dict[str, BatchSampler | ChatSampler]"
    notes: list[str] = field(default_factory=list)  # what the plan says about the data (chat packing)
    examples: list[dict[str, Any]] = field(default_factory=list)  # chat: held-out questions the evals answer


def open_training_data(data_dir: str | Path, block_size: int, batch_size: int, seed: int,
                       share: tuple[int, int] = (0, 1)) -> TrainData:
    """Open DATA_DIR for a run of this context and batch size; one-line errors when it cannot train.

    share = (rank, world): the training sampler gives this rank its rows of every micro-batch; the eval
    samplers give whole batches (the ranks split the eval batches among them instead).
    """
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if is_chat_data(meta):
        return open_chat_data(data_dir, meta, block_size, batch_size, seed, share)
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


# ---------------------------------------------------------------- chat data (conversations.py writes it)

IGNORE = -100  # a target the loss does not count (F.cross_entropy's ignore_index, model.sliced_loss's)


def write_chat_split(folder: Path, split: str, ids: Sequence[int], mask: Sequence[int], exchanges: list[list[int]],
                     sources: list[str], vocab_size: int) -> None:
    """A chat split: its token ids, the loss mask, and each conversation's exchange ends and source."""
    write_tokens(split_path(folder, split), np.asarray(ids, dtype=np.int64), vocab_size)
    write_tokens(mask_path(folder, split), np.asarray(mask, dtype=np.int64), 2)
    write_json(chats_path(folder, split), {"exchanges": exchanges, "sources": sources})


def write_chat_meta(folder: Path, tokenizer: Tokenizer, splits: dict[str, dict[str, int]],
                    sources: list[dict[str, Any]], examples: list[dict[str, Any]], val_fraction: float,
                    seconds: float) -> None:
    """meta.json of a chat folder: a text folder's keys, "format": "chat", and the held-out examples."""
    from .version import __version__

    write_json(folder / META, {
        "format_version": DATA_FORMAT_VERSION, "pocketgpt_version": __version__, "format": "chat",
        "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
        "dtype": str(token_dtype(tokenizer.vocab_size)), "val_fraction": val_fraction, "splits": splits,
        "sources": sources, "examples": examples, "prepare_seconds": round(seconds, 3)})


def too_long(source: str, tokens: int, block_size: int) -> PocketError:
    return PocketError(f"{source}: its first exchange is {tokens:,} tokens, more than the context of {block_size:,} "
                       "+ 1; raise --block-size or shorten that conversation")


@dataclass
class Packed:
    """A split's conversations packed into rows of the context + 1 tokens, none split between rows.

    targets: the next token where it is trained on, IGNORE elsewhere (context, padding)."""

    tokens: np.ndarray  # (rows, block_size + 1)
    targets: np.ndarray  # (rows, block_size), the targets of tokens[:, :-1]
    cut: int  # conversations cut at an exchange to fit the context
    padding: float  # share of the rows' positions that hold no token

    @property
    def trained(self) -> int:
        return int((self.targets != IGNORE).sum())


def pack_chats(tokens: np.ndarray, mask: np.ndarray, exchanges: list[list[int]], sources: list[str],
               block_size: int) -> Packed:
    """Best-fit decreasing: the longest conversation first, each into the row it fills the most. One longer
    than a row keeps its first exchanges that fit; one whose first exchange does not fit is refused."""
    import bisect

    row_len, pieces, start, cut = block_size + 1, [], 0, 0
    for ends, source in zip(exchanges, sources):
        fits = [e for e in ends if e <= row_len]
        if not fits:
            raise too_long(source, ends[0], block_size)
        cut += fits[-1] < ends[-1]
        pieces.append((start, fits[-1]))
        start += ends[-1]
    order = sorted(range(len(pieces)), key=lambda i: -pieces[i][1])
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    placed: list[list[int]] = []  # each row's pieces
    for i in order:
        size = pieces[i][1]
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = row_len, len(placed)
            placed.append([])
        placed[row].append(i)
        bisect.insort(free, (room - size, row))
    rows = np.zeros((len(placed), row_len), dtype=np.int64)
    keep = np.zeros((len(placed), row_len), dtype=bool)
    for r, members in enumerate(placed):
        at = 0
        for i in members:
            s, n = pieces[i]
            rows[r, at:at + n] = tokens[s:s + n]
            keep[r, at:at + n] = mask[s:s + n] != 0
            at += n
    targets = np.where(keep[:, 1:], rows[:, 1:], IGNORE)
    used = sum(n for _, n in pieces)
    return Packed(rows, targets, cut, 1.0 - used / max(rows.size, 1))


class ChatSampler:
    """Random packed rows, drawn as BatchSampler draws its windows: from (seed, step, micro) alone, each rank
    its share of the global batch's rows."""

    def __init__(self, packed: Packed, batch_size: int, seed: int, share: tuple[int, int] = (0, 1)):
        self.packed, self.batch_size, self.seed, self.share = packed, batch_size, seed, share
        self.rows, self._mine = rank_rows(batch_size, share)

    def batch(self, step: int, micro: int = 0, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step, micro])
        rows = rows or self.batch_size
        mine = self._mine if rows == self.batch_size else rank_rows(rows, self.share)[1]
        picked = rng.integers(0, len(self.packed.tokens), size=rows)[mine]
        return self.packed.tokens[picked, :-1], self.packed.targets[picked]


def chat_windows(packed: Packed) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every packed row once (a whole-split eval of a chat split: only trained tokens are scored)."""
    for tokens, targets in zip(packed.tokens, packed.targets):
        yield tokens[:-1], targets


def open_chat_split(data_dir: Path, split: str, block_size: int) -> tuple[np.ndarray, Packed]:
    """A chat split's tokens as stored, and packed into rows of this context."""
    tokens, _ = open_tokens(split_path(data_dir, split))
    mask, _ = open_tokens(mask_path(data_dir, split))
    chats = read_json(chats_path(data_dir, split), f"the {split} conversations")
    if len(mask) != len(tokens) or sum(e[-1] for e in chats["exchanges"]) != len(tokens):
        raise PocketError(f"the {split} split of {data_dir} does not match its conversations; {PREPARE_HINT}")
    return tokens, pack_chats(np.asarray(tokens, dtype=np.int64), np.asarray(mask), chats["exchanges"],
                              chats["sources"], block_size)


def open_chat_data(data_dir: Path, meta: dict[str, Any], block_size: int, batch_size: int, seed: int,
                   share: tuple[int, int]) -> TrainData:
    """A chat data folder opened for training: both splits packed into rows of this context."""
    (train_tokens, train), (val_tokens, val) = (open_chat_split(data_dir, split, block_size) for split in SPLITS)
    tokenizer = load_tokenizer(data_dir / TOKENIZER)
    scored = val.targets[val.targets != IGNORE]
    notes = [f"chat: {meta['splits']['train']['conversations']:,} conversations in {len(train.tokens):,} rows of "
             f"{block_size + 1} tokens, {train.trained:,} answer tokens trained on, padding {train.padding:.1%}"]
    for split, packed in (("train", train), ("val", val)):
        if packed.cut:
            notes.append(f"chat: {packed.cut:,} {split} conversation{'s' if packed.cut > 1 else ''} longer than the "
                         f"context kept only the exchanges that fit ({block_size} tokens; --block-size to change)")
    return TrainData(
        train_tokens=train_tokens, val_tokens=val_tokens, vocab_size=int(meta["vocab_size"]),
        val_bytes_per_token=float(tokenizer.token_bytes()[scored].sum()) / max(len(scored), 1),
        tokenizer=tokenizer,
        sampler=ChatSampler(train, batch_size, seed, share),
        eval_samplers={"train": ChatSampler(train, batch_size, seed + EVAL_SEED_OFFSET),
                       "val": ChatSampler(val, batch_size, seed + EVAL_SEED_OFFSET)},
        notes=notes, examples=list(meta.get("examples", [])))
