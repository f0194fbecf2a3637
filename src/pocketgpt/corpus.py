"""prepare(): text files -> a data folder (data.py owns its format): inputs, downloads, Gutenberg
stripping, a scan of the corpus, the train/val split, the tokenizer, and the writer of the token files.

The corpus streams through in chunks (a corpus larger than RAM prepares), is built in a temp folder
and swapped in whole (files.swap_dir), so a failed or killed prepare leaves any earlier data folder
as it was.
"""

from __future__ import annotations

import codecs
import contextlib
import enum
import glob
import gzip
import hashlib
import itertools
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Union

import numpy as np
from tqdm import tqdm

from .config import TOKENIZERS, PrepareConfig, check_val_fraction, nearest
from .data import DATA_FORMAT_VERSION, META, SPLITS, TOKENIZER, is_data_dir, split_path, token_dtype, write_header
from .errors import PocketError
from .files import raise_refused, write_dir, write_json
from .tokenizer import (
    DEFAULT_BPE_VOCAB,
    MIN_BPE_VOCAB,
    ByteLevelTokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    save_tokenizer,
    train_bpe,
)

CHUNK_BYTES = 8 << 20
BUNDLED = Path(__file__).parent / "corpora" / "tinyshakespeare.txt.gz"
BUNDLED_NAME = "tinyshakespeare.txt (bundled)"
DOC_SEPARATOR = "\n\n"  # char tokenizer: between documents when several files are prepared together
# BPE kinds encode text in batches of about this many characters, cut into pieces of PIECE_CHARS
# that are encoded in parallel; text with no safe cut is held back up to MAX_PENDING_CHARS.
BATCH_CHARS = 4 << 20
PIECE_CHARS = 1 << 18
MAX_PENDING_CHARS = 64 << 20
DOWNLOAD_TIMEOUT_S = 30


# ---------------------------------------------------------------- inputs

def is_url(item: str) -> bool:
    return item.lower().startswith(("http://", "https://"))


def download_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pocketgpt" / "downloads"


def download(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch url once into the download cache and return the file; later calls reuse it (offline too)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:] or "download"
    path = download_cache_dir() / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if path.is_file():
        return path
    part = path.with_name(f"{path.name}.part-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise_refused(e, path, cleanup=lambda: part.unlink(missing_ok=True))  # a full cache is no network error
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise PocketError(f"cannot download {url} ({reason}); check the address and the network, "
                          "or download the file yourself and give its path") from None
    os.replace(part, path)  # only a complete download is ever cached
    return path


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders as every *.txt inside (recursive, sorted), globs expanded, URLs downloaded."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if is_url(item):
            found = [download(item)]
        elif p.is_file():
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


def resolve_sources(inputs: list[str], strip_gutenberg: bool = False) -> list["Source"]:
    """The documents to prepare, in order; a downloaded file keeps its URL as its name."""
    if not inputs:
        return [Source(None, strip_gutenberg=strip_gutenberg)]
    urls = {download(item): item for item in inputs if is_url(item)}
    return [Source(p, urls.get(p), strip_gutenberg) for p in resolve_inputs(inputs)]


class Source:
    """One document: a file on disk (maybe downloaded) or the bundled corpus."""

    def __init__(self, path: Path | None, name: str | None = None, strip_gutenberg: bool = False):
        self.path = path
        self.name = name or (str(path) if path else BUNDLED_NAME)
        self.strip_gutenberg = strip_gutenberg
        self._noted = False

    def open(self) -> IO[bytes]:
        return open(self.path, "rb") if self.path else gzip.open(BUNDLED, "rb")

    def chunks(self, encoding: str) -> Iterator[str]:
        """The document's text in chunks, without the Gutenberg licence when asked."""
        text = self._decoded(encoding)
        if not self.strip_gutenberg:
            return text
        return strip_gutenberg(text, on_missing=self._note_missing_markers)

    def _note_missing_markers(self, which: str) -> None:
        if not self._noted:  # prepare reads each file more than once; say it once
            self._noted = True
            note(f"--strip-gutenberg: {self.name} has no '*** {which} OF THE PROJECT GUTENBERG EBOOK' "
                 "marker; kept the text on that side")

    def _decoded(self, encoding: str) -> Iterator[str]:
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


def note(message: str) -> None:
    """A one-line remark on stderr that does not stop prepare."""
    print(f"note: {message}", file=sys.stderr, flush=True)


# Project Gutenberg wraps each book in a licence: a header ending in a "*** START OF THE PROJECT
# GUTENBERG EBOOK ... ***" line and a footer from "*** END OF ...". Older files say "THIS" for "THE".
_GUTENBERG_START = re.compile(r"^[ \t]*\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*\n", re.I | re.M)
_GUTENBERG_END = re.compile(r"^[ \t]*\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG", re.I | re.M)
GUTENBERG_HEADER_LIMIT = 1 << 20  # characters to read looking for the START line before giving up


def strip_gutenberg(chunks: Iterable[str], on_missing: Any = None) -> Iterator[str]:
    """The text between the START and END marker lines, streamed; a missing marker keeps that side.

    on_missing("START" | "END" | "START and END") is called at the end when markers were not found.
    """
    buf, started, body_seen, missing = "", False, False, []
    for chunk in chunks:
        buf += chunk
        if not started:
            # match whole lines only: a marker may straddle two chunks
            m = _GUTENBERG_START.search(buf, 0, buf.rfind("\n") + 1)
            if m:
                buf, started = buf[m.end():], True
            elif len(buf) > GUTENBERG_HEADER_LIMIT:
                started = body_seen = True
                missing.append("START")
            else:
                continue
        if not body_seen:  # the blank lines after the START line belong to the licence's layout
            buf = buf.lstrip("\r\n")
            body_seen = bool(buf)
        lines_end = buf.rfind("\n") + 1
        m = _GUTENBERG_END.search(buf, 0, lines_end)
        if m:
            buf = buf[: m.start()]
            break  # the footer is dropped unread
        if lines_end:
            yield buf[:lines_end]
            buf = buf[lines_end:]
    else:
        if not started:
            missing.append("START")
        m = _GUTENBERG_END.search(buf)
        if m:
            buf = buf[: m.start()]
        else:
            missing.append("END")
    if buf:
        yield buf
    if missing and on_missing:
        on_missing(" and ".join(missing))


class _Scan:
    """What the first pass learns about the corpus."""

    def __init__(self) -> None:
        self.chars: set[str] = set()
        self.n_chars = 0
        self.sources: list[dict[str, Any]] = []


def _scan(sources: list[Source], encoding: str, separator_chars: int) -> _Scan:
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
        scan.n_chars += n_chars + (separator_chars if i else 0)
        scan.sources.append({"path": src.name, "bytes": n_bytes, "sha256": digest.hexdigest()})
    if len(sources) > 1:
        scan.chars.update(DOC_SEPARATOR)
    return scan


# ---------------------------------------------------------------- the corpus as a stream of pieces

class Mark(enum.Enum):
    """Non-text items in the stream of corpus pieces."""

    DOC_BREAK = "document break"  # BPE kinds: written as the <|endoftext|> id
    VAL_START = "val split starts"


Piece = Union[str, Mark]


def _corpus(sources: list[Source], encoding: str, separator: str | None) -> Iterator[Piece]:
    """Every document's text in chunks; between documents the separator text, or a DOC_BREAK."""
    for i, src in enumerate(sources):
        if i:
            yield separator if separator is not None else Mark.DOC_BREAK
        yield from src.chunks(encoding)


def _mark_split(pieces: Iterable[Piece], n_train: int) -> Iterator[Piece]:
    """Insert VAL_START after the first n_train characters, cutting the chunk it falls in."""
    seen, marked = 0, False
    for piece in pieces:
        if isinstance(piece, str) and not marked and seen + len(piece) >= n_train:
            cut, marked = n_train - seen, True
            yield from (p for p in (piece[:cut], Mark.VAL_START, piece[cut:]) if p)
        else:
            yield piece
        seen += len(piece) if isinstance(piece, str) else 0


# GPT-2's split pattern (used by both BPE kinds) never joins a non-space character and the whitespace
# after it into one piece, and looks at no text before a match; so text cut right before a space or
# newline that follows a non-space encodes, piece by piece, to exactly the ids of the whole text.
_SAFE_CUT = re.compile(r"(?<=\S)[ \n]")


def split_safely(text: str, size: int) -> list[str]:
    """text in pieces of at least `size` characters (but the last), cut only where BPE allows."""
    pieces, start = [], 0
    while len(text) - start > size:
        m = _SAFE_CUT.search(text, start + size)
        if not m:
            break
        pieces.append(text[start:m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


def _aligned(pieces: Iterable[Piece]) -> Iterator[Piece]:
    """Re-cut text into PIECE_CHARS pieces at safe cuts; marks are hard boundaries and pass through."""
    held = ""
    for piece in pieces:
        if isinstance(piece, Mark):
            if held:
                yield held
            held = ""
            yield piece
            continue
        held += piece
        cuts = split_safely(held, PIECE_CHARS)
        held = cuts.pop()
        yield from cuts
        if len(held) > MAX_PENDING_CHARS:  # no whitespace for 64M characters: cut anyway
            yield held
            held = ""
    if held:
        yield held


def _whole(pieces: Iterable[Piece]) -> Iterator[Piece]:
    """Text joined up to each mark: a pretrained model's tokenizer has split rules of its own (Llama 3's
    and Qwen's join punctuation with the newlines after it), so no cut inside a document is known to
    be safe; each document (each side of the train/val cut) is encoded whole, as its tokenizer would."""
    held: list[str] = []
    for piece in pieces:
        if isinstance(piece, Mark):
            if held:
                yield "".join(held)
            held = []
            yield piece
        else:
            held.append(piece)
    if held:
        yield "".join(held)


class _SplitWriter:
    """Streams encoded pieces to train.bin until VAL_START, then to val.bin.

    Byte-level kinds get safely cut pieces (see _aligned) and encode them in parallel batches.
    """

    def __init__(self, out: Path, tok: Tokenizer, progress: Any = None):
        self.tok, self.split, self.progress = tok, "train", progress
        self.dtype = token_dtype(tok.vocab_size)
        self.files = {s: open(split_path(out, s), "wb") for s in SPLITS}
        self.counts = {s: {"tokens": 0, "bytes": 0} for s in SPLITS}
        self.batched = isinstance(tok, ByteLevelTokenizer)
        # between documents: the end-of-text token (no characters); hf kinds use their end of sequence
        eot = getattr(tok, "eot_id", None)
        self._break = np.array([] if eot is None else [eot], dtype=np.int64)
        self.batch: list[str] = []
        self.batch_chars = 0
        for f in self.files.values():
            write_header(f, tok.vocab_size, 0)

    def write(self, piece: Piece) -> None:
        if piece is Mark.VAL_START:
            self._flush()
            self.split = "val"
        elif piece is Mark.DOC_BREAK:
            self._flush()
            self._emit(self._break, 0)
        elif not self.batched:
            self._emit(self.tok.encode_array(piece), _utf8_len(piece))
        else:
            self.batch.append(piece)
            self.batch_chars += len(piece)
            if self.batch_chars >= BATCH_CHARS:
                self._flush()
        if self.progress is not None and isinstance(piece, str):
            self.progress.update(len(piece))

    def _flush(self) -> None:
        if not self.batch:
            return
        lists = self.tok.encode_batch(self.batch)  # type: ignore[attr-defined]
        ids = np.fromiter(itertools.chain.from_iterable(lists), dtype=self.dtype, count=sum(map(len, lists)))
        self._emit(ids, sum(_utf8_len(p) for p in self.batch))
        self.batch, self.batch_chars = [], 0

    def _emit(self, ids: np.ndarray, n_bytes: int) -> None:
        self.files[self.split].write(ids.astype(self.dtype, copy=False).tobytes())
        self.counts[self.split]["tokens"] += len(ids)
        self.counts[self.split]["bytes"] += n_bytes

    def __enter__(self) -> "_SplitWriter":
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        """Finish both files; after an error only close them, so a failed prepare holds no removed file open."""
        try:
            if kind is None:
                self.close()
        finally:
            for f in self.files.values():
                with contextlib.suppress(OSError):  # a buffer that cannot be flushed: the file closes all the same
                    f.close()

    def close(self) -> None:
        self._flush()
        for split, f in self.files.items():
            f.seek(0)
            write_header(f, self.tok.vocab_size, self.counts[split]["tokens"])
            f.flush()
            os.fsync(f.fileno())
            f.close()


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _stderr_is_tty() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def _check_prepare_config(cfg: PrepareConfig, given: Tokenizer | None = None) -> None:
    if cfg.tokenizer not in TOKENIZERS and not (given is not None and given.kind == cfg.tokenizer):
        raise PocketError(f"unknown tokenizer '{cfg.tokenizer}'{nearest(cfg.tokenizer, TOKENIZERS)}; "
                          f"choose from {', '.join(TOKENIZERS)}")
    check_val_fraction(cfg.val_fraction)
    if cfg.vocab_size and cfg.tokenizer != "bpe":
        raise PocketError(f"--vocab-size is for --tokenizer bpe; {cfg.tokenizer} has a fixed vocabulary")
    if cfg.tokenizer == "bpe" and cfg.vocab_size and cfg.vocab_size < MIN_BPE_VOCAB:
        raise PocketError(f"--vocab-size must be at least {MIN_BPE_VOCAB} for bpe "
                          f"(256 bytes + <|endoftext|>), got {cfg.vocab_size}")


def _build_tokenizer(cfg: PrepareConfig, sources: list[Source], scan: _Scan, n_train: int) -> Tokenizer:
    if cfg.tokenizer == "char":
        return CharTokenizer(scan.chars)
    if cfg.tokenizer == "gpt2":
        return GPT2Tokenizer()
    # bpe: merges are learned from the train split only, so val stays unseen text
    wanted = cfg.vocab_size or DEFAULT_BPE_VOCAB
    train_text = itertools.takewhile(lambda p: p is not Mark.VAL_START,
                                     _mark_split(_corpus(sources, cfg.encoding, None), n_train))
    tok = train_bpe(_texts_only(_aligned(train_text)), wanted, show_progress=_stderr_is_tty())
    if tok.vocab_size < wanted:
        note(f"--vocab-size {wanted} is more than this corpus supports (no pair of tokens left that occurs "
             f"twice); using {tok.vocab_size}")
    return tok


def _texts_only(pieces: Iterable[Piece]) -> Iterator[str]:
    return (p for p in pieces if isinstance(p, str))


def prepare(cfg: PrepareConfig, tokenizer: Tokenizer | None = None) -> Path:
    """Tokenize the inputs (or the bundled corpus) into cfg.out; returns that folder.

    tokenizer: one to encode with instead of the one cfg.tokenizer names (a fine-tune's base model's own:
    a trained BPE, or a pretrained model's hf kind); cfg.tokenizer must then be its kind.
    """
    _check_prepare_config(cfg, tokenizer)
    if tokenizer is not None and tokenizer.kind != cfg.tokenizer:
        raise ValueError(f"prepare(): a {tokenizer.kind} tokenizer given for cfg.tokenizer {cfg.tokenizer}")
    sources = resolve_sources(cfg.inputs, cfg.strip_gutenberg)
    out = Path(cfg.out or default_data_dir(cfg.inputs))
    _check_out_dir(out)
    started = time.time()
    # char: documents joined by a blank line; BPE kinds: by the <|endoftext|> token (no characters)
    separator = DOC_SEPARATOR if cfg.tokenizer == "char" else None
    scan = _scan(sources, cfg.encoding, len(separator or ""))
    n_train = int(scan.n_chars * (1.0 - cfg.val_fraction))
    if n_train < 2 or scan.n_chars - n_train < 2:
        raise PocketError(
            f"the corpus has {scan.n_chars} characters, too few to split into train and val; "
            "give more text or change --val-fraction"
        )
    tok = tokenizer or _build_tokenizer(cfg, sources, scan, n_train)

    def fill(tmp: Path) -> None:
        pieces = _mark_split(_corpus(sources, cfg.encoding, separator), n_train)
        if isinstance(tok, ByteLevelTokenizer):
            pieces = _aligned(pieces)
        elif tok.kind == "hf":
            pieces = _whole(pieces)
        with tqdm(total=scan.n_chars, unit="char", unit_scale=True, desc="tokenizing", file=sys.stderr,
                  disable=not _stderr_is_tty(), leave=False) as progress, _SplitWriter(tmp, tok, progress) as writer:
            for piece in pieces:
                writer.write(piece)
        save_tokenizer(tok, tmp / TOKENIZER)
        write_json(tmp / META, _meta(cfg, tok, writer, scan, time.time() - started))

    write_dir(out, fill, "data folder")
    return out


def builtin_tokenizer(kind: str) -> Tokenizer:
    """A tokenizer that needs no data folder: char (the bundled corpus's characters) or gpt2."""
    if kind == "char":
        with gzip.open(BUNDLED, "rt", encoding="utf-8") as f:
            return CharTokenizer.from_text(f.read())
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "bpe":
        raise PocketError("a bpe tokenizer is trained on your text; give --data DATA_DIR or --model RUN_DIR")
    raise PocketError(f"unknown tokenizer '{kind}'{nearest(kind, TOKENIZERS)}; choose from char, gpt2")


def _meta(cfg: PrepareConfig, tok: Tokenizer, writer: _SplitWriter, scan: _Scan, seconds: float) -> dict[str, Any]:
    from .version import __version__

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
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_data_dir(out))):
        raise PocketError(f"{out} exists and is not a pocketgpt data folder; choose another --out")
