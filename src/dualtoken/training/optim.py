"""Optimisers and learning-rate schedules of the trainer.

AdamW with weight decay on parameters of two or more dimensions only (matrices, convolutions, embeddings),
none on biases and norm scales; codebooks are buffers and never reach an optimiser. The schedule is the
release's: ``lr * (t + 1) / warmup`` for the first ``warmup`` steps, then a cosine from ``lr`` to ``min_lr`` over
the remaining steps (or constant), set before every step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimizerConfig


def parameter_groups(
    model: nn.Module, weight_decay: float, lr_scales: list[tuple[nn.Module, float]] | None = None
) -> list[dict]:
    """Trainable parameters grouped by weight decay (ndim >= 2 decayed, the rest not) and by learning-rate scale
    (``lr_scales``: modules whose parameters step at ``scale`` x the learning rate); unscaled groups come first."""
    scale_of = {id(p): scale for module, scale in lr_scales or [] for p in module.parameters()}
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for parameter in model.parameters():
        if parameter.requires_grad:
            key = (scale_of.get(id(parameter), 1.0), parameter.ndim >= 2)
            grouped.setdefault(key, []).append(parameter)
    order = sorted(grouped, key=lambda key: (key[0] != 1.0, key[0], not key[1]))
    return [
        {"params": grouped[key], "weight_decay": weight_decay if key[1] else 0.0, "lr_scale": key[0]} for key in order
    ]


def build_optimizer(
    model: nn.Module, config: OptimizerConfig, lr_scales: list[tuple[nn.Module, float]] | None = None
) -> torch.optim.AdamW:
    groups = parameter_groups(model, config.weight_decay, lr_scales)
    if not groups:
        raise ValueError("no trainable parameters: every parameter is frozen")
    for group in groups:
        group["lr"] = config.lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def lr_factor(step: int, total_steps: int, config: OptimizerConfig) -> float:
    """The multiplier of ``config.lr`` at optimiser step ``step`` (0-based) of ``total_steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.min_lr / config.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, config: OptimizerConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))


def optimizer_step(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, scaler: torch.amp.GradScaler, clip: float
) -> tuple[float, float]:
    """Unscale, clip (when ``clip`` > 0), step, advance the schedule -> (learning rate used, gradient norm)."""
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return lr, float(norm)
