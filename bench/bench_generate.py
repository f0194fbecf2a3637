"""Generation speed of pocketgpt's KV-cache engine vs a no-cache loop (nanoGPT-style), same weights.

    python bench/bench_generate.py                 # reference shape: 4 layers, 4 heads, 128 wide, T=64
    python bench/bench_generate.py --gpt2-small    # 12 x 12 x 768, vocab 50257, 200 new tokens

Prints a table of tokens/s (median of --repeats runs, interleaved A, B, A, B ...).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pocketgpt.config import ModelConfig
from pocketgpt.engine import Engine
from pocketgpt.model import GPT


@torch.inference_mode()
def no_cache_generate(model: GPT, prompt: list[int], n: int, seed: int) -> list[int]:
    """What nanoGPT's generate does: crop to the context, full forward for every new token."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor([prompt])
    T = model.config.block_size
    for _ in range(n):
        logits, _ = model(idx[:, -T:])
        probs = torch.softmax(logits[:, -1, :] / 0.8, dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return idx[0, len(prompt):].tolist()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpt2-small", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.gpt2_small:
        cfg = ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
        n = args.new_tokens or 200
    else:
        cfg = ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
        n = args.new_tokens or 500
    model = GPT(cfg).eval()
    engine = Engine(model)
    rows = []
    for label, prompt in (("1-token prompt", [0]), (f"{cfg.block_size}-token prompt", [1] * cfg.block_size)):
        base, ours = [], []
        engine.generate(prompt, 5, temperature=0.8, seed=0)  # warm-up
        for r in range(args.repeats):
            base.append(n / timed(lambda: no_cache_generate(model, prompt, n, r)))
            ours.append(n / timed(lambda: engine.generate(prompt, n, temperature=0.8, seed=r)))
        b, o = statistics.median(base), statistics.median(ours)
        rows.append((label, b, o, o / b))
    print(f"model {cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}, vocab {cfg.vocab_size}, {n} new tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'case':20s} {'no-cache tok/s':>15s} {'pocketgpt tok/s':>16s} {'ratio':>7s}")
    for label, b, o, ratio in rows:
        print(f"{label:20s} {b:15.0f} {o:16.0f} {ratio:6.2f}x")


if __name__ == "__main__":
    main()
