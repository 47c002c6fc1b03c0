"""Optimizers and learning-rate schedules, registered by name. Schedules step once per optimizer step.

``param_groups`` is what the loop builds the optimizer over: the strategy's groups (``train.lr_ratio``, gradual
unfreezing: ``transferlab.strategies.optimizer_param_groups``) or, with ``train.layer_decay``, timm's layer-wise
decay groups (``param_groups_layer_decay`` over the backbone's ``group_matcher``) plus the head's. With
``train.swa`` the schedule hands over to ``SWALR`` at the first averaged epoch (``SwaSchedule``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from timm.optim import Lookahead, param_groups_layer_decay
from torch import nn
from torch.optim import lr_scheduler as S
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import SWALR

from transferlab.config import ConfigError, ExperimentConfig, TrainConfig, register_choices
from transferlab.models.model import TransferModel
from transferlab.registry import Registry, UnknownNameError
from transferlab.strategies import optimizer_param_groups

__all__ = [
    "OPTIMIZERS", "SCHEDULES", "SwaSchedule", "group_lrs", "layer_decay_groups", "make_optimizer", "make_scheduler", "param_groups",
    "swa_first_epoch",
]

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
    with ``params`` and ``lr``, e.g. per-stage learning rates); with ``train.lookahead``, inside timm's ``Lookahead``
    (its slow weights and step count are in the optimizer's state dict, so a resumed run continues them)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        if not any(g["params"] for g in params):
            raise ValueError("the strategy left no trainable parameters")
    else:
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("the strategy left no trainable parameters")
    try:
        opt = OPTIMIZERS.get(cfg.optimizer)(params, cfg)
    except UnknownNameError as e:
        raise ValueError(str(e)) from None
    if cfg.lookahead is not None:  # the base optimizer's param_groups (and so the schedule's lrs) are the wrapper's
        opt = Lookahead(opt, alpha=cfg.lookahead.alpha, k=cfg.lookahead.k)
    return opt


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


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Any:
    """The registered ``cfg.schedule`` over ``cfg.epochs * steps_per_epoch`` steps (handing over to ``SWALR`` with ``cfg.swa``)."""
    try:
        base = SCHEDULES.get(cfg.schedule)(opt, cfg, steps_per_epoch)
    except UnknownNameError as e:
        raise ValueError(str(e)) from None
    return base if cfg.swa is None else SwaSchedule(opt, base, cfg, steps_per_epoch)


# --------------------------------------------------------------------------------------------
# train.swa: the schedule hands over to SWALR


def swa_first_epoch(cfg: TrainConfig) -> int:
    """The first (0-based) epoch whose weights join the SWA average: ``floor(start * epochs)``, within [1, epochs - 1]."""
    assert cfg.swa is not None
    return min(max(1, math.floor(cfg.swa.start * cfg.epochs)), cfg.epochs - 1)


class SwaSchedule:
    """``train.swa``: the run's schedule until the first averaged epoch, then ``SWALR`` (cosine annealing over
    ``anneal_epochs`` from the lr reached to ``swa.lr``, then constant). Steps once per optimizer step, like the others."""

    def __init__(self, opt: torch.optim.Optimizer, base: LRScheduler, cfg: TrainConfig, steps_per_epoch: int) -> None:
        assert cfg.swa is not None
        swa_lr = cfg.swa.lr if cfg.swa.lr is not None else float(cfg.lr) / 2
        # per group: the same share of swa_lr as the group has of train.lr (layer decay, lr_ratio keep their ratios)
        lrs = [swa_lr * g["initial_lr"] / float(cfg.lr) for g in opt.param_groups]
        self.base = base
        current = [g["lr"] for g in opt.param_groups]
        self.swa = SWALR(opt, swa_lr=lrs, anneal_epochs=max(0, cfg.swa.anneal_epochs * steps_per_epoch), anneal_strategy="cos")
        for g, lr in zip(opt.param_groups, current, strict=True):  # SWALR's first step (anneal_epochs 0) set swa_lr already
            g["lr"] = lr
        self.start = swa_first_epoch(cfg) * steps_per_epoch
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        (self.swa if self.steps > self.start else self.base).step()

    def get_last_lr(self) -> list[float]:
        return (self.swa if self.steps > self.start else self.base).get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        swa = {k: v for k, v in self.swa.state_dict().items() if k != "anneal_func"}  # a function: rebuilt by __init__
        return {"steps": self.steps, "base": self.base.state_dict(), "swa": swa}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.base.load_state_dict(state["base"])
        self.swa.load_state_dict({**self.swa.state_dict(), **state["swa"]})


# --------------------------------------------------------------------------------------------
# parameter groups: the strategy's, or train.layer_decay's


def param_groups(model: nn.Module, cfg: ExperimentConfig) -> list[nn.Parameter] | list[dict]:
    """What the optimizer is built over: ``layer_decay_groups`` with ``train.layer_decay``, else the strategy's groups."""
    if cfg.train.layer_decay is None:
        return optimizer_param_groups(model, cfg)
    inner = model if isinstance(model, TransferModel) else getattr(model, "model", None)  # the feature cache's wrapper
    if not isinstance(inner, TransferModel):
        raise TypeError(f"train.layer_decay needs a TransferModel (or a wrapper with .model), got {type(model).__name__}")
    return layer_decay_groups(inner, cfg.train)


def layer_decay_groups(model: TransferModel, cfg: TrainConfig) -> list[dict]:
    """timm's layer-wise lr decay over the backbone (``param_groups_layer_decay`` with its ``group_matcher``), plus the head.

    Group order: the head first, then the backbone from its top layer down, so group 0 has ``train.lr``; each group
    carries ``lr`` (``train.lr`` times timm's ``lr_scale``), its ``weight_decay`` (0 for biases and norms) and a ``name``.
    """
    backbone = model.backbone
    if not hasattr(backbone, "group_matcher"):
        raise ConfigError(f"train.layer_decay needs a backbone with timm's group_matcher; {type(backbone).__name__} has none")
    skip = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
    lr, wd = float(cfg.lr), cfg.weight_decay
    groups = param_groups_layer_decay(backbone, weight_decay=wd, no_weight_decay_list=skip, layer_decay=float(cfg.layer_decay))
    scales = sorted({g["lr_scale"] for g in groups}, reverse=True)  # top layer (scale 1) first
    out = []
    for g in sorted(groups, key=lambda g: (-g["lr_scale"], -g["weight_decay"])):
        depth = scales.index(g["lr_scale"])
        name = f"backbone.top-{depth}" if depth else "backbone.top"
        no_decay = all(q.ndim <= 1 for q in g["params"]) or (wd > 0 and not g["weight_decay"])  # timm's no_decay group
        out.append({"params": g["params"], "lr": lr * g["lr_scale"], "weight_decay": g["weight_decay"],
                    "name": f"{name}{' (no decay)' if no_decay else ''}", "lr_scale": g["lr_scale"]})
    head = [p for p in model.head.parameters() if p.requires_grad]
    head_groups = [{"params": [p for p in head if p.ndim > 1], "lr": lr, "weight_decay": wd, "name": "head", "lr_scale": 1.0},
                   {"params": [p for p in head if p.ndim <= 1], "lr": lr, "weight_decay": 0.0, "name": "head (no decay)", "lr_scale": 1.0}]
    return [g for g in head_groups + out if g["params"]]


def group_lrs(opt: torch.optim.Optimizer, lr0: float) -> dict[str, float]:
    """``lr_group<i>`` of every parameter group, given group 0's lr ``lr0`` of the last step (the schedules scale
    every group alike, so each group's lr is ``lr0`` times its share of group 0's initial lr)."""
    first = opt.param_groups[0].get("initial_lr", opt.param_groups[0]["lr"])
    return {f"lr_group{i}": lr0 * g.get("initial_lr", g["lr"]) / first for i, g in enumerate(opt.param_groups)}


register_choices(TrainConfig, "optimizer", OPTIMIZERS.names)
register_choices(TrainConfig, "schedule", SCHEDULES.names)
