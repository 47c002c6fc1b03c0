"""A finished run's model rebuilt from its folder: ``load_run_model(run)`` (what ``Run.load_model()`` calls)."""

from __future__ import annotations

import dataclasses

from transferlab.models.model import TransferModel, build_model
from transferlab.models.weights import load_model_weights
from transferlab.rundir import RUN_ACTIONS, Run, RunError
from transferlab.rundir.layout import checkpoint_path

__all__ = ["load_run_model"]


def load_run_model(run: Run, checkpoint: str = "best") -> TransferModel:
    """Rebuild ``run``'s model (random init, no download) and load ``checkpoints/<checkpoint>.safetensors``
    strictly; the inputs are normalised as the run trained (``data.normalize``). Eval mode."""
    if run.config is None:
        raise RunError(f"{run.path}: no readable config.yaml, so its model cannot be rebuilt")
    model_cfg = dataclasses.replace(run.config.model, weights="scratch")
    model, _ = build_model(model_cfg, run.config.head, len(run.class_names))
    load_model_weights(model, checkpoint_path(run.path, checkpoint))
    norm = run.normalization
    if norm.mean is not None and norm.std is not None:  # data.normalize: dataset / none, as the run trained
        model.set_normalization(norm.mean, norm.std)
    return model.eval()


RUN_ACTIONS.load_model = load_run_model
