"""Optimizer parameter groups and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .config import OptimConfig
from .lora import is_adapter

if TYPE_CHECKING:
    from .model import GPT


def _adamw(params: list[torch.nn.Parameter], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings (>= 2-D) only, never on gains and biases.

    LoRA factors are matrices, so they decay too: shrinking A and B shrinks the update B A, which pulls
    the model towards its base (the same "stay near what was learned" a full fine-tune's small decay gives).
    """
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # the fused kernel (one pass over each tensor for the whole update) exists on CUDA and the CPU; on a
    # CPU it measured ~5x foreach's step at the demo's shapes (bench/RESULTS.md); foreach elsewhere (MPS)
    extra = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **extra)


def make_optimizers(model: "GPT", cfg: OptimConfig, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> list[torch.optim.Optimizer]:
    """[AdamW] or, with optimizer = muon, [AdamW for embeddings/head/gains, Muon for block matrices].

    Only parameters that train are given out (a LoRA run's frozen base gets no optimizer state), and
    LoRA factors always go to AdamW: nothing shows Muon's orthogonalised step suits rank-r factors
    (config.check_lora refuses muon with LoRA; this holds for callers that skip it). dtype is the run's
    autocast dtype: a bf16 run (and any CUDA run) orthogonalises in bf16, a float32 run in float32.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer != "muon":
        return [_adamw([p for _, p in named], cfg, device)]
    in_blocks = {id(p) for p in model.blocks.parameters()}
    hidden = [p for n, p in named if id(p) in in_blocks and p.dim() == 2 and not is_adapter(n)]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in hidden_ids]
    if not hidden:
        return [_adamw(rest, cfg, device)]
    ns_dtype = torch.bfloat16 if device.type == "cuda" or dtype == torch.bfloat16 else torch.float32
    return [_adamw(rest, cfg, device), Muon(hidden, lr=cfg.muon_lr, momentum=muon_momentum_at(cfg, 0),
                                            weight_decay=cfg.muon_weight_decay, ns_dtype=ns_dtype)]


# Muon's momentum at a warmup's first step (modded-nanogpt's speed runs raise it from 0.85 over 300 steps)
MUON_MOMENTUM_START = 0.85


def muon_momentum_at(cfg: OptimConfig, it: int) -> float:
    """Muon's momentum at step it: from MUON_MOMENTUM_START up to muon_momentum over muon_momentum_warmup steps
    (a function of the step alone, so a resumed run gets the same); muon_momentum throughout without warmup."""
    if it >= cfg.muon_momentum_warmup:
        return cfg.muon_momentum
    start = min(MUON_MOMENTUM_START, cfg.muon_momentum)
    return start + (cfg.muon_momentum - start) * it / cfg.muon_momentum_warmup


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately replace g = U S V^T by U V^T with a quintic Newton-Schulz iteration.

    The coefficients (3.4445, -4.7750, 2.0315) push all singular values towards ~1 quickly without
    needing an SVD; the result is "close enough" to orthogonal for an optimizer step. g may be a stack
    (..., m, n) of same-shape matrices, each orthogonalised on its own in one batched matmul per term:
    a small model's many small matrices cost a few large calls instead of many tiny ones. The
    iteration runs in dtype (default bf16 on CUDA, float32 elsewhere).
    """
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype or (torch.bfloat16 if g.is_cuda else torch.float32))
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values into [0, 1]
    flat = x.dim() == 2
    if flat:
        x = x.unsqueeze(0)
    for _ in range(steps):
        gram = x @ x.mT
        # x <- a x + (b gram + c gram^2) x, each product fused with its sum (baddbmm): fewer passes over memory
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    if flat:
        x = x.squeeze(0)
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum whose update is orthogonalised: every direction of a weight matrix moves equally.

    For the 2-D weights inside transformer blocks; embeddings, the head and gains stay on AdamW.
    Matrices of one shape are updated together: their momenta with multi-tensor (foreach) ops, their
    Newton-Schulz iterations as one batch (orthogonalize). weight_decay is cautious (Chen et al. 2025):
    a weight shrinks by lr * weight_decay only where the step moves it towards zero anyway (step and weight
    of one sign), so the decay never fights the update.
    """

    def __init__(self, params: list[torch.nn.Parameter], lr: float = 0.02, momentum: float = 0.95,
                 weight_decay: float = 0.0, ns_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            by_shape: dict[tuple[int, ...], list[torch.nn.Parameter]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for ps in by_shape.values():
                self._update(ps, group["lr"], group["momentum"], group.get("weight_decay", 0.0))

    def _update(self, ps: list[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float) -> None:
        for p in ps:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        grads = [p.grad for p in ps]
        bufs = [self.state[p]["momentum_buffer"] for p in ps]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        updates = torch._foreach_add(grads, bufs, alpha=momentum)  # Nesterov
        rows, cols = ps[0].shape
        scale = max(1.0, rows / cols) ** 0.5  # same RMS step for tall matrices
        step = orthogonalize(torch.stack(updates), dtype=self.ns_dtype)
        if weight_decay > 0:
            weights = torch.stack([p.detach() for p in ps])
            agree = (step * weights > 0).to(weights.dtype)  # the step (subtracted) already points towards zero
            torch._foreach_sub_(ps, list((weights * agree).unbind(0)), alpha=lr * weight_decay)
        torch._foreach_add_(ps, list(step.unbind(0)), alpha=-lr * scale)


def progress(cfg: OptimConfig, it: int, max_iters: int, elapsed: float = 0.0, max_time: float = 0.0) -> float:
    """How far the decay has come, 0..1: by seconds under a time budget, else by iterations."""
    if max_time > 0:
        return min(1.0, max(elapsed / max_time, it / max_iters))
    horizon = cfg.lr_decay_iters or max_iters
    if horizon <= cfg.warmup_iters:
        return 1.0
    return min(1.0, max(0.0, (it - cfg.warmup_iters) / (horizon - cfg.warmup_iters)))


def lr_at(cfg: OptimConfig, it: int, p: float) -> float:
    """Linear warmup over warmup_iters, then the schedule's shape over progress p."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == "constant":
        return cfg.learning_rate
    if p >= 1.0:
        return cfg.min_lr
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * (cfg.learning_rate - cfg.min_lr)
    # wsd: hold the peak, then decay linearly to min_lr over the last decay_fraction
    stable = 1.0 - cfg.decay_fraction
    if p < stable:
        return cfg.learning_rate
    return cfg.learning_rate + (cfg.min_lr - cfg.learning_rate) * (p - stable) / max(cfg.decay_fraction, 1e-12)


def set_muon_momentum(optimizers: list[torch.optim.Optimizer], momentum: float) -> None:
    """Muon's momentum for this step (muon_momentum_at); AdamW's betas stay as they are."""
    for opt in optimizers:
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = momentum


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """Scale every group's peak rate by the schedule's factor (lr_t / learning_rate)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("peak_lr", group["lr"])
            group["lr"] = group["peak_lr"] * factor
