"""Optimizers and learning-rate schedules by name. Schedules step once per optimizer step."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LRScheduler

from transferlab.config import TrainConfig


def make_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """``sgd`` (Nesterov momentum), ``adam``, ``adamw`` or ``rmsprop`` over the trainable parameters,
    or over parameter groups (dicts with ``params`` and ``lr``, e.g. per-stage learning rates)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        if not any(g["params"] for g in params):
            raise ValueError("the strategy left no trainable parameters")
    else:
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("the strategy left no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    """``cosine`` (optional linear warm-up), ``step`` (decay every ``step_size`` epochs), ``onecycle``, ``none``."""
    total = cfg.epochs * steps_per_epoch
    S = torch.optim.lr_scheduler
    if cfg.schedule == "cosine":
        warm = int(round(cfg.warmup_epochs * steps_per_epoch))
        cosine = S.CosineAnnealingLR(opt, T_max=max(total - warm, 1))
        if warm <= 0:
            return cosine
        return S.SequentialLR(opt, [S.LinearLR(opt, start_factor=1e-3, total_iters=warm), cosine], milestones=[warm])
    if cfg.schedule == "step":
        return S.StepLR(opt, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.gamma)
    if cfg.schedule == "onecycle":
        return S.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=max(total, 1))  # per-group peaks
    if cfg.schedule == "none":
        return S.LambdaLR(opt, lambda _step: 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")
