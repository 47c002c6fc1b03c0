"""Test-set evaluation with torchmetrics: accuracy, top-5, per-class accuracy, confusion matrix, calibration, speed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from transferlab.config import TrainConfig, register_choices
from transferlab.engine.calibration import CalibrationSums
from transferlab.engine.distributed import all_reduce_sum
from transferlab.registry import Registry, UnknownNameError
from transferlab.rundir.metrics import balanced_scores

__all__ = ["TTA", "Calibration", "Evaluation", "TestTimeAugmentation", "evaluate", "with_tta"]

TTA: Registry[Callable[..., torch.nn.Module]] = Registry(
    "test-time augmentation", "train.tta: the views averaged at evaluation"
)


class TestTimeAugmentation(torch.nn.Module):
    """A classifier whose prediction is the mean probability over views of each image: ``flip``, the image and its
    horizontal mirror; ``flip_translate``, airbench's six views (Jordan 2024) — the mirror pair weighted 1/2 and the
    mirror pairs of the image shifted one pixel up-left and down-right (reflect padding) 1/4 each.

    Multiclass: the mean softmax, returned as its *log*, so everything downstream — cross-entropy (the NLL of the
    averaged prediction), argmax, top-k, softmax — sees the averaged prediction. Multi-label (``multilabel``): the
    mean *sigmoid* of each class, returned as its logit, log(p / (1 − p)), so that a sigmoid downstream gives the
    averaged probability back and BCE with logits is the BCE of it (p clamped to [1e-7, 1 − 1e-7]).
    """

    VIEWS = ("flip", "flip_translate")

    def __init__(self, model: torch.nn.Module, views: str = "flip", multilabel: bool = False) -> None:
        super().__init__()
        if views not in self.VIEWS:
            raise ValueError(f"unknown test-time augmentation {views!r}; use one of {', '.join(TTA.names())}")
        self.model, self.views, self.multilabel = model, views, multilabel

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        """The mean probability of ``x`` and its mirror."""
        act = torch.sigmoid if self.multilabel else (lambda t: t.softmax(-1))
        return (act(self.model(x).float()) + act(self.model(x.flip(-1)).float())) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self._probs(x)
        if self.views == "flip_translate":
            h, w = x.shape[-2:]
            padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
            shifted = (padded[..., :h, :w], padded[..., 2:, 2:])  # the content moves one pixel down-right, then up-left
            probs = probs / 2 + sum(self._probs(v.contiguous(memory_format=_layout(x))) for v in shifted) / 4
        if self.multilabel:
            return torch.logit(probs, eps=1e-7)
        return probs.clamp_min(1e-12).log()


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


@TTA.register("none")
def no_tta(model: torch.nn.Module, multilabel: bool = False) -> torch.nn.Module:
    """The model itself: one view per image."""
    return model


@TTA.register("flip")
def flip_tta(model: torch.nn.Module, multilabel: bool = False) -> torch.nn.Module:
    """Mean probability (softmax; per class sigmoid for multi-label) of each image and its horizontal mirror (2x inference)."""
    return TestTimeAugmentation(model, "flip", multilabel)


@TTA.register("flip_translate")
def flip_translate_tta(model: torch.nn.Module, multilabel: bool = False) -> torch.nn.Module:
    """airbench's six views: the mirror pair (weight 1/2) and the mirror pairs of the image shifted one pixel up-left and
    down-right (1/4 each), probabilities averaged (6x inference)."""
    return TestTimeAugmentation(model, "flip_translate", multilabel)


def with_tta(model: torch.nn.Module, tta: str, multilabel: bool = False) -> torch.nn.Module:
    """``model`` wrapped by the registered test-time augmentation ``tta`` (``none``: itself); ``multilabel``: the views'
    sigmoid probabilities are averaged (an entry is called ``entry(model)``, or ``entry(model, multilabel=True)``)."""
    try:
        entry = TTA.get(tta)
    except UnknownNameError as e:
        raise ValueError(str(e)) from None
    return entry(model, multilabel=True) if multilabel else entry(model)


register_choices(TrainConfig, "tta", TTA.names)


@dataclass(frozen=True)
class Calibration:
    """How well the predicted probabilities match the accuracy (``transferlab.engine.calibration``)."""

    ece: float
    """L1 expected calibration error over ``ECE_BINS`` confidence bins."""
    nll: float
    brier: float
    reliability: dict[str, list[float]]
    """Per bin: ``count``, summed ``confidence``, summed ``correct`` (the reliability diagram)."""

    @classmethod
    def from_sums(cls, d: dict[str, Any], suffix: str = "") -> Calibration:
        """From ``CalibrationSums.compute``'s mapping (``suffix``: ``_calibrated`` for the temperature-scaled one)."""
        return cls(d[f"ece{suffix}"], d[f"nll{suffix}"], d[f"brier{suffix}"], d[f"reliability{suffix}"])


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate`` measured on one split: the engine's typed answer to the kinds."""

    loss: float
    acc: float
    """Top-1 accuracy."""
    top5: float | None
    """Top-5 accuracy (``None`` with 5 classes or fewer)."""
    per_class_acc: list[float]
    confusion_matrix: list[list[int]]
    """Rows = true class, columns = predicted class."""
    n: int
    seconds: float
    images_per_s: float
    """Forward passes only, including the preprocessing of each batch."""
    calibration: Calibration
    temperature: float | None = None
    """The temperature the logits were also measured at (``train.calibrate: temperature``) ..."""
    calibrated: Calibration | None = None
    """... and the calibration after dividing them by it."""

    @property
    def balanced_acc(self) -> float:
        """Mean per-class recall, from the confusion matrix."""
        return balanced_scores(self.confusion_matrix)[0]

    @property
    def macro_f1(self) -> float:
        return balanced_scores(self.confusion_matrix)[1]


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    device: torch.device | str = "cpu",
    temperature: float | None = None,
) -> Evaluation:
    """Evaluate ``model`` on ``batches``; metrics accumulate on the device, logits are never all kept.

    With ``temperature`` the calibration is also measured on ``logits / temperature``, in the same pass.
    """
    was_training = model.training
    model.eval()
    top1 = MulticlassAccuracy(num_classes, average="micro").to(device)
    per_class = MulticlassAccuracy(num_classes, average="none").to(device)
    confusion = MulticlassConfusionMatrix(num_classes).to(device)
    top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro").to(device) if num_classes > 5 else None
    calibration = CalibrationSums(num_classes, device, temperature)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    n = 0
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for x, y in batches:
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        n += len(y)
        calibration.update(logits, y)
        for metric in (top1, per_class, confusion, top5):
            if metric is not None:
                metric.update(logits, y)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.train(was_training)
    # under DDP every rank saw part of the data: sum loss and count over ranks (torchmetrics syncs itself)
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(n), device=device, dtype=torch.float64)]))
    loss_sum, n = totals[0], int(totals[1])
    calibration_sums = all_reduce_sum(calibration.sums)
    cal = calibration.compute(calibration_sums, n)
    return Evaluation(
        loss=float(loss_sum) / max(n, 1),
        acc=float(top1.compute()),
        top5=float(top5.compute()) if top5 is not None else None,
        per_class_acc=[float(v) for v in per_class.compute()],
        confusion_matrix=confusion.compute().tolist(),
        n=n,
        seconds=seconds,
        images_per_s=n / seconds if seconds > 0 else float("nan"),
        calibration=Calibration.from_sums(cal),
        temperature=cal.get("temperature"),
        calibrated=Calibration.from_sums(cal, "_calibrated") if "ece_calibrated" in cal else None,
    )
