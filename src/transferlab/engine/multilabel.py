"""Multi-label evaluation (``data.task: multilabel``): scores, thresholds chosen on validation, the metrics part.

An image has any number of the K classes; its targets are a float 0/1 vector of length K and the model's K
logits are read as independent probabilities ``sigmoid(logit)``. A label is *predicted* when its probability is
at least its class's threshold (``p >= t``, everywhere: test metrics, ``predictions.json``, ``predict``).

* ``multilabel_scores`` — the test metrics, from torchmetrics' multilabel functions: mAP (macro over the classes
  with a positive, and micro), per-class AP (``None`` for a class with no positive), then at the thresholds:
  macro and micro F1, macro precision and recall, the exact-match ratio (subset accuracy) and the Hamming loss.
  Precision / recall / F1 of a class with nothing predicted or nothing to find count as 0 (scikit-learn's
  ``zero_division=0``), and every class counts in the macro means, as in scikit-learn.
* ``choose_thresholds`` — ``train.threshold``: ``global`` picks the one threshold with the best micro F1, ``per_class``
  each class's best F1 (a class without validation positives gets the global one), a number is used as it is.
  Candidates are the sorted unique validation probabilities (scikit-learn's ``precision_recall_curve``); every
  threshold between the best candidate and the next lower probability gives the same validation F1, so the
  midpoint of that interval is taken (a threshold right at a validation probability would drop test images
  scored a hair lower). Call it with the *validation* probabilities only: the thresholds are then fixed for test.
* ``evaluate_multilabel`` — one pass over a split: mean BCE, the probabilities and targets (on the CPU: the
  thresholds are chosen from them, ``predictions.json`` is written from them) and, given thresholds, the scores.
* ``multilabel_part`` — the ``RunMetrics`` fields of a multi-label test (``RunMetrics.add``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_curve
from torchmetrics.functional.classification import (
    multilabel_average_precision,
    multilabel_exact_match,
    multilabel_f1_score,
    multilabel_hamming_distance,
    multilabel_precision,
    multilabel_recall,
)

__all__ = [
    "SCORE_KEYS",
    "MultilabelEvaluation",
    "choose_thresholds",
    "evaluate_at_val_thresholds",
    "evaluate_multilabel",
    "multilabel_part",
    "multilabel_predictions",
    "multilabel_scores",
    "predicted",
]

SCORE_KEYS = ("map", "map_micro", "per_class_ap", "f1", "f1_micro", "precision", "recall", "exact_match", "hamming")
"""The keys of ``multilabel_scores``' mapping."""

FALLBACK_THRESHOLD = 0.5
"""``global`` when the validation split has no positive label at all (nothing to choose from)."""


def _as_targets(targets: torch.Tensor) -> torch.Tensor:
    """0/1 int targets (torchmetrics wants integers; mixup never reaches an evaluation)."""
    return (targets >= 0.5).long()


def predicted(probs: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """N×K 0/1 (int64) decisions: ``probs >= thresholds`` per class."""
    t = torch.as_tensor(list(thresholds), dtype=probs.dtype, device=probs.device)
    if t.numel() != probs.shape[1]:
        raise ValueError(f"{t.numel()} thresholds for {probs.shape[1]} classes")
    return (probs >= t).long()


def average_precisions(probs: torch.Tensor, targets: torch.Tensor) -> tuple[float | None, list[float | None]]:
    """(macro mAP over the classes with a positive, per-class AP with ``None`` where a class has none)."""
    y = _as_targets(targets)
    has = (y.sum(0) > 0).nonzero().flatten()
    per_class: list[float | None] = [None] * y.shape[1]
    if len(has) == 0:
        return None, per_class
    # only classes with a positive: torchmetrics would score the others 0 (with a warning), not leave them out
    ap = multilabel_average_precision(probs[:, has].double(), y[:, has], num_labels=len(has), average="none")  # float64: AP 1 is 1
    for c, v in zip(has.tolist(), ap.tolist(), strict=True):
        per_class[c] = float(v)
    return float(ap.mean()), per_class


def multilabel_scores(probs: torch.Tensor, targets: torch.Tensor, thresholds: Sequence[float]) -> dict[str, Any]:
    """The multi-label metrics of N×K ``probs`` (sigmoid probabilities) against N×K 0/1 ``targets``, predicting a
    label when its probability is >= its class's threshold; keys ``SCORE_KEYS`` (``None`` for mAP without positives)."""
    probs, y = probs.detach().float().cpu(), _as_targets(targets.detach().cpu())
    k = probs.shape[1]
    mean_ap, per_class = average_precisions(probs, y)
    micro = float(multilabel_average_precision(probs.double(), y, num_labels=k, average="micro")) if y.sum() > 0 else None
    pred = predicted(probs, thresholds)  # integer decisions: torchmetrics applies no threshold of its own to them
    return {
        "map": mean_ap,
        "map_micro": micro,
        "per_class_ap": per_class,
        "f1": float(multilabel_f1_score(pred, y, num_labels=k, average="macro")),
        "f1_micro": float(multilabel_f1_score(pred, y, num_labels=k, average="micro")),
        "precision": float(multilabel_precision(pred, y, num_labels=k, average="macro")),
        "recall": float(multilabel_recall(pred, y, num_labels=k, average="macro")),
        "exact_match": float(multilabel_exact_match(pred, y, num_labels=k)),
        "hamming": float(multilabel_hamming_distance(pred, y, num_labels=k, average="micro")),
    }


# --------------------------------------------------------------------------------------------
# thresholds, chosen on validation


def best_f1_threshold(probs: np.ndarray, targets: np.ndarray) -> float | None:
    """The threshold of best F1 for binary ``targets`` scored ``probs`` (predict ``p >= t``): among the sorted unique
    probabilities, the best one, moved down to the midpoint toward the next lower probability (same F1 on these
    data). ``None`` when there is no positive."""
    if not targets.any():
        return None
    precision, recall, cands = precision_recall_curve(targets, probs)  # cands ascending; the last P/R pair has no threshold
    p, r = precision[:-1], recall[:-1]
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    best = float(cands[int(np.argmax(f1))])  # ties: the lowest such threshold (the most recall for the same F1)
    below = float(np.max(probs[probs < best], initial=0.0))  # the next lower probability (0 when none)
    mid = (best + below) / 2
    return mid if np.float32(mid) > np.float32(below) else best  # adjacent float32 values: no midpoint between them


def choose_thresholds(probs: torch.Tensor, targets: torch.Tensor, mode: str | float) -> tuple[list[float], str]:
    """(K thresholds, ``global`` / ``per_class`` / ``fixed``) for ``train.threshold`` = ``mode``, from the N×K
    *validation* probabilities and targets. ``global``: the best micro F1 of one threshold over all classes;
    ``per_class``: each class its best F1, the global one for a class without validation positives; a number: fixed."""
    k = probs.shape[1]
    if not isinstance(mode, str):
        return [float(mode)] * k, "fixed"
    if mode not in ("global", "per_class"):
        raise ValueError(f"train.threshold must be global, per_class or a number in (0, 1), not {mode!r}")
    p, y = probs.detach().float().cpu().numpy(), _as_targets(targets.detach().cpu()).numpy()
    pooled = best_f1_threshold(p.ravel(), y.ravel())  # micro F1: every image-label pair pooled
    pooled = FALLBACK_THRESHOLD if pooled is None else pooled
    if mode == "global":
        return [pooled] * k, "global"
    chosen = [best_f1_threshold(p[:, c], y[:, c]) for c in range(k)]
    return [pooled if t is None else t for t in chosen], "per_class"


# --------------------------------------------------------------------------------------------
# one pass over a split


@dataclass(frozen=True)
class MultilabelEvaluation:
    """What ``evaluate_multilabel`` measured on one split."""

    loss: float
    """Mean binary cross-entropy over images and classes (the ``bce`` training loss without ``pos_weight``)."""
    probs: torch.Tensor
    """N×K sigmoid probabilities, float32 on the CPU, in the order of the batches."""
    targets: torch.Tensor
    """N×K 0/1 targets, float32 on the CPU."""
    n: int
    seconds: float
    images_per_s: float
    """Forward passes only, including the preprocessing of each batch."""
    scores: dict[str, Any] | None = None
    """``multilabel_scores`` at ``thresholds`` (``None`` when evaluated without thresholds)."""
    thresholds: list[float] | None = None

    @property
    def map(self) -> float:
        """Macro mAP over the classes with a positive (threshold-free; NaN when the split has no positive)."""
        mean_ap, _ = average_precisions(self.probs, self.targets)
        return float("nan") if mean_ap is None else mean_ap


def _gathered(t: torch.Tensor) -> torch.Tensor:
    """``t`` of every rank, concatenated (DDP: each rank evaluated every N-th batch); itself in one process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t)
    return torch.cat(parts)


@torch.inference_mode()
def evaluate_multilabel(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    device: torch.device | str = "cpu",
    thresholds: Sequence[float] | None = None,
) -> MultilabelEvaluation:
    """Evaluate ``model`` (K logits per image) on ``batches`` of (images, N×K targets): mean BCE, the probabilities and
    targets on the CPU, and with ``thresholds`` the ``multilabel_scores``. Under DDP the ranks' parts are gathered."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    probs, targets = [], []
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for x, y in batches:
        logits = model(x).float()
        if logits.shape[-1] != num_classes or y.shape != logits.shape:
            raise ValueError(f"multi-label evaluation: logits {tuple(logits.shape)} for targets {tuple(y.shape)} ({num_classes} classes)")
        loss_sum += F.binary_cross_entropy_with_logits(logits, y.float(), reduction="sum").double()
        probs.append(logits.sigmoid())
        targets.append(y.float())
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.train(was_training)
    p = _gathered(torch.cat(probs).cpu() if probs else torch.zeros(0, num_classes))
    y = _gathered(torch.cat(targets).cpu() if targets else torch.zeros(0, num_classes))
    n = len(y)
    scores = multilabel_scores(p, y, thresholds) if thresholds is not None else None
    return MultilabelEvaluation(
        loss=float(_gathered(loss_sum.cpu().view(1)).sum()) / max(n * num_classes, 1),
        probs=p, targets=y, n=n, seconds=seconds, images_per_s=n / seconds if seconds > 0 else float("nan"),
        scores=scores, thresholds=list(thresholds) if thresholds is not None else None,
    )


def evaluate_at_val_thresholds(
    model: torch.nn.Module,
    val: Iterable[tuple[torch.Tensor, torch.Tensor]],
    test: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    device: torch.device | str,
    mode: str | float,
) -> tuple[MultilabelEvaluation, str]:
    """A multi-label model's test evaluation at thresholds chosen on its validation pass (``train.threshold`` = ``mode``):
    (the test ``MultilabelEvaluation`` with its scores and thresholds, ``global`` / ``per_class`` / ``fixed``). The
    test probabilities are never looked at before the thresholds are fixed."""
    on_val = evaluate_multilabel(model, val, num_classes, device)
    thresholds, chosen = choose_thresholds(on_val.probs, on_val.targets, mode)
    return evaluate_multilabel(model, test, num_classes, device, thresholds), chosen


# --------------------------------------------------------------------------------------------
# what metrics.json and predictions.json get


def multilabel_part(scores: dict[str, Any], thresholds: list[float], mode: str, loss: float | None,
                    images_per_s: float | None) -> dict[str, Any]:
    """The multi-label test fields of ``metrics.json`` (``RunMetrics.add``) from ``multilabel_scores``."""
    return {
        "task": "multilabel",
        "test_map": scores["map"], "test_map_micro": scores["map_micro"], "per_class_ap": scores["per_class_ap"],
        "test_f1": scores["f1"], "test_f1_micro": scores["f1_micro"],
        "test_precision": scores["precision"], "test_recall": scores["recall"],
        "test_exact_match": scores["exact_match"], "test_hamming": scores["hamming"],
        "thresholds": [float(t) for t in thresholds], "threshold_mode": mode,
        "test_loss": loss, "inference_images_per_s": images_per_s,
    }


def multilabel_predictions(probs: torch.Tensor, targets: torch.Tensor, thresholds: Sequence[float]) -> dict[str, Any]:
    """The per-image part of a multi-label ``predictions.json``: ``task``, ``thresholds``, N×K 0/1 ``true`` and
    ``pred``, N×K ``prob`` (rounded to 5 decimals), an empty ``true_prob``. ``save_test_predictions`` takes it."""
    probs = probs.detach().float().cpu()
    return {
        "task": "multilabel",
        "thresholds": [float(t) for t in thresholds],
        "true": _as_targets(targets.detach().cpu()).tolist(),
        "pred": predicted(probs, thresholds).tolist(),
        "prob": [[round(float(v), 5) for v in row] for row in probs],
        "true_prob": [],
    }
