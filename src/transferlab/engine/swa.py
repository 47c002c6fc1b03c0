"""Stochastic weight averaging (``train.swa``, Izmailov et al. 2018) on PyTorch's ``torch.optim.swa_utils``.

From the first averaged epoch (``engine.optim.swa_first_epoch``: ``floor(start * epochs)``) the lr follows
``SWALR`` (``engine.optim.SwaSchedule``) and, at the end of every epoch, the weights join an ``AveragedModel``
(the ``SwaUpdate`` hook, before the epoch's checkpoints, which hold the average as their tensor group ``swa``:
a resumed run continues the same average). After the last epoch the averaged weights get BatchNorm statistics
recomputed on the training images (``recompute_batchnorm``: PyTorch's ``update_bn``, except that BatchNorm layers a
strategy froze keep theirs) and become the run's tested weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from transferlab.config import ExperimentConfig
from transferlab.engine.optim import swa_first_epoch
from transferlab.models.model import BN_TYPES, TransferModel

__all__ = ["SwaAverage", "averaged_weights", "make_swa", "recompute_batchnorm"]


class SwaAverage:
    """The running equal-weight average of the weights at the end of every epoch from ``first_epoch`` on."""

    def __init__(self, model: nn.Module, first_epoch: int) -> None:
        self.averaged = AveragedModel(unwrapped(model))  # a deep copy; parameters averaged, buffers recomputed at the end
        self.first_epoch = first_epoch

    @property
    def count(self) -> int:
        """Epochs averaged so far."""
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self, model: nn.Module, epoch: int) -> None:
        """Add ``model``'s weights at the end of (0-based) ``epoch`` when it is an averaged epoch."""
        if epoch >= self.first_epoch:
            self.averaged.update_parameters(unwrapped(model))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average's tensors (``n_averaged`` and ``module.<the model's state dict>``): checkpoint group ``swa``."""
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state, strict=True)


def unwrapped(model: nn.Module) -> nn.Module:
    """The ``TransferModel`` of what the loop trains (the feature cache trains a wrapper of it: ``.model``)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, TransferModel) else model


def make_swa(model: nn.Module, cfg: ExperimentConfig) -> SwaAverage | None:
    """The run's ``SwaAverage`` (``train.swa``), or ``None`` when it is off."""
    return None if cfg.train.swa is None else SwaAverage(model, swa_first_epoch(cfg.train))


def averaged_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict inside an ``SwaAverage.state_dict()`` (the ``module.`` entries)."""
    return {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Any, device: torch.device, autocast: Any = None) -> list[str]:
    """Recompute the running statistics of the BatchNorm layers that train, over ``batches`` (PyTorch's ``update_bn``:
    reset, then a cumulative average over one pass). Layers kept in eval mode (a frozen BatchNorm) keep theirs.
    Returns the names of the recomputed layers; leaves ``model`` in eval mode."""
    model.train()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, BN_TYPES) and m.training and m.track_running_stats}
    if not bns:
        model.eval()
        return []
    momenta = {n: m.momentum for n, m in bns.items()}
    for m in bns.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
    ctx = autocast() if autocast is not None else torch.autocast(device.type, enabled=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), ctx:  # dropout draws leave no trace
        for x, _ in batches:
            model(x.to(device))
    for n, m in bns.items():
        m.momentum = momenta[n]
    model.eval()
    return sorted(bns)
