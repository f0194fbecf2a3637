"""How much of a text a model reproduces verbatim: greedy continuations of prompts taken from it.

Learning a book by heart is a legitimate goal; this measures it. N prompts of P tokens start at
evenly spaced positions of the text; each is continued greedily for S tokens (through the Engine,
so the numbers match what `sample --temperature 0` prints) and compared with the S tokens that
really follow. Deterministic: no sampling, no random positions.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .engine import Engine
from .errors import PocketError
from .model import GPT

DEFAULT_PROMPTS = 64
DEFAULT_CONTINUATION = 32
MAX_DEFAULT_PROMPT = 128


def default_prompt_tokens(block_size: int) -> int:
    """Half the context, at most MAX_DEFAULT_PROMPT: enough to pin down a place in the text."""
    return max(1, min(block_size // 2, MAX_DEFAULT_PROMPT))


def prompt_starts(n_tokens: int, prompts: int, prompt_tokens: int, continuation_tokens: int,
                  block_size: int) -> np.ndarray:
    """Evenly spaced start positions of the prompts, after checking the counts fit the text and model."""
    for name, value in (("--prompts", prompts), ("--prompt-tokens", prompt_tokens),
                        ("--continuation-tokens", continuation_tokens)):
        if value < 1:
            raise PocketError(f"{name} must be at least 1, got {value}")
    if prompt_tokens > block_size:
        raise PocketError(f"--prompt-tokens {prompt_tokens} exceeds the model's context of {block_size}; "
                          f"use at most {block_size}")
    span = prompt_tokens + continuation_tokens
    if span > n_tokens:
        raise PocketError(f"--prompt-tokens + --continuation-tokens = {span} but the text has only {n_tokens} "
                          f"tokens; lower them to at most {n_tokens} together")
    return np.linspace(0, n_tokens - span, prompts).round().astype(np.int64)


def score(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Exact-match share, mean matching prefix (tokens and share of S), per-token accuracy; (N, S) arrays."""
    same = predicted == truth
    # the matching prefix ends at the first mismatch (or runs the whole continuation)
    prefix = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return {
        "exact_match": float(same.all(axis=1).mean()),
        "mean_prefix_tokens": float(prefix.mean()),
        "mean_prefix_share": float(prefix.mean() / same.shape[1]),
        "token_accuracy": float(same.mean()),
    }


def memorization(model: GPT, tokens: np.ndarray, prompts: int = DEFAULT_PROMPTS, prompt_tokens: int | None = None,
                 continuation_tokens: int = DEFAULT_CONTINUATION,
                 on_prompt: Callable[[], None] | None = None) -> dict[str, Any]:
    """Score greedy continuations of `prompts` prompts from `tokens` against the true text."""
    block = model.config.block_size
    P = default_prompt_tokens(block) if prompt_tokens is None else prompt_tokens
    S = continuation_tokens
    starts = prompt_starts(len(tokens), prompts, P, S, block)
    was_training = model.training
    engine = Engine(model)  # puts the model in eval mode
    predicted = np.zeros((len(starts), S), dtype=np.int64)
    truth = np.zeros_like(predicted)
    try:
        # The Engine continues one prompt per call (its batch holds samples of one prompt), and greedy
        # samples of one prompt are identical, so each prompt is one call of num_samples=1.
        for i, start in enumerate(starts):
            window = np.asarray(tokens[start : start + P + S], dtype=np.int64)
            predicted[i] = engine.generate(window[:P].tolist(), S, temperature=0.0, num_samples=1)[0]
            truth[i] = window[P:]
            if on_prompt:
                on_prompt()
    finally:
        model.train(was_training)
    return {"prompts": len(starts), "prompt_tokens": P, "continuation_tokens": S, **score(predicted, truth)}
