"""The numbers the report derives from the runs, shared by the HTML page, the Markdown summary and the plots.

The best value of each table column, the Pareto front of accuracy against training time, the confusion
matrix summed over seeds and its most-confused pairs, per-class accuracy as mean ± std over seeds, and
one row per sweep point. Multi-label experiments get, from their ``metrics.json`` and ``predictions.json``:
per-class average precision (mean ± std over seeds), one row per label (threshold, test positives, recall,
precision, F1 at the thresholds, summed over seeds), the most-missed labels and the label co-occurrence of the test
set. Kept in one place so the two pages and the figures cannot disagree.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.config import SweepPoint
from transferlab.results.compare import HIGHER_IS_BETTER
from transferlab.results.report.records import ExperimentRecord
from transferlab.rundir import Run, RunError, TestPredictions, load_test_predictions

__all__ = [
    "BEST_KEYS",
    "CONFUSED_PAIRS",
    "MISSED_LABELS",
    "LabelRow",
    "SweepRow",
    "best_flags",
    "confused_pairs",
    "cooccurrence",
    "epoch_stats",
    "label_rows",
    "missed_labels",
    "per_class_ap",
    "lr_find_curves",
    "pareto_front",
    "per_class_accuracy",
    "study_front",
    "summed_confusion",
    "summed_reliability",
    "sweep_groups",
]

CONFUSED_PAIRS = 5
"""Most-confused (true, predicted) pairs listed per experiment."""

BEST_KEYS = ("test_acc", "test_balanced_acc", "test_macro_f1", "test_ece", "test_map", "test_map_micro", "test_f1", "test_exact_match",
             "test_hamming", "train_seconds", "inference_images_per_s", "trainable_params")
"""The comparison table's columns whose best value is marked (the direction: ``HIGHER_IS_BETTER``; ECE, Hamming lower)."""
MISSED_LABELS = 5
"""Labels listed as the most missed per multi-label experiment (lowest recall at the thresholds)."""


def best_flags(exps: list[ExperimentRecord]) -> dict[str, set[str]]:
    """For each marked column, the experiments holding its best value (ties all marked).

    Only experiments with a test score (accuracy, or mAP for multi-label) compete, and a column needs two values to
    have a best one.
    """
    out: dict[str, set[str]] = {}
    ok = [e for e in exps if e.row.get(e.headline) is not None]
    for key in BEST_KEYS:
        pick = max if HIGHER_IS_BETTER[key] else min
        vals = [e.row[key] for e in ok if e.row.get(key) is not None]
        if len(vals) < 2:
            out[key] = set()
            continue
        best = pick(vals)
        out[key] = {e.name for e in ok if e.row.get(key) == best}
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower or equal time and higher or equal accuracy
    (one of them strictly). ``points`` are (time, accuracy). Returned sorted by time."""
    front = []
    for i, (t, a) in enumerate(points):
        dominated = any(t2 <= t and a2 >= a and (t2 < t or a2 > a) for j, (t2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def study_front(ok: list[ExperimentRecord], key: str = "test_acc") -> list[int]:
    """The Pareto front of finished experiments (indices into ``ok``), by mean time and mean ``key`` (accuracy, or mAP
    for multi-label experiments: the experiments of one task)."""
    return pareto_front([(e.row["train_seconds"], e.row[key]) for e in ok])


def summed_confusion(e: ExperimentRecord) -> np.ndarray | None:
    """The confusion matrix summed over the finished seeds; ``None`` when none recorded one or shapes differ."""
    mats = [np.asarray(r.record.confusion_matrix, dtype=np.int64) for r in e.ok_runs if r.record.confusion_matrix]
    if not mats or len({m.shape for m in mats}) != 1:
        return None
    return np.sum(mats, axis=0)


def summed_reliability(e: ExperimentRecord, calibrated: bool = False) -> dict[str, list[float]] | None:
    """Reliability bins (count, confidence sum, correct sum per bin) summed over the finished seeds; ``None`` when
    no run recorded them (runs written before calibration was measured). ``calibrated``: after temperature scaling."""
    bins = []
    for r in e.ok_runs:
        cal = r.record.extra.get("calibration") or {}
        rel = (cal.get("calibrated") or {}).get("reliability") if calibrated else cal.get("reliability")
        if rel:
            bins.append(rel)
    if not bins or len({len(b["count"]) for b in bins}) != 1:
        return None
    return {k: [float(sum(v)) for v in zip(*(b[k] for b in bins), strict=True)] for k in ("count", "confidence", "correct")}


def lr_find_curves(e: ExperimentRecord) -> list[tuple[str, Path]]:
    """(run name, ``lr_find.png``) of every run of ``e`` that has an LR-finder curve: its own (``train.lr: find``),
    else the one ``transferlab lr-find`` wrote under ``<study>/lr_find/<run>/``."""
    out = []
    for r in e.runs:
        for png in (r.path / "lr_find.png", r.path.parent / "lr_find" / r.path.name / "lr_find.png"):
            if png.is_file():
                out.append((r.path.name, png))
                break
    return out


def confused_pairs(cm: np.ndarray, k: int = CONFUSED_PAIRS) -> list[tuple[int, int, int, float]]:
    """The ``k`` largest off-diagonal cells: (true, predicted, count, share of the true class)."""
    rows = cm.sum(1)
    cells = [(int(cm[i, j]), i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))  # ties: by class index, so the list is stable
    return [(i, j, c, c / rows[i] if rows[i] else 0.0) for c, i, j in cells[:k]]


def per_class_accuracy(e: ExperimentRecord) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-class test accuracy, mean and std over the finished seeds; ``None`` when missing or lengths differ."""
    vals = [r.record.per_class_acc for r in e.ok_runs if r.record.per_class_acc]
    if not vals or len({len(v) for v in vals}) != 1:
        return None
    arr = np.asarray(vals, dtype=float)
    return arr.mean(0), (arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(arr.shape[1]))


def epoch_stats(runs: list[Run], key: str) -> tuple[list[float], list[float], list[float]]:
    """Per epoch: epochs, mean and std of ``key`` over the runs that have that epoch."""
    by_epoch: dict[float, list[float]] = {}
    for r in runs:
        for row in r.history:
            v = row.get(key, math.nan)
            if not math.isnan(v):  # an empty history cell (a metric not logged that epoch) is NaN
                by_epoch.setdefault(row.get("epoch", math.nan), []).append(v)
    epochs = sorted(k for k in by_epoch if not math.isnan(k))
    means = [statistics.fmean(by_epoch[e]) for e in epochs]
    stds = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
    return epochs, means, stds


@dataclass
class SweepRow:
    """One sweep point: its swept values and its scores (accuracy, or mAP for multi-label), mean over the finished seeds."""

    experiment: ExperimentRecord
    values: dict[str, Any]
    score: float
    """The mean test score: ``metric`` (``test_acc``, or ``test_map`` for multi-label)."""
    score_std: float
    train_score: float | None
    """The last epoch's train accuracy / mAP (``None`` without a history that has it)."""
    best_val: float | None
    """The best validation accuracy / mAP, when the run monitored it."""
    n: int
    metric: str = "test_acc"


def _final(run: Run, key: str) -> float | None:
    vals = [row[key] for row in run.history if not math.isnan(row.get(key, math.nan))]
    return vals[-1] if vals else None


def _sweep_row(e: ExperimentRecord, sweep: SweepPoint) -> SweepRow:
    ok, metric = e.ok_runs, e.headline
    name = metric.removeprefix("test_")  # acc / map: the history's train_<name>, val_<name>
    scores = [v for v in (getattr(r.record, metric) for r in ok) if v is not None]
    trains = [v for v in (_final(r, f"train_{name}") for r in ok) if v is not None]
    vals = [r.record.best_val for r in ok if r.record.monitor == f"val_{name}" and r.record.best_val is not None]
    return SweepRow(
        experiment=e,
        values=sweep.values,
        score=statistics.fmean(scores) if scores else math.nan,
        score_std=statistics.stdev(scores) if len(scores) > 1 else 0.0,
        train_score=statistics.fmean(trains) if trains else None,
        best_val=statistics.fmean(vals) if vals else None,
        n=len(scores),
        metric=metric,
    )


def sweep_groups(exps: list[ExperimentRecord]) -> dict[str, list[SweepRow]]:
    """The finished sweep points, grouped by sweep (in study order)."""
    groups: dict[str, list[SweepRow]] = {}
    for e in exps:
        sweep = e.sweep
        if sweep is not None and e.ok_runs:
            groups.setdefault(sweep.group, []).append(_sweep_row(e, sweep))
    return groups


# --------------------------------------------------------------------------------------------
# multi-label experiments: per-class AP, one row per label, the most missed, co-occurrence


def per_class_ap(e: ExperimentRecord) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-class test average precision, mean and std over the finished seeds (NaN for a class that had no test
    positive in any seed); ``None`` when no run recorded it or the lengths differ."""
    vals = [r.record.per_class_ap for r in e.ok_runs if r.record.per_class_ap]
    if not vals or len({len(v) for v in vals}) != 1:
        return None
    arr = np.asarray([[math.nan if v is None else v for v in run] for run in vals], dtype=float)
    known = ~np.isnan(arr)
    counts = known.sum(0)
    mean = np.divide(np.nansum(arr, 0), counts, out=np.full(arr.shape[1], math.nan), where=counts > 0)
    dev = np.where(known, arr - mean, 0.0)
    std = np.sqrt(np.divide((dev**2).sum(0), counts - 1, out=np.zeros(arr.shape[1]), where=counts > 1))
    return mean, std


def _seed_predictions(e: ExperimentRecord) -> list[tuple[Run, TestPredictions]]:
    """The multi-label test predictions (N×K) of every finished seed that recorded them."""
    out = []
    for r in e.ok_runs:
        try:
            preds = load_test_predictions(r.path)
        except RunError:
            continue
        if preds is not None and preds.true.ndim == 2:
            out.append((r, preds))
    return out


@dataclass
class LabelRow:
    """One label of a multi-label experiment: its thresholds, its test AP and its decisions summed over the seeds."""

    index: int
    name: str
    thresholds: list[float]
    """The threshold each seed chose on validation (``metrics.json``)."""
    ap: float | None
    ap_std: float | None
    positives: int
    """Test images with the label (summed over seeds)."""
    predicted: int
    """Test images it was predicted for."""
    hits: int
    """Test images with the label that it was predicted for."""

    @property
    def recall(self) -> float | None:
        return self.hits / self.positives if self.positives else None

    @property
    def precision(self) -> float | None:
        return self.hits / self.predicted if self.predicted else None

    @property
    def f1(self) -> float | None:
        total = self.positives + self.predicted
        return 2 * self.hits / total if total else None

    @property
    def missed(self) -> int:
        """Test images with the label that it was not predicted for."""
        return self.positives - self.hits


def label_rows(e: ExperimentRecord) -> list[LabelRow]:
    """One row per label of a multi-label experiment (``[]`` when no seed recorded its test predictions): thresholds
    from ``metrics.json``, AP mean ± std over seeds, the decisions at the thresholds summed over the seeds."""
    found = _seed_predictions(e)
    if not found or len({p.true.shape for _, p in found}) != 1:
        return []
    true = np.concatenate([p.true for _, p in found]).astype(bool)
    pred = np.concatenate([p.pred for _, p in found]).astype(bool)
    aps = per_class_ap(e)
    names = e.class_names or found[0][1].class_names
    rows = []
    for k in range(true.shape[1]):
        ths = [float(r.record.thresholds[k]) for r, _ in found if r.record.thresholds and len(r.record.thresholds) > k]
        ap, ap_std = (float(aps[0][k]), float(aps[1][k])) if aps is not None and not math.isnan(aps[0][k]) else (None, None)
        rows.append(LabelRow(k, names[k] if k < len(names) else str(k), ths, ap, ap_std, int(true[:, k].sum()), int(pred[:, k].sum()),
                             int((true[:, k] & pred[:, k]).sum())))
    return rows


def missed_labels(rows: list[LabelRow], k: int = MISSED_LABELS) -> list[LabelRow]:
    """The ``k`` labels with test positives that were missed most: lowest recall first, then lowest AP, then most misses."""
    found = [r for r in rows if r.positives and r.missed]
    found.sort(key=lambda r: (r.recall, math.inf if r.ap is None else r.ap, -r.missed, r.index))
    return found[:k]


def cooccurrence(e: ExperimentRecord) -> np.ndarray | None:
    """K×K counts of test images having both labels (diagonal: having the label), from the true label sets of the
    first finished seed that recorded its predictions (every seed tests the same images); ``None`` without any."""
    found = _seed_predictions(e)
    if not found:
        return None
    true = found[0][1].true.astype(np.int64)
    return true.T @ true
