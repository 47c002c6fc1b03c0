"""A finished run's model rebuilt from its folder: ``load_run_model(run)`` (what ``Run.load_model()`` calls) and
``rebuild_model`` (the same from a config and a checkpoint file: exports of a run still being written)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from transferlab.config import ExperimentConfig
from transferlab.files import CheckpointError, load_checkpoint
from transferlab.models.adapters import add_strategy_modules, merge_adapters
from transferlab.models.model import TransferModel, build_model
from transferlab.models.weights import FrozenPart, WeightsError, load_checkpoint_state
from transferlab.rundir import RUN_ACTIONS, Run, RunError
from transferlab.rundir.layout import checkpoint_path

__all__ = ["load_run_model", "rebuild_model"]


def rebuild_model(cfg: ExperimentConfig, num_classes: int, checkpoint: str | Path) -> TransferModel:
    """The model of run ``cfg`` with ``checkpoint`` loaded strictly, in eval mode.

    A full checkpoint is loaded into a randomly initialised model (no download). An adapter-only one
    (``weights_scope: trainable``: ``lora``, ``vpt``, ``bitfit`` … runs) holds only what trained, so the model is built
    with the run's base weights first (``frozen.base``: the embedded package, the local file, the source run …; its
    loader names what is missing) and their fingerprint is checked (``models.weights.load_checkpoint_state``).
    The modules its strategy added are rebuilt before the load — LoRA adapters, VPT prompts — and LoRA is then merged
    into the layers it adapts, so predict, ensembles, soups and every export get the plain architecture with the
    adapted weights.
    """
    path = Path(checkpoint)
    state, meta, _, _ = load_checkpoint(path)
    part = FrozenPart.from_meta(meta, path)
    model = _built(cfg, num_classes, part, path)
    if cfg.strategy.name != "lora" or any(".lora_" in k for k in state):  # a soup of LoRA runs stores merged weights
        add_strategy_modules(model, cfg.strategy)
    load_checkpoint_state(model, state, meta, path)
    return merge_adapters(model).eval()


def _built(cfg: ExperimentConfig, num_classes: int, part: FrozenPart | None, path: Path) -> TransferModel:
    """The model before the checkpoint: random (a full checkpoint replaces everything) or on the recorded base."""
    if part is None:
        return build_model(dataclasses.replace(cfg.model, weights="scratch"), cfg.head, num_classes)[0]
    try:
        return build_model(dataclasses.replace(cfg.model, weights=part.base, keep_head=False), cfg.head, num_classes)[0]
    except WeightsError as e:
        raise CheckpointError(f"{path} holds only the tensors its {cfg.strategy.name} run trained; the {len(part.keys)} frozen ones "
                              f"come from model.weights={part.base}, which cannot be loaded here: {e}") from None


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
