"""prepare(): text files -> headered token files + tokenizer.json + meta.json; batches for training.

Token files (`train.bin`, `val.bin`) start with a 64-byte header so a wrong or stale file is
caught with a helpful message instead of silently training on garbage:
    magic b"PGPTTOK1" | version u32 | itemsize u32 | vocab_size u32 | reserved u32 | n_tokens u64
followed by n_tokens little-endian uint16 (vocab <= 65536) or uint32 tokens. Training reads them
memory-mapped, so a corpus larger than RAM trains.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import os
import shutil
import struct
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from .checkpoint import read_json, write_json
from .config import TOKENIZERS, PrepareConfig, nearest
from .errors import PocketError
from .tokenizer import CharTokenizer, Tokenizer, save_tokenizer

MAGIC = b"PGPTTOK1"
DATA_FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIIIQ")
CHUNK_BYTES = 8 << 20
BUNDLED = Path(__file__).parent / "corpora" / "tinyshakespeare.txt.gz"
BUNDLED_NAME = "tinyshakespeare.txt (bundled)"
DOC_SEPARATOR = "\n\n"  # between documents when several files are prepared together
PREPARE_HINT = "run `pocketgpt prepare` to (re)create it"


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


class BatchSampler:
    """Random windows of block_size + 1 tokens.

    The batch for (step, micro) depends only on (seed, step, micro), so the sampler's position in
    the resume state is just the step: resuming at step N draws exactly the batches an
    uninterrupted run would have drawn.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self.n_starts = len(tokens) - block_size
        if self.n_starts < 1:
            raise PocketError(f"need at least block_size + 1 = {block_size + 1} tokens, have {len(tokens)}")
        self._offsets = np.arange(block_size + 1)

    def batch(self, step: int, micro: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step, micro])
        starts = rng.integers(0, self.n_starts, size=self.batch_size)
        # one fancy-indexing gather; only the touched pages of the memmap are read
        window = self.tokens[starts[:, None] + self._offsets].astype(np.int64)
        return window[:, :-1], window[:, 1:]


def eval_windows(tokens: np.ndarray, block_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows covering every token but the first once as a target."""
    n = len(tokens)
    for start in range(0, n - 1, block_size):
        chunk = np.asarray(tokens[start : min(start + block_size + 1, n)], dtype=np.int64)
        yield chunk[:-1], chunk[1:]


# ---------------------------------------------------------------- inputs

def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders as every *.txt inside (recursive, sorted), globs expanded."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = sorted(q for q in p.rglob("*.txt") if q.is_file())
            if not found:
                raise PocketError(f"folder {p} has no .txt files; point at the text files or the folder holding them")
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(os.path.expanduser(item), recursive=True) if Path(q).is_file())
            if not found:
                raise PocketError(f"no files match {item!r}")
        else:
            raise PocketError(f"input not found: {item}")
        out.extend(q for q in found if q not in out)
    return out


class Source:
    """One document: a file on disk or the bundled corpus."""

    def __init__(self, path: Path | None):
        self.path = path
        self.name = str(path) if path else BUNDLED_NAME

    def open(self) -> IO[bytes]:
        return open(self.path, "rb") if self.path else gzip.open(BUNDLED, "rb")

    def chunks(self, encoding: str) -> Iterator[str]:
        """Decoded text in chunks; bad bytes -> an error naming the file and the byte offset."""
        try:
            decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        except LookupError:
            raise PocketError(f"unknown encoding {encoding!r}; try utf-8, latin-1 or cp1252") from None
        offset = 0
        with self.open() as f:
            while True:
                raw = f.read(CHUNK_BYTES)
                if offset == 0 and b"\0" in raw[:8192] and not encoding.lower().startswith("utf-16"):
                    raise PocketError(f"{self.name} looks like a binary file (it contains NUL bytes), not text")
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise PocketError(
                        f"{self.name} is not valid {encoding} at byte {offset + e.start}; "
                        f"give its encoding with --encoding (e.g. latin-1 or cp1252)"
                    ) from None
                if text:
                    yield text
                if not raw:
                    return
                offset += len(raw)


class _Scan:
    """What the first pass learns about the corpus."""

    def __init__(self) -> None:
        self.chars: set[str] = set()
        self.n_chars = 0
        self.sources: list[dict[str, Any]] = []


def _scan(sources: list[Source], encoding: str) -> _Scan:
    scan = _Scan()
    for i, src in enumerate(sources):
        digest, n_bytes, n_chars, blank = hashlib.sha256(), 0, 0, True
        with src.open() as f:
            for raw in iter(lambda: f.read(CHUNK_BYTES), b""):
                digest.update(raw)
                n_bytes += len(raw)
        for text in src.chunks(encoding):
            scan.chars.update(text)
            n_chars += len(text)
            blank = blank and text.isspace()
        if n_bytes == 0:
            raise PocketError(f"{src.name} is empty; give a file with some text in it")
        if blank:
            raise PocketError(f"{src.name} holds only whitespace; give a file with some text in it")
        scan.n_chars += n_chars + (len(DOC_SEPARATOR) if i else 0)
        scan.sources.append({"path": src.name, "bytes": n_bytes, "sha256": digest.hexdigest()})
    if len(sources) > 1:
        scan.chars.update(DOC_SEPARATOR)
    return scan


def _corpus_text(sources: list[Source], encoding: str) -> Iterator[str]:
    for i, src in enumerate(sources):
        if i:
            yield DOC_SEPARATOR
        yield from src.chunks(encoding)


class _SplitWriter:
    """Streams encoded text to train.bin until the split point, then to val.bin."""

    def __init__(self, out: Path, tok: Tokenizer, n_train: int):
        self.tok, self.n_train, self.seen = tok, n_train, 0
        self.dtype = token_dtype(tok.vocab_size)
        self.files = {s: open(out / f"{s}.bin", "wb") for s in ("train", "val")}
        self.counts = {s: {"tokens": 0, "bytes": 0} for s in ("train", "val")}
        for f in self.files.values():
            write_header(f, tok.vocab_size, 0)

    def write(self, text: str) -> None:
        cut = max(0, min(len(text), self.n_train - self.seen))
        for split, part in (("train", text[:cut]), ("val", text[cut:])):
            if part:
                ids = self.tok.encode_array(part).astype(self.dtype)
                self.files[split].write(ids.tobytes())
                self.counts[split]["tokens"] += len(ids)
                self.counts[split]["bytes"] += len(part.encode("utf-8", "surrogatepass"))
        self.seen += len(text)

    def close(self) -> None:
        for split, f in self.files.items():
            f.seek(0)
            write_header(f, self.tok.vocab_size, self.counts[split]["tokens"])
            f.flush()
            os.fsync(f.fileno())
            f.close()


def prepare(cfg: PrepareConfig) -> Path:
    """Tokenize the inputs (or the bundled corpus) into cfg.out; returns that folder."""
    if cfg.tokenizer not in TOKENIZERS:
        raise PocketError(f"unknown tokenizer '{cfg.tokenizer}'{nearest(cfg.tokenizer, TOKENIZERS)}; "
                          f"choose from {', '.join(TOKENIZERS)}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise PocketError(f"--val-fraction must be between 0 and 1 (exclusive), got {cfg.val_fraction}")
    sources = [Source(p) for p in resolve_inputs(cfg.inputs)] if cfg.inputs else [Source(None)]
    out = Path(cfg.out or default_data_dir(cfg.inputs))
    _check_out_dir(out)
    started = time.time()
    scan = _scan(sources, cfg.encoding)
    n_train = int(scan.n_chars * (1.0 - cfg.val_fraction))
    if n_train < 2 or scan.n_chars - n_train < 2:
        raise PocketError(
            f"the corpus has {scan.n_chars} characters, too few to split into train and val; "
            "give more text or change --val-fraction"
        )
    tok = CharTokenizer(scan.chars)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = _SplitWriter(tmp, tok, n_train)
        for text in _corpus_text(sources, cfg.encoding):
            writer.write(text)
        writer.close()
        save_tokenizer(tok, tmp / "tokenizer.json")
        meta = _meta(cfg, tok, writer, scan, time.time() - started)
        write_json(tmp / "meta.json", meta)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _meta(cfg: PrepareConfig, tok: Tokenizer, writer: _SplitWriter, scan: _Scan, seconds: float) -> dict[str, Any]:
    from . import __version__

    return {
        "format_version": DATA_FORMAT_VERSION,
        "pocketgpt_version": __version__,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": str(writer.dtype),
        "val_fraction": cfg.val_fraction,
        "encoding": cfg.encoding,
        "splits": writer.counts,
        "sources": scan.sources,
        "prepare_seconds": round(seconds, 3),
        "config": asdict(cfg),
    }


def default_data_dir(inputs: list[str]) -> Path:
    if not inputs:
        return Path("data") / "shakespeare-char"
    return Path("data") / (Path(inputs[0].rstrip("/")).stem or "corpus")


def _check_out_dir(out: Path) -> None:
    """Refuse to replace a folder that is not a prepared data dir."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").is_file())):
        raise PocketError(f"{out} exists and is not a pocketgpt data folder; choose another --out")


def _replace_dir(tmp: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    d = Path(data_dir)
    if not (d / "meta.json").is_file():
        raise PocketError(f"{d} is not a prepared data folder (no meta.json); {PREPARE_HINT}")
    return read_json(d / "meta.json", "data meta.json")
