"""The numbers the report derives from the runs, shared by the HTML page, the Markdown summary and the plots.

The best value of each table column, the Pareto front of accuracy against training time, the confusion
matrix summed over seeds and its most-confused pairs, per-class accuracy as mean ± std over seeds, and
one row per sweep point. Kept in one place so the two pages and the figures cannot disagree.
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
from transferlab.rundir import Run

__all__ = [
    "BEST_KEYS",
    "CONFUSED_PAIRS",
    "SweepRow",
    "best_flags",
    "confused_pairs",
    "epoch_stats",
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

BEST_KEYS = ("test_acc", "test_balanced_acc", "test_macro_f1", "test_ece", "train_seconds", "inference_images_per_s", "trainable_params")
"""The comparison table's columns whose best value is marked (the direction: ``HIGHER_IS_BETTER``; ECE lower)."""


def best_flags(exps: list[ExperimentRecord]) -> dict[str, set[str]]:
    """For each marked column, the experiments holding its best value (ties all marked).

    Only experiments with a test accuracy compete, and a column needs two values to have a best one.
    """
    out: dict[str, set[str]] = {}
    ok = [e for e in exps if e.row.get("test_acc") is not None]
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


def study_front(ok: list[ExperimentRecord]) -> list[int]:
    """The Pareto front of finished experiments (indices into ``ok``), by mean time and mean accuracy."""
    return pareto_front([(e.row["train_seconds"], e.row["test_acc"]) for e in ok])


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
    """One sweep point: its swept values and its accuracies, mean over the finished seeds."""

    experiment: ExperimentRecord
    values: dict[str, Any]
    test_acc: float
    test_acc_std: float
    train_acc: float | None
    """The last epoch's train accuracy (``None`` without a history)."""
    best_val_acc: float | None
    """The best validation accuracy, when the run monitored ``val_acc``."""
    n: int


def _final(run: Run, key: str) -> float | None:
    vals = [row[key] for row in run.history if not math.isnan(row.get(key, math.nan))]
    return vals[-1] if vals else None


def _sweep_row(e: ExperimentRecord, sweep: SweepPoint) -> SweepRow:
    ok = e.ok_runs
    accs = [r.record.test_acc for r in ok]
    trains = [v for v in (_final(r, "train_acc") for r in ok) if v is not None]
    vals = [r.record.best_val for r in ok if r.record.monitor == "val_acc" and r.record.best_val is not None]
    return SweepRow(
        experiment=e,
        values=sweep.values,
        test_acc=statistics.fmean(accs),
        test_acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
        train_acc=statistics.fmean(trains) if trains else None,
        best_val_acc=statistics.fmean(vals) if vals else None,
        n=len(accs),
    )


def sweep_groups(exps: list[ExperimentRecord]) -> dict[str, list[SweepRow]]:
    """The finished sweep points, grouped by sweep (in study order)."""
    groups: dict[str, list[SweepRow]] = {}
    for e in exps:
        sweep = e.sweep
        if sweep is not None and e.ok_runs:
            groups.setdefault(sweep.group, []).append(_sweep_row(e, sweep))
    return groups
