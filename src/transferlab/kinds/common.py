"""Steps several kinds share: the data of a run, the identity part of its metrics, frozen features."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
from lightning.fabric import Fabric

from transferlab.config import ExperimentConfig
from transferlab.data.prepare import ImageSplits, prepare_splits
from transferlab.engine.calibration import ECE_BINS, multilabel_calibration
from transferlab.engine.distributed import make_fabric
from transferlab.engine.evaluation import Calibration, Evaluation
from transferlab.engine.features import default_cache_dir, frozen_features
from transferlab.engine.features.store import FeatureSet, state_hash
from transferlab.engine.loop import FitResult
from transferlab.engine.multilabel import MultilabelEvaluation, multilabel_part
from transferlab.kinds.base import RunContext
from transferlab.models.model import TransferModel, build_model
from transferlab.models.weights import LoadReport
from transferlab.rundir import RunError, RunMetrics, code_version
from transferlab.rundir.layout import SELECTION_FILE
from transferlab.strategies import linear_probe

__all__ = [
    "MULTILABEL_ECE",
    "Prepared",
    "ProbeInputs",
    "base_metrics",
    "fit_part",
    "prepare",
    "test_part",
    "batch_kwargs",
    "default_image_size",
    "load_splits",
    "multilabel_test_part",
    "probe_inputs",
    "probe_metrics",
    "calibration_part",
    "single_process_fabric",
    "split_features",
    "use_data_normalization",
]


def default_image_size(backbone: str) -> int | None:
    """The backbone's pretrained input side (timm's pretrained config), for images of mixed sizes without
    ``data.image_size``; ``None`` when it declares none.

    Resolved here, in the kind, because it is a fact of the model (the data layer may not import models)
    and the config stays a plain schema: timm's registry answers without building the model, and the
    transferlab built-ins (no timm pretrained config) are built once on the CPU to read theirs.
    """
    cfg = timm.models.get_pretrained_cfg(backbone) if timm.is_model(backbone) else None
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    if size is None and timm.is_model(backbone):
        with torch.random.fork_rng():  # building draws random init: the run's own model must get the seed's first draws
            size = (timm.create_model(backbone, pretrained=False).pretrained_cfg or {}).get("input_size")
    return int(size[-1]) if size else None


def load_splits(cfg: ExperimentConfig, ctx: RunContext | None, writer: bool = True) -> tuple[ImageSplits, float]:
    """The run's train/val/test splits (prepared here unless the caller gave them) and the seconds it took;
    ``selection.json`` records the indices, the folds and the normalisation. Image files of mixed sizes
    without ``data.image_size`` get the backbone's pretrained input size, and the console says so.
    Without ``ctx`` (the LR finder outside a run) nothing is written or said."""
    t0 = time.perf_counter()
    if ctx is None:
        default = default_image_size(cfg.model.backbone) if cfg.data.image_size is None else None
        return prepare_splits(cfg.data, cfg.seed, default_size=default), time.perf_counter() - t0
    if ctx.splits is not None:
        splits = ctx.splits
    else:
        default = default_image_size(cfg.model.backbone) if cfg.data.image_size is None else None
        splits = prepare_splits(cfg.data, cfg.seed, default_size=default)
    if splits.size_from == "backbone":
        ctx.console.print(f"  data.image_size: null and the images differ in size: using {cfg.model.backbone}'s pretrained "
                          f"input size, {splits.image_size}×{splits.image_size} (data.resize: {cfg.data.resize})")
    seconds = time.perf_counter() - t0
    if writer:
        ctx.rundir.write_json(SELECTION_FILE, splits.selection_record())
    return splits, seconds


@dataclass
class Prepared:
    """A run's shared start (``prepare``): the Fabric, the data, the model with its normalisation and strategy."""

    fabric: Fabric
    splits: ImageSplits
    model: TransferModel
    weights: LoadReport | None
    """How the pretrained weights loaded (``None``: a model given by the caller, or random init)."""
    data_seconds: float
    wall0: float
    """``time.perf_counter()`` when the run started (for ``wall_seconds``)."""

    @property
    def writer(self) -> bool:
        """This process writes the run directory (rank 0)."""
        return self.fabric.is_global_zero


def prepare(
    cfg: ExperimentConfig,
    ctx: RunContext | None,
    strategy: Callable[[TransferModel, Any], Any] | None = None,
    single_process: bool = False,
) -> Prepared:
    """The start every kind with a model shares, in one order (the RNG draws depend on it): Fabric, the run
    directory begun (``config.yaml``; skipped without ``ctx``), the seed, the splits, the model (built, or the
    caller's ``ctx.model``), the data normalisation, then ``strategy(model, cfg.strategy)`` when given.

    ``single_process``: a DDP launch is an error naming the kind (probes, few-shot).
    """
    wall0 = time.perf_counter()
    fabric = single_process_fabric(cfg) if single_process else make_fabric(cfg)
    if ctx is not None:
        fabric.barrier()  # every rank has decided from the same view of the folder; now rank 0 may change it
        ctx.begin(fabric.is_global_zero)
    fabric.seed_everything(cfg.seed, verbose=False)
    splits, data_seconds = load_splits(cfg, ctx, fabric.is_global_zero)
    if ctx is not None and ctx.model is not None:
        model, weights = ctx.model, None
    else:
        model, weights = build_model(cfg.model, cfg.head, splits.num_classes)
        use_data_normalization(model, splits)  # data.normalize: dataset / none — batches, cache key, outside images alike
    if strategy is not None:
        strategy(model, cfg.strategy)
    return Prepared(fabric, splits, model, weights, data_seconds, wall0)


def test_part(ev: Evaluation, fitted_on: str = "val") -> dict[str, Any]:
    """The test metrics of ``metrics.json`` from an ``Evaluation`` of the test split: accuracy, loss, per class,
    the confusion matrix, inference speed and the calibration."""
    part = {"test_acc": ev.acc, "test_top5": ev.top5, "test_loss": ev.loss, "per_class_acc": ev.per_class_acc,
            "confusion_matrix": ev.confusion_matrix, "inference_images_per_s": ev.images_per_s}
    return {**part, **calibration_part(ev.calibration, ev.calibrated, ev.temperature, fitted_on)}


MULTILABEL_ECE = "torchmetrics BinaryCalibrationError of each class, averaged over classes"


def multilabel_test_part(ev: MultilabelEvaluation, mode: str) -> dict[str, Any]:
    """The test metrics of ``metrics.json`` from a multi-label ``evaluate_multilabel`` of the test split at the thresholds
    chosen on validation (``mode``: ``global`` / ``per_class`` / ``fixed``, from ``choose_thresholds``): ``task``, mAP,
    F1 / precision / recall, exact match, Hamming loss, the thresholds, speed and the per-class calibration."""
    if ev.scores is None or ev.thresholds is None:
        raise ValueError("multilabel_test_part needs an evaluation at thresholds (evaluate_multilabel(..., thresholds))")
    cal = multilabel_calibration(ev.probs, ev.targets, ev.loss)
    part = {**multilabel_part(ev.scores, ev.thresholds, mode, ev.loss, ev.images_per_s),
            **calibration_part(Calibration.from_sums(cal), source=MULTILABEL_ECE)}
    part["extra"]["calibration"]["per_class_ece"] = cal["per_class_ece"]
    return part


def calibration_part(cal: Calibration, calibrated: Calibration | None = None, temperature: float | None = None,
                     fitted_on: str = "val", source: str = "torchmetrics MulticlassCalibrationError") -> dict[str, Any]:
    """ECE / NLL / Brier of the test predictions and the ``calibration`` section of ``metrics.json`` (binning, reliability
    bins; after temperature scaling too when it was applied). ``source``: how the ECE was measured."""
    part: dict[str, Any] = {"test_ece": cal.ece, "test_nll": cal.nll, "test_brier": cal.brier}
    section: dict[str, Any] = {"ece": {"bins": ECE_BINS, "norm": "l1", "source": source},
                               "reliability": cal.reliability}
    if calibrated is not None:
        part.update(test_ece_calibrated=calibrated.ece, temperature=temperature)
        section["calibrated"] = {"method": "temperature", "fitted_on": fitted_on, "temperature": temperature,
                                 "ece": calibrated.ece, "nll": calibrated.nll, "brier": calibrated.brier,
                                 "reliability": calibrated.reliability}
    return {**part, "extra": {"calibration": section}}


def fit_part(result: FitResult, cfg: ExperimentConfig) -> dict[str, Any]:
    """The training facts of ``metrics.json`` from the loop's ``FitResult``."""
    return {
        "best_epoch": result.best_epoch, "best_val": result.best_metric, "monitor": cfg.train.early_stopping.monitor,
        "epochs_run": len(result.history), "stopped_early": result.stopped_early, "resumed_from": result.resumed_from,
        "train_seconds": result.train_seconds,
    }


def base_metrics(cfg: ExperimentConfig, splits: ImageSplits, weights: LoadReport | None, device: torch.device, world_size: int = 1) -> RunMetrics:
    """The fields every ``metrics.json`` starts with: which experiment ran, with what, on which data, where."""
    return RunMetrics(
        status="ok",
        kind=cfg.kind,
        experiment=cfg.name,
        seed=cfg.seed,
        backbone=cfg.model.backbone,
        weights=cfg.model.weights,
        head=cfg.head.type,
        dataset=cfg.data.dataset,
        image_size=int(splits.train_x.shape[-1]),
        channels=int(splits.train_x.shape[1]),
        n_train=len(splits.train_y),
        n_val=len(splits.val_y),
        n_test=len(splits.test_y),
        skipped_bad_images=len(splits.skipped),
        class_names=list(splits.class_names),
        task=cfg.data.task,
        weights_source=weights.describe() if weights else "random init",
        device=str(device),
        world_size=world_size,
        notes=cfg.notes,
        code_version=code_version(),
    )


def single_process_fabric(cfg: ExperimentConfig) -> Fabric:
    """A Fabric for a kind that runs in one process (a DDP launch is an error naming the kind)."""
    fabric = make_fabric(cfg)
    if fabric.world_size > 1:
        raise RunError(f"experiment '{cfg.name}': kind: {cfg.kind} runs in a single process (launched with world size {fabric.world_size})")
    return fabric


def use_data_normalization(model: TransferModel, splits: ImageSplits) -> TransferModel:
    """Give ``model`` the mean/std of ``data.normalize`` (``dataset`` / ``none``) so every later use of
    ``model.preprocess()`` — batches, the feature-cache key, outside images, export — normalises alike.
    ``backbone`` leaves the model's own. Call right after building the model."""
    norm = splits.normalization
    if norm.mean is not None and norm.std is not None:
        model.set_normalization(norm.mean, norm.std)
    return model


def batch_kwargs(model: TransferModel, cfg: ExperimentConfig, device: torch.device) -> dict[str, Any]:
    """The ``make_batches`` arguments of a run: the model's preprocessing, the device, memory format, workers."""
    return dict(preprocess=model.preprocess(), device=device, channels_last=cfg.model.channels_last, num_workers=cfg.data.num_workers)


def split_features(
    model: TransferModel, splits: ImageSplits, names: tuple[str, ...], cfg: ExperimentConfig, fabric: Fabric, ctx: RunContext
) -> tuple[dict[str, FeatureSet], float]:
    """The frozen backbone's pooled features of the named splits (one pass each, or a cache hit), and the seconds spent.

    Features computed under bf16 autocast (``train.precision: bf16-mixed``, what ``auto`` picks on CPUs with native
    bf16) are cached in bfloat16; the probes and episodes solve in float32, so they get a float32 copy (pooled
    vectors: small).
    """
    kwargs = batch_kwargs(model, cfg, fabric.device)
    weights = state_hash(model.backbone)
    sets, seconds = {}, 0.0
    for split in names:
        fs, s = frozen_features(
            model, splits, split, cfg, fabric.device, kwargs, default_cache_dir(ctx.rundir.path), fabric.autocast, weights=weights,
            shared=ctx.shared_features,
        )
        if fs.features.is_floating_point() and fs.features.dtype != torch.float32:
            fs = dataclasses.replace(fs, features=fs.features.float())
        sets[split] = fs
        seconds += s
    return sets, seconds


# --------------------------------------------------------------------------------------------
# probes on frozen pooled features (kind: logistic / knn)


@dataclass
class ProbeInputs:
    """What a probe starts from: the frozen model, its data, and the pooled features of all three splits."""

    fabric: Fabric
    splits: ImageSplits
    model: TransferModel
    weights: LoadReport | None
    features: dict[str, FeatureSet]
    data_seconds: float
    pass_seconds: float
    wall0: float


def probe_inputs(cfg: ExperimentConfig, ctx: RunContext) -> ProbeInputs:
    """Open the run, load the data, build the model with its backbone frozen, compute (or reuse) the features."""
    p = prepare(cfg, ctx, linear_probe, single_process=True)  # the backbone is a fixed feature extractor (BatchNorm in eval mode)
    p.model.to(p.fabric.device).eval()
    ctx.console.print(
        f"[bold]{cfg.name}[/] seed {cfg.seed}: {cfg.kind} on frozen {cfg.model.backbone} ({cfg.model.weights}) features, "
        f"{len(p.splits.train_y)}/{len(p.splits.val_y)}/{len(p.splits.test_y)} train/val/test images on {p.fabric.device}"
    )
    sets, pass_seconds = split_features(p.model, p.splits, ("train", "val", "test"), cfg, p.fabric, ctx)
    return ProbeInputs(p.fabric, p.splits, p.model, p.weights, sets, p.data_seconds, pass_seconds, p.wall0)


def probe_metrics(
    cfg: ExperimentConfig, inp: ProbeInputs, test: Evaluation | MultilabelEvaluation, chosen: dict[str, Any],
    sweep: list[dict[str, float]], fit_seconds: float, trainable: int,
) -> RunMetrics:
    """The ``metrics.json`` of a probe: test metrics of the classifier chosen on val, the sweep, the feature pass.

    Multi-label: ``test`` is scored at the thresholds chosen on val and ``chosen["threshold_mode"]`` says how they were
    chosen; the probe was chosen by ``chosen["val_map"]``."""
    if isinstance(test, MultilabelEvaluation):
        part, monitor = multilabel_test_part(test, chosen["threshold_mode"]), "val_map"
    else:
        part, monitor = test_part(test), "val_acc"
    m = base_metrics(cfg, inp.splits, inp.weights, inp.fabric.device).add(part)
    m.strategy = cfg.kind
    m.best_epoch, m.best_val, m.monitor, m.epochs_run, m.stopped_early = 1, chosen[monitor], monitor, 1, False
    m.train_seconds, m.data_seconds, m.wall_seconds = fit_seconds, inp.data_seconds, time.perf_counter() - inp.wall0
    test_ips = inp.features["test"].meta.get("images_per_s")
    # the backbone's forward pass over the test images (when this run computed it) plus the classifier
    m.inference_images_per_s = (1 / (1 / test_ips + 1 / test.images_per_s)) if test_ips else test.images_per_s
    m.total_params, m.trainable_params = sum(p.numel() for p in inp.model.parameters()), trainable
    m.feature_cache = {
        "used": True,
        "reason": "probe on frozen pooled features",
        "cut": "pooled",
        "sources": [inp.features[s].source for s in ("train", "val", "test")],
        "keys": [inp.features[s].key for s in ("train", "val", "test")],
        "pass_seconds": inp.pass_seconds,
        "head_seconds": fit_seconds,
    }
    m.extra["probe"] = {**chosen, "sweep": sweep}
    return m
