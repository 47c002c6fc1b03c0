"""``tracking: [tensorboard]`` — one TensorBoard log dir per run, ``runs/<study>/tb/<run>``, via ``torch.utils.tensorboard``.

``tensorboard --logdir runs/<study>/tb`` then shows the whole study, live while it runs. All scalars
share one x axis, the global optimizer step: ``train/loss_step`` and ``train/lr`` every step
(``log_every_steps``), the epoch's ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` and ``epoch``
at its last step, then ``test/acc``, ``test/loss`` (``test/top5``) and the confusion matrix image
``test/confusion_matrix`` — a multi-label run (``data.task: multilabel``) logs ``val/map`` per epoch and
``test/map``, ``test/map_micro``, ``test/f1``, ``test/f1_micro``, ``test/precision``, ``test/recall``,
``test/exact_match``, ``test/hamming`` instead of the accuracies. The few settings that tell runs apart (``HPARAMS``: backbone, weights,
strategy, lr, epochs, batch size, image size, seed, precision) go to the hparams plugin, so the HPARAMS
table shows them side by side; the whole flattened config is the text ``config`` (TEXT tab). A resumed
run opens its log dir with ``purge_step`` at the step it continues from: what the interrupted run logged
past its checkpoint is hidden, so no step appears twice.

``torch.utils.tensorboard.SummaryWriter`` rather than Lightning Fabric's ``TensorBoardLogger``: the
latter adds ``version_N`` folders and has no ``purge_step``, and our loop is not Lightning's.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferlab.engine.tracking import TRACKERS, RunInfo, Tracker, confusion_image, flat_config, strategy_label
from transferlab.results.trackers.fields import MULTILABEL_TEST_METRICS

__all__ = ["HPARAMS", "TensorBoardOptions", "TensorBoardTracker"]

HPARAMS = ("model.backbone", "model.weights", "strategy.name", "train.lr", "train.epochs", "train.batch_size", "data.image_size",
           "seed", "train.precision")
"""The flattened config keys logged as hparams, in this order (the HPARAMS table's columns); the rest is text."""

HPARAM_METRICS = ("test/acc", "test/loss", "val/acc", "val/loss")
"""The scalars the HPARAMS table shows beside each run's hyperparameters (their last value) ..."""
MULTILABEL_HPARAM_METRICS = ("test/map", "test/loss", "val/map", "val/loss")
"""... and beside a multi-label run's."""

EPOCH_SCALARS = {"train_loss": "train/loss", "train_acc": "train/acc", "val_loss": "val/loss", "val_acc": "val/acc", "val_map": "val/map",
                 "epoch": "epoch"}
TEST_SCALARS = {"test_acc": "test/acc", "test_loss": "test/loss", "test_top5": "test/top5",
                **{k: k.replace("test_", "test/", 1) for k in MULTILABEL_TEST_METRICS}}


@dataclass
class TensorBoardOptions:
    """``tracking: {tensorboard: {...}}``."""

    log_dir: str | None = None
    """Folder of the study's TensorBoard runs; this run logs to ``<log_dir>/<run>``. Default ``runs/<study>/tb``."""
    log_every_steps: int = 1
    """Write the per-step train loss and lr every N optimizer steps."""


@TRACKERS.register("tensorboard")
class TensorBoardTracker(Tracker):
    """TensorBoard (torch.utils.tensorboard): per-step loss and lr, per-epoch metrics, hparams, test metrics, confusion matrix."""

    name = "tensorboard"
    extra = "tensorboard"
    Options = TensorBoardOptions
    wants_steps = True

    def __init__(self, run: RunInfo, options: TensorBoardOptions) -> None:
        super().__init__(run, options)
        root = Path(options.log_dir).expanduser() if options.log_dir else run.study_dir / "tb"
        self.log_dir = root / run.name
        self.writer: Any = None
        self.last_step = 0

    @classmethod
    def modules(cls, options: TensorBoardOptions) -> tuple[str, ...]:
        return ("tensorboard",)

    @classmethod
    def check(cls, options: TensorBoardOptions) -> str | None:
        return None if options.log_every_steps >= 1 else f"log_every_steps={options.log_every_steps!r} must be >= 1"

    def _open(self, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: the optional extra

        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step, flush_secs=10)

    def _write_hparams(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        flat = flat_config(self.run.cfg)
        flat["strategy.name"] = strategy_label(self.run.cfg)  # a kind that does not train has no strategy: the kind says what ran
        chosen = {k: ("none" if flat[k] is None else flat[k]) for k in HPARAMS if k in flat}
        # the metric values here only declare the HPARAMS table's columns; the scalars of the same tags fill them
        declared = MULTILABEL_HPARAM_METRICS if self.run.cfg.multilabel else HPARAM_METRICS
        for summary in hparams(chosen, dict.fromkeys(declared, 0.0)):
            self.writer.file_writer.add_summary(summary)
        rows = "\n".join(f"| `{k}` | `{str(v).replace('|', '/')}` |" for k, v in flat.items())
        self.writer.add_text("config", f"| key | value |\n|---|---|\n{rows}", 0)

    def start(self, resuming: bool, previous: dict[str, Any] | None) -> None:
        if resuming:  # opened at fit start, which knows the step the run continues from
            return
        if self.log_dir.exists():  # a new (or replaced) run: the old run's events go with it
            shutil.rmtree(self.log_dir)
        self._open()
        if self.run.cfg.train.lr != "find":  # else once the LR finder has chosen it (resolved)
            self._write_hparams()

    def resolved(self) -> None:
        if self.writer is not None:
            self._write_hparams()

    def record(self) -> dict[str, Any]:
        return {"log_dir": str(self.log_dir)}

    def fit_start(self, first_step: int, steps_per_epoch: int, history: list[dict[str, float]]) -> None:
        self.last_step = first_step - 1
        if self.writer is not None:  # a new run: opened at start
            return
        fresh = not self.log_dir.exists()  # resumed, but never logged here (tracking added on --resume)
        self._open(purge_step=first_step)  # hides what the interrupted run logged from this step on
        if fresh:
            self._write_hparams()
            for row in history:
                self.log_epoch(row, int(row["epoch"]) * steps_per_epoch)

    def log_steps(self, steps: list[tuple[int, float, float]]) -> None:
        every = self.options.log_every_steps
        for step, loss, lr in steps:
            if step % every == 0:
                self.writer.add_scalar("train/loss_step", loss, step)
                self.writer.add_scalar("train/lr", lr, step)
            self.last_step = max(self.last_step, step)

    def log_epoch(self, row: dict[str, float], step: int) -> None:
        for key, tag in EPOCH_SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], step)
        self.last_step = max(self.last_step, step)
        self.writer.flush()  # live: the epoch shows up in TensorBoard now

    def finish(self, metrics: dict[str, Any] | None, error: BaseException | None) -> None:
        if self.writer is None:
            self._open()
        if metrics is None or metrics.get("status") != "ok":
            return
        for key, tag in TEST_SCALARS.items():
            if isinstance(metrics.get(key), (int, float)):
                self.writer.add_scalar(tag, metrics[key], self.last_step)
        if metrics.get("confusion_matrix"):
            image = confusion_image(metrics["confusion_matrix"], metrics.get("class_names") or [])
            self.writer.add_image("test/confusion_matrix", image, self.last_step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
