"""Deterministic evaluation: loss, perplexity and bits per byte over a whole token sequence.

Bits per byte = total negative log-likelihood in bits / UTF-8 bytes of the predicted tokens. Unlike
loss per token it compares fairly across tokenizers (a char token is ~1 byte, a BPE token ~4). A chat
split scores the answers' tokens only (its packed rows, data.chat_windows).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .data import IGNORE, eval_windows
from .errors import PocketError
from .model import GPT
from .runtime import Runtime


def evaluate_tokens(
    model: GPT, tokens: np.ndarray, token_bytes: np.ndarray, runtime: Runtime, batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Every token but the first predicted once, in non-overlapping windows of block_size.

    on_batch(n) is told the number of tokens scored after each batch (for a progress bar).
    """
    if len(tokens) < 2:
        raise PocketError(f"need at least 2 tokens to evaluate, have {len(tokens)}")
    return evaluate_windows(model, eval_windows(tokens, model.config.block_size), token_bytes, runtime, batch_size,
                            on_batch)


@torch.no_grad()
def evaluate_windows(
    model: GPT, windows: Iterable[tuple[np.ndarray, np.ndarray]], token_bytes: np.ndarray, runtime: Runtime,
    batch_size: int = 32, on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte over (inputs, targets) windows; a target IGNORE (a chat split's
    context and padding) is not scored."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        nonlocal total_nll, total_tokens, total_bytes
        x = torch.from_numpy(np.stack([p[0] for p in pending])).to(runtime.device)
        y = np.stack([p[1] for p in pending])
        with runtime.autocast():
            logits, _ = model(x)
        nll = F.cross_entropy(logits.float().flatten(0, 1), torch.from_numpy(y).to(runtime.device).flatten(),
                              reduction="sum", ignore_index=IGNORE)
        scored = y[y != IGNORE]
        total_nll += float(nll)
        total_tokens += scored.size
        total_bytes += int(token_bytes[scored].sum())
        pending.clear()
        if on_batch:
            on_batch(int(y.size))

    for x, y in windows:
        if pending and len(x) != len(pending[0][0]):
            flush()  # the short last window goes in a batch of its own
        pending.append((x, y))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    model.train(was_training)
    loss = total_nll / max(total_tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": total_nll / math.log(2) / max(total_bytes, 1),
        "tokens": total_tokens,
        "bytes": total_bytes,
    }
