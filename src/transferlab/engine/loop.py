"""The training loop, on Lightning Fabric: a short ``fit`` over ``train_one_epoch`` and ``validate``, with hooks.

Per epoch: shuffle + augment (seeded by epoch, see ``transferlab.data.batches``), forward, loss,
backward, step, schedule; evaluate on val; save ``best`` (when the monitored metric improved) and
``last`` checkpoints; stop early when patience runs out. Loss sums and the non-finite check stay on
the device, so the hot loop never waits for the host (one sync per epoch, in ``reduced_sums``).

What varies between runs is not a branch in the step loop but a callback (Lightning's hooks):
progressive resizing of the training batches (``ProgressiveResize``, ``train.progressive_resize``), gradual
unfreezing (``UnfreezeSchedule``), the weight average (``EmaUpdate``, ``train.ema``),
mid-epoch checkpoints (``MidEpochCheckpoint``), stochastic weight averaging (``SwaUpdate``, ``train.swa``),
the per-group lrs of ``train.layer_decay`` (``GroupLrLog``), the progress bar and the epoch log. Each sees the
whole ``Loop``; a criterion that is also a ``Callback`` (distillation: it needs each batch) is one of
them. The step itself takes a batch transform (``Loop.mix``: mixup / CutMix, with its own
generator state) and a criterion (``Loop.criterion``: ``train.loss`` with ``train.class_weights``).

Multi-label (``data.task: multilabel``, N×K targets): the same loop; ``train_acc`` is the share of right image-label
decisions at probability 0.5 (``right_decisions``), validation reports ``val_loss`` (mean BCE) and ``val_map`` (macro
mAP, ``engine.multilabel``) instead of ``val_acc``, and ``val_map`` is maximised like ``val_acc``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from transferlab.config import ExperimentConfig, resize_scales
from transferlab.data.batches import TensorBatches
from transferlab.engine.checkpointing import LoopCheckpoints, LoopState
from transferlab.engine.distributed import all_reduce_sum
from transferlab.engine.ema import WeightEma, make_ema
from transferlab.engine.evaluation import evaluate, with_tta
from transferlab.engine.losses import make_loss
from transferlab.engine.mixup import Mixup, make_mixup
from transferlab.engine.multilabel import evaluate_multilabel
from transferlab.engine.optim import group_lrs, make_optimizer, make_scheduler, param_groups
from transferlab.engine.swa import make_swa
from transferlab.models.model import TransferModel
from transferlab.strategies import trainability_for_epoch

__all__ = ["Callback", "FitResult", "Loop", "TrainingDiverged", "fit", "right_decisions", "train_one_epoch", "validate", "validation_scores"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite. The message names the experiment, epoch and step."""


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_metric: float
    train_seconds: float
    stopped_early: bool
    resumed_from: str | None = None
    log: list[str] = field(default_factory=list)


class Callback:
    """Hooks the loop calls (all optional), in the order of Lightning's: fit start, epoch start, batch start (the
    batch, mixed, is ``loop.batch_x``; a hook may replace it, and the step trains on what it holds), batch end, the
    epoch's row (before its checkpoints: add columns, update state the checkpoints keep), epoch end, fit end."""

    def on_fit_start(self, loop: Loop) -> None: ...
    def on_train_epoch_start(self, loop: Loop) -> None: ...
    def on_train_batch_start(self, loop: Loop) -> None: ...
    def on_train_batch_end(self, loop: Loop) -> None: ...
    def on_epoch_row(self, loop: Loop, row: dict[str, float]) -> None: ...
    def on_train_epoch_end(self, loop: Loop, row: dict[str, float]) -> None: ...
    def on_fit_end(self, loop: Loop) -> None: ...


@dataclass
class Loop:
    """One run's moving parts, as the hooks see them."""

    cfg: ExperimentConfig
    fabric: Fabric
    model: TransferModel  # the bare module: checkpoints and evaluation
    fmodel: Any  # what trains: set up by Fabric (DDP, precision), optionally compiled
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train: Any
    val: Any
    checkpoints: LoopCheckpoints
    console: Console
    callbacks: Sequence[Callback] = ()
    state: LoopState = field(default_factory=LoopState)
    history: list[dict[str, float]] = field(default_factory=list)
    criterion: torch.nn.Module | None = None  # train.loss (class weights included), on the device
    mix: Mixup | None = None  # train.mixup: (x, y) -> (mixed x, soft targets, dominant labels)
    ema: WeightEma | None = None  # train.ema: the weight average the EmaUpdate hook moves
    extras: dict[str, Any] = field(default_factory=dict)  # further state the checkpoints keep, by name (train.swa: "swa")
    batch_x: torch.Tensor | None = None  # the training batch of the step in progress (after mixup), for hooks
    # the epoch in progress: running sums on the device, the lr of the last step, clocks
    loss_sum: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    first_bad: torch.Tensor | None = None
    step_lr: float = 0.0
    step_loss: torch.Tensor | None = None  # the last step's loss, on the device (hooks read it without a host sync)
    epoch_start: float = 0.0
    clock: float = 0.0  # start of the training time not yet added to state.seconds
    stop_epoch: bool = False  # set by a hook: leave the step loop now

    def call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def save(self, kind: str) -> None:
        self.checkpoints.save(kind, self.state, self.history, self.model, self.optimizer, self.scheduler, self.mix, self.ema, self.extras)

    def evaluated(self) -> torch.nn.Module:
        """The weights that are validated and kept as ``best``: the EMA (``train.ema``, unless ``evaluate: raw``) or the model."""
        return self.ema.module if self.ema is not None and self.ema.main else self.model

    def reduced_sums(self) -> tuple[float, int, int, bool]:
        """The epoch's running sums and the divergence flag summed over ranks (one host sync)."""
        dev = self.fabric.device
        seen = torch.tensor(float(self.state.seen), device=dev, dtype=torch.float64)
        t = all_reduce_sum(torch.stack([self.loss_sum, self.correct.double(), seen, (self.first_bad >= 0).double()])).tolist()
        return t[0], int(t[1]), int(t[2]), t[3] > 0


def fit(
    model: TransferModel,
    train: TensorBatches,
    val: TensorBatches,
    cfg: ExperimentConfig,
    fabric: Fabric,
    ckpt_dir: Path,
    meta: dict[str, Any],
    resume: bool = False,
    console: Console | None = None,
    callbacks: Sequence[Callback] | None = None,
    criterion: torch.nn.Module | None = None,
) -> FitResult:
    """Train ``model`` (already strategy-applied) and write best/last checkpoints into ``ckpt_dir``.

    ``criterion`` defaults to ``make_loss(cfg, ...)`` without training labels; pass
    ``make_loss(cfg, class_names, train_labels)`` for ``train.class_weights: balanced``.

    ``last`` is written at the end of every epoch and, within an epoch, every
    ``train.checkpoint_every_steps`` steps or ``train.checkpoint_every_minutes`` minutes; a resumed
    run replays the interrupted epoch's batch order, skips the steps already done and continues
    with the saved optimizer, scheduler, RNG and running sums — bit-identical on the CPU.
    """
    loop, resumed_from = setup(model, train, val, cfg, fabric, ckpt_dir, meta, resume, console or Console(), callbacks, criterion)
    st = loop.state
    loop.call("on_fit_start")
    try:
        while st.epoch < cfg.train.epochs and not st.stopped_early:
            loop.epoch_start = loop.clock = time.perf_counter()
            loop.call("on_train_epoch_start")
            train_loss, train_acc = train_one_epoch(loop)
            val_metrics = validate(loop)
            row = end_epoch(loop, train_loss, train_acc, val_metrics)
            loop.call("on_train_epoch_end", row)
    finally:
        loop.call("on_fit_end")
    best = st.best if st.best is not None else float("nan")
    return FitResult(loop.history, st.best_epoch + 1, best, st.seconds, st.stopped_early, resumed_from)


def setup(
    model: TransferModel, train: Any, val: Any, cfg: ExperimentConfig, fabric: Fabric, ckpt_dir: Path, meta: dict[str, Any],
    resume: bool, console: Console, callbacks: Sequence[Callback] | None, criterion: torch.nn.Module | None = None,
) -> tuple[Loop, str | None]:
    """Optimizer, scheduler, loss, mixup, EMA and Fabric setup; with ``resume``, the newest checkpoint restored."""
    tc = cfg.train
    optimizer = make_optimizer(param_groups(model, cfg), tc)  # per-stage groups (schedule / lr_ratio) or layer decay
    # A compiled module handed to Fabric is unwrapped, set up (DDP, precision) and compiled again on top.
    fmodel, optimizer = fabric.setup(torch.compile(model) if tc.compile else model, optimizer)
    scheduler = make_scheduler(optimizer, tc, len(train))
    checkpoints = LoopCheckpoints(ckpt_dir, meta, fabric)
    hooks = [*default_callbacks(cfg, fabric), *(callbacks or [])]  # yours run after the built-in ones
    if isinstance(criterion, Callback):  # a loss that needs the batch (distillation)
        hooks.append(criterion)
    loop = Loop(cfg, fabric, model, fmodel, optimizer, scheduler, train, val, checkpoints, console, hooks)
    classes = [str(c) for c in range(model.num_classes)]
    loop.criterion = (criterion if criterion is not None else make_loss(cfg, classes)).to(fabric.device)
    # after fabric.setup: the average copies the module where it now lives; one mixup stream for all ranks
    loop.mix, loop.ema = make_mixup(tc.mixup, model.num_classes, cfg.seed), make_ema(model, tc.ema)
    loop.extras = {name: obj for name, obj in (("swa", make_swa(model, cfg)),) if obj is not None}
    resumed_from = None
    if resume and (restored := checkpoints.restore(model, optimizer, scheduler, console, loop.mix, loop.ema, loop.extras)):
        loop.state, loop.history, resumed_from = restored.state, restored.history, str(restored.path)
        console.print(f"resumed from {restored.path} (epoch {loop.state.epoch + 1}, step {loop.state.step})")
    if fabric.world_size > 1 and not fabric.is_global_zero:  # rank 0 alone carries the restored partial sums
        loop.state.loss_sum, loop.state.correct, loop.state.seen = 0.0, 0, 0
    warm_up(loop)
    return loop, resumed_from


def warm_up(loop: Loop) -> None:
    """One untimed forward/backward step on the first training batch, leaving no trace.

    Why: the first model run in a process pays one-off costs — the intra-op thread pool starting, oneDNN
    creating its kernels (primitives) for each layer shape and precision, the caching allocator growing,
    DataLoader workers starting. Without this the first experiment of a study pays them inside its
    measured ``train_seconds`` and looks slower than the same experiment run second (benchmarks/RESULTS.md,
    section 3, "Warm-up, and why"). The step runs in the run's precision, never through ``torch.compile``
    (compile time stays part of a compiled run's cost), and undoes what it
    touched: the global RNG (dropout), BatchNorm running statistics and the gradients. Weights, optimizer,
    scheduler, mixup and EMA are not used, so the timed run is bit-identical to one without it.
    Skipped under DDP (a backward outside DDP's forward would confuse its gradient reducer).
    """
    if loop.fabric.world_size > 1 or loop.state.epoch >= loop.cfg.train.epochs:
        return
    model, dev = loop.model, loop.fabric.device
    loop.train.set_epoch(loop.state.epoch)  # batch order and augmentation are seeded by the epoch: reading one changes nothing
    batch = next(iter(loop.train), None)
    if batch is None:
        return
    x, y = batch
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        model.train()  # TransferModel keeps frozen BatchNorm in eval mode
        if loop.cfg.train.compile:  # the bare module: compiling is the compiled run's own (timed) cost
            with loop.fabric.autocast():
                logits = model(x.to(next(model.parameters()).dtype) if x.is_floating_point() else x)
        else:  # Fabric's module: the run's precision (autocast, input conversion), without DDP
            logits = loop.fmodel(x)
        loss = warm_up_loss(logits.float(), y)
        if loss.requires_grad:
            loop.fabric.backward(loss)
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    for p in model.parameters():
        p.grad = None
    model.train(was_training)


def train_one_epoch(loop: Loop) -> tuple[float, float]:
    """One pass over the training batches: forward, loss, backward, step, schedule. Returns (loss, accuracy) — multi-label:
    the accuracy of the image-label decisions at 0.5 (``right_decisions``)."""
    st, tc, dev = loop.state, loop.cfg.train, loop.fabric.device
    loop.fmodel.train()
    loop.train.set_epoch(st.epoch)
    # running sums stay on the device: no host sync per step
    loop.loss_sum = torch.tensor(st.loss_sum, device=dev, dtype=torch.float64)
    loop.correct = torch.tensor(st.correct, device=dev, dtype=torch.long)
    loop.first_bad = torch.full((), -1, device=dev, dtype=torch.long)
    loop.step_lr, loop.stop_epoch = loop.optimizer.param_groups[0]["lr"], False
    for step, (x, y) in enumerate(loop.train):
        if step < st.step:  # resumed mid-epoch: replay the order (and augmentation RNG), skip the work
            continue
        # mixup / CutMix: soft targets; accuracy counts the dominant label of each mixed image
        x, target, label = loop.mix(x, y) if loop.mix is not None else (x, y, y)
        loop.batch_x = x
        loop.call("on_train_batch_start")  # may replace loop.batch_x (train.progressive_resize)
        logits = loop.fmodel(loop.batch_x)
        loss = loop.criterion(logits, target)
        loop.optimizer.zero_grad(set_to_none=True)
        loop.fabric.backward(loss)
        if tc.max_grad_norm:
            loop.fabric.clip_gradients(loop.fmodel, loop.optimizer, max_norm=tc.max_grad_norm)
        loop.optimizer.step()
        loop.step_lr = loop.optimizer.param_groups[0]["lr"]  # the lr this step used (logged per epoch)
        loop.scheduler.step()
        d = loop.step_loss = loss.detach()
        loop.first_bad = torch.where((loop.first_bad < 0) & ~torch.isfinite(d), step, loop.first_bad)
        loop.loss_sum += d.double() * len(y)
        loop.correct += right_decisions(logits.detach(), label)
        st.seen += len(y)
        st.step = step + 1
        loop.call("on_train_batch_end")
        if loop.stop_epoch:
            break
    epoch_loss, epoch_correct, seen, diverged = loop.reduced_sums()  # the epoch's host sync
    if diverged:
        where = f"step {int(loop.first_bad) + 1}" if int(loop.first_bad) >= 0 else "a step on another rank"
        raise TrainingDiverged(
            f"experiment '{loop.cfg.name}': loss became non-finite at epoch {st.epoch + 1}, {where} "
            f"(lr {tc.lr:g}); the last good checkpoint is kept in {loop.checkpoints.directory}"
        )
    st.seconds += time.perf_counter() - loop.clock
    decisions = loop.model.num_classes if loop.cfg.multilabel else 1  # multi-label: every image-label decision counts
    return epoch_loss / seen, epoch_correct / (seen * decisions)


def right_decisions(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The training accuracy's count of a batch (on the device): multiclass, the images whose argmax is ``label``;
    multi-label (N×K ``label``), the image-label decisions right at probability 0.5 (logit >= 0 against label >= 0.5),
    so ``train_acc`` is the share of right label decisions (1 − the Hamming loss at 0.5)."""
    if label.dim() == 2:
        return ((logits >= 0) == (label >= 0.5)).sum()
    return (logits.argmax(1) == label).sum()


def warm_up_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A loss of the right kind for the untimed warm-up step (its value is thrown away): cross-entropy of class labels,
    BCE of N×K multi-label targets."""
    if y.dim() == 2:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    return torch.nn.functional.cross_entropy(logits, y)


def validate(loop: Loop) -> dict[str, Any]:
    """Loss and accuracy (multi-label: loss and macro mAP, ``map``) of the evaluated weights on the validation batches,
    with the run's test-time augmentation.

    With ``train.ema: {evaluate: both}`` the raw weights are validated too (``extra``: history columns).
    """
    with loop.fabric.autocast():  # the bare module: DDP's forward would sync buffers per call
        out: dict[str, Any] = validation_metrics(loop, loop.evaluated())
        if loop.ema is not None and loop.ema.cfg.evaluate == "both":
            out["extra"] = {f"val_{k}_raw": v for k, v in validation_metrics(loop, loop.model).items()}
    return out


def validation_metrics(loop: Loop, model: torch.nn.Module) -> dict[str, float]:
    """``validation_scores`` of ``model`` with the run's test-time augmentation on the validation batches."""
    multilabel = loop.cfg.multilabel
    tested = with_tta(model, loop.cfg.train.tta, multilabel=multilabel)
    return validation_scores(tested, loop.val, loop.model.num_classes, loop.fabric.device, multilabel)


def validation_scores(model: torch.nn.Module, batches: Any, num_classes: int, device: torch.device | str,
                      multilabel: bool = False) -> dict[str, float]:
    """``{"loss", "acc"}`` of ``model`` on ``batches``; multi-label ``{"loss", "map"}`` (mean BCE, macro mAP: threshold-free)."""
    if multilabel:
        ml = evaluate_multilabel(model, batches, num_classes, device)
        return {"loss": ml.loss, "map": ml.map}
    ev = evaluate(model, batches, num_classes, device)
    return {"loss": ev.loss, "acc": ev.acc}


def end_epoch(loop: Loop, train_loss: float, train_acc: float, val_metrics: dict[str, Any]) -> dict[str, float]:
    """Record the epoch, checkpoint ``best`` (if it improved) and ``last``, decide on early stopping."""
    st, es = loop.state, loop.cfg.train.early_stopping
    row = {
        "epoch": st.epoch + 1,
        "train_loss": train_loss,
        "train_acc": train_acc,
        **{f"val_{k}": v for k, v in val_metrics.items() if k != "extra"},  # val_loss, then val_acc (multi-label: val_map)
        **val_metrics.get("extra", {}),
        "lr": loop.step_lr,
        "seconds": time.perf_counter() - loop.epoch_start,
    }
    loop.call("on_epoch_row", row)
    loop.history.append(row)
    epoch = st.epoch
    st.epoch, st.step, st.loss_sum, st.correct, st.seen = epoch + 1, 0, 0.0, 0, 0
    last = es.keep == "last" and math.isfinite(row[es.monitor])  # keep: last -> every epoch's weights replace the previous
    if last or _improved(row[es.monitor], st.best, es.monitor in ("val_acc", "val_map"), es.min_delta):
        st.best, st.best_epoch, st.bad_epochs = row[es.monitor], epoch, 0
        loop.save("best")
    else:
        st.bad_epochs += 1
    st.stopped_early = es.patience is not None and st.bad_epochs >= es.patience
    loop.save("last")
    return row


def _improved(value: float, best: float | None, mode_max: bool, min_delta: float) -> bool:
    if not math.isfinite(value):
        return False  # NaN is never "best"
    if best is None:
        return True
    return value > best + min_delta if mode_max else value < best - min_delta


# --------------------------------------------------------------------------------------------
# the built-in hooks


def default_callbacks(cfg: ExperimentConfig, fabric: Fabric) -> list[Callback]:
    # EmaUpdate before MidEpochCheckpoint: a mid-epoch checkpoint holds the average of the step it follows
    # ProgressiveResize first: every later batch-start hook (distillation's teacher) sees the batch the step trains on
    return [ProgressiveResize(), UnfreezeSchedule(), EmaUpdate(), MidEpochCheckpoint(cfg, fabric), SwaUpdate(), GroupLrLog(),
            ProgressBar(), EpochLog()]


class ProgressiveResize(Callback):
    """``train.progressive_resize``: each training batch resized to its epoch's side (``config.resize_scales``), bilinear
    with antialiasing, the batch's memory layout kept; the epoch's scale is a ``train_scale`` column of its row."""

    def __init__(self) -> None:
        self.scale = 1.0

    def on_train_epoch_start(self, loop: Loop) -> None:
        tc = loop.cfg.train
        self.scale = resize_scales(tc)[loop.state.epoch] if tc.progressive_resize is not None else 1.0

    def on_train_batch_start(self, loop: Loop) -> None:
        x = loop.batch_x
        if self.scale >= 1 or x is None or x.dim() != 4:
            return
        h, w = x.shape[-2:]
        size = (max(1, round(h * self.scale)), max(1, round(w * self.scale)))
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        resized = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        loop.batch_x = resized.contiguous(memory_format=layout)

    def on_epoch_row(self, loop: Loop, row: dict[str, float]) -> None:
        if loop.cfg.train.progressive_resize is not None:
            row["train_scale"] = self.scale


class UnfreezeSchedule(Callback):
    """Gradual unfreezing (``strategy.unfreeze`` / ``freeze_epochs``): the trainable set of every epoch."""

    def on_train_epoch_start(self, loop: Loop) -> None:
        note = trainability_for_epoch(loop.model, loop.cfg, loop.state.epoch, loop.fabric.world_size)
        if note and loop.fabric.is_global_zero:
            loop.console.print(note)


class EmaUpdate(Callback):
    """``train.ema``: move the weight average after every optimizer step (``transferlab.engine.ema``)."""

    def on_train_batch_end(self, loop: Loop) -> None:
        if loop.ema is not None:
            loop.ema.update(loop.model)


class SwaUpdate(Callback):
    """``train.swa``: the epoch's weights join the average (from its first averaged epoch), before the checkpoints."""

    def on_epoch_row(self, loop: Loop, row: dict[str, float]) -> None:
        swa = loop.extras.get("swa")
        if swa is not None:
            swa.update(loop.model, loop.state.epoch)
            row["swa_models"] = swa.count


class GroupLrLog(Callback):
    """``train.layer_decay``: the lr of every parameter group in the epoch's row (``lr_group<i>``, group 0 = ``lr``)."""

    def on_epoch_row(self, loop: Loop, row: dict[str, float]) -> None:
        if loop.cfg.train.layer_decay is not None:
            row.update(group_lrs(loop.optimizer, loop.step_lr))


class MidEpochCheckpoint(Callback):
    """``last`` inside an epoch: every ``train.checkpoint_every_steps`` steps or ``checkpoint_every_minutes``."""

    def __init__(self, cfg: ExperimentConfig, fabric: Fabric) -> None:
        tc = cfg.train
        self.every_steps = tc.checkpoint_every_steps or 0
        # time-based saves only in a single process: under DDP every rank must take the same decision
        minutes = tc.checkpoint_every_minutes if fabric.world_size == 1 else None
        self.every_s = 60 * minutes if minutes else float("inf")
        self.last_save = 0.0

    def on_train_epoch_start(self, loop: Loop) -> None:
        self.last_save = loop.epoch_start

    def on_train_batch_end(self, loop: Loop) -> None:
        st, now = loop.state, time.perf_counter()
        due = (self.every_steps and st.step % self.every_steps == 0) or now - self.last_save > self.every_s
        if st.step >= len(loop.train) or not due:
            return
        loss_sum, correct, seen, diverged = loop.reduced_sums()
        if diverged:
            loop.stop_epoch = True  # never checkpoint a diverged state; the epoch end raises
            return
        seen_local = st.seen
        st.loss_sum, st.correct, st.seen = loss_sum, correct, seen
        st.seconds += now - loop.clock
        loop.clock = self.last_save = now
        loop.save("last")
        st.seen = seen_local


class ProgressBar(Callback):
    """A transient rich progress bar per epoch (``train.progress``, rank 0 only)."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def on_fit_start(self, loop: Loop) -> None:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        show = loop.cfg.train.progress and loop.fabric.is_global_zero
        self.progress = Progress(*columns, console=loop.console, disable=not show, transient=True)
        self.progress.start()

    def on_train_epoch_start(self, loop: Loop) -> None:
        assert self.progress is not None
        desc = f"{loop.cfg.name} epoch {loop.state.epoch + 1}/{loop.cfg.train.epochs}"
        self.task = self.progress.add_task(desc, total=len(loop.train), info="", completed=loop.state.step)

    def on_train_batch_end(self, loop: Loop) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=1)

    def on_train_epoch_end(self, loop: Loop, row: dict[str, float]) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def on_fit_end(self, loop: Loop) -> None:
        if self.progress is not None:
            self.progress.stop()


class EpochLog(Callback):
    """One line per epoch (``train.progress``, rank 0), and the early-stopping notice."""

    def on_train_epoch_end(self, loop: Loop, row: dict[str, float]) -> None:
        st, tc = loop.state, loop.cfg.train
        if tc.progress and loop.fabric.is_global_zero:
            score = "map" if loop.cfg.multilabel else "acc"
            loop.console.print(
                f"  {loop.cfg.name} epoch {row['epoch']:>3}/{tc.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                f"val loss {row['val_loss']:.4f} {score} {row[f'val_{score}']:.4f}  {row['seconds']:.1f}s"
                + ("  *" if st.best_epoch == row["epoch"] - 1 else "")
            )
        if st.stopped_early:
            loop.console.print(f"  early stop: no {tc.early_stopping.monitor} improvement for {st.bad_epochs} epochs")
