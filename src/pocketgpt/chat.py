"""A conversation as a model's prompt: through the model's own chat template, or a plain transcript.

A pretrained chat model (Qwen2.5-Instruct, SmolLM2-Instruct, Llama 3.2-Instruct ...) was trained on
conversations written one exact way, with control tokens around each turn; its tokenizer folder
carries that way as a Jinja template. It is rendered here as transformers renders it (a sandboxed
Jinja environment, blocks trimmed, loop controls, the same globals: raise_exception, strftime_now,
a tojson that keeps non-ASCII text), and the rendered text is encoded with its control tokens and
nothing added in front (the template writes any start token itself), so the ids equal
transformers' apply_chat_template. A model without a template (every model pocketgpt trains from
scratch) gets the role-line transcript: "user: ...\\nassistant:", ended where it would write the
next "user:" line, until it is fine-tuned on conversations: then its tokenizer gets pocketgpt's own
turn tokens after its ids and pocketgpt's template (WithChatTokens, saved with the run).

Torch-free: the CLI's chat loop and the server both call chat_prompt().
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import PocketError

ROLES = ("system", "user", "assistant")
TRANSCRIPT_STOP = "\nuser:"  # a base model goes on to write the user's next line; end the reply there

Message = dict[str, str]


@dataclass(frozen=True)
class ChatPrompt:
    """What a conversation becomes: ids (a rendered template, encoded as it must be) or text (the
    transcript, encoded as any prompt), and the stop strings the reply ends at."""

    prompt: str | list[int]
    stop: tuple[str, ...]


def transcript(messages: Sequence[Message]) -> str:
    """One "role: content" line per message, then "assistant:" for the reply. A base model has never
    seen chat turns, so this only makes a transcript for it to continue."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def chat_prompt(tokenizer: Any, messages: Sequence[Message]) -> ChatPrompt:
    """The prompt for a reply to messages: the tokenizer's chat template when it has one (kind hf),
    else the transcript."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return ChatPrompt(transcript(messages), (TRANSCRIPT_STOP,))
    return ChatPrompt(tokenizer.encode(render_for(tokenizer, messages)), ())


def render_for(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template rendered over messages, with the start and end tokens its folder names."""
    settings = tokenizer.settings
    return render(tokenizer.chat_template, messages, add_generation_prompt=add_generation_prompt,
                  bos_token=settings.get("bos_token"), eos_token=settings.get("eos_token"))


def fit_conversation(tokenizer: Any, messages: Sequence[Message], room: int) -> tuple[list[Message], int]:
    """messages with the oldest exchanges left out until the prompt takes at most `room` tokens (a system turn
    and the last message are always kept); and how many messages were left out."""
    kept, dropped = list(messages), 0
    while len(kept) > 1 and _prompt_tokens(tokenizer, kept) > room:
        first = 1 if kept[0]["role"] == "system" else 0
        if len(kept) - first <= 1:
            break
        # up to and including the first answer: whole exchanges go, never half of one
        end = next((i for i in range(first, len(kept) - 1) if kept[i]["role"] == "assistant"), len(kept) - 2)
        dropped += end - first + 1
        del kept[first:end + 1]
    return kept, dropped


def _prompt_tokens(tokenizer: Any, messages: Sequence[Message]) -> int:
    prompt = chat_prompt(tokenizer, messages).prompt
    return len(prompt) if isinstance(prompt, list) else len(tokenizer.encode(prompt))


def render(template: str, messages: Sequence[Message], add_generation_prompt: bool = True, **tokens: Any) -> str:
    """The template rendered over messages, as transformers renders it; one line when it fails."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise PocketError("this model's chat template needs jinja2: pip install 'pocketgpt[hf]'") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                **tokens)
    except TemplateError as e:
        raise PocketError(f"the model's chat template failed: {str(e).splitlines()[0] if str(e) else e}") from None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """Jinja's own tojson escapes HTML characters; chat templates expect JSON as json.dumps writes it."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


# ---------------------------------------------------------------- pocketgpt's own chat turns

# A model without a chat template (char, gpt2, bpe: every model trained here) gets these turn tokens,
# appended after its own ids, and this template to write a conversation with them.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


class WithChatTokens:
    """A tokenizer of ours with pocketgpt's turn tokens after its own ids: its ids and text are unchanged,
    each turn token in a text is its one id (so a rendered template encodes to them), and generation ends
    at <|end|>. Anything else is the base tokenizer's (its kind, chars, special ...)."""

    def __init__(self, base: Any, template: str = CHAT_TEMPLATE, tokens: tuple[str, ...] = CHAT_TOKENS):
        import re

        self.base, self.chat_template, self.chat_tokens = base, template, tuple(tokens)
        self.first = base.vocab_size
        self._ids = {t: self.first + i for i, t in enumerate(self.chat_tokens)}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self.chat_tokens) + ")")
        self.settings = {"bos_token": None, "eos_token": "<|end|>"}
        base_stop = getattr(base, "eot_id", None)
        self.stop_ids = sorted({self._ids["<|end|>"], *([base_stop] if base_stop is not None else [])})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    @property
    def kind(self) -> str:
        return self.base.kind

    @property
    def vocab_size(self) -> int:
        return self.first + len(self.chat_tokens)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._ids:
                ids.append(self._ids[part])
            elif part:
                ids += self.base.encode(part)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Ids and the character each starts at: per piece between turn tokens (a turn token splits the text
        for the base tokenizer too, so the ids equal encode(text))."""
        ids: list[int] = []
        starts: list[int] = []
        at = 0
        for part in self._split.split(text):
            if part in self._ids:
                ids.append(self._ids[part])
                starts.append(at)
            elif part and hasattr(self.base, "encode_with_offsets"):  # a pretrained model's: as it counts them
                got, own = self.base.encode_with_offsets(part)
                ids += got
                starts += [at + k for k in own]
            elif part:
                got = self.base.encode(part)
                ids += got
                starts += _piece_starts(self.base, got, at)
            at += len(part)
        return ids, starts

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], []
        for i in ids:
            if isinstance(i, int) and self.first <= i < self.vocab_size:
                out += [self.base.decode(run), self.chat_tokens[i - self.first]]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.base.decode(run)

    def piece(self, token_id: int) -> bytes:
        if token_id >= self.first:
            return self.chat_tokens[token_id - self.first].encode("utf-8")
        return self.base.piece(token_id)

    def token_bytes(self) -> np.ndarray:
        """The base's, and 0 for each turn token: it stands for no text (bits per byte)."""
        return np.concatenate([self.base.token_bytes(), np.zeros(len(self.chat_tokens), dtype=np.int64)])

    def to_dict(self) -> dict[str, Any]:
        return {**self.base.to_dict(), "chat": {"tokens": list(self.chat_tokens), "template": self.chat_template}}


def _piece_starts(tok: Any, ids: list[int], at: int) -> list[int]:
    """The character each of ids starts at, the text they encode beginning at character `at` (a token that
    ends a multi-byte character starts where that character does)."""
    piece = getattr(tok, "piece", None)
    if piece is None:  # char: one character a token
        return list(range(at, at + len(ids)))
    import codecs

    decoder, starts, done = codecs.getincrementaldecoder("utf-8")(errors="replace"), [], at
    for i in ids:
        starts.append(done)
        done += len(decoder.decode(piece(i)))
    return starts


def with_chat_tokens(tok: Any) -> Any:
    """tok with pocketgpt's turn tokens and template (a tokenizer that has a template of its own is kept)."""
    return tok if getattr(tok, "chat_template", None) else WithChatTokens(tok)
