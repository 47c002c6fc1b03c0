"""The order of the training images each epoch (``data.sampler``), the same on every data path.

A sampler is a function of the training labels (class indices, or N×K multi-hot rows with
``data.task: multilabel``, which only ``random`` accepts) and a generator seeded by (seed, epoch) — the
generator the batches already shuffle with — that returns the indices of one epoch. Nothing else
goes in, so epoch *e* of a resumed run (even resumed mid-epoch) replays exactly the same indices:
a sampler needs no checkpoint state of its own.

===============  ===============================================================================
name             one epoch
===============  ===============================================================================
``random``       a random permutation: every image once (the default)
``balanced``     as many draws as images, with replacement, each with probability
                 1 / (classes · count of its class): every class equally likely, rare images repeated
===============  ===============================================================================
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from transferlab.config import DataConfig, register_choices
from transferlab.registry import Registry

__all__ = ["SAMPLERS", "EpochOrder", "balanced_order", "epoch_order", "random_order"]

EpochOrder = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""(training labels on the CPU, the epoch's generator) -> the epoch's indices (int64, on the CPU)."""

SAMPLERS: Registry[EpochOrder] = Registry("sampler", "data.sampler: the order of the training images each epoch")


@SAMPLERS.register("random")
def random_order(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A seeded permutation: every image once per epoch."""
    return torch.randperm(len(labels), generator=g)


@SAMPLERS.register("balanced")
def balanced_order(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Draws with replacement, every class equally likely (torch's ``WeightedRandomSampler`` with 1 / class count)."""
    if labels.ndim == 2:  # the config checks refuse it; this is for callers of the API
        raise ValueError("data.sampler: balanced draws by the one class of each image: not with data.task: multilabel (multi-hot targets)")
    counts = torch.bincount(labels)
    weights = 1.0 / counts[labels].double()  # every class sums to 1: uniform over the classes present
    return torch.multinomial(weights, len(labels), replacement=True, generator=g)


def epoch_order(labels: torch.Tensor, shuffle: bool, sampler: str, g: torch.Generator) -> torch.Tensor:
    """The indices of one epoch: ``sampler``'s order when shuffling, else 0..n-1 (validation and test)."""
    if not shuffle:
        return torch.arange(len(labels))
    return SAMPLERS.get(sampler)(labels.cpu(), g)


register_choices(DataConfig, "sampler", SAMPLERS.names)
