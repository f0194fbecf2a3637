"""A conversation as a model's prompt: through the model's own chat template, or a plain transcript.

A pretrained chat model (Qwen2.5-Instruct, SmolLM2-Instruct, Llama 3.2-Instruct ...) was trained on
conversations written one exact way, with control tokens around each turn; its tokenizer folder
carries that way as a Jinja template. It is rendered here as transformers renders it (a sandboxed
Jinja environment, blocks trimmed, loop controls, the same globals: raise_exception, strftime_now,
a tojson that keeps non-ASCII text), and the rendered text is encoded with its control tokens and
nothing added in front (the template writes any start token itself), so the ids equal
transformers' apply_chat_template. A model without a template (every model pocketgpt trains from
scratch) gets the role-line transcript: "user: ...\\nassistant:", ended where it would write the
next "user:" line.

Torch-free: the CLI's chat loop and the server both call chat_prompt().
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any, Sequence

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
    settings = tokenizer.settings
    text = render(template, messages, bos_token=settings.get("bos_token"), eos_token=settings.get("eos_token"))
    return ChatPrompt(tokenizer.encode(text), ())


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
