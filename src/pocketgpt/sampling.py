"""How to sample, as one value, and the text side of generation; torch-free.

`SamplingSettings` is everything a caller chooses about one generation (the CLI's flags, a
server's request body, a notebook's keywords), validated once when it is made: a bad value raises
`InvalidSetting` (a PocketError) whose message names the setting, e.g. "temperature must be 0
(greedy) or positive, got -1". `DEFAULTS` is the one home of the defaults (temperature 0.8 ...).

Generation has two layers. The engine (engine.py) speaks token ids: it yields, per step, one new
id per sample (None once a sample has ended), ends a sample at a stop token id or at
max_new_tokens, and lets the layer above end one with `stop(row)`. `TextStream` here is that layer
above: it decodes each sample's ids (tokenizer.StreamDecoder: a multi-byte character split over
tokens is never emitted half), finds stop strings in the decoded text (`StopMatcher`: a stop
string may span many tokens; text that could still turn into one is held back until it cannot,
and released at the end if no stop came), and reports per sample why it ended ("stop" or
"length") and how many tokens it read and wrote. Stop strings are matched in the generated text
only, never in the prompt.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

from .errors import PocketError

FINISH_REASONS = ("stop", "length")
MAX_LOGPROBS = 20  # most likely alternatives per token (OpenAI's chat limit)


class InvalidSetting(PocketError):
    """A sampling setting out of range; `setting` names it, `rule` says what would work."""

    def __init__(self, setting: str, rule: str, value: Any):
        self.setting, self.rule, self.value = setting, rule, value
        super().__init__(f"{setting} {rule}, got {value!r}")

    def as_flag(self) -> str:
        """The same message for a command line: '--top-p must be in (0, 1], got 1.5'."""
        return f"--{self.setting.replace('_', '-')} {self.rule}, got {self.value!r}"


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingSettings:
    """One generation's choices. Frozen and checked in __post_init__, so a value that exists is valid
    (dataclasses.replace checks again). `stop` may be given as one string or any sequence of them."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy; the only place this default is written
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None: a fresh seed from the OS
    repetition_penalty: float = 1.0  # CTRL / Hugging Face form; 1 = off
    stop: tuple[str, ...] = ()  # end a sample when its text contains one; the stop string is not output
    stop_at_eos: bool = False  # BPE tokenizers: end a sample at <|endoftext|>; no-op for char tokenizers; a
    # pretrained model's tokenizer (kind hf) always ends at its end-of-sequence ids
    num_samples: int = 1  # independent samples, generated as one batch
    logprobs: int | None = None  # None: off; k: each token's log-probability and the k most likely ids

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        try:
            stop = tuple(stop)
        except TypeError:
            raise InvalidSetting("stop", "must be a string or a list of strings", self.stop) from None
        object.__setattr__(self, "stop", stop)  # frozen: normalise once, here
        self.validate()

    def validate(self) -> None:
        """Raise InvalidSetting for the first value out of range."""
        checks: list[tuple[str, bool, str]] = [
            ("max_new_tokens", _integer(self.max_new_tokens) and self.max_new_tokens >= 0, "must be zero or positive"),
            ("temperature", _number(self.temperature) and self.temperature >= 0, "must be 0 (greedy) or positive"),
            ("top_k", _integer(self.top_k) and self.top_k >= 0, "must be 0 (off) or positive"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("seed", self.seed is None or _integer(self.seed), "must be an integer or None"),
            ("repetition_penalty", _number(self.repetition_penalty) and self.repetition_penalty > 0,
             "must be positive (1 = off)"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must hold non-empty strings"),
            ("stop_at_eos", isinstance(self.stop_at_eos, bool), "must be true or false"),
            ("num_samples", _integer(self.num_samples) and self.num_samples >= 1, "must be at least 1"),
            ("logprobs", self.logprobs is None or (_integer(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"must be None (off) or an integer from 0 to {MAX_LOGPROBS}"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise InvalidSetting(name, rule, getattr(self, name))

    def replace(self, **changes: Any) -> "SamplingSettings":
        """A copy with some fields changed (and checked)."""
        return dataclasses.replace(self, **changes)


DEFAULTS = SamplingSettings()
SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingSettings))


def as_settings(settings: SamplingSettings | int | None = None, **changes: Any) -> SamplingSettings:
    """One SamplingSettings from either call style: the new one (a SamplingSettings, maybe with
    keyword changes) or the old one (max_new_tokens as a number and the rest as keywords, the
    defaults coming from DEFAULTS). Keyword values of None are left out (None means "not given"),
    except seed, where None is a value (a fresh seed)."""
    changes = {k: v for k, v in changes.items() if v is not None or k == "seed"}
    unknown = sorted(set(changes) - SETTING_NAMES)
    if unknown:
        raise PocketError(f"unknown sampling setting '{unknown[0]}'; the settings are {', '.join(sorted(SETTING_NAMES))}")
    if isinstance(settings, SamplingSettings):
        base = settings
    else:
        base = DEFAULTS
        if settings is not None:
            changes["max_new_tokens"] = settings
    return base.replace(**changes) if changes else base


class StopMatcher:
    """Finds the first stop string in text that arrives piece by piece (a stop string is found
    when its last character arrives; what comes before it is the text).

    push() returns the text that is safe to show and whether a stop string was found. Safe means
    it cannot be the start of a stop string: the longest tail of the text so far that is a prefix
    of some stop string is held back, and released by a later push (once it cannot be one) or by
    flush() at the end. So a stop string is never shown, not even half of it, and one spanning
    many pieces is still found: any occurrence starts inside the held tail or the new piece.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        text = self.held + piece
        # the stop string completed first (the earliest end; on a tie the longer one) ends the text,
        # as if the text had come one character at a time: the result never depends on the pieces
        hits = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)[1]], True
        keep = self._held_tail(text)
        self.held = text[len(text) - keep:]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, when no more text will come."""
        held, self.held = self.held, ""
        return held

    def _held_tail(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


class TokenSource(Protocol):
    """What TextStream needs from the engine (engine.TokenStream): per step one id per sample,
    None once that sample has ended; stop(row) ends one; the counts and reasons per sample."""

    prompt_tokens: int
    completion_tokens: list[int]
    finish_reasons: list[str | None]

    def __iter__(self) -> Iterator[list[int | None]]: ...

    def stop(self, row: int) -> None: ...


class TextDecoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token as logprobs report it: its text and bytes (a token may hold part of a
    character, so bytes are the exact form), its log-probability, and the most likely alternatives
    as (text, bytes, log-probability)."""

    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[tuple[str, tuple[int, ...], float], ...] = ()


@dataclass(frozen=True)
class Chunk:
    """New text of one sample. Its last chunk has finish_reason ("stop" or "length") and the counts.
    With settings.logprobs, `logprobs` holds the sample's tokens since its previous chunk."""

    index: int  # which sample
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Completion:
    """One finished sample: its text (the continuation only, without the prompt or a stop string)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class _Row:
    """One sample's text state: streaming decode, stop strings, and the ids for a final flush."""

    def __init__(self, tokenizer: TextDecoder, new_decoder: Callable[[], Any], stops: Sequence[str]):
        self.tokenizer, self.decoder, self.matcher = tokenizer, new_decoder(), StopMatcher(stops)
        self.ids: list[int] = []
        self.decoded = 0  # characters the streaming decoder has given out so far
        self.done = False
        self.logprobs: list[TokenLogprob] = []  # tokens not yet reported in a chunk

    def take_logprobs(self) -> tuple[TokenLogprob, ...]:
        got, self.logprobs = tuple(self.logprobs), []
        return got

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        piece = self.decoder.push(token)
        self.decoded += len(piece)
        return self.matcher.push(piece)

    def flush(self) -> str:
        """At the end without a stop string: the characters the decoder still waits on (a split
        character shows as U+FFFD, as a full decode shows it) and the held-back text."""
        rest = self.tokenizer.decode(self.ids)[self.decoded:] if self.ids else ""
        text, stopped = self.matcher.push(rest)
        return text if stopped else text + self.matcher.flush()


class TextStream:
    """Text of every sample, step by step, from an engine's TokenSource (see the module docstring).

    Iterate for lists of new text, one string per sample per engine step ('' when a sample has
    nothing new: held back, split character, or ended); or call chunks() for Chunk records, each
    sample ending with one that carries its finish_reason and token counts. Use one or the other.
    """

    def __init__(self, tokens: TokenSource, tokenizer: TextDecoder, stops: Sequence[str] = (),
                 new_decoder: Callable[[], Any] | None = None):
        if new_decoder is None:
            from .tokenizer import StreamDecoder  # here: importing pocketgpt stays light

            def new_decoder() -> Any:
                return StreamDecoder(tokenizer)  # type: ignore[arg-type]

        self.tokens, self.tokenizer = tokens, tokenizer
        self.rows = [_Row(tokenizer, new_decoder, stops) for _ in tokens.finish_reasons]
        self.finished_now: list[int] = []  # the rows that ended in the last step
        self._steps = iter(tokens)
        self._ended = False

    def __iter__(self) -> Iterator[list[str]]:
        for step in self._steps:
            yield self._step(step)

    def _step(self, step: list[int | None]) -> list[str]:
        pieces, self.finished_now = [], []
        logprobs = getattr(self.tokens, "last_logprobs", None) or None
        for i, (row, token) in enumerate(zip(self.rows, step)):
            if logprobs is not None and token is not None and not row.done:
                row.logprobs.append(self._token_logprob(token, *logprobs[i]))
            text, stopped = row.push(token) if token is not None and not row.done else ("", False)
            if stopped:
                self.tokens.stop(i)
            elif self.tokens.finish_reasons[i] is not None and not row.done:
                text += row.flush()  # ended by a stop token or by the length limit
            if self.tokens.finish_reasons[i] is not None and not row.done:
                row.done = True
                self.finished_now.append(i)
            pieces.append(text)
        return pieces

    def _token_logprob(self, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        text, raw = self._token_text(token)
        return TokenLogprob(text, raw, logprob, tuple((*self._token_text(i), lp) for i, lp in top))

    def _token_text(self, token: int) -> tuple[str, tuple[int, ...]]:
        """A token's text and its exact bytes (byte-level tokenizers say them; else the text's UTF-8)."""
        text = self.tokenizer.decode([token])
        piece = getattr(self.tokenizer, "piece", None)
        return text, tuple(piece(token) if piece is not None else text.encode("utf-8"))

    def chunks(self) -> Iterator[Chunk]:
        """Chunk records: non-empty text as it comes, then one final chunk per sample."""
        while (got := self.next_chunks()) is not None:
            yield from got

    def next_chunks(self) -> list[Chunk] | None:
        """The chunks of one engine step (maybe none: text held back); None once every sample has
        ended. A server steps many streams together with this (one engine step each per turn)."""
        if self._ended:
            return None
        t = self.tokens
        try:
            pieces = self._step(next(self._steps))
        except StopIteration:
            self._ended = True
            # rows a step never ended (max_new_tokens 0, or a closed stream) end here
            finals = [Chunk(i, row.flush(), t.finish_reasons[i] or "length", t.prompt_tokens,
                            t.completion_tokens[i], row.take_logprobs())
                      for i, row in enumerate(self.rows) if not row.done]
            for row in self.rows:
                row.done = True
            return finals or None
        out = []
        for i, text in enumerate(pieces):
            if i in self.finished_now:
                row = self.rows[i]
                out.append(Chunk(i, text, t.finish_reasons[i], t.prompt_tokens, t.completion_tokens[i],
                                 row.take_logprobs()))
            elif text:
                out.append(Chunk(i, text, logprobs=self.rows[i].take_logprobs()))
        return out

    def completions(self, on_step: Callable[[], None] | None = None) -> list[Completion]:
        """Run to the end: one Completion per sample; on_step() after every engine step (progress)."""
        texts: list[list[str]] = [[] for _ in self.rows]
        for pieces in self:
            for parts, text in zip(texts, pieces):
                parts.append(text)
            if on_step is not None:
                on_step()
        t = self.tokens
        return [Completion("".join(parts), t.finish_reasons[i] or "length", t.prompt_tokens, t.completion_tokens[i])
                for i, parts in enumerate(texts)]
