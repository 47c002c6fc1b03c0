"""The comparison table of a study: one row per experiment, mean ± std and a 95 % interval over seeds,
and every experiment tested against a reference (the best row, or ``against``).

Which test a pair of experiments gets (``docs/comparisons.md`` says what each assumes):

* both have runs with the same seed / fold, at least two such pairs: the paired t-test over them;
* both have several runs, but none pair up: Welch's t-test;
* otherwise (a single run on a side): the two runs' recorded test predictions, when they are of the same
  test images — McNemar's test (mid-p) for accuracy, a paired bootstrap for the other metrics;
* else no test ("no test": nothing to pair).

The p-values of one table are one family: Holm's correction, then each row is ``better`` / ``worse``
than the reference or ``not distinguishable`` from it, with a "seeds needed" hint for the latter. The
numbers come from ``transferlab.results.stats``.

Multi-label experiments (``data.task: multilabel``) are ranked by their headline, the test mAP
(``rundir.metrics.HEADLINE``), and shown with their own columns (mAP, micro mAP, F1, exact match, Hamming
loss). A study that mixes the tasks gets one table per task, each its own family of tests with its own
reference: an mAP is never compared with an accuracy. For single multi-label runs, exact match (a per-image
right / wrong) gets McNemar's test and the other metrics the paired bootstrap over the test images.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from transferlab.files import write_text
from transferlab.results import stats
from transferlab.results.search import read_searches, search_lines
from transferlab.rundir import ExperimentRuns, Run, RunError, RunMetrics, load_test_predictions, read_study
from transferlab.rundir.metrics import HEADLINE

__all__ = [
    "COLUMNS",
    "CONSOLE_WIDTH",
    "HIGHER_IS_BETTER",
    "MULTILABEL_COLUMNS",
    "TASK_COLUMNS",
    "TASK_METRICS",
    "TASK_TITLES",
    "TESTED_METRICS",
    "CompareError",
    "cell_text",
    "ci_text",
    "collect",
    "compare",
    "compare_rows",
    "console_table",
    "experiment_row",
    "headline",
    "markdown_table",
    "pair_test",
    "run_precision",
    "seeds_hint",
    "study_rows",
    "task_groups",
    "training_cost_seconds",
    "versus_text",
]

COLUMNS = [
    ("experiment", "experiment"),
    ("strategy", "strategy"),
    ("backbone", "backbone"),
    ("weights", "weights"),
    ("precision", "precision"),
    ("image_size", "image size"),
    ("test_acc", "test acc"),
    ("test_acc_ci", "95 % CI"),
    ("versus", "vs reference"),
    ("test_balanced_acc", "balanced acc"),
    ("test_macro_f1", "macro F1"),
    ("test_ece", "ECE"),
    ("n_seeds", "seeds"),
    ("train_seconds", "train time (s)"),
    ("inference_images_per_s", "inference img/s"),
    ("trainable_params", "trainable params"),
    ("checkpoint_mb", "checkpoint (MB)"),
    ("data", "data"),
    ("status", "status"),
]
"""Every column of the Markdown table and of ``compare --wide``, in order (key, title): multiclass experiments."""

MULTILABEL_COLUMNS = [
    *COLUMNS[:6],
    ("test_map", "test mAP"),
    ("test_map_ci", "95 % CI"),
    ("versus", "vs reference"),
    ("test_map_micro", "micro mAP"),
    ("test_f1", "F1"),
    ("test_exact_match", "exact match"),
    ("test_hamming", "Hamming loss"),
    ("threshold_mode", "thresholds"),
    *COLUMNS[12:],
]
"""The columns of a table of multi-label experiments: the scores of ``data.task: multilabel`` instead of accuracies
(F1, exact match and Hamming loss at the thresholds chosen on validation; ``thresholds`` says how they were chosen)."""
TASK_COLUMNS = {"multiclass": COLUMNS, "multilabel": MULTILABEL_COLUMNS}
TASK_TITLES = {"multiclass": "multiclass (one label per image)", "multilabel": "multi-label (any labels per image)"}

NARROW = ["experiment", "backbone", "strategy", "test_acc", "test_acc_ci", "versus", "n_seeds", "train_seconds"]
"""The console table's columns without ``--wide``: it fits ``CONSOLE_WIDTH`` (the rest is in compare.md / .csv;
experiments with runs that did not finish are listed below it). Multi-label tables show mAP in place of accuracy."""
TASK_NARROW = {"multiclass": NARROW, "multilabel": [k.replace("test_acc", "test_map") for k in NARROW]}
NARROW_TITLES = {"test_acc": "test acc %", "test_map": "test mAP %", "n_seeds": "n", "train_seconds": "train (s)"}
NARROW_MAX = {"experiment": 26, "backbone": 16, "strategy": 12}
"""Longest text of a narrow console column (longer values end in …; compare.md has them whole)."""
CONSOLE_WIDTH = 120

HIGHER_IS_BETTER = {
    "test_acc": True,
    "test_balanced_acc": True,
    "test_macro_f1": True,
    "test_ece": False,
    "test_map": True,
    "test_map_micro": True,
    "test_f1": True,
    "test_f1_micro": True,
    "test_precision": True,
    "test_recall": True,
    "test_exact_match": True,
    "test_hamming": False,
    "test_nll": False,
    "test_brier": False,
    "test_loss": False,
    "train_seconds": False,
    "inference_images_per_s": True,
    "trainable_params": False,
}
"""Which direction is better, per metric (the ★ of the report and the marks of the tests)."""
TASK_METRICS = {
    "multiclass": ("test_acc", "test_balanced_acc", "test_macro_f1", "test_ece"),
    "multilabel": ("test_map", "test_map_micro", "test_f1", "test_exact_match", "test_hamming"),
}
"""Per task, the metrics its experiments can be compared on, the headline (``HEADLINE``) first."""
TESTED_METRICS = tuple(m for metrics in TASK_METRICS.values() for m in metrics)
"""The metrics a comparison can be made on (``compare --metric``); each also gets a 95 % interval (those of its task)."""
MULTILABEL_SCORES = ("test_map", "test_map_micro", "test_f1", "test_f1_micro", "test_precision", "test_recall", "test_exact_match",
                     "test_hamming")
"""The test scores of a multi-label run (``metrics.json``) that its row averages over seeds."""
PER_IMAGE_METRICS = ("test_acc", "test_exact_match")
"""Means of a per-image right / wrong: two single runs are compared on them with McNemar's test."""


class CompareError(ValueError):
    """The comparison cannot be made as asked (an unknown reference experiment or metric)."""


def training_cost_seconds(metrics: dict[str, Any]) -> float:
    """What training cost: the loop's time plus, when features were cached, the one backbone pass."""
    return RunMetrics.from_dict(metrics).training_cost_seconds()


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and standard deviation of the values a run recorded (a kind may leave a figure unset: ``None``, skipped;
    none at all gives NaN)."""
    known = [v for v in values if v is not None]
    if not known:
        return math.nan, math.nan
    return statistics.fmean(known), (statistics.stdev(known) if len(known) > 1 else 0.0)


def headline(row: dict[str, Any]) -> str:
    """The metric that ranks a row's experiment: ``test_map`` for a multi-label one, else ``test_acc``."""
    return HEADLINE.get(row.get("task") or "multiclass", "test_acc")


def task_groups(rows: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """The indices of the rows of each task, tasks in order of first appearance (one table, one family of tests each)."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.get("task") or "multiclass", []).append(i)
    return groups


def collect(study_dir: str | Path, metric: str | None = None, against: str | None = None) -> list[dict[str, Any]]:
    """Read every run of ``study_dir``: one row per experiment (``experiment_row``) with its comparison against
    the reference (``compare_rows``)."""
    return study_rows(read_study(study_dir).experiments, metric, against)


def study_rows(experiments: Sequence[ExperimentRuns], metric: str | None = None, against: str | None = None) -> list[dict[str, Any]]:
    """The rows of ``experiments`` (in order), each compared against the reference of its task.

    The experiments of each task (``task_groups``) are compared among themselves: on ``metric`` where it is a metric of
    that task (``TASK_METRICS``), else on the task's headline; against ``against`` where it is of that task, else
    against the task's best experiment.
    """
    experiments = list(experiments)
    rows = [experiment_row(e) for e in experiments]
    names = [e.name for e in experiments]
    if metric is not None and metric not in TESTED_METRICS:
        raise CompareError(f"compare --metric {metric!r}: one of {', '.join(TESTED_METRICS)}")
    if against is not None and against not in names:
        raise CompareError(f"compare --against {against!r}: no such experiment in the study (experiments: {', '.join(names)})")
    groups = task_groups(rows)
    if metric is not None and not any(metric in TASK_METRICS[t] for t in groups):
        owner = next(t for t, ms in TASK_METRICS.items() if metric in ms)
        raise CompareError(f"compare --metric {metric!r} is a {owner} metric; this study's experiments are {', '.join(groups)} "
                           f"(metrics: {', '.join(m for t in groups for m in TASK_METRICS[t])})")
    for task, idx in groups.items():
        task_metric = metric if metric in TASK_METRICS[task] else HEADLINE[task]
        task_against = against if against in [names[i] for i in idx] else None
        compare_rows([experiments[i] for i in idx], [rows[i] for i in idx], task_metric, task_against)
    return rows


def run_precision(exp: ExperimentRuns) -> str | None:
    """The precision the experiment's runs recorded (``train.precision`` in ``config.yaml``, resolved from ``auto``);
    several values (seeds run on different machines) are listed; ``None`` for an ensemble (its members' own)."""
    values = sorted({r.config.train.precision for r in (exp.ok_runs or exp.runs) if r.config is not None and r.config.uses.model})
    return ", ".join(values) if values else None


def _values(exp: ExperimentRuns, key: str) -> list[float]:
    """``key`` of every finished run of ``exp`` (the training cost for ``train_seconds``)."""
    if key == "train_seconds":
        return [r.record.training_cost_seconds() for r in exp.ok_runs]
    return [v for v in (getattr(r.record, key) for r in exp.ok_runs) if v is not None]


def _task(exp: ExperimentRuns) -> str:
    """The experiment's task: what its finished runs recorded, else what its config asked for (a run that failed
    early recorded the default)."""
    if exp.ok_runs:
        return exp.ok_runs[0].record.task
    return next((r.config.data.task for r in exp.runs if r.config is not None), "multiclass")


def experiment_row(exp: ExperimentRuns) -> dict[str, Any]:
    """One experiment's row: what ran, mean ± std and the 95 % interval over its finished seeds, and its status.

    A multiclass row has the accuracy scores (``test_acc`` …), a multi-label one the mAP scores (``test_map`` …,
    ``MULTILABEL_SCORES``) and how its thresholds were chosen; ``task`` says which.
    """
    ok = [r.record for r in exp.ok_runs]
    first = ok[0] if ok else exp.runs[0].record
    failed = [r.record for r in exp.failed_runs]
    task = _task(exp)
    row: dict[str, Any] = {
        "experiment": exp.name,
        "task": task,
        "kind": first.kind,
        "strategy": first.strategy,
        "backbone": first.backbone,
        "weights": first.weights,
        "precision": run_precision(exp),
        "image_size": first.image_size,
        "n_seeds": len(ok),
        "status": _status(failed),
    }
    if ok and task == "multilabel":
        _multilabel_scores(row, ok)
    elif ok:
        row["test_acc"], row["test_acc_std"] = _mean_std([r.test_acc for r in ok])
        for key in ("test_balanced_acc", "test_macro_f1"):  # from the confusion matrix: none for few-shot episodes
            values = [getattr(r, key) for r in ok if getattr(r, key) is not None]
            if len(values) == len(ok):
                row[key], row[f"{key}_std"] = _mean_std(values)
        for key in ("test_ece", "test_nll", "test_brier", "test_ece_calibrated"):  # calibration: absent in older runs
            values = [getattr(r, key) for r in ok if getattr(r, key) is not None]
            if values and len(values) == len(ok):
                row[key], row[f"{key}_std"] = _mean_std(values)
    if ok:
        row["inference_images_per_s"], row["inference_images_per_s_std"] = _mean_std([r.inference_images_per_s for r in ok])
        row["train_seconds"], row["train_seconds_std"] = _mean_std([r.training_cost_seconds() for r in ok])
        row["trainable_params"] = first.trainable_params
        row["total_params"] = first.total_params
        size = first.extra.get("checkpoint_bytes")  # the tested checkpoint on disk (train runs, soups)
        row["checkpoint_mb"] = size / 1e6 if isinstance(size, (int, float)) else None
        row["data"] = f"{first.dataset} {first.n_train} train, {first.image_size}px"
        if first.notes:
            row["data"] += f"; {first.notes}"
        for key in (*TASK_METRICS[task], "train_seconds"):  # 95 % interval of the mean over seeds / folds; none for one run
            values = _values(exp, key)
            ci = stats.mean_interval(values) if len(values) == len(ok) else None
            if ci is not None:
                row[f"{key}_ci_low"], row[f"{key}_ci_high"] = ci.low, ci.high
                row["ci_method"] = ci.method
    return row


def _multilabel_scores(row: dict[str, Any], ok: list[RunMetrics]) -> None:
    """A multi-label row's scores, mean ± std over the finished seeds (a score some seed did not record is left out),
    and how its thresholds were chosen."""
    for key in MULTILABEL_SCORES:
        values = [getattr(r, key) for r in ok]
        if all(v is not None for v in values):
            row[key], row[f"{key}_std"] = _mean_std(values)
    modes = sorted({r.threshold_mode for r in ok if r.threshold_mode})
    row["threshold_mode"] = ", ".join(modes) if modes else None


def _status(not_ok: list[Any]) -> str:
    """``ok``, or the runs that did not finish by status (failed / skipped / pruned) with the first one's reason."""
    if not not_ok:
        return "ok"
    counts: dict[str, int] = {}
    for r in not_ok:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items()) + f": {(not_ok[0].error or '')[:120]}"


# --------------------------------------------------------------------------------------------
# the comparisons: which runs pair up, which test, Holm, the marks


def _pair_key(run: Run) -> tuple[str, str]:
    """What pairs two runs of different experiments: the same seed and the same fold (``data.fold``)."""
    fold = run.config.data.fold if run.config is not None else None
    return str(run.seed), str(fold)


def _by_key(exp: ExperimentRuns, metric: str) -> dict[tuple[str, str], Run]:
    return {_pair_key(r): r for r in exp.ok_runs if getattr(r.record, metric) is not None}


def _same_images(a: Run, b: Run) -> tuple[Any, Any] | None:
    """Both runs' test predictions when they are of the same test images (same dataset, same labels in the
    same order), else ``None``."""
    if a.record.dataset != b.record.dataset:
        return None
    try:
        pa, pb = load_test_predictions(a.path), load_test_predictions(b.path)
    except RunError:
        return None
    if pa is None or pb is None or len(pa.true) != len(pb.true) or not np.array_equal(pa.true, pb.true):
        return None
    return pa, pb


def pair_test(exp: ExperimentRuns, ref: ExperimentRuns, metric: str = "test_acc") -> stats.TestResult | None:
    """``exp`` against ``ref`` on ``metric`` (difference exp - ref), with the test the runs allow (module
    docstring); ``None`` when nothing pairs (a single run without predictions on the same test images)."""
    mine, theirs = _by_key(exp, metric), _by_key(ref, metric)
    common = [k for k in mine if k in theirs]
    if len(common) >= 2:
        return stats.paired_t([getattr(mine[k].record, metric) for k in common], [getattr(theirs[k].record, metric) for k in common])
    if len(mine) >= 2 and len(theirs) >= 2:
        return stats.welch_t([getattr(r.record, metric) for r in mine.values()], [getattr(r.record, metric) for r in theirs.values()])
    if not mine or not theirs:
        return None
    key = common[0] if common else next(iter(mine))
    a, b = mine[key], theirs.get(key) or next(iter(theirs.values()))
    found = _same_images(a, b)
    if found is None:
        return None
    pa, pb = found
    if metric in PER_IMAGE_METRICS:
        return stats.mcnemar(stats.per_image_correct(pa.true, pa.pred), stats.per_image_correct(pb.true, pb.pred))
    return stats.paired_bootstrap(pa.true, pa.pred, pb.pred, stats.METRIC_FUNCTIONS[metric], pa.prob, pb.prob)


def _reference(experiments: list[ExperimentRuns], rows: list[dict[str, Any]], metric: str, against: str | None) -> int | None:
    names = [e.name for e in experiments]
    if against is not None:
        if against not in names:
            raise CompareError(f"compare --against {against!r}: no such experiment in the study (experiments: {', '.join(names)})")
        i = names.index(against)
        if rows[i].get(metric) is None:
            raise CompareError(f"compare --against {against!r}: the experiment has no finished run with {metric}")
        return i
    candidates = [i for i, r in enumerate(rows) if r.get(metric) is not None]
    if not candidates:
        return None
    pick = max if HIGHER_IS_BETTER[metric] else min
    return pick(candidates, key=lambda i: rows[i][metric])  # ties: the first in study order


def compare_rows(experiments: list[ExperimentRuns], rows: list[dict[str, Any]], metric: str | None = None,
                 against: str | None = None, alpha: float = stats.ALPHA) -> None:
    """Test every experiment against the reference on ``metric`` and write the result into its row.

    The experiments are of one task (``study_rows`` groups a study by task); ``metric`` defaults to that task's
    headline (``test_acc``, or ``test_map`` for multi-label). The reference is ``against``, else the best row on
    ``metric``. Each row gets ``reference``, ``metric``,
    ``test``, ``diff`` (row - reference) with ``diff_ci_low`` / ``diff_ci_high``, ``p_value``, ``p_adjusted``
    (Holm over the table's comparisons), ``mark`` (``reference``, ``better``, ``worse``,
    ``not distinguishable``, or ``no test``) and, where not distinguishable, ``seeds_needed`` (runs per
    experiment for 80 % power at the strictest Holm level; ``None`` beyond ``stats.MAX_RUNS_NEEDED``).
    """
    metric = metric or (headline(rows[0]) if rows else "test_acc")
    if metric not in TESTED_METRICS:
        raise CompareError(f"compare --metric {metric!r}: one of {', '.join(TESTED_METRICS)}")
    ref = _reference(experiments, rows, metric, against)
    if ref is None:
        return
    rows[ref].update(reference=experiments[ref].name, metric=metric, mark="reference")
    results: dict[int, stats.TestResult] = {}
    for i, (exp, row) in enumerate(zip(experiments, rows, strict=True)):
        if i == ref or row.get(metric) is None:
            continue
        row.update(reference=experiments[ref].name, metric=metric, mark="no test")
        result = pair_test(exp, experiments[ref], metric)
        if result is not None:
            results[i] = result
    adjusted = stats.holm([r.p_value for r in results.values()])
    family = max(len(results), 1)
    for (i, r), p_adj in zip(results.items(), adjusted, strict=True):
        row = rows[i]
        row.update(test=r.test, test_n=r.n, diff=r.diff, diff_ci_low=r.low, diff_ci_high=r.high, p_value=r.p_value, p_adjusted=p_adj,
                   mark=stats.mark(r.diff, p_adj, HIGHER_IS_BETTER[metric], alpha))
        if row["mark"] == "not distinguishable" and r.spread is not None:
            row["seeds_needed"] = stats.runs_needed(r.diff, r.spread, alpha / family, paired=r.paired)


# --------------------------------------------------------------------------------------------
# text: the cells of the console table and of compare.md (the report reuses ``ci_text`` / ``versus_text``)


PERCENT_METRICS = ("test_acc", "test_balanced_acc", "test_map", "test_map_micro", "test_exact_match")
"""Written as percentages (2 decimals); the other scores as fractions."""


def _scale(key: str) -> tuple[float, int]:
    """How a metric is written: accuracies and mAPs as percentages with 2 decimals, F1 / ECE as fractions with 3, the
    Hamming loss (small: a share of all image-label decisions) with 4."""
    if key in PERCENT_METRICS:
        return 100.0, 2
    return (1.0, 4) if key == "test_hamming" else (1.0, 3)


def ci_text(row: dict[str, Any], key: str = "test_acc") -> str:
    """The 95 % interval of ``key``'s mean as ``low–high`` (percent for accuracies), or "one run: no interval"."""
    if row.get(key) is None:
        return "—"
    if row.get(f"{key}_ci_low") is None:
        return "one run: no interval" if row.get("n_seeds", 0) < 2 else "—"
    scale, digits = _scale(key) if key != "train_seconds" else (1.0, 1)
    return f"{scale * row[f'{key}_ci_low']:.{digits}f}–{scale * row[f'{key}_ci_high']:.{digits}f}"


def _p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.1 else f"p={p:.2f}"


MARK_SYMBOL = {"better": "▲", "worse": "▼", "not distinguishable": "≈", "reference": "●", "no test": "·"}


def versus_text(row: dict[str, Any], short: bool = False) -> str:
    """The row against the reference: ``▼ worse p=0.004`` (Holm-adjusted p), ``≈ p=0.41, ~9 seeds``,
    ``● reference``, ``· no test`` (nothing pairs); ``short`` leaves out the test's name."""
    m = row.get("mark")
    if m is None:
        return "—"
    if m in ("reference", "no test"):
        return f"{MARK_SYMBOL[m]} {m}"
    text = f"{MARK_SYMBOL[m]} {'' if m == 'not distinguishable' else m + ' '}{_p_text(row['p_adjusted'])}"
    if m == "not distinguishable":
        need = row.get("seeds_needed")
        if need is not None:
            text += f", ~{need} seeds"
        elif row.get("test", "").endswith(" t"):
            text += f", >{stats.MAX_RUNS_NEEDED} seeds"
    return text if short else f"{text} ({row['test']})"


def seeds_hint(row: dict[str, Any]) -> str | None:
    """A sentence for a not-distinguishable row: how many seeds would resolve it, or why none is given."""
    if row.get("mark") != "not distinguishable":
        return None
    scale, digits = _scale(row["metric"])
    diff = f"{scale * row['diff']:+.{digits}f}{' points' if scale == 100 else ''}"
    head = f"{row['experiment']} vs {row['reference']}: {diff}, not distinguishable ({row['test']}, adjusted {_p_text(row['p_adjusted'])})"
    need = row.get("seeds_needed")
    if need is not None:
        return head + f"; about {need} seeds per experiment would resolve a difference this size (80 % power)"
    if row["test"].startswith(("McNemar", "paired bootstrap")):
        return head + "; one run each: run several seeds to measure the seed spread"
    if row.get("diff") == 0:
        return head + "; identical results"
    return head + f"; more than {stats.MAX_RUNS_NEEDED} seeds: the difference is small next to the seed spread"


SCORES = (*PERCENT_METRICS, "test_macro_f1", "test_f1", "test_f1_micro", "test_precision", "test_recall", "test_hamming")
"""The test scores a table shows as mean ± std over seeds (``_scale`` says how)."""


def cell_text(row: dict[str, Any], key: str) -> str:
    """A cell of the comparison table as text: ``key``'s value of ``row``, with ± std over seeds where it has one."""
    if key.endswith("_ci"):
        base = key.removesuffix("_ci")
        return ci_text(row, base) if row.get(base) is not None else "—"
    if key == "versus":
        return versus_text(row)
    if key not in row or row[key] is None:
        return "—"
    v = row[key]
    multi = row.get("n_seeds", 0) > 1
    if key in SCORES:
        scale, digits = _scale(key)
        unit = "%" if scale == 100 else ""
        return f"{scale * v:.{digits}f}{unit}" + (f" ± {scale * row[key + '_std']:.{digits}f}" if multi else "")
    if key == "test_ece":  # with train.calibrate: temperature, before → after scaling
        after = f" → {row['test_ece_calibrated']:.3f}" if row.get("test_ece_calibrated") is not None else ""
        return f"{v:.3f}" + (f" ± {row[key + '_std']:.3f}" if multi else "") + after
    if key == "train_seconds":
        return f"{v:.1f}" + (f" ± {row['train_seconds_std']:.1f}" if row.get("n_seeds", 0) > 1 else "")
    if key == "inference_images_per_s":
        return f"{v:,.0f}"
    if key == "trainable_params":
        return f"{v:,}"
    if key == "checkpoint_mb":
        return f"{v:.2f}"
    if key == "image_size":
        return f"{v}px"
    return str(v)


def _clip(text: str, n: int | None) -> str:
    return text if n is None or len(text) <= n else text[: n - 1] + "…"


RIGHT = (*SCORES, "test_acc_ci", "test_map_ci", "test_ece", "n_seeds", "train_seconds", "inference_images_per_s", "trainable_params",
         "checkpoint_mb", "image_size")


def _narrow(row: dict[str, Any], key: str) -> str:
    """A cell of the narrow console table: accuracies (mAP) without the % sign, time without ± std, status in short."""
    if key in HEADLINE.values() and row.get(key) is not None:
        return f"{100 * row[key]:.2f}" + (f" ± {100 * row[key + '_std']:.2f}" if row.get("n_seeds", 0) > 1 else "")
    if key == "train_seconds" and row.get(key) is not None:
        return f"{row[key]:.1f}"
    if key == "versus":
        return versus_text(row, short=True)
    return _clip(cell_text(row, key), NARROW_MAX.get(key))


def console_table(rows: list[dict[str, Any]], title: str, wide: bool = False, task: str = "multiclass") -> Table:
    """The comparison of experiments of ``task`` as a rich table: without ``wide`` the ``NARROW`` columns, one line
    per row (print it at most ``CONSOLE_WIDTH`` wide: long texts end in …); with ``wide`` every column of ``COLUMNS``
    (multi-label: ``MULTILABEL_COLUMNS``) in full."""
    columns = TASK_COLUMNS[task]
    keys = [k for k, _ in columns] if wide else TASK_NARROW[task]
    titles = dict(columns) if wide else {**dict(columns), **NARROW_TITLES}
    ref = next((r["reference"] for r in rows if r.get("reference")), None)
    if ref is not None:
        titles["versus"] = "vs " + (ref if wide else _clip(ref, 12))
    table = Table(title=title, box=box.HEAVY_HEAD if wide else None, pad_edge=False, header_style="bold underline")
    for k in keys:
        table.add_column(titles[k], justify="right" if k in RIGHT else "left", no_wrap=not wide, overflow="fold" if wide else "ellipsis")
    for row in rows:
        table.add_row(*[cell_text(row, k) if wide else _narrow(row, k) for k in keys])
    return table


COMPARISON_KEYS = ["reference", "metric", "mark", "test", "test_n", "diff", "diff_ci_low", "diff_ci_high", "p_value", "p_adjusted",
                   "seeds_needed"]
"""The columns ``compare_rows`` adds, as ``compare.csv`` orders them (after the tested metric's own)."""


def _csv_keys(rows: list[dict[str, Any]]) -> list[str]:
    """``compare.csv``'s columns: the table's, each metric followed by its std and interval bounds, the comparison's
    after ``test_acc``; anything else after them, by name."""
    present = {k for r in rows for k in r}
    order: list[str] = []
    for key, _ in [*COLUMNS, *MULTILABEL_COLUMNS]:
        group = [key, f"{key}_std", f"{key}_ci_low", f"{key}_ci_high"]
        if key in HEADLINE.values():
            group += ["ci_method", *COMPARISON_KEYS]
        order += [k for k in group if k in present and k not in order]
    return order + sorted(present - set(order))


def compare(study_dir: str | Path, console: Console | None = None, write: bool = True, metric: str | None = None,
            against: str | None = None, wide: bool = False) -> list[dict[str, Any]]:
    """Print the comparison table of ``study_dir`` and write ``compare.csv`` and ``compare.md`` there.

    Every experiment is tested on ``metric`` (default: its task's headline, test accuracy or test mAP) against
    ``against`` (default: the best row of its task); the rows are returned (``experiment_row`` plus ``compare_rows``'
    keys). A study with both tasks gets a table per task. The console table fits 120 columns; ``wide`` shows all.
    """
    console = console or Console()
    study_dir = Path(study_dir)
    rows = collect(study_dir, metric, against)
    groups = task_groups(rows)
    for task, idx in groups.items():
        title = f"study {study_dir.name}" + (f" — {TASK_TITLES[task]}" if set(groups) != {"multiclass"} else "")
        _print_table(console, [rows[i] for i in idx], title, wide, task)
    for rec in read_searches(study_dir):  # a search's result is its best trial on validation, marked as such
        console.print(f"search {rec.experiment}: " + "; ".join(search_lines(rec)[1:]), markup=False, highlight=False)
    if write:
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=_csv_keys(rows))
        w.writeheader()
        w.writerows(rows)
        write_text(study_dir / "compare.csv", buf.getvalue())
        write_text(study_dir / "compare.md", markdown_table(rows))
        console.print(f"written: {study_dir / 'compare.csv'}, {study_dir / 'compare.md'}")
    return rows


def _print_table(console: Console, rows: list[dict[str, Any]], title: str, wide: bool, task: str) -> None:
    """One task's table, its legend, the experiments that did not finish and the seeds-needed hints."""
    table = console_table(rows, title, wide, task)
    if wide:  # as wide as the table needs, never folded (rich caps a print at the console's width: lift it meanwhile)
        width = console.width
        console.width = max(width, console.measure(table, options=console.options.update_width(10_000)).maximum)
        console.print(table)
        console.width = width
    else:  # at most 120 columns (cut with … if still too wide)
        console.print(table, width=min(console.width, CONSOLE_WIDTH))
    legend = _legend(rows)
    if legend:
        console.print(legend, markup=False, highlight=False)
    for row in rows if not wide else []:
        if row.get("status", "ok") != "ok":
            console.print(_clip(f"  {row['experiment']}: {row['status']}", CONSOLE_WIDTH), markup=False, highlight=False)
    for row in rows:
        hint = seeds_hint(row)
        if hint:
            console.print(textwrap.fill(hint, CONSOLE_WIDTH, initial_indent="  ", subsequent_indent="    "), markup=False, highlight=False)


def _legend(rows: list[dict[str, Any]]) -> str:
    ref = next((r for r in rows if r.get("mark") == "reference"), None)
    if ref is None:
        return ""
    method = "bootstrap" if any(r.get("ci_method") == "bootstrap" for r in rows) else "t"
    single = "McNemar" if ref["metric"] in PER_IMAGE_METRICS else "a paired bootstrap"  # what pair_test gives two single runs
    return (f"95 % CI of the mean over seeds ({method}); vs {ref['experiment']} on {ref['metric']}: ▲ better, ▼ worse, ≈ not\n"
            f"distinguishable at 5 % after Holm's correction (paired t over seeds; {single} on the test images for single runs)")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """``compare.md``: every column, the tests' p-values and the seeds-needed hints below the table; a study with
    both tasks gets a table per task, each under a heading."""
    groups = task_groups(rows)
    parts = []
    for task, idx in groups.items():
        head = [f"## {TASK_TITLES[task]}", ""] if set(groups) != {"multiclass"} else []
        parts.append("\n".join(head + _markdown_task([rows[i] for i in idx], TASK_COLUMNS[task])))
    return "\n\n".join(parts) + "\n"


def _markdown_task(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> list[str]:
    md = ["| " + " | ".join(t for _, t in columns) + " | p | p (Holm) |", "|" + "---|" * (len(columns) + 2)]
    for r in rows:
        cells = [cell_text(r, k) for k, _ in columns]
        cells += [f"{r[k]:.3g}" if r.get(k) is not None else "—" for k in ("p_value", "p_adjusted")]
        md.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    legend = _legend(rows)
    hints = [h for h in (seeds_hint(r) for r in rows) if h]
    return md + ([""] + [legend] if legend else []) + ([""] + [f"- {h}" for h in hints] if hints else [])
