"""The parts of ``kind: train`` that keep what was pretrained or average weights (issue 22 §3–§5), as small phases.

* ``check_finetuning`` — what ``train.distill``, ``train.swa``, ``train.layer_decay`` and ``lp_ft`` need of a config,
  before any data loads (a teacher that is the run itself, unfinished, of another dataset; combinations that
  cannot work);
* ``training_criterion`` — the run's loss with L2-SP (``train.l2_sp``) and distillation (``train.distill``) around it;
* ``fit_phases`` — the loop once, or LP-FT's two fits: the head on cached features (``checkpoints/probe``), then
  everything from there; the history of both with a ``phase`` column;
* ``finish_swa`` — the SWA average (BatchNorm recomputed on the training images) written as ``best``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from transferlab.config import ExperimentConfig
from transferlab.data.batches import make_batches
from transferlab.engine.distill import DistillLoss
from transferlab.engine.features import CachedTraining, cached_training, default_cache_dir
from transferlab.engine.loop import FitResult, fit, validation_scores
from transferlab.engine.losses import with_l2_sp
from transferlab.engine.optim import swa_first_epoch
from transferlab.engine.swa import averaged_weights, recompute_batchnorm
from transferlab.files import load_checkpoint, load_checkpoint_group, read_checkpoint_metadata, save_checkpoint
from transferlab.kinds.base import RunContext
from transferlab.kinds.common import Prepared
from transferlab.models.model import TransferModel
from transferlab.models.weights import FrozenPart, frozen_fingerprint, load_model_weights
from transferlab.rundir import Run, RunError, load_run
from transferlab.rundir.layout import HISTORY_FILE
from transferlab.strategies import apply_strategy, linear_probe

__all__ = ["check_finetuning", "finetuning_extra", "finish_swa", "fit_phases", "run_ref", "training_criterion"]


def run_ref(value: str) -> Path:
    """The run directory of a ``run:<path>`` reference (a study resolves ``run:<experiment>`` to its run first)."""
    return Path(value[len("run:"):] if value.startswith("run:") else value).expanduser()


# --------------------------------------------------------------------------------------------
# checks before any data loads


def check_finetuning(cfg: ExperimentConfig) -> None:
    """``train.distill`` / ``swa`` / ``layer_decay`` / ``lp_ft`` settings that cannot work, as config errors naming the key."""
    t, s = cfg.train, cfg.strategy
    if t.swa is not None and t.ema is not None:
        raise cfg.error("train.swa and train.ema both average the weights: keep one of them")
    if t.swa is not None and t.early_stopping.patience is not None:
        raise cfg.error("train.swa averages the last epochs: it cannot be combined with train.early_stopping.patience")
    if t.layer_decay is not None and (t.lr_ratio is not None or s.unfreeze is not None or s.freeze_epochs is not None):
        raise cfg.error("train.layer_decay sets every group's lr itself: it cannot be combined with train.lr_ratio, "
                        "strategy.unfreeze or strategy.freeze_epochs")
    if s.name == "lp_ft" and (s.unfreeze is not None or s.freeze_epochs is not None):
        raise cfg.error("strategy lp_ft unfreezes everything after its probe phase: strategy.unfreeze / freeze_epochs do not apply")
    if t.distill is not None:
        check_teacher(cfg, None)


def check_teacher(cfg: ExperimentConfig, own_dir: Path | None) -> Run | None:
    """The distillation teacher is not the run itself, and when its folder exists: finished, of the same dataset and
    classes. Returns it (``None`` while a study has not made it yet)."""
    assert cfg.train.distill is not None
    ref = cfg.train.distill.teacher
    path = run_ref(ref)
    key = f"train.distill.teacher={ref!r}"
    if ref[len("run:"):] == cfg.name or (own_dir is not None and path.exists() and path.resolve() == own_dir.resolve()):
        raise cfg.error(f"{key} is the run itself: a teacher must be another, finished run")
    if not path.is_dir():
        if own_dir is not None:
            raise cfg.error(f"{key}: no run directory {path} (in a study, name an experiment of the study)")
        return None  # a study's experiment: planned before this run, checked when this run starts
    try:
        teacher = load_run(path)
    except RunError as e:
        raise cfg.error(f"{key}: not a finished run ({e})") from None
    if not teacher.ok or teacher.config is None or not teacher.config.uses.model:
        raise cfg.error(f"{key}: not a finished single-model run (status {teacher.record.status!r}, kind {teacher.record.kind!r})")
    d, td = cfg.data, teacher.config.data
    if d.task != td.task:
        raise cfg.error(f"{key}: the teacher was trained for data.task: {td.task}, this run is data.task: {d.task}")
    if (d.dataset, d.classes) != (td.dataset, td.classes):
        raise cfg.error(f"{key}: the teacher learned other classes (data.dataset {td.dataset!r}, data.classes {td.classes!r}; "
                        f"this run: {d.dataset!r}, {d.classes!r})")
    return teacher


# --------------------------------------------------------------------------------------------
# the loss


def training_criterion(criterion: torch.nn.Module, p: Prepared, cfg: ExperimentConfig, ctx: RunContext) -> torch.nn.Module:
    """``criterion`` with L2-SP toward the weights the run starts from, then distillation from the teacher."""
    criterion = with_l2_sp(criterion, p.model, cfg)
    if cfg.train.distill is None:
        return criterion
    teacher = check_teacher(cfg, ctx.rundir.path)
    assert teacher is not None
    if teacher.class_names != list(p.splits.class_names):
        raise cfg.error(f"train.distill.teacher={cfg.train.distill.teacher!r}: the teacher's classes {teacher.class_names[:10]} "
                        f"differ from this run's {list(p.splits.class_names)[:10]}")
    model = teacher.load_model()
    assert teacher.config is not None
    size = teacher.record.image_size or teacher.config.model.image_size or teacher.config.data.image_size  # what it trained on
    d = cfg.train.distill
    ctx.console.print(f"  distillation from {teacher.path.name} ({teacher.config.model.backbone}, "
                      f"{size or 'native'} px): alpha {d.alpha}, temperature {d.temperature}")
    return DistillLoss(criterion, model, p.model.preprocess(), model.preprocess(), size, d.alpha, d.temperature, cfg.multilabel)


# --------------------------------------------------------------------------------------------
# the fit: once, or LP-FT's probe then fine-tune


def fit_phases(p: Prepared, cfg: ExperimentConfig, ctx: RunContext, train: Any, val: Any, kwargs: dict[str, Any],
               criterion: torch.nn.Module, meta: dict[str, Any]) -> tuple[FitResult, CachedTraining, FitResult | None]:
    """Train; with ``strategy: lp_ft`` first the head alone on cached features for ``probe_epochs`` (checkpoints in
    ``checkpoints/probe``), then everything from the probe's best weights for the remaining epochs. Writes
    ``history.csv`` (both phases, a ``phase`` column, epochs counted over the whole run). Returns (the last fit,
    its cache decision, the probe fit or ``None``)."""
    probe = _probe_phase(p, cfg, ctx, train, val, kwargs, criterion, meta) if cfg.strategy.name == "lp_ft" else None
    main_cfg = cfg
    if probe is not None:  # the fine-tuning phase: the epochs after the probe
        # nothing is frozen now: train.cache (on for the probe) has nothing to cache
        main_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=cfg.train.epochs - int(cfg.strategy.probe_epochs or 0),
                                                                      cache="off"))
    cached = cached_training(p.model, p.splits, main_cfg, p.fabric, kwargs, default_cache_dir(ctx.rundir.path), ctx.console,
                             shared=ctx.shared_features)
    fit_model, fit_train, fit_val = cached.apply(p.model, train, val)
    result = fit(fit_model, fit_train, fit_val, main_cfg, p.fabric, ctx.rundir.checkpoints, meta, resume=ctx.resume, console=ctx.console,
                 callbacks=ctx.callbacks, criterion=criterion)
    if p.writer:
        ctx.rundir.write_rows(HISTORY_FILE, history_rows(probe.history if probe else None, result.history))
    if probe is not None:  # the run's facts over both phases: epochs, best epoch, training time
        n = len(probe.history)
        result = dataclasses.replace(result, history=[*probe.history, *result.history], best_epoch=result.best_epoch + n,
                                     train_seconds=probe.train_seconds + result.train_seconds)
    return result, cached, probe


def _probe_phase(p: Prepared, cfg: ExperimentConfig, ctx: RunContext, train: Any, val: Any, kwargs: dict[str, Any],
                 criterion: torch.nn.Module, meta: dict[str, Any]) -> FitResult:
    """LP-FT's first phase: the backbone frozen, the head trained on cached features (one backbone pass); the probe's
    best weights loaded into the model and everything made trainable again."""
    s = cfg.strategy
    probe_cfg = dataclasses.replace(cfg, strategy=dataclasses.replace(s, name="linear_probe", probe_epochs=None),
                                    train=dataclasses.replace(cfg.train, epochs=int(s.probe_epochs or 0), swa=None))
    ctx.console.print(f"  lp_ft: probe phase, {s.probe_epochs} epoch(s) with the backbone frozen")
    linear_probe(p.model, s)
    cached = cached_training(p.model, p.splits, probe_cfg, p.fabric, kwargs, default_cache_dir(ctx.rundir.path), ctx.console,
                             shared=ctx.shared_features)
    fit_model, fit_train, fit_val = cached.apply(p.model, train, val)
    directory = ctx.rundir.checkpoints / "probe"
    result = fit(fit_model, fit_train, fit_val, probe_cfg, p.fabric, directory, meta, resume=ctx.resume, console=ctx.console,
                 callbacks=ctx.callbacks, criterion=criterion)
    result.log.append(f"feature cache: {cached.reason}")  # what the probe phase trained on (metrics.json's lp_ft section)
    p.fabric.barrier()
    best = directory / "best.safetensors"
    load_model_weights(p.model, best if best.exists() else directory / "last.safetensors")
    apply_strategy(p.model, s)  # lp_ft: everything trains from here
    ctx.console.print(f"  lp_ft: fine-tuning phase, {cfg.train.epochs - int(s.probe_epochs or 0)} epoch(s) from the probe's best head "
                      f"(val {result.best_metric:.4f})")
    return result


def history_rows(probe: list[dict[str, Any]] | None, main: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``history.csv``: with a probe phase, its rows (``phase: probe``) then the fine-tuning rows
    (``phase: finetune``, epochs continuing); every row with every column (phases log different ones)."""
    if probe is None:
        rows = [dict(r) for r in main]
    else:
        n = len(probe)
        rows = [{"phase": "probe", **r} for r in probe] + [{"phase": "finetune", **r, "epoch": r["epoch"] + n} for r in main]
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    return [{c: r.get(c, "") for c in columns} for r in rows]


# --------------------------------------------------------------------------------------------
# train.swa: the average becomes the run's weights


def finish_swa(p: Prepared, cfg: ExperimentConfig, ctx: RunContext, kwargs: dict[str, Any], val: Any, last_epochs: int) -> dict[str, Any] | None:
    """With ``train.swa``: load the average the last checkpoint holds, recompute BatchNorm statistics on the training
    images (no augmentation, one pass), validate it and write it as ``checkpoints/best`` (what is tested, loaded and
    exported). Deterministic, so a resumed run writes the same weights. Returns the ``swa`` section of ``metrics.json``."""
    if cfg.train.swa is None:
        return None
    last = ctx.rundir.checkpoints / "last.safetensors"
    model: TransferModel = p.model
    state = averaged_weights(load_checkpoint_group(last, "swa"))
    n_averaged = int(load_checkpoint_group(last, "swa")["n_averaged"])
    if n_averaged == 0:
        raise RunError(f"experiment '{cfg.name}': train.swa averaged no epoch (training stopped before epoch {swa_first_epoch(cfg.train) + 1})")
    model.load_state_dict(state, strict=True)
    model.to(p.fabric.device)
    plain = make_batches(p.splits, "train", cfg.train.eval_batch_size, **kwargs)
    recomputed = recompute_batchnorm(model, plain, p.fabric.device, p.fabric.autocast)
    with p.fabric.autocast():
        scores = validation_scores(model, val, p.splits.num_classes, p.fabric.device, cfg.multilabel)  # loss, acc / map
    if p.writer:
        _, meta, _, _ = load_checkpoint(last)
        weights, scope = _scoped_weights(model, meta, last)
        meta = {k: v for k, v in meta.items() if k not in ("optimizer", "weights_scope", "frozen")}
        save_checkpoint(ctx.rundir.checkpoints / "best.safetensors", weights, {**meta, **scope, "kind": "best", "swa": {"models": n_averaged}})
    p.fabric.barrier()
    first = swa_first_epoch(dataclasses.replace(cfg.train, epochs=last_epochs))
    swa, score = cfg.train.swa, "val_map" if cfg.multilabel else "val_acc"
    return {"start": swa.start, "first_epoch": first + 1 + (cfg.train.epochs - last_epochs), "models": n_averaged,
            "lr": swa.lr if swa.lr is not None else float(cfg.train.lr) / 2, "batchnorm_recomputed": len(recomputed),
            **{f"val_{k}": v for k, v in scores.items()}, f"{score}_last_epoch": read_checkpoint_metadata(last)["history"][-1][score]}


def _scoped_weights(model: TransferModel, meta: dict[str, Any], last: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The SWA weights to write as ``best`` and their scope: adapter-only like the run's checkpoints when the average of the
    frozen parameters is still exactly the base (it is: an average of equal tensors), else every tensor."""
    state, part = model.state_dict(), FrozenPart.from_meta(meta, last)
    if part is None or frozen_fingerprint(state, part.keys) != part.fingerprint:
        return state, {}
    return part.strip(state), part.meta()


def finetuning_extra(cfg: ExperimentConfig, probe: FitResult | None, swa: dict[str, Any] | None,
                     optimizer_groups: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``metrics.json`` sections of layer decay, L2-SP, LP-FT, SWA and distillation (only those in use)."""
    t, out = cfg.train, {}
    if t.layer_decay is not None:
        out["layer_decay"] = {"decay": t.layer_decay, **({"groups": optimizer_groups} if optimizer_groups else {})}
    if t.l2_sp is not None:
        out["l2_sp"] = {"alpha": t.l2_sp.alpha, "beta": t.l2_sp.beta, "start": cfg.model.weights}
    if probe is not None:
        out["lp_ft"] = {"probe_epochs": cfg.strategy.probe_epochs, "probe_best_epoch": probe.best_epoch, "probe_best_val": probe.best_metric,
                        "probe_train_seconds": probe.train_seconds, "finetune_epochs": t.epochs - int(cfg.strategy.probe_epochs or 0),
                        "probe_log": probe.log}
    if swa is not None:
        out["swa"] = swa
    if t.distill is not None:
        out["distill"] = dataclasses.asdict(t.distill)
    return out
