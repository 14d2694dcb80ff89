"""Optimizers and learning-rate schedules built from an ``OptimConfig`` (``train`` / ``finetune`` sections)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Schedule:
    """Learning rate per optimisation step: linear warm-up, then cosine, multistep or constant."""

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            return self.base_lr * 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "multistep":
            return self.base_lr * self.gamma ** sum(t >= m for m in self.milestones)
        return self.base_lr


def make_schedule(cfg, steps_per_epoch: int) -> Schedule:
    """The schedule of ``cfg`` (an ``OptimConfig``) over ``cfg.epochs`` epochs of ``steps_per_epoch`` steps."""
    return Schedule(
        cfg.lr,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=int(cfg.warmup_epochs * steps_per_epoch),
        kind=cfg.schedule,
        milestones=tuple(cfg.milestones),
        gamma=cfg.gamma,
    )


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or AdamW; no weight decay on biases and norm parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)
