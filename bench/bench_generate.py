"""Generation speed of pocketgpt's engine against a baseline on the same weights, random init.

    python bench/bench_generate.py                 # 4 layers x 4 heads x 128, T=64, vocab 65, 500 new tokens:
                                                   #   engine vs a nanoGPT-style no-cache loop
    python bench/bench_generate.py --gpt2-small    # 12 x 12 x 768, vocab 50257, T=1024, 200 new tokens:
                                                   #   engine float32 / auto vs transformers' generate (cache on)
    python bench/bench_generate.py --gpt2-small --num-samples 64
                                                   #   the same as one batch of 64 samples (what
                                                   #   `pocketgpt sample --num-samples 64` does): aggregate tokens/s

Every repeat runs each contender once, interleaved (A, B, A, B ...), so a slow patch on a shared
machine hits all of them; the table shows medians, and the ratio is the median of the per-repeat
ratios. Sampling everywhere: batch 1 (--num-samples: one batch of that many), temperature 0.8, no
top-k / top-p.
The no-cache loop runs on one thread and on torch's default, and the ratio is against the faster;
transformers runs on as many threads as the engine picks (one for small models or on a 2-core
machine), so a ratio measures the engine, not a thread setting; --baseline-threads overrides.
--gpt2-small needs transformers (`pip install transformers`), a bench-only dependency.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

from pocketgpt.config import ModelConfig
from pocketgpt.decoder import MANY_ROWS, Decoder, probe_logit_diff
from pocketgpt.engine import Engine
from pocketgpt.model import GPT

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402


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


def race(contenders: dict[str, Callable[[int], object]], n: int, repeats: int) -> dict[str, list[float]]:
    """tokens/s of every contender per repeat, run interleaved; each gets one warm-up run first."""
    return {name: [n / s for s in secs] for name, secs in common.interleaved(contenders, repeats).items()}


def ratio(speeds: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repeats of a/b: the figure that survives a noisy, shared machine."""
    return common.median_ratio(speeds[a], speeds[b])


def reference(args: argparse.Namespace) -> None:
    cfg = ModelConfig(vocab_size=65, **common.NANOGPT_SHAPE)
    n = args.new_tokens or 500
    model = GPT(cfg).eval()
    engine = Engine(model)
    default = torch.get_num_threads()
    # nanoGPT runs on torch's default threads; one thread is faster for this size on a busy machine.
    # Both baselines run, and the ratio is against the faster of the two in each repeat.
    thread_counts = sorted({args.baseline_threads or 1, default})
    print(f"model {cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}, vocab {cfg.vocab_size}, T={cfg.block_size}, "
          f"{model.num_params() / 1e6:.2f}M params, {n} new tokens, temperature 0.8, torch {torch.__version__}, "
          f"engine threads {engine.threads or default}, median of {args.repeats}")
    heads = [f"no-cache {t}T tok/s" for t in thread_counts]
    print(f"{'case':16s} " + " ".join(f"{h:>19s}" for h in heads) + f" {'engine tok/s':>13s} {'ratio':>7s}")
    for label, prompt in (("1-token prompt", [0]), (f"{cfg.block_size}-token prompt", [1] * cfg.block_size)):
        contenders: dict[str, Callable[[int], object]] = {}
        for t in thread_counts:
            def base(seed: int, prompt: list[int] = prompt, t: int = t) -> object:
                with common.threads(t):
                    return no_cache_generate(model, prompt, n, seed)

            contenders[f"base{t}"] = base
        contenders["ours"] = lambda seed, prompt=prompt: engine.generate(prompt, n, temperature=0.8, seed=seed)
        s = race(contenders, n, args.repeats)
        s["best"] = [max(s[f"base{t}"][r] for t in thread_counts) for r in range(args.repeats)]
        cols = " ".join(f"{statistics.median(s[f'base{t}']):19.0f}" for t in thread_counts)
        print(f"{label:16s} {cols} {statistics.median(s['ours']):13.0f} {ratio(s, 'ours', 'best'):6.2f}x")
    print("ratio: engine / the faster no-cache loop, per repeat, median")


def hf_copy(model: GPT):
    """A transformers GPT2LMHeadModel holding the same weights (its Conv1D stores them transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf_cfg = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        activation_function="gelu",  # exact erf GELU, as pocketgpt (GPT-2 itself uses the tanh approximation)
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
    )
    hf = GPT2LMHeadModel(hf_cfg).eval()
    ours = model.state_dict()  # the parameter names match GPT-2's: transformer.h.0.attn.c_attn.weight ...
    with torch.no_grad():
        for name, p in hf.state_dict().items():
            if name not in ours:
                continue  # attention-mask buffers of older transformers versions
            conv = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
            p.copy_(ours[name].t() if conv else ours[name])
    return hf


def gpt2_small(args: argparse.Namespace) -> None:
    cfg = ModelConfig(vocab_size=common.GPT2_VOCAB, block_size=1024, **common.GPT2_SMALL_SHAPE, bias=True)
    n = args.new_tokens or 200
    model = GPT(cfg).eval()
    hf = hf_copy(model)
    prompt = list(range(1000, 1008))  # a short prompt: 8 tokens
    B = args.num_samples
    fp32, auto = Engine(model, decode_dtype="float32"), Engine(model, decode_dtype="auto")
    with torch.inference_mode():
        ids = torch.tensor([list(range(100, 164))])
        same = float((hf(ids).logits - model(ids)[0]).abs().max())
        cpu = torch.device("cpu")
        low = {name: probe_logit_diff(Decoder(model, getattr(torch, name)), cpu, steps=args.probe_steps)
               for name in ("float16", "bfloat16")}
    attention = hf.config._attn_implementation

    threads = args.baseline_threads or auto.threads or torch.get_num_threads()

    def hf_generate(seed: int) -> object:
        torch.manual_seed(seed)
        with common.threads(threads), torch.inference_mode():
            return hf.generate(torch.tensor([prompt] * B), max_new_tokens=n, min_new_tokens=n, do_sample=True,
                               temperature=0.8, top_k=0, top_p=1.0, use_cache=True, pad_token_id=0)

    contenders = {
        "fp32": lambda seed: fp32.generate(prompt, n, temperature=0.8, seed=seed, num_samples=B),
        "auto": lambda seed: auto.generate(prompt, n, temperature=0.8, seed=seed, num_samples=B),
        "hf": hf_generate,
    }
    labels = [("hf", "transformers generate (KV cache)"), ("fp32", "pocketgpt engine float32")]
    if B > 1:  # float16 is auto's one-row choice: at many rows its matmuls are slow on CPUs
        fp16 = Engine(model, decode_dtype="float16")
        contenders["fp16"] = lambda seed: fp16.generate(prompt, n, temperature=0.8, seed=seed, num_samples=B)
        labels.append(("fp16", "pocketgpt engine float16"))
    chosen = str(auto.decoder(many_rows=B >= MANY_ROWS).step_dtype).removeprefix("torch.")  # what B samples get
    s = race(contenders, n * B, args.repeats)  # tokens/s over all B samples (aggregate)
    import transformers

    print(f"model 12x12x768, vocab 50257, T=1024, bias, {model.num_params() / 1e6:.1f}M params, batch {B}, "
          f"{len(prompt)}-token prompt, {n} new tokens, torch {torch.__version__}, transformers "
          f"{transformers.__version__} ({attention} attention), engine threads "
          f"{auto.threads or torch.get_num_threads()}, transformers threads {threads}, "
          f"median of {args.repeats}")
    print(f"{'contender':36s} {'tok/s':>7s} {'ms/token':>9s} {'vs transformers':>16s}")
    for key, label in labels + [("auto", f"pocketgpt engine auto ({chosen})")]:
        tps = statistics.median(s[key])
        print(f"{label:36s} {tps:7.1f} {1000 / tps:9.1f} {ratio(s, key, 'hf'):15.2f}x")
    print(f"max |logit diff| transformers vs pocketgpt float32, 64 tokens: {same:.2e}")
    for name, diff in low.items():
        print(f"max |logit diff| {name} decode steps vs float32, 8-token prefill + {args.probe_steps} steps: {diff:.2e}")
    print("auto's own probe (8 + 16 steps), tried in order: "
          + ", ".join(f"{k} {v:.2e}" for k, v in auto.logit_diffs.items()) + f" -> {chosen}")


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--gpt2-small", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--num-samples", type=int, default=1, help="--gpt2-small: samples generated as one batch")
    ap.add_argument("--probe-steps", type=int, default=128, help="decode steps compared with float32 logits")
    ap.add_argument("--baseline-threads", type=int, default=None, help="threads for the no-cache loop")
    args = ap.parse_args()
    torch.manual_seed(0)
    gpt2_small(args) if args.gpt2_small else reference(args)


if __name__ == "__main__":
    main()
