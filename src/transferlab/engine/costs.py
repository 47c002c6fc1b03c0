"""What one training step and one image of inference cost on this machine: the measurement behind ``transferlab plan``.

The probe runs the real model (random weights: the cost does not depend on them) on random images of the run's size,
with the run's own optimiser and parameter groups (``engine.optim``), loss and precision (``engine.precision``) — the
pieces the training loop uses — so what it times is what an epoch repeats. The first steps pay one-off costs
(allocation, oneDNN's kernel choice) and are not timed; the fastest of the timed steps counts, because other
processes' bursts only ever add time. Large batches are timed at ``PROBE_MAX_BATCH`` and scaled linearly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transferlab.config import ExperimentConfig
from transferlab.engine.optim import make_optimizer, param_groups
from transferlab.engine.precision import AUTO, auto_precision, autocast_for
from transferlab.models.model import TransferModel

__all__ = ["PROBE_MAX_BATCH", "PROBE_STEPS", "PROBE_WARMUP", "Cost", "measure_cost"]

PROBE_WARMUP = 2
PROBE_STEPS = 3
"""Timed training steps per probe (after ``PROBE_WARMUP`` untimed ones); the fastest counts."""
PROBE_MAX_BATCH = 32
"""Probes run at min(batch, this) and scale linearly: a 256-image batch of ResNet-152 at 224 px would take a minute here."""


@dataclass(frozen=True)
class Cost:
    """Measured seconds: one training step at the run's batch size (``None``: nothing trains) and one image of inference."""

    step: float | None
    forward: float


def measure_cost(model: TransferModel, cfg: ExperimentConfig, side: int, classes: int, train: bool) -> Cost:
    """Time ``model`` (its strategy applied) as run ``cfg`` would use it on ``side``-px images of ``classes`` classes, on
    the CPU in the run's precision; ``train``: also a training step (the kind trains)."""
    batch = min(cfg.train.batch_size, PROBE_MAX_BATCH)
    x = torch.randn(batch, model.preprocess().in_chans, side, side)
    if cfg.model.channels_last:  # as the real batches come (data.batches): a layout conversion per layer would be timed otherwise
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))
    precision = cfg.train.precision if cfg.train.precision != AUTO else auto_precision("cpu")[0]  # as the run resolves it
    step = None
    if train and any(p.requires_grad for p in model.parameters()):
        opt = make_optimizer(param_groups(model, cfg), cfg.train)
        model.train()
        times = []
        for _ in range(PROBE_WARMUP + PROBE_STEPS):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with autocast_for(precision, "cpu"):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        step = min(times[PROBE_WARMUP:]) * cfg.train.batch_size / batch
    model.eval()
    with torch.inference_mode(), autocast_for(precision, "cpu"):
        model(x)
        forward = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            model(x)
            forward = min(forward, (time.perf_counter() - t) / batch)
    return Cost(step, forward)
