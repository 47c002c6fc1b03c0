"""How the report writes its numbers and facts as plain text, the same on the HTML page and in Markdown.

Escaping is not done here: each page escapes these strings for its own format.
"""

from __future__ import annotations

import math
from typing import Any

from transferlab.results.compare import ci_text, headline
from transferlab.results.report.records import ExperimentRecord, StudyRecord
from transferlab.results.report.stats import LabelRow, SweepRow
from transferlab.rundir import Run

__all__ = [
    "MISSING",
    "acc_text",
    "balance_text",
    "class_label",
    "ece_text",
    "error_text",
    "interval_text",
    "int_text",
    "labels_text",
    "legend_text",
    "metric_name",
    "pct",
    "rate_text",
    "secs",
    "status_text",
    "study_facts",
    "sweep_acc_text",
    "thresholds_text",
    "time_text",
]

MISSING = "—"
"""Shown for a value that does not apply or was not recorded."""


def pct(v: float | None) -> str:
    """A fraction as a percentage with two decimals (``—`` for none or NaN)."""
    return MISSING if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}%"


def secs(v: float) -> str:
    """Seconds with a precision that suits their size (0.04, 3.21, 45.2, 612)."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


METRIC_NAMES = {"test_acc": "accuracy", "test_map": "mAP"}


def metric_name(key: str) -> str:
    """How the pages name a headline metric (``test_map`` -> ``mAP``; any split: ``val_acc`` -> ``accuracy``)."""
    return METRIC_NAMES.get("test_" + key.split("_", 1)[-1], key)


def acc_text(row: dict[str, Any], key: str | None = None) -> str:
    """The headline score of a comparison row (test accuracy, or test mAP for multi-label; or ``key``): mean, ± std
    when there are several seeds, and n."""
    key = key or headline(row)
    if row.get(key) is None:
        return MISSING
    n = row.get("n_seeds", 0)
    std = f" ± {100 * row[key + '_std']:.2f}" if n > 1 else ""
    return f"{100 * row[key]:.2f}%{std} (n={n})"


def labels_text(names: list[str], indices: Any) -> str:
    """Labels by name, comma-separated (``—`` for none)."""
    return ", ".join(class_label(names, int(i)) for i in indices) or MISSING


def interval_text(row: dict[str, Any], key: str | None = None) -> str:
    """The 95 % interval of a comparison row's mean (default: of its headline): ``95 % CI 93.32–93.86`` (percent
    points for accuracies and mAPs), ``one run: no interval``, or ``—``."""
    text = ci_text(row, key or headline(row))
    return text if text in (MISSING, "one run: no interval") else f"95 % CI {text}"


def legend_text(exps: list[ExperimentRecord]) -> str:
    """What the interval and the marks of a comparison table (of ``exps``, one task) mean, naming the reference and
    the metric."""
    ref = next((e.row for e in exps if e.row.get("mark") == "reference"), None)
    if ref is None:
        return ""
    method = "bootstrap percentile" if any(e.row.get("ci_method") == "bootstrap" for e in exps) else "Student t"
    return (
        f"95 % CI: confidence interval of the mean over seeds / folds ({method}). Every experiment is tested against "
        f"{ref['experiment']} on {ref['metric']}: ▲ better, ▼ worse, ≈ not distinguishable at 5 % after Holm's correction for "
        "the number of comparisons (p shown adjusted). Runs with the same seed / fold pair up (paired t-test); single runs are "
        "compared on their predictions of the same test images (McNemar mid-p; paired bootstrap for other metrics); several runs "
        "that do not pair: Welch's t-test."
    )


def balance_text(row: dict[str, Any], key: str) -> str:
    """``test_balanced_acc`` (a percentage) or ``test_macro_f1`` (a fraction) of a comparison row, ± std over seeds."""
    if row.get(key) is None:
        return MISSING
    multi, v, std = row.get("n_seeds", 0) > 1, row[key], row.get(f"{key}_std", 0.0)
    if key == "test_macro_f1":
        return f"{v:.3f}" + (f" ± {std:.3f}" if multi else "")
    return f"{100 * v:.2f}%" + (f" ± {100 * std:.2f}" if multi else "")


def ece_text(row: dict[str, Any]) -> str:
    """Test ECE of a comparison row (15 bins, L1), ± std over seeds; ``→ after`` with temperature scaling."""
    if row.get("test_ece") is None:
        return MISSING
    std = f" ± {row.get('test_ece_std', 0.0):.3f}" if row.get("n_seeds", 0) > 1 else ""
    after = f" → {row['test_ece_calibrated']:.3f}" if row.get("test_ece_calibrated") is not None else ""
    return f"{row['test_ece']:.3f}{std}{after}"


def time_text(row: dict[str, Any]) -> str:
    """Training time of a comparison row in seconds, ± std when there are several seeds."""
    if row.get("train_seconds") is None:
        return MISSING
    n = row.get("n_seeds", 0)
    std = f" ± {secs(row['train_seconds_std'])}" if n > 1 else ""
    return f"{secs(row['train_seconds'])}{std}"


def sweep_acc_text(row: SweepRow) -> str:
    """Test score (accuracy, or mAP) of a sweep point: mean, ± std when there are several seeds."""
    return pct(row.score) + (f" ± {100 * row.score_std:.2f}" if row.n > 1 else "")


def thresholds_text(row: LabelRow) -> str:
    """The threshold of a label that every seed chose on validation, or their range when the seeds differ."""
    if not row.thresholds:
        return MISSING
    lo, hi = min(row.thresholds), max(row.thresholds)
    return f"{lo:.3f}" if lo == hi else f"{lo:.3f}–{hi:.3f}"


def int_text(v: Any) -> str:
    """An integer with thousands separators."""
    return MISSING if v is None else f"{int(v):,}"


def rate_text(v: Any) -> str:
    """A rate (images per second), rounded, with thousands separators."""
    return MISSING if v is None else f"{v:,.0f}"


def status_text(e: ExperimentRecord) -> str:
    """``ok``, ``failed`` / ``skipped`` / ``pruned`` (no run finished), or how many of its runs did not finish."""
    failed = e.failed_runs
    if not failed:
        return "ok"
    statuses = sorted({r.record.status for r in failed})  # failed, skipped (a dependency did not finish), pruned (a search)
    if not e.ok_runs:
        return "/".join(statuses)
    return f"{len(failed)} of {len(e.runs)} runs {'/'.join(statuses)}"


def error_text(run: Run) -> str:
    """A failed run's error, as recorded."""
    return run.record.error or "no error recorded"


def class_label(names: list[str], i: int) -> str:
    """Class ``i`` by name, or its index when the run recorded fewer names."""
    return names[i] if 0 <= i < len(names) else str(i)


def study_facts(study: StudyRecord) -> list[str]:
    """The header line: experiments and runs, datasets, devices, transferlab version (empty parts left out)."""
    ok = [r.record for e in study.ok_experiments for r in e.ok_runs]
    n_runs = sum(len(e.runs) for e in study.experiments)
    n_failed = sum(len(e.failed_runs) for e in study.experiments)
    datasets = sorted({str(m.dataset) for m in ok})
    devices = sorted({str(m.device) for m in ok if m.device})
    version = ok[0].code_version if ok else {}  # the first finished run speaks for the study
    commit = f", commit {version['git_commit']}" if version.get("git_commit") else ""
    facts = [
        f"{len(study.experiments)} experiments, {n_runs} runs ({n_failed} failed)",
        "dataset: " + ", ".join(datasets) if datasets else "",
        "device: " + ", ".join(devices) if devices else "",
        "transferlab " + str(version.get("transferlab", "?")) + commit,
    ]
    return [f for f in facts if f]
