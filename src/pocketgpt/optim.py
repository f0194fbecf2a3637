"""Optimizer parameter groups and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices and embeddings (>= 2-D) only, never on gains and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused kernels exist for CUDA; foreach (multi-tensor) is the fast path elsewhere
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **extra)


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
