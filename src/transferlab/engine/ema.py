"""An exponential moving average of the weights (``train.ema``), on timm's ``ModelEmaV3``.

After every optimizer step t (counted from 1 over the whole run) the average moves towards the
trained weights: ``ema ← d_t · ema + (1 − d_t) · θ_t``, with ``d_1 = 0`` (the first step copies the
weights) and then ``d_t = decay``, or with ``warmup`` ``d_t = min(decay, 1 − t^(-2/3))`` (timm's
warm-up, so a short run is not dominated by its first, random weights). Every floating-point entry
of the state dict is averaged — parameters *and* BatchNorm running statistics, so the averaged
model's normalisation matches its averaged weights without an extra pass over the data; integer
buffers (``num_batches_tracked``) are copied. The average is kept in float32 whatever the training
precision (no stochastic rounding, hence no extra RNG state to checkpoint).

``evaluate`` says which weights are *the* weights of the run — validated, kept as ``best`` and
tested: ``ema`` or ``raw``; ``both`` validates and tests both, with the EMA ones the run's result.
The checkpoints store the run's weights as their model (what ``load_run`` and ``weights: run:…``
load) and the other set beside them, so a resume restores both (``transferlab.engine.checkpointing``).
"""

from __future__ import annotations

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn

from transferlab.config.schema import EmaConfig

__all__ = ["WeightEma", "make_ema"]


class WeightEma:
    """The EMA of one model's weights: ``update`` after each step, ``module`` to evaluate, state for checkpoints."""

    def __init__(self, model: nn.Module, cfg: EmaConfig) -> None:
        self.cfg = cfg
        # timm's EMA deep-copies the module; a copy of a training-mode module is put in eval mode there
        self.ema = ModelEmaV3(model, decay=cfg.decay, use_warmup=cfg.warmup, dtype=torch.float32, foreach=True)
        self.updates = 0  # optimizer steps averaged so far (the t above)

    @property
    def module(self) -> nn.Module:
        """The averaged model (eval mode), to validate and test."""
        return self.ema.module

    @property
    def main(self) -> bool:
        """Whether the EMA weights are the run's weights (``evaluate: ema`` or ``both``)."""
        return self.cfg.evaluate != "raw"

    def decay_at(self, step: int) -> float:
        """d_t of the module docstring (timm's ``get_decay``)."""
        return self.ema.get_decay(step)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current weights (call after each optimizer step)."""
        self.updates += 1
        self.ema.update(model, step=self.updates)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed as the model's own state dict."""
        return self.ema.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Restore the average and the number of steps it has seen (a resume)."""
        self.ema.module.load_state_dict(state, strict=True)
        self.updates = updates


def make_ema(model: nn.Module, cfg: EmaConfig | None) -> WeightEma | None:
    """The run's ``WeightEma`` of ``model`` (``train.ema``), or ``None`` when it is off."""
    return None if cfg is None else WeightEma(model, cfg)
