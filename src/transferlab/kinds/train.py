"""``kind: train`` — the training loop: data, model, strategy, (cached) fit, test.

Runs in one process or as one rank of a ``torchrun`` DDP world (``transferlab.engine.distributed``):
every rank trains on its slice of every global batch; rank 0 alone writes the run directory.
A frozen prefix of the network (``linear_probe``, ``freeze_first``) runs once when it can be cut off
exactly (``train.cache``); the loop then trains the rest on cached features.

Multi-label (``data.task: multilabel``): the loop trains with ``bce`` / ``asymmetric`` and keeps the best ``val_map``; after
training, the thresholds (``train.threshold``) are chosen on the validation split with the tested weights and only
then is the test split scored at them (``metrics.json``: ``test_map`` …, ``thresholds``; ``predictions.json``: N×K).
``train.calibrate: temperature`` is refused; the per-class calibration is reported instead.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from lightning.fabric import Fabric

from transferlab.config import ExperimentConfig, from_dict, load_yaml, resize_scales, unfreeze_milestones
from transferlab.config.kinds import KindUses
from transferlab.data.batches import make_batches
from transferlab.data.prepare import ImageSplits
from transferlab.engine.calibration import collect_logits, fit_temperature
from transferlab.engine.costs import CachedCost, Cost, Estimate, Part, feature_pass, fmt_seconds
from transferlab.engine.distributed import RoundRobin, SliceOfGlobalBatch
from transferlab.engine.evaluation import evaluate, with_tta
from transferlab.engine.losses import make_loss
from transferlab.engine.lr_find import LrFindResult, lr_find, resolved, save_lr_find
from transferlab.engine.multilabel import evaluate_at_val_thresholds, evaluate_multilabel, multilabel_predictions
from transferlab.engine.optim import layer_decay_groups
from transferlab.engine.precision import guard_bf16_convs
from transferlab.engine.predictions import PredictionRecorder, save_test_predictions
from transferlab.files import load_checkpoint_group, read_json
from transferlab.kinds.base import KINDS, Kind, RunContext, Tested, check_sections, run_sections
from transferlab.kinds.common import Prepared, base_metrics, batch_kwargs, fit_part, multilabel_test_part, prepare, test_part
from transferlab.kinds.phases import check_finetuning, finetuning_extra, finish_swa, fit_phases, training_criterion
from transferlab.models.backbones import takes_image_size
from transferlab.models.model import TransferModel, count_params
from transferlab.models.weights import load_model_weights
from transferlab.rundir import Opening, RunMetrics, code_version
from transferlab.rundir.layout import LR_FIND_JSON, LR_FIND_PNG
from transferlab.strategies import apply_strategy

__all__ = ["TrainKind", "find_lr"]


def _guard_bf16(model: TransferModel, train: Any, cfg: ExperimentConfig, fabric: Fabric, ctx: RunContext) -> list[str]:
    """Strided convs that see 1×1 inputs run in fp32 under bf16 on the CPU (``engine.precision.guard_bf16_convs``)."""
    if not cfg.train.precision.startswith("bf16") or fabric.device.type != "cpu":
        return []
    train.set_epoch(0)  # batch order and augmentation are seeded by the epoch: reading one batch changes nothing
    batch = next(iter(train), None)
    names = [] if batch is None else guard_bf16_convs(model, batch[0].to(fabric.device), cfg.train.precision, fabric.device)
    if names:
        ctx.console.print(f"  bf16: convolutions with a stride > 1 on a 1×1 input run in fp32 (a oneDNN bf16 weight-gradient "
                          f"bug, see transferlab.engine.precision): {', '.join(names)}")
    return names


class TrainKind(Kind):
    """The training loop: data, model, strategy, (cached) fit, test."""

    name = "train"
    uses = KindUses(training=True, multilabel=True)
    keeps_partial = True  # an interrupted run continues from its newest checkpoint
    uses_tta = True

    def check(self, cfg: ExperimentConfig) -> None:
        """Distillation, SWA, layer decay and LP-FT settings that cannot work (``kinds.phases.check_finetuning``); progressive
        resizing of a backbone built for one input size; temperature scaling of a multi-label run."""
        check_finetuning(cfg)
        if cfg.train.progressive_resize is not None and takes_image_size(cfg.model.backbone):
            raise cfg.error(f"train.progressive_resize: backbone {cfg.model.backbone!r} is built for one input size (timm's "
                            "fixed_input_size: ViT, DeiT, Swin, …) and cannot train on smaller images; drop train.progressive_resize")
        if cfg.multilabel and cfg.train.calibrate == "temperature":
            # the thresholds are chosen on the validation probabilities: a temperature fitted afterwards would move them all
            raise cfg.error("train.calibrate: temperature is multiclass only (one softmax); a multi-label run reports the calibration "
                            "of each class's sigmoid (test_ece: the mean binary ECE) without rescaling")

    def estimate(self, cfg: ExperimentConfig, n_train: int, n_val: int, n_test: int, cost: Cost | None) -> float:
        """Seconds of ``explain``'s estimate."""
        return self.explain(cfg, n_train, n_val, n_test, cost).seconds

    def explain(self, cfg: ExperimentConfig, n_train: int, n_val: int, n_test: int, cost: Cost | None) -> Estimate:
        """Epochs of training steps and validation passes, then the test pass, each part saying what it assumed.

        A run the feature cache takes (``cost.cached``: the probe asked the engine's own decision) costs one pass of the
        frozen prefix over the training (× ``cache_views``) and validation images — marked shared when it is the pooled
        features other runs of its cache group read — then its epochs on the cached features. A trainability schedule
        (``strategy.freeze_epochs`` / ``unfreeze``) costs each epoch at the step of its phase (``cost.phase_steps``);
        ``lp_ft``'s probe epochs cost one backbone pass (they train the head on cached pooled features)."""
        if cost is None:
            return Estimate()
        if cost.step is None:
            n = n_train + n_val + n_test
            return Estimate((Part(f"inference over {n} images ({fmt_seconds(n * cost.forward)})", n * cost.forward),))
        steps = math.ceil(max(1, n_train) / cfg.train.batch_size)
        test = Part(f"test pass over {n_test} images ({fmt_seconds(n_test * cost.forward)})", n_test * cost.forward)
        if cost.cached is not None:
            return Estimate((*_cached_parts(cfg, cost.cached, steps, n_train, n_val, self.shares_backbone_pass(cfg)), test))
        return Estimate((*_epoch_parts(cfg, cost, steps, n_train, n_val), test))

    def shares_backbone_pass(self, cfg: ExperimentConfig) -> bool:
        return cfg.strategy.name == "linear_probe" and cfg.train.cache != "off" and not cfg.data.augment

    def run(self, cfg: ExperimentConfig, ctx: RunContext) -> RunMetrics:
        recorded = _recorded_lr(cfg, ctx)  # read before begin() rewrites config.yaml
        p = prepare(cfg, ctx, apply_strategy)  # fabric, config.yaml, seed, splits, model, normalisation, strategy
        criterion = make_loss(cfg, p.splits.class_names, p.splits.train_y)  # train.loss + class_weights: bad ones fail here
        check_sections(p.model, cfg)  # e.g. a wrong activations layer stops the run now, not after training
        kwargs = batch_kwargs(p.model, cfg, p.fabric.device)
        train, val, test = _batches(cfg, p.splits, kwargs, p.fabric)
        total_params, trainable_params = count_params(p.model)
        _announce(cfg, p, trainable_params, total_params, ctx)
        fp32_convs = _guard_bf16(p.model, train, cfg, p.fabric, ctx)
        cfg, lr_record = _resolve_lr(cfg, ctx, p.model, train, criterion, p.fabric, recorded)  # train.lr: find -> a number
        criterion = training_criterion(criterion, p, cfg, ctx)  # train.l2_sp, train.distill around the loss

        # a frozen prefix runs once: the loop then trains the rest on cached features (train.cache); lp_ft: probe, then all
        meta = {"config": cfg.to_dict(), "class_names": p.splits.class_names, "code_version": code_version()}
        result, cached, probe = fit_phases(p, cfg, ctx, train, val, kwargs, criterion, meta)  # history.csv written
        p.fabric.barrier()  # rank 0 has written the checkpoints every rank now reads
        swa = finish_swa(p, cfg, ctx, kwargs, val, len(result.history) - (len(probe.history) if probe else 0))  # -> best

        raw_test, temperature = _load_tested_weights(p, test, val, cfg, ctx)  # best (EMA) weights; raw test; T on val
        test_metrics, record = _test(p.model, test, val, cfg, p.splits, p.fabric, temperature)  # multi-label: thresholds from val first
        m = base_metrics(cfg, p.splits, p.weights, p.fabric.device, p.fabric.world_size).add(test_metrics, fit_part(result, cfg), {
            "strategy": cfg.strategy.name, "data_seconds": p.data_seconds, "total_params": total_params,
            "trainable_params": trainable_params, "feature_cache": cached.summary(result.train_seconds),
            "tested_weights": "ema" if cfg.train.ema is not None and cfg.train.ema.evaluate != "raw" else "raw",
            "extra": {**_extra_sections(cfg, lr_record, raw_test, fp32_convs, criterion), **finetuning_extra(cfg, probe, swa, _groups(p.model, cfg)),
                      "checkpoint_bytes": _checkpoint_bytes(ctx)},
            "wall_seconds": time.perf_counter() - p.wall0,
        })
        if p.writer and record is not None:
            save_test_predictions(ctx.rundir.path, record, p.splits, cfg.seed)  # predictions.json, test_samples.safetensors
        if p.writer:
            m.add({"extra": run_sections(_tested(p, cfg, ctx), ctx.console)})  # the predict: / activations: sections
        score = "mAP" if cfg.multilabel else "acc"
        ctx.console.print(f"  [green]{cfg.name}[/]: test {score} {getattr(m, m.headline):.4f}, trained {m.train_seconds:.1f}s, "
                          f"inference {m.inference_images_per_s:.0f} img/s -> {ctx.rundir.path}")
        return m


def _groups(model: TransferModel, cfg: ExperimentConfig) -> list[dict[str, Any]] | None:
    """``train.layer_decay``: name, lr and size of every parameter group (``history.csv``'s ``lr_group<i>`` in order)."""
    if cfg.train.layer_decay is None:
        return None
    return [{"group": i, "name": g["name"], "lr": g["lr"], "lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"],
             "params": sum(q.numel() for q in g["params"])} for i, g in enumerate(layer_decay_groups(model, cfg.train))]


def _announce(cfg: ExperimentConfig, p: Prepared, trainable: int, total: int, ctx: RunContext) -> None:
    """One line on what trains on what, and how the pretrained weights loaded when some were dropped."""
    s = p.splits
    ctx.console.print(
        f"[bold]{cfg.name}[/] seed {cfg.seed}: {cfg.model.backbone} ({cfg.model.weights}) + {cfg.head.type} head, "
        f"strategy {cfg.strategy.name}, {trainable:,}/{total:,} params trainable, "
        f"{len(s.train_y)}/{len(s.val_y)}/{len(s.test_y)} train/val/test images on {p.fabric.device}"
    )
    if p.weights is not None and p.weights.dropped:
        ctx.console.print(f"  weights: {p.weights.describe()}")


def _load_tested_weights(p: Prepared, test: Any, val: Any, cfg: ExperimentConfig, ctx: RunContext) -> tuple[dict[str, Any] | None, float | None]:
    """Load the run's chosen weights into the model (``best``, else ``last``; the EMA ones with ``train.ema`` unless
    ``evaluate: raw``); return the raw weights' test metrics (``ema: {evaluate: both}``) and the temperature fitted on
    the validation split (``train.calibrate: temperature``)."""
    best = ctx.rundir.checkpoints / "best.safetensors"
    chosen = best if best.exists() else ctx.rundir.checkpoints / "last.safetensors"
    raw_test = _test_raw(p.model, test, cfg, p.splits, p.fabric, chosen)
    load_model_weights(p.model, chosen)
    return raw_test, _temperature(p.model, val, cfg, p.fabric)


def _checkpoint_bytes(ctx: RunContext) -> int | None:
    """Size on disk of the run's tested checkpoint (``best``, else ``last``: weights, optimizer state, RNG)."""
    for name in ("best", "last"):
        path = ctx.rundir.checkpoints / f"{name}.safetensors"
        if path.is_file():
            return path.stat().st_size
    return None


def _extra_sections(cfg: ExperimentConfig, lr_record: dict[str, Any] | None, raw_test: dict[str, Any] | None,
                    fp32_convs: list[str], criterion: Any) -> dict[str, Any]:
    """The kind-specific sections of ``metrics.json``: ``lr_find``, ``ema``, ``bf16_fp32_convs``, ``class_weights``."""
    extra: dict[str, Any] = {}
    if lr_record is not None:
        extra["lr_find"] = lr_record
    if cfg.train.ema is not None:
        main = "ema" if cfg.train.ema.evaluate != "raw" else "raw"
        extra["ema"] = {"decay": cfg.train.ema.decay, "warmup": cfg.train.ema.warmup, "evaluate": cfg.train.ema.evaluate,
                        "main": main, **({"test_raw": raw_test} if raw_test else {})}
    if fp32_convs:
        extra["bf16_fp32_convs"] = fp32_convs
    if getattr(criterion, "weight", None) is not None:  # multi-label: the pos_weight of each class
        extra["pos_weight" if cfg.multilabel else "class_weights"] = [round(float(w), 6) for w in criterion.weight]
    return extra


def _tested(p: Prepared, cfg: ExperimentConfig, ctx: RunContext) -> Tested:
    """The tested model as the run sections get it: outside images take the training images' channels and size."""
    x = p.splits.train_x
    predictor = with_tta(p.model, cfg.train.tta, multilabel=cfg.multilabel)
    return Tested(cfg, p.model, predictor, p.splits.class_names, int(x.shape[1]), int(x.shape[-1]), p.fabric.device, p.fabric.autocast,
                  ctx.rundir.path)


def _batches(cfg: ExperimentConfig, splits: ImageSplits, kwargs: dict[str, Any], fabric: Fabric) -> tuple[Any, Any, Any]:
    """Train / val / test batches (in memory or the PIL loader); under DDP each rank's share of them."""
    train = make_batches(splits, "train", cfg.train.batch_size, shuffle=True, augment=cfg.data.augment, seed=cfg.seed,
                         sampler=cfg.data.sampler, **kwargs)
    val = make_batches(splits, "val", cfg.train.eval_batch_size, **kwargs)
    test = make_batches(splits, "test", cfg.train.eval_batch_size, **kwargs)
    if fabric.world_size > 1:  # each rank trains on its slice of every global batch, evaluates every N-th batch
        rank, size = fabric.global_rank, fabric.world_size
        return SliceOfGlobalBatch(train, rank, size), RoundRobin(val, rank, size), RoundRobin(test, rank, size)
    return train, val, test


def _test_raw(model: TransferModel, test: Any, cfg: ExperimentConfig, splits: ImageSplits, fabric: Fabric, checkpoint: Any) -> dict[str, Any] | None:
    """``train.ema: {evaluate: both}``: the test metrics of the chosen checkpoint's raw weights (else ``None``); multi-label:
    the threshold-free ones (mAP, loss), since the thresholds are chosen for the tested weights."""
    if cfg.train.ema is None or cfg.train.ema.evaluate != "both":
        return None
    model.load_state_dict(load_checkpoint_group(checkpoint, "raw"), strict=True)
    with fabric.autocast():
        if cfg.multilabel:
            ml = evaluate_multilabel(with_tta(model, cfg.train.tta, multilabel=True), test, splits.num_classes, fabric.device)
            return {"map": ml.map, "loss": ml.loss}
        r = evaluate(with_tta(model, cfg.train.tta), test, splits.num_classes, fabric.device)
    return {"acc": r.acc, "top5": r.top5, "loss": r.loss, "balanced_acc": r.balanced_acc, "macro_f1": r.macro_f1}


def _test(
    model: TransferModel, test: Any, val: Any, cfg: ExperimentConfig, splits: ImageSplits, fabric: Fabric, temperature: float | None = None
) -> tuple[dict[str, Any], PredictionRecorder | dict[str, Any] | None]:
    """The test metrics of the chosen checkpoint (with the run's TTA), as ``metrics.json`` fields, and — in one process —
    the per-image predictions (``save_test_predictions``' input).

    With ``temperature`` the calibration is measured before and after dividing the logits by it, in the same pass.
    Multi-label: the thresholds (``train.threshold``) are chosen on the validation split with these same weights, then
    fixed for the test split (``engine.multilabel.evaluate_at_val_thresholds``)."""
    tested = with_tta(model, cfg.train.tta, multilabel=cfg.multilabel)
    if cfg.multilabel:
        with fabric.autocast():
            ev, mode = evaluate_at_val_thresholds(tested, val, test, splits.num_classes, fabric.device, cfg.train.threshold)
        assert ev.thresholds is not None
        record = multilabel_predictions(ev.probs, ev.targets, ev.thresholds) if fabric.world_size == 1 else None
        return multilabel_test_part(ev, mode), record
    recorder = PredictionRecorder(tested) if fabric.world_size == 1 else None  # per-image test predictions (report)
    with fabric.autocast():
        if recorder is None:
            return test_part(evaluate(tested, test, splits.num_classes, fabric.device, temperature)), None
        return test_part(evaluate(recorder, recorder.batches(test), splits.num_classes, fabric.device, temperature)), recorder


def _temperature(model: TransferModel, val: Any, cfg: ExperimentConfig, fabric: Fabric) -> float | None:
    """``train.calibrate: temperature``: the T fitted on the validation logits of the tested weights (else ``None``)."""
    if cfg.train.calibrate != "temperature":
        return None
    if fabric.world_size > 1:
        raise cfg.error("train.calibrate: temperature runs in a single process (each rank holds only part of the validation split)")
    with fabric.autocast():
        logits, labels = collect_logits(with_tta(model, cfg.train.tta), val)
    return fit_temperature(logits, labels)


# --------------------------------------------------------------------------------------------
# train.lr: find


def _recorded_lr(cfg: ExperimentConfig, ctx: RunContext) -> float | None:
    """The lr a continued ``train.lr: find`` run found before it was interrupted (its ``config.yaml``), else ``None``."""
    path = ctx.rundir.path / "config.yaml"
    if cfg.train.lr != "find" or not ctx.opening.resuming or not path.is_file():
        return None
    old = from_dict(ExperimentConfig, load_yaml(path.read_text(encoding="utf-8"), str(path)) or {})
    return old.train.lr_find.found


def _resolve_lr(
    cfg: ExperimentConfig, ctx: RunContext, model: TransferModel, train: Any, criterion: Any, fabric: Fabric, recorded: float | None
) -> tuple[ExperimentConfig, dict[str, Any] | None]:
    """``train.lr: find``: the config with the lr the finder chose (or ``recorded``, when continuing), and its record.

    The sweep runs on a copy of the model before anything trains; ``config.yaml`` is rewritten with the
    resolved lr (and ``train.lr_find.found``), which ``--resume`` matches against a new ``lr: find``; the trackers
    log the lr the run trains with, not ``find``.
    """
    if cfg.train.lr != "find":
        return cfg, None
    record_path = ctx.rundir.path / LR_FIND_JSON
    if recorded is not None:  # a continued run keeps the lr it trained with so far
        record = read_json(record_path) if record_path.is_file() else {"suggestion": recorded}
        ctx.console.print(f"  lr: find -> {recorded:.3g} (found before the interruption)")
        cfg = resolved(cfg, recorded)
        ctx.tracking.resolved(cfg)
        return cfg, record
    if fabric.world_size > 1:
        raise cfg.error("train.lr: find runs in a single process; run `transferlab lr-find` and set train.lr to its suggestion")
    result = lr_find(model, train, cfg, criterion.to(fabric.device), fabric.device, fabric.autocast)
    save_lr_find(result, ctx.rundir.path, f"{cfg.name}: LR finder ({result.rule})")
    cfg = resolved(cfg, result.suggestion)
    ctx.snapshot = cfg.to_dict()
    ctx.rundir.begin(Opening(), ctx.snapshot)  # config.yaml again, now with the resolved lr
    ctx.console.print(f"  lr: find -> {result.suggestion:.3g} ({result.rule}, {len(result.lrs)} steps, {result.stopped}); "
                      f"curve in {ctx.rundir.path / LR_FIND_PNG}")
    ctx.tracking.resolved(cfg)
    return cfg, result.record()


def find_lr(cfg: ExperimentConfig, out: str | Path, console: Any = None) -> LrFindResult:
    """The LR finder of one ``kind: train`` experiment as its run would start it; writes ``lr_find.{csv,json,png}`` into ``out``.

    Builds the data, model, strategy, loss and training batches exactly as ``TrainKind.run`` does before
    training (same seeding, same order), so the suggestion is the one ``train.lr: find`` would use.
    """
    if cfg.kind != "train":
        raise cfg.error(f"the LR finder needs kind: train (this experiment is kind: {cfg.kind})")
    p = prepare(cfg, None, apply_strategy)  # the run's own start, without a run directory
    fabric, model = p.fabric, p.model
    criterion = make_loss(cfg, p.splits.class_names, p.splits.train_y)
    train, _, _ = _batches(cfg, p.splits, batch_kwargs(model, cfg, fabric.device), fabric)
    result = lr_find(model, train, cfg, criterion.to(fabric.device), fabric.device, fabric.autocast)
    save_lr_find(result, out, f"{cfg.name}: LR finder ({result.rule})")
    if console is not None:
        console.print(f"{cfg.name}: suggested lr {result.suggestion:.3g} ({result.rule}; {len(result.lrs)} steps, {result.stopped}) -> {out}")
    return result


# --------------------------------------------------------------------------------------------
# the estimate's parts (``TrainKind.explain``)


def _cached_parts(cfg: ExperimentConfig, c: CachedCost, steps: int, n_train: int, n_val: int, shares: bool) -> list[Part]:
    """The feature-cache path: the prefix pass over the training (× views) and validation images, then the epochs on the
    cached features. The pass is shared with the cache group (``count_shared_once``) when it is the feature store's
    pooled, single-view set that ``logistic`` / ``knn`` / other linear probes of the same backbone and data read."""
    views = cfg.train.cache_views if cfg.data.augment else 1
    shared = shares and c.cut == "pooled" and views == 1
    epoch = steps * c.suffix_step + n_val * c.suffix_forward
    label = f"prefix pass to {c.cut}" + (f" ({views} views)" if views > 1 else "")
    return [*feature_pass(c.prefix_forward, {"train": n_train * views, "val": n_val}, shared, label),
            Part(f"{_epochs(cfg.train.epochs)} on cached {c.cut} features at {fmt_seconds(epoch)}", cfg.train.epochs * epoch)]


def _epoch_parts(cfg: ExperimentConfig, cost: Cost, steps: int, n_train: int, n_val: int) -> list[Part]:
    """Epochs of full training steps (and a validation pass each), one part per phase of the strategy's trainability
    schedule: every epoch costs the step of the trainable set it has (``strategies.apply_strategy_at_epoch``: a phase
    per milestone passed). Without the schedule's measured steps (``cost.phase_steps``), every epoch costs ``cost.step``."""
    parts, first = [], 0
    if cfg.strategy.name == "lp_ft" and cfg.strategy.probe_epochs:
        first = cfg.strategy.probe_epochs
        n = n_train + n_val
        parts.append(Part(f"lp_ft: {_epochs(first)} of the head on one backbone pass over {n} images ({fmt_seconds(n * cost.forward)})",
                          n * cost.forward))
    milestones = unfreeze_milestones(cfg.strategy)[0] if cost.phase_steps else []
    step_of = (cost.step or 0.0, *cost.phase_steps)
    counts = [0] * (len(milestones) + 1)
    for e in range(first, cfg.train.epochs):
        counts[sum(e >= m for m in milestones)] += 1
    for phase, n in enumerate(counts):
        if n:
            epoch = steps * step_of[phase] + n_val * cost.forward
            parts.append(Part(f"{_epochs(n, _phase_name(cfg, phase, len(counts)))} at {fmt_seconds(epoch)}", n * epoch))
    return _resized(cfg, parts, steps * step_of[0], first)


def _resized(cfg: ExperimentConfig, parts: list[Part], full_steps: float, first: int) -> list[Part]:
    """``train.progressive_resize``: the smaller epochs' steps cost their area's share of a full-size step (the probe timed
    full-size images; a conv net's step scales with the pixels), taken off the epochs' parts as one negative part."""
    small = [s for s in resize_scales(cfg.train)[first:] if s < 1]
    if not small:
        return parts
    saved = full_steps * sum(1 - s * s for s in small)
    return [*parts, Part(f"progressive resize: {_epochs(len(small))} at {min(small):.2f}-{max(small):.2f} of the side, steps "
                         f"assumed to scale with the area (-{fmt_seconds(saved)})", -saved)]


def _phase_name(cfg: ExperimentConfig, phase: int, phases: int) -> str:
    """How the plan names a phase of the trainability schedule: ``frozen`` / ``full`` for ``freeze_epochs``."""
    if phases == 1:
        return ""
    if cfg.strategy.freeze_epochs is not None:
        return "frozen" if phase == 0 else "full"
    return "frozen" if phase == 0 else f"unfreeze-step-{phase}"


def _epochs(n: int, adjective: str = "") -> str:
    """``1 frozen epoch``, ``7 full epochs``."""
    return f"{n} {adjective + ' ' if adjective else ''}epoch{'' if n == 1 else 's'}"


KINDS.register("train", TrainKind())
