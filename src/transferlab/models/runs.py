"""A finished run's model rebuilt from its folder: ``load_run_model(run)`` (what ``Run.load_model()`` calls) and
``rebuild_model`` (the same from a config and a checkpoint file: exports of a run still being written)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from transferlab.config import ExperimentConfig
from transferlab.models.adapters import add_strategy_modules, merge_adapters
from transferlab.models.model import TransferModel, build_model
from transferlab.models.weights import load_model_weights
from transferlab.rundir import RUN_ACTIONS, Run, RunError
from transferlab.rundir.layout import checkpoint_path

__all__ = ["load_run_model", "rebuild_model"]


def rebuild_model(cfg: ExperimentConfig, num_classes: int, checkpoint: str | Path) -> TransferModel:
    """The model of run ``cfg`` (random init, no download) with ``checkpoint`` loaded strictly, in eval mode.

    The modules its strategy added are rebuilt first — LoRA adapters, VPT prompts: the checkpoint holds their
    weights — and LoRA is then merged into the layers it adapts, so predict, ensembles, soups and every export get
    the plain architecture with the adapted weights.
    """
    model, _ = build_model(dataclasses.replace(cfg.model, weights="scratch"), cfg.head, num_classes)
    add_strategy_modules(model, cfg.strategy)
    load_model_weights(model, Path(checkpoint))
    return merge_adapters(model).eval()


def load_run_model(run: Run, checkpoint: str = "best") -> TransferModel:
    """Rebuild ``run``'s model (``rebuild_model``) from ``checkpoints/<checkpoint>.safetensors``; the inputs are
    normalised as the run trained (``data.normalize``). Eval mode."""
    if run.config is None:
        raise RunError(f"{run.path}: no readable config.yaml, so its model cannot be rebuilt")
    model = rebuild_model(run.config, len(run.class_names), checkpoint_path(run.path, checkpoint))
    norm = run.normalization
    if norm.mean is not None and norm.std is not None:  # data.normalize: dataset / none, as the run trained
        model.set_normalization(norm.mean, norm.std)
    return model


RUN_ACTIONS.load_model = load_run_model
