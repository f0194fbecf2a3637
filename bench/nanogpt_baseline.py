"""nanoGPT's CPU "I only have a macbook" Shakespeare-char recipe, re-implemented as a speed baseline.

This is our own from-scratch re-implementation (plain PyTorch + numpy, no pocketgpt code in the
model, data or loop; the package is read only for its bundled corpus) of what karpathy/nanoGPT does for

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 \
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
    python sample.py --out_dir=out-shakespeare-char --device=cpu

so that pocketgpt's numbers can be compared against the same model, data, schedule and loop on
the same machine. It mirrors nanoGPT's loop shape on purpose: one step per iteration for
iter 0..max_iters inclusive (max_iters+1 steps), an estimate_loss() at every eval_interval
(iter 0 included), the next batch fetched right after the forward pass. Differences, kept small:
no checkpoint writes, and a log line every --log-interval iters (nanoGPT's recipe logs every iter).

Run (from the repo root, in a venv with torch, numpy and pocketgpt, whose bundled Tiny Shakespeare
is the default corpus; --data takes any other text file):

    python bench/nanogpt_baseline.py                                   # full recipe, 2001 steps
    python bench/nanogpt_baseline.py --max-iters 30 --gen-tokens 50    # quick smoke test
    python bench/nanogpt_baseline.py --gen-only                        # generation speed only
    python bench/nanogpt_baseline.py --json out/nanogpt_baseline.json  # also write a summary

Reports parameter count, ms/iter (median step time after the first 10 iters, eval iters left
out), training tokens/s, wall time of the whole training loop (evals included), the loss over
the complete val split, no-KV-cache generation tokens/s (1-token and full-context prompts) and
peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402


# --------------------------------------------------------------------------- config


@dataclass
class ModelCfg:
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False


@dataclass
class TrainCfg:
    batch_size: int = 12
    max_iters: int = 2000
    lr_decay_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 100


# --------------------------------------------------------------------------- data


def load_char_data(path: str | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Char-level encode the corpus (None: the bundled Tiny Shakespeare) and split 90/10 the way nanoGPT's
    prepare.py does."""
    text = Path(path).read_text(encoding="utf-8") if path else common.bundled_text()
    stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)  # uint16, like train.bin/val.bin
    n = len(ids)
    return ids[: int(n * 0.9)], ids[int(n * 0.9) :], stoi


def get_batch(data: np.ndarray, batch_size: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows drawn with the global torch RNG, so the batch stream follows the seed."""
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix])
    return x, y


# --------------------------------------------------------------------------- model


class LayerNorm(nn.Module):
    """LayerNorm whose bias can be switched off (nn.LayerNorm could not, in older torch)."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention: one fused qkv projection, then the SDPA kernel."""

    def __init__(self, cfg: ModelCfg) -> None:
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        # Submodules are created in nanoGPT's order so that a given seed consumes the RNG alike.
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs): heads become a batch dimension for SDPA.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """4x expansion with exact (erf) GELU, as nn.GELU() defaults to."""

    def __init__(self, cfg: ModelCfg) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelCfg) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's GPT: learned token + position embeddings, blocks, final LN, tied lm_head."""

    def __init__(self, cfg: ModelCfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=LayerNorm(cfg.n_embd, cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one shared matrix
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection gets std 0.02/sqrt(2L),
        # so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (the tied matrix counted once); nanoGPT prints the non-embedding count."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        _, t = idx.shape
        assert t <= self.cfg.block_size, f"sequence of {t} exceeds block_size {self.cfg.block_size}"
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            # Inference: only the last position's logits are needed (nanoGPT's shortcut).
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> torch.Tensor:
        """No KV cache: crop to the context window and run the full forward for every new token."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.cfg.block_size else idx[:, -self.cfg.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx


# --------------------------------------------------------------------------- training


def make_optimizer(model: GPT, t: TrainCfg) -> torch.optim.AdamW:
    """AdamW with decay on matrices/embeddings only; LayerNorm gains and biases are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # CPU: no fused kernel (nanoGPT only asks for fused=True on CUDA).
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2))


def get_lr(it: int, t: TrainCfg) -> float:
    """Linear warmup (it+1)/(warmup+1), cosine down to min_lr at lr_decay_iters, then flat."""
    if it < t.warmup_iters:
        return t.learning_rate * (it + 1) / (t.warmup_iters + 1)
    if it > t.lr_decay_iters:
        return t.min_lr
    ratio = (it - t.warmup_iters) / (t.lr_decay_iters - t.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return t.min_lr + coeff * (t.learning_rate - t.min_lr)


@torch.no_grad()
def estimate_loss(model: GPT, splits: dict[str, np.ndarray], t: TrainCfg) -> dict[str, float]:
    """nanoGPT's noisy progress estimate: mean loss over eval_iters random batches per split."""
    model.eval()
    out = {}
    for name, data in splits.items():
        losses = [model(*get_batch(data, t.batch_size, model.cfg.block_size))[1].item() for _ in range(t.eval_iters)]
        out[name] = float(np.mean(losses))
    model.train()
    return out


def train(model: GPT, train_data: np.ndarray, val_data: np.ndarray, t: TrainCfg) -> dict:
    """The nanoGPT loop; returns per-step times (eval time excluded) and the loop's wall time."""
    opt = make_optimizer(model, t)
    T = model.cfg.block_size
    step_times: dict[int, float] = {}
    evals: list[dict] = []
    x, y = get_batch(train_data, t.batch_size, T)  # first batch fetched before the loop, as nanoGPT
    wall0 = time.perf_counter()
    for it in range(t.max_iters + 1):  # nanoGPT breaks once iter_num > max_iters: max_iters+1 steps
        lr = get_lr(it, t)
        for g in opt.param_groups:
            g["lr"] = lr
        if it % t.eval_interval == 0:
            est = estimate_loss(model, {"train": train_data, "val": val_data}, t)
            evals.append({"iter": it, **est})
            print(f"step {it}: train loss {est['train']:.4f}, val loss {est['val']:.4f}", flush=True)
        t0 = time.perf_counter()
        _, loss = model(x, y)
        x, y = get_batch(train_data, t.batch_size, T)  # prefetch next batch between fwd and bwd
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lossf = loss.item()  # the recipe's log_interval=1 reads the loss every step
        step_times[it] = time.perf_counter() - t0
        if it % t.log_interval == 0:
            print(f"iter {it}: loss {lossf:.4f}, time {step_times[it] * 1000:.2f}ms, lr {lr:.2e}", flush=True)
    return {"step_times": step_times, "wall_s": time.perf_counter() - wall0, "evals": evals}


def median_step_s(step_times: dict[int, float], eval_interval: int, skip: int = 10) -> float:
    """Median step time after warm-up; eval iterations are left out (nanoGPT's dt would include them)."""
    kept = [s for it, s in step_times.items() if it >= skip and it % eval_interval != 0]
    if not kept:  # very short runs: fall back to whatever steps there are
        kept = list(step_times.values())
    return statistics.median(kept)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def full_val_loss(model: GPT, val: np.ndarray, batch_windows: int = 256) -> float:
    """Mean cross-entropy over every val token but the first, in non-overlapping block_size windows."""
    model.eval()
    T = model.cfg.block_size
    data = torch.from_numpy(val.astype(np.int64))
    n_pred = len(data) - 1
    n_full = n_pred // T
    total = 0.0
    for start in range(0, n_full, batch_windows):  # full windows, batched
        stop = min(start + batch_windows, n_full)
        x = data[start * T : stop * T].view(-1, T)
        y = data[start * T + 1 : stop * T + 1].view(-1, T)
        total += _sum_ce(model, x, y)
    if n_pred % T:  # shorter trailing window, so no token goes unpredicted
        x = data[n_full * T : n_pred].view(1, -1)
        y = data[n_full * T + 1 : n_pred + 1].view(1, -1)
        total += _sum_ce(model, x, y)
    model.train()
    return total / n_pred


def _sum_ce(model: GPT, x: torch.Tensor, y: torch.Tensor) -> float:
    # Passing targets makes forward return logits for every position; we want a sum, not its mean.
    logits, _ = model(x, y)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()


# --------------------------------------------------------------------------- generation benchmark


def gen_tok_s(model: GPT, prompt: list[int], n_new: int, runs: int, temperature: float, top_k: int | None) -> float:
    """Median tokens/s over `runs` sample.py-style generations (eval mode, no_grad, no cache)."""
    model.eval()
    idx = torch.tensor([prompt], dtype=torch.long)
    model.generate(idx, min(n_new, 10), temperature, top_k)  # warm-up: first-call allocations
    rates = []
    for r in range(runs):
        torch.manual_seed(1000 + r)
        t0 = time.perf_counter()
        model.generate(idx, n_new, temperature, top_k)
        rates.append(n_new / (time.perf_counter() - t0))
    model.train()
    return statistics.median(rates)


def bench_generation(model: GPT, val: np.ndarray, stoi: dict[str, int], a: argparse.Namespace) -> dict[str, float]:
    # sample.py's default start is "\n" (one token); the other prompt fills the whole context.
    one = [stoi["\n"]]
    full = val[: model.cfg.block_size].astype(np.int64).tolist()
    res = {
        "gen_tok_s_1tok_prompt": gen_tok_s(model, one, a.gen_tokens, a.gen_runs, a.temperature, a.top_k),
        "gen_tok_s_full_prompt": gen_tok_s(model, full, a.gen_tokens, a.gen_runs, a.temperature, a.top_k),
    }
    print(f"generate {a.gen_tokens} tokens, 1-token prompt:  {res['gen_tok_s_1tok_prompt']:.1f} tok/s")
    print(f"generate {a.gen_tokens} tokens, {len(full)}-token prompt: {res['gen_tok_s_full_prompt']:.1f} tok/s")
    return res


# --------------------------------------------------------------------------- CLI


def parse_args() -> argparse.Namespace:
    m, t = ModelCfg(), TrainCfg()
    p = common.parser(__doc__)
    p.add_argument("--data", default=None, help="text file (default: the Tiny Shakespeare bundled with pocketgpt)")
    for name, default in [*asdict(m).items(), *asdict(t).items()]:
        if name in ("vocab_size", "bias"):
            continue  # vocab comes from the data; bias gets a store_true flag below
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--bias", action="store_true", help="biases in Linear/LayerNorm (recipe: off)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--full-val-batch", type=int, default=256, help="windows per forward in full val loss")
    p.add_argument("--gen-tokens", type=int, default=500)
    p.add_argument("--gen-runs", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.8, help="sample.py default")
    p.add_argument("--top-k", type=int, default=200, help="sample.py default; <=0 disables")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gen-only", action="store_true", help="skip training; benchmark generation on init weights")
    g.add_argument("--no-gen", action="store_true", help="skip the generation benchmark")
    p.add_argument("--json", metavar="OUT", default=None, help="write the summary JSON here")
    a = p.parse_args()
    a.top_k = a.top_k if a.top_k and a.top_k > 0 else None
    return a


def main() -> None:
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)  # before model init: init and batch sampling share the global RNG
    train_data, val_data, stoi = load_char_data(a.data)
    mcfg = ModelCfg(**{k: getattr(a, k) for k in asdict(ModelCfg()) if k != "vocab_size"}, vocab_size=len(stoi))
    tcfg = TrainCfg(**{k: getattr(a, k) for k in asdict(TrainCfg())})
    model = GPT(mcfg)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, vocab {len(stoi)}, "
          f"train {len(train_data):,} / val {len(val_data):,} tokens")
    print(f"params: {model.num_params():,} ({model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding)")

    summary: dict = {"params": model.num_params(), "torch_version": torch.__version__,
                     "threads": torch.get_num_threads()}
    if not a.gen_only:
        summary |= run_training(model, train_data, val_data, tcfg, a.full_val_batch)
    if not a.no_gen:
        summary |= bench_generation(model, val_data, stoi, a)
    summary["peak_rss_mb"] = round(common.peak_rss_mb(), 1)
    print(f"peak RSS: {summary['peak_rss_mb']:.1f} MB")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(summary | {"config": vars(a)}, indent=2) + "\n")
        print(f"wrote {a.json}")


def run_training(model: GPT, train_data: np.ndarray, val_data: np.ndarray, t: TrainCfg, val_batch: int) -> dict:
    res = train(model, train_data, val_data, t)
    step = median_step_s(res["step_times"], t.eval_interval)
    tok_s = t.batch_size * model.cfg.block_size / step
    vloss = full_val_loss(model, val_data, val_batch)
    print(f"ms/iter (median, iters >= 10, eval iters excluded): {step * 1000:.2f}")
    print(f"train tokens/s: {tok_s:,.0f}")
    print(f"training loop wall time (evals included): {res['wall_s']:.1f} s for {t.max_iters + 1} steps")
    print(f"full val loss ({len(val_data) - 1:,} predicted tokens): {vloss:.4f}")
    return {"ms_per_iter": round(step * 1000, 3), "tokens_per_s": round(tok_s, 1),
            "train_wall_s": round(res["wall_s"], 2), "full_val_loss": round(vloss, 4),
            "train_steps": t.max_iters + 1, "evals": res["evals"]}


if __name__ == "__main__":
    main()
