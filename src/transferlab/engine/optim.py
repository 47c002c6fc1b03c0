"""Optimizers and learning-rate schedules, registered by name. Schedules step once per optimizer step."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim import lr_scheduler as S
from torch.optim.lr_scheduler import LRScheduler

from transferlab.config import TrainConfig, register_choices
from transferlab.registry import Registry, UnknownNameError

__all__ = ["OPTIMIZERS", "SCHEDULES", "make_optimizer", "make_scheduler"]

Params = list[torch.nn.Parameter] | list[dict]
OPTIMIZERS: Registry[Callable[[Params, TrainConfig], torch.optim.Optimizer]] = Registry("optimizer", "train.optimizer")
SCHEDULES: Registry[Callable[[torch.optim.Optimizer, TrainConfig, int], LRScheduler]] = Registry("schedule", "train.schedule")


@OPTIMIZERS.register("sgd")
def sgd(params: Params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (train.momentum; plain SGD at 0)."""
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def adam(params: Params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (weight decay added to the gradient)."""
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(params: Params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay)."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("rmsprop")
def rmsprop(params: Params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """RMSprop with train.momentum."""
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The registered ``cfg.optimizer`` over the trainable parameters, or over parameter groups (dicts
    with ``params`` and ``lr``, e.g. per-stage learning rates)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        if not any(g["params"] for g in params):
            raise ValueError("the strategy left no trainable parameters")
    else:
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("the strategy left no trainable parameters")
    try:
        return OPTIMIZERS.get(cfg.optimizer)(params, cfg)
    except UnknownNameError as e:
        raise ValueError(str(e)) from None


@SCHEDULES.register("cosine")
def cosine(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    """Cosine decay to 0 over all steps, after an optional linear warm-up (train.warmup_epochs)."""
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    decay = S.CosineAnnealingLR(opt, T_max=max(total - warm, 1))
    if warm <= 0:
        return decay
    return S.SequentialLR(opt, [S.LinearLR(opt, start_factor=1e-3, total_iters=warm), decay], milestones=[warm])


@SCHEDULES.register("step")
def step(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    """Multiply the lr by train.gamma every train.step_size epochs."""
    return S.StepLR(opt, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.gamma)


@SCHEDULES.register("onecycle")
def onecycle(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    """Smith's one-cycle policy, peaking at each parameter group's lr."""
    return S.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=max(cfg.epochs * steps_per_epoch, 1))


@SCHEDULES.register("none")
def constant(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    """A constant lr."""
    return S.LambdaLR(opt, lambda _step: 1.0)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    """The registered ``cfg.schedule`` over ``cfg.epochs * steps_per_epoch`` steps."""
    try:
        return SCHEDULES.get(cfg.schedule)(opt, cfg, steps_per_epoch)
    except UnknownNameError as e:
        raise ValueError(str(e)) from None


register_choices(TrainConfig, "optimizer", OPTIMIZERS.names)
register_choices(TrainConfig, "schedule", SCHEDULES.names)
