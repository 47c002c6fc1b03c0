"""What one training step and one image of inference cost on this machine: the measurement behind ``transferlab plan``.

The probe runs the real model (random weights: the cost does not depend on them) on random images of the run's size,
with the run's own optimiser and parameter groups (``engine.optim``), loss and precision (``engine.precision``) — the
pieces the training loop uses — so what it times is what an epoch repeats. The first steps pay one-off costs
(allocation, oneDNN's kernel choice) and are not timed; the fastest of the timed steps counts, because other
processes' bursts only ever add time. Large batches are timed at ``PROBE_MAX_BATCH`` and scaled linearly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.config import ExperimentConfig
from transferlab.engine.features.cached import CachedSuffix, plan_cut, setting_rules_out
from transferlab.engine.optim import make_optimizer, param_groups
from transferlab.engine.precision import AUTO, auto_precision, autocast_for
from transferlab.models.model import TransferModel

__all__ = ["PROBE_MAX_BATCH", "PROBE_STEPS", "PROBE_WARMUP", "CachedCost", "Cost", "measure_cost"]

PROBE_WARMUP = 2
PROBE_STEPS = 3
"""Timed training steps per probe (after ``PROBE_WARMUP`` untimed ones); the fastest counts."""
ONE_PROCESS = SimpleNamespace(world_size=1)
"""What the feature cache's settings check reads of a Fabric: a plan is made for one process."""
PROBE_MAX_BATCH = 32
"""Probes run at min(batch, this) and scale linearly: a 256-image batch of ResNet-152 at 224 px would take a minute here."""


@dataclass(frozen=True)
class CachedCost:
    """The feature-cache path (``engine.features``) of a run whose frozen prefix would be cached: one pass of the prefix
    over the training and validation images, then every epoch on the cached features."""

    cut: str
    """The cut the run would cache at (``pooled``, ``features``, ``after:<piece>``) — the engine's own choice."""
    prefix_forward: float
    """Seconds per image of the prefix (the one pass)."""
    suffix_step: float
    """Seconds per training step at the run's batch size, on cached features."""
    suffix_forward: float
    """Seconds per image of evaluating the suffix on cached features (validation)."""


@dataclass(frozen=True)
class Cost:
    """Measured seconds: one training step at the run's batch size (``None``: nothing trains) and one image of inference;
    ``cached``: the feature-cache path's costs when the run would train on cached features (else ``None``)."""

    step: float | None
    forward: float
    cached: CachedCost | None = None


def measure_cost(model: TransferModel, cfg: ExperimentConfig, side: int, classes: int, train: bool, cached: bool = False) -> Cost:
    """Time ``model`` (its strategy applied) as run ``cfg`` would use it on ``side``-px images of ``classes`` classes, on
    the CPU in the run's precision; ``train``: also a training step (the kind trains); ``cached``: also the feature-cache
    path when the cache would take the run (the same decision the run makes: ``engine.features.plan_cut``)."""
    batch = min(cfg.train.batch_size, PROBE_MAX_BATCH)
    x = torch.randn(batch, model.preprocess().in_chans, side, side)
    if cfg.model.channels_last:  # as the real batches come (data.batches): a layout conversion per layer would be timed otherwise
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))
    precision = cfg.train.precision if cfg.train.precision != AUTO else auto_precision("cpu")[0]  # as the run resolves it
    trains = train and any(p.requires_grad for p in model.parameters())
    step = _step_seconds(model, model, cfg, x, y, precision) if trains else None
    forward = _forward_seconds(model, x, precision)
    return Cost(step, forward, _cached_cost(model, cfg, x, y, precision) if trains and cached else None)


def _step_seconds(model: TransferModel, net: nn.Module, cfg: ExperimentConfig, x: torch.Tensor, y: torch.Tensor, precision: str) -> float:
    """Seconds of one training step of ``net`` (the model, or its part after a cut) at the run's batch size, with the
    run's optimiser over ``model``'s parameter groups; the fastest of ``PROBE_STEPS`` after ``PROBE_WARMUP``."""
    opt = make_optimizer(param_groups(model, cfg), cfg.train)
    model.train()
    times = []
    for _ in range(PROBE_WARMUP + PROBE_STEPS):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast_for(precision, "cpu"):
            loss = F.cross_entropy(net(x).float(), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return min(times[PROBE_WARMUP:]) * cfg.train.batch_size / len(x)


def _forward_seconds(net: Callable[[torch.Tensor], torch.Tensor] | nn.Module, x: torch.Tensor, precision: str,
                     model: nn.Module | None = None) -> float:
    """Seconds per image of ``net(x)`` in eval mode under inference mode (the fastest of two, after one untimed)."""
    (model or net).eval()  # type: ignore[union-attr]
    with torch.inference_mode(), autocast_for(precision, "cpu"):
        net(x)
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            net(x)
            best = min(best, (time.perf_counter() - t) / len(x))
    return best


def _cached_cost(model: TransferModel, cfg: ExperimentConfig, x: torch.Tensor, y: torch.Tensor, precision: str) -> CachedCost | None:
    """The feature-cache path's costs, when the run's settings and its model let the cache take it (else ``None``).

    The decision is the engine's (``setting_rules_out`` on the settings, ``plan_cut`` on the model: dropout in the
    prefix, BatchNorm that would update, a prefix too cheap to be worth it, ...); only the memory limit, which depends
    on the split sizes, is left to the run."""
    if setting_rules_out(cfg, ONE_PROCESS) is not None:  # the plan runs in one process; DDP runs cache nothing
        return None
    check = plan_cut(model, x[:4], lambda: autocast_for(precision, "cpu"), cfg.train.cache == "on", [])
    if check is None:
        return None
    prefix_forward = _forward_seconds(lambda t: check.cut.prefix(model, t), x, precision, model)
    with torch.inference_mode(), autocast_for(precision, "cpu"):
        features = check.cut.prefix(model, x)
    features = features.clone()  # out of inference mode: the suffix trains on it
    suffix = CachedSuffix(model, check.cut)
    suffix_step = _step_seconds(model, suffix, cfg, features, y, precision)
    suffix_forward = _forward_seconds(suffix, features, precision, model)
    return CachedCost(check.cut.name, prefix_forward, suffix_step, suffix_forward)
