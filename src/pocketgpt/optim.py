"""Optimizer parameter groups and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig
from .lora import is_adapter


def _adamw(params: list[torch.nn.Parameter], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings (>= 2-D) only, never on gains and biases.

    LoRA factors are matrices, so they decay too: shrinking A and B shrinks the update B A, which pulls
    the model towards its base (the same "stay near what was learned" a full fine-tune's small decay gives).
    """
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused kernels exist for CUDA; foreach (multi-tensor) is the fast path elsewhere
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **extra)


def make_optimizers(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """[AdamW] or, with optimizer = muon, [AdamW for embeddings/head/gains, Muon for block matrices].

    Only parameters that train are given out (a LoRA run's frozen base gets no optimizer state), and
    LoRA factors always go to AdamW: nothing shows Muon's orthogonalised step suits rank-r factors
    (config.check_lora refuses muon with LoRA; this holds for callers that skip it).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer != "muon":
        return [_adamw([p for _, p in named], cfg, device)]
    hidden = [p for n, p in named if n.startswith("transformer.h.") and p.dim() == 2 and not is_adapter(n)]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in hidden_ids]
    if not hidden:
        return [_adamw(rest, cfg, device)]
    return [_adamw(rest, cfg, device), Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum)]


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately replace g = U S V^T by U V^T with a quintic Newton-Schulz iteration.

    The coefficients (3.4445, -4.7750, 2.0315) push all singular values towards ~1 quickly without
    needing an SVD; the result is "close enough" to orthogonal for an optimizer step.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    x = x / (x.norm() + 1e-7)  # singular values into [0, 1]
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum whose update is orthogonalised: every direction of a weight matrix moves equally.

    For the 2-D weights inside transformer blocks; embeddings, the head and gains stay on AdamW.
    """

    def __init__(self, params: list[torch.nn.Parameter], lr: float = 0.02, momentum: float = 0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5  # same RMS step for tall matrices
                p.add_(orthogonalize(update), alpha=-group["lr"] * scale)


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


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """Scale every group's peak rate by the schedule's factor (lr_t / learning_rate)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("peak_lr", group["lr"])
            group["lr"] = group["peak_lr"] * factor
