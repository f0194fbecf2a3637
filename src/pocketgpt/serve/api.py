"""The OpenAI request and response shapes, as plain dicts; free of FastAPI and torch.

A request body becomes one `GenRequest` (its prompts and one validated SamplingSettings) or an
`ApiError` naming the field; chunks from the scheduler become OpenAI's response objects here.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..chat import ROLES
from ..sampling import MAX_LOGPROBS, Chunk, InvalidSetting, SamplingSettings, TokenLogprob

# SamplingSettings' names that the API spells differently
API_NAMES = {"max_new_tokens": "max_tokens", "num_samples": "n"}

# Fields a client may send that change nothing here (the OpenAI client sends `model` always).
IGNORED = frozenset({"model", "user", "metadata", "store", "service_tier"})
SAMPLING = frozenset({"max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "repetition_penalty",
                      "stream", "stream_options", "logprobs", "frequency_penalty", "presence_penalty", "logit_bias"})
COMPLETION_FIELDS = IGNORED | SAMPLING | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = IGNORED | SAMPLING | {"messages", "max_completion_tokens", "top_logprobs"}



class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error body, naming the field (param)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class Limits:
    """Per-request and server-wide limits (each has a `pocketgpt serve` flag)."""

    max_tokens: int = 1024  # cap on max_tokens of one request
    max_n: int = 4  # samples per prompt
    max_prompts: int = 8  # prompts in one completions request
    max_stop: int = 4  # stop strings (OpenAI's own limit)
    max_body_bytes: int = 1_000_000
    timeout_s: float = 120.0  # wall clock of one request, waiting included
    max_active: int = 16  # requests generating at once (stepped in turn)
    max_queue: int = 32  # requests waiting for a turn; beyond it: 429
    retry_after_s: int = 1


@dataclass(frozen=True)
class GenRequest:
    """One request, checked: its prompts, one SamplingSettings for all, and how to answer."""

    prompts: list[str | list[int]]  # a chat's: its one prompt, made from messages once the model is known
    settings: SamplingSettings
    stream: bool = False
    include_usage: bool = False
    chat: bool = False
    messages: list[dict[str, str]] = field(default_factory=list)  # a chat's, checked
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _typed(body: dict[str, Any], name: str, ok: Callable[[Any], bool], what: str) -> Any:
    """body[name] when present and not null, checked: a wrong type is a 400 naming the field."""
    v = body.get(name)
    if v is not None and not ok(v):
        raise ApiError(f"{name} must be {what}, got {v!r}", name)
    return v


def _check_fields(body: dict[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:  # a typo ("temprature") should not be silently ignored
        raise ApiError(f"unknown field '{unknown[0]}'", unknown[0])
    _typed(body, "model", lambda v: isinstance(v, str), "a string")
    _typed(body, "user", lambda v: isinstance(v, str), "a string")
    for name in ("frequency_penalty", "presence_penalty"):
        if _typed(body, name, _is_number, "a number") not in (None, 0):
            raise ApiError(f"{name} is not supported; use repetition_penalty (> 1 discourages repeats)", name)
    if _typed(body, "logit_bias", lambda v: isinstance(v, dict), "an object"):
        raise ApiError("logit_bias is not supported", "logit_bias")


def _stop(body: dict[str, Any], limits: Limits) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(f"stop must be a non-empty string or a list of them, got {stop!r}", "stop")
    if len(stops) > limits.max_stop:
        raise ApiError(f"stop has {len(stops)} strings; this server takes at most {limits.max_stop}", "stop")
    return tuple(stops)


def _completion_logprobs(body: dict[str, Any]) -> int | None:
    """/v1/completions: logprobs is how many alternatives per token (0 to 5, OpenAI's range); null: off."""
    k = _typed(body, "logprobs", _is_int, "an integer from 0 to 5 (or null)")
    if k is not None and not 0 <= k <= 5:
        raise ApiError(f"logprobs must be from 0 to 5, got {k}", "logprobs")
    return k


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """/v1/chat/completions: logprobs true turns them on; top_logprobs (0 to 20) asks for alternatives."""
    on = _typed(body, "logprobs", lambda v: isinstance(v, bool), "true or false")
    top = _typed(body, "top_logprobs", _is_int, f"an integer from 0 to {MAX_LOGPROBS}")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise ApiError(f"top_logprobs must be from 0 to {MAX_LOGPROBS}, got {top}", "top_logprobs")
    if top is not None and not on:
        raise ApiError("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if on else None


def _settings(body: dict[str, Any], limits: Limits, max_tokens: int, logprobs: int | None = None) -> SamplingSettings:
    """One SamplingSettings from the body's sampling fields; out-of-range values name their field."""
    if max_tokens > limits.max_tokens:
        raise ApiError(f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}", "max_tokens")
    n = _typed(body, "n", _is_int, "an integer")
    if n is not None and n > limits.max_n:
        raise ApiError(f"n is {n}; this server allows at most {limits.max_n}", "n")
    temperature = _typed(body, "temperature", _is_number, "a number")
    if temperature is not None and not 0 <= temperature <= 2:
        raise ApiError(f"temperature must be in [0, 2] (0 = greedy), got {temperature!r}", "temperature")
    given = {"max_new_tokens": max_tokens, "num_samples": n, "temperature": temperature,
             "top_p": body.get("top_p"), "top_k": body.get("top_k"), "seed": body.get("seed"),
             "repetition_penalty": body.get("repetition_penalty"), "stop": _stop(body, limits),
             "logprobs": logprobs}
    try:  # SamplingSettings keeps the defaults and the range checks; only given values are passed
        return SamplingSettings(**{k: v for k, v in given.items() if v is not None})
    except InvalidSetting as e:
        name = API_NAMES.get(e.setting, e.setting)
        raise ApiError(f"{name} {e.rule}, got {e.value!r}", name) from None


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = bool(_typed(body, "stream", lambda v: isinstance(v, bool), "true or false"))
    options = _typed(body, "stream_options", lambda v: isinstance(v, dict), "an object") or {}
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise ApiError(f"stream_options.include_usage must be true or false, got {usage!r}", "stream_options")
    return stream, stream and usage


def _max_tokens(body: dict[str, Any], names: Sequence[str], default: int) -> int:
    for name in names:
        v = _typed(body, name, _is_int, "an integer")
        if v is not None:
            if v < 0:
                raise ApiError(f"{name} must be zero or positive, got {v}", name)
            return v
    return default


def parse_completion(body: dict[str, Any], limits: Limits) -> GenRequest:
    """POST /v1/completions: prompt (a string or a list of them) and the sampling fields."""
    _check_fields(body, COMPLETION_FIELDS)
    if body.get("echo"):
        raise ApiError("echo is not supported yet", "echo")
    if body.get("suffix") is not None:
        raise ApiError("suffix is not supported", "suffix")
    if body.get("best_of") not in (None, 1):
        raise ApiError("best_of is not supported; use n", "best_of")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError("prompt must be a string or a non-empty list of strings (token ids are not supported)", "prompt")
    if len(prompts) > limits.max_prompts:
        raise ApiError(f"prompt has {len(prompts)} prompts; this server takes at most {limits.max_prompts}", "prompt")
    stream, usage = _stream_flags(body)
    settings = _settings(body, limits, _max_tokens(body, ["max_tokens"], 16),  # 16: OpenAI's default
                         logprobs=_completion_logprobs(body))
    return GenRequest(prompts, settings, stream, usage)


def _message(m: Any) -> dict[str, str]:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ApiError(f"each message needs a role of {', '.join(ROLES)}, got {m!r}", "messages")
    content = m.get("content")
    if isinstance(content, list):  # the parts form: [{"type": "text", "text": ...}]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError("message content parts must be text parts", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(f"message content must be a string, got {content!r}", "messages")
    return {"role": m["role"], "content": content}


def parse_chat(body: dict[str, Any], limits: Limits) -> GenRequest:
    """POST /v1/chat/completions: the messages checked; the server makes them the model's prompt
    (chat.chat_prompt: its chat template, else the transcript, whose reply also ends at its stop)."""
    _check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list", "messages")
    checked = [_message(m) for m in messages]
    stream, usage = _stream_flags(body)
    max_tokens = _max_tokens(body, ["max_completion_tokens", "max_tokens"], min(256, limits.max_tokens))
    settings = _settings(body, limits, max_tokens, logprobs=_chat_logprobs(body))
    return GenRequest([], settings, stream, usage, chat=True, messages=checked)


# ---------------------------------------------------------------- responses


def usage(finals: Sequence[Chunk], n: int) -> dict[str, int]:
    """Token counts over every choice; a prompt is counted once, not once per sample."""
    prompt = sum(c.prompt_tokens for c in finals if c.index % n == 0)
    completion = sum(c.completion_tokens for c in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _head(req: GenRequest, model_id: str, obj: str) -> dict[str, Any]:
    prefix = "chatcmpl-" if req.chat else "cmpl-"
    return {"id": prefix + req.id, "object": obj, "created": req.created, "model": model_id}


def _top_chat(top: Sequence[tuple[str, tuple[int, ...], float]]) -> list[dict[str, Any]]:
    return [{"token": t, "logprob": lp, "bytes": list(b)} for t, b, lp in top]


def logprobs_object(req: GenRequest, tokens: Sequence[TokenLogprob], offset: int) -> dict[str, Any] | None:
    """A choice's logprobs in OpenAI's shape for these tokens (None when not asked for). Chat:
    {"content": [{token, logprob, bytes, top_logprobs}]}; completions: parallel lists tokens,
    token_logprobs, top_logprobs ({text: logprob} per token) and text_offset (each token's place
    in the prompt and text, starting at `offset`). The log-probabilities are the model's own
    distribution, before temperature, top-k, top-p and the repetition penalty."""
    if req.settings.logprobs is None:
        return None
    if req.chat:
        return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes),
                             "top_logprobs": _top_chat(t.top)} for t in tokens], "refusal": None}
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{text: lp for text, _, lp in t.top} for t in tokens] if req.settings.logprobs else None,
            "text_offset": offsets}


def prompt_chars(req: GenRequest, index: int) -> int:
    """Where a choice's text starts in prompt + text (completions' text_offset counts the prompt)."""
    return 0 if req.chat else len(req.prompts[index // req.settings.num_samples])


def full_response(req: GenRequest, model_id: str, texts: dict[int, str], finals: Sequence[Chunk],
                  logprobs: dict[int, list[TokenLogprob]] | None = None) -> dict[str, Any]:
    """The non-streaming answer: every choice in index order, with usage (and logprobs if asked)."""
    choices = []
    for c in sorted(finals, key=lambda c: c.index):
        text = texts.get(c.index, "")
        lp = logprobs_object(req, (logprobs or {}).get(c.index, []), prompt_chars(req, c.index))
        if req.chat:
            choices.append({"index": c.index, "message": {"role": "assistant", "content": text},
                            "logprobs": lp, "finish_reason": c.finish_reason})
        else:
            choices.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
    obj = "chat.completion" if req.chat else "text_completion"
    return {**_head(req, model_id, obj), "choices": choices, "usage": usage(finals, req.settings.num_samples)}


def chunk_response(req: GenRequest, model_id: str, chunk: Chunk, first: bool, offset: int = 0) -> dict[str, Any]:
    """One streamed event for a chunk; in chat the first one of a choice carries the role. offset:
    the choice's text so far in characters, with its prompt (completions' text_offset)."""
    if req.chat:
        delta: dict[str, str] = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
        choice: dict[str, Any] = {"index": chunk.index, "delta": delta}
    else:
        choice = {"index": chunk.index, "text": chunk.text}
    choice.update(logprobs=logprobs_object(req, chunk.logprobs, offset), finish_reason=chunk.finish_reason)
    obj = "chat.completion.chunk" if req.chat else "text_completion"
    return {**_head(req, model_id, obj), "choices": [choice], **({"usage": None} if req.include_usage else {})}


def usage_response(req: GenRequest, model_id: str, finals: Sequence[Chunk]) -> dict[str, Any]:
    """stream_options.include_usage: the last event, with no choices and the usage."""
    obj = "chat.completion.chunk" if req.chat else "text_completion"
    return {**_head(req, model_id, obj), "choices": [], "usage": usage(finals, req.settings.num_samples)}
