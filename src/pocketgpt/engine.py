"""Generation: prefill + cached decode over a preallocated KV cache; speaks token ids only.

When the context window is full, the window slides: the cache is rebuilt from the newest
block_size // 2 tokens (one prefill) and decoding continues, so long generations stay cheap
instead of recomputing the whole window for every token.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .errors import PocketError
from .model import GPT, KVCache


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    if temperature < 0:
        raise PocketError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k < 0:
        raise PocketError(f"--top-k must be 0 (off) or positive, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise PocketError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise PocketError(f"--max-new-tokens must be zero or positive, got {max_new_tokens}")


def pick_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top-k keeps exactly k tokens."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        # keep the k best by index, so ties at the k-th value cannot let more than k through
        values, indices = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the best token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# Below this many parameters a CPU decode step is a chain of tiny matmuls where waking a second
# thread costs more than it saves (bench/RESULTS.md, "Generation").
SINGLE_THREAD_PARAMS = 5_000_000


@contextlib.contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Engine:
    """Samples from a GPT with a KV cache. One Engine per model; not thread-safe."""

    def __init__(self, model: GPT, device: torch.device | None = None):
        self.model = model.eval()
        self.cfg = model.config
        self.device = device or next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        small = self.device.type == "cpu" and model.num_params() < SINGLE_THREAD_PARAMS
        self.threads = 1 if small else None

    def stream(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        num_samples: int = 1,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every sample, (num_samples,) on CPU, max_new_tokens times."""
        with _cpu_threads(self.threads), torch.inference_mode():
            yield from self._stream(prompt_ids, max_new_tokens, num_samples, temperature, top_k, top_p, seed)

    def _stream(
        self, prompt_ids: list[int], max_new_tokens: int, num_samples: int, temperature: float, top_k: int,
        top_p: float, seed: int | None,
    ) -> Iterator[torch.Tensor]:
        check_sampling(temperature, top_k, top_p, max_new_tokens)
        T = self.cfg.block_size
        if not prompt_ids:
            raise PocketError("the prompt is empty; give at least one character or token")
        if len(prompt_ids) > T:
            raise PocketError(
                f"the prompt is {len(prompt_ids)} tokens but the model's context is {T}; "
                f"shorten it to at most {T} tokens"
            )
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed) if seed is not None else gen.seed()
        cache = KVCache(self.cfg, num_samples, self.device, self.dtype)
        seq = torch.tensor(prompt_ids, dtype=torch.long, device=self.device).repeat(num_samples, 1)
        logits, _ = self.model(seq, cache=cache, last_only=True)
        keep = max(1, T // 2)
        for i in range(max_new_tokens):
            nxt = pick_next(logits[:, -1, :], temperature, top_k, top_p, gen)
            yield nxt.cpu()
            if i == max_new_tokens - 1:
                break
            seq = torch.cat([seq[:, -(T - 1):], nxt[:, None]], dim=1)  # only the window is ever needed
            if cache.pos < T:
                logits, _ = self.model(nxt[:, None], cache=cache, last_only=True)
            else:  # the window is full: slide it and rebuild the cache in one prefill
                cache.reset()
                logits, _ = self.model(seq[:, -keep:], cache=cache, last_only=True)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[list[int]]:
        """All samples at once: num_samples lists of new token ids."""
        steps = list(self.stream(prompt_ids, max_new_tokens, **kwargs))
        if not steps:
            return [[] for _ in range(kwargs.get("num_samples", 1))]
        return torch.stack(steps, dim=1).tolist()
