"""Tokenizers behind one small interface: encode, decode, vocab_size, token_bytes, JSON save/load.

Kept free of torch so `prepare` and `tokenize` stay light.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np

from .errors import PocketError

TOKENIZER_FORMAT_VERSION = 1


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_bytes(self) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...


def describe_char(ch: str) -> str:
    """'é' -> "'é' (U+00E9 LATIN SMALL LETTER E WITH ACUTE)" so invisible characters can be named."""
    name = unicodedata.name(ch, "")
    shown = repr(ch)[1:-1] if not ch.isprintable() else ch
    return f"'{shown}' (U+{ord(ch):04X}{' ' + name if name else ''})"


class CharTokenizer:
    """One token per Unicode character; the vocabulary is the sorted set of characters seen."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars: list[str] = sorted(set(chars))
        if not self.chars or any(len(c) != 1 for c in self.chars):
            raise PocketError("a char tokenizer needs a non-empty list of single characters")
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        # Sorted code points let numpy map a whole text to ids with one searchsorted.
        self._points = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode_array(self, text: str) -> np.ndarray:
        try:
            points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        except UnicodeEncodeError:  # lone surrogates: take the slow path
            points = np.array([ord(c) for c in text], dtype=np.uint32)
        ids = np.searchsorted(self._points, points)
        ids = np.minimum(ids, len(self._points) - 1)
        bad = self._points[ids] != points
        if bad.any():
            ch = text[int(np.argmax(bad))]
            raise PocketError(
                f"the text contains {describe_char(ch)}, which is not in this model's "
                f"{self.vocab_size}-character vocabulary; remove it, or prepare data that contains it"
            )
        return ids.astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        try:
            return "".join(chars[i] for i in ids)
        except IndexError:
            raise PocketError(f"token id out of range for a vocabulary of {self.vocab_size}") from None

    def token_bytes(self) -> np.ndarray:
        """UTF-8 length of each token, for bits per byte."""
        return np.array([len(c.encode("utf-8", "surrogatepass")) for c in self.chars], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "format_version": TOKENIZER_FORMAT_VERSION, "chars": self.chars}


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    kind = d.get("kind")
    if d.get("format_version") != TOKENIZER_FORMAT_VERSION:
        raise PocketError(
            f"tokenizer format version {d.get('format_version')} is not supported "
            f"(this pocketgpt reads version {TOKENIZER_FORMAT_VERSION})"
        )
    if kind == "char":
        chars = d.get("chars")
        if not isinstance(chars, list):
            raise PocketError("tokenizer.json of kind 'char' has no list of 'chars'")
        return CharTokenizer(chars)
    raise PocketError(f"unknown tokenizer kind {kind!r} in tokenizer.json")


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    from .checkpoint import atomic_write_text  # local: checkpoint is torch-free at import too

    atomic_write_text(Path(path), json.dumps(tok.to_dict(), ensure_ascii=False))


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = Path(path)
    if not p.is_file():
        raise PocketError(f"no tokenizer.json at {p}")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PocketError(f"{p} is not valid JSON ({e}); prepare the data again") from None
    if not isinstance(d, dict):
        raise PocketError(f"{p} does not hold a tokenizer")
    return tokenizer_from_dict(d)


class StreamDecoder:
    """Turns ids arriving one by one into text pieces, holding back incomplete characters."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        if len(self.ids) > 64:  # keep decode cost bounded on long streams
            self.ids, self.emitted = [], 0
        return piece
