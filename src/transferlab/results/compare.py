"""The comparison table of a study: one row per experiment, mean ± std over seeds."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from transferlab.files import write_text
from transferlab.results.search import read_searches, search_lines
from transferlab.rundir import ExperimentRuns, RunMetrics, read_study

COLUMNS = [
    ("experiment", "experiment"),
    ("strategy", "strategy"),
    ("backbone", "backbone"),
    ("weights", "weights"),
    ("precision", "precision"),
    ("test_acc", "test acc"),
    ("test_balanced_acc", "balanced acc"),
    ("test_macro_f1", "macro F1"),
    ("test_ece", "ECE"),
    ("n_seeds", "seeds"),
    ("train_seconds", "train time (s)"),
    ("inference_images_per_s", "inference img/s"),
    ("trainable_params", "trainable params"),
    ("data", "data"),
    ("status", "status"),
]


def training_cost_seconds(metrics: dict[str, Any]) -> float:
    """What training cost: the loop's time plus, when features were cached, the one backbone pass."""
    return RunMetrics.from_dict(metrics).training_cost_seconds()


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(study_dir: str | Path) -> list[dict[str, Any]]:
    """Read every run of ``study_dir`` and aggregate the seeds of each experiment (one row per experiment)."""
    return [experiment_row(e) for e in read_study(study_dir).experiments]


def run_precision(exp: ExperimentRuns) -> str | None:
    """The precision the experiment's runs recorded (``train.precision`` in ``config.yaml``, resolved from ``auto``);
    several values (seeds run on different machines) are listed; ``None`` for an ensemble (its members' own)."""
    values = sorted({r.config.train.precision for r in (exp.ok_runs or exp.runs) if r.config is not None and r.config.kind != "ensemble"})
    return ", ".join(values) if values else None


def experiment_row(exp: ExperimentRuns) -> dict[str, Any]:
    """One experiment's row: what ran, mean ± std over its finished seeds, and its status."""
    ok = [r.record for r in exp.ok_runs]
    first = ok[0] if ok else exp.runs[0].record
    failed = [r.record for r in exp.failed_runs]
    row: dict[str, Any] = {
        "experiment": exp.name,
        "kind": first.kind,
        "strategy": first.strategy,
        "backbone": first.backbone,
        "weights": first.weights,
        "precision": run_precision(exp),
        "n_seeds": len(ok),
        "status": _status(failed),
    }
    if ok:
        row["test_acc"], row["test_acc_std"] = _mean_std([r.test_acc for r in ok])
        for key in ("test_balanced_acc", "test_macro_f1"):  # from the confusion matrix: none for few-shot episodes
            values = [getattr(r, key) for r in ok if getattr(r, key) is not None]
            if len(values) == len(ok):
                row[key], row[f"{key}_std"] = _mean_std(values)
        for key in ("test_ece", "test_nll", "test_brier", "test_ece_calibrated"):  # calibration: absent in older runs
            values = [getattr(r, key) for r in ok if getattr(r, key) is not None]
            if values and len(values) == len(ok):
                row[key], row[f"{key}_std"] = _mean_std(values)
        row["inference_images_per_s"], row["inference_images_per_s_std"] = _mean_std([r.inference_images_per_s for r in ok])
        row["train_seconds"], row["train_seconds_std"] = _mean_std([r.training_cost_seconds() for r in ok])
        row["trainable_params"] = first.trainable_params
        row["total_params"] = first.total_params
        row["data"] = f"{first.dataset} {first.n_train} train, {first.image_size}px"
        if first.notes:
            row["data"] += f"; {first.notes}"
    return row


def _status(not_ok: list[Any]) -> str:
    """``ok``, or the runs that did not finish by status (failed / skipped / pruned) with the first one's reason."""
    if not not_ok:
        return "ok"
    counts: dict[str, int] = {}
    for r in not_ok:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items()) + f": {(not_ok[0].error or '')[:120]}"


def _fmt(row: dict[str, Any], key: str) -> str:
    if key not in row or row[key] is None:
        return "—"
    v = row[key]
    multi = row.get("n_seeds", 0) > 1
    if key in ("test_acc", "test_balanced_acc"):
        return f"{100 * v:.2f}%" + (f" ± {100 * row[key + '_std']:.2f}" if multi else "")
    if key == "test_macro_f1":
        return f"{v:.3f}" + (f" ± {row[key + '_std']:.3f}" if multi else "")
    if key == "test_ece":  # with train.calibrate: temperature, before → after scaling
        after = f" → {row['test_ece_calibrated']:.3f}" if row.get("test_ece_calibrated") is not None else ""
        return f"{v:.3f}" + (f" ± {row[key + '_std']:.3f}" if multi else "") + after
    if key == "train_seconds":
        return f"{v:.1f}" + (f" ± {row['train_seconds_std']:.1f}" if row.get("n_seeds", 0) > 1 else "")
    if key == "inference_images_per_s":
        return f"{v:,.0f}"
    if key == "trainable_params":
        return f"{v:,}"
    return str(v)


def compare(study_dir: str | Path, console: Console | None = None, write: bool = True) -> list[dict[str, Any]]:
    """Print the comparison table of ``study_dir`` and write ``compare.csv`` and ``compare.md`` there."""
    console = console or Console()
    study_dir = Path(study_dir)
    rows = collect(study_dir)
    table = Table(title=f"study {study_dir.name}")
    for _, title in COLUMNS:
        table.add_column(title, justify="right" if title.endswith(("acc", "F1", "ECE", "(s)", "img/s", "params", "seeds")) else "left")
    for row in rows:
        table.add_row(*[_fmt(row, k) for k, _ in COLUMNS])
    console.print(table)
    for rec in read_searches(study_dir):  # a search's result is its best trial on validation, marked as such
        console.print(f"search {rec.experiment}: " + "; ".join(search_lines(rec)[1:]), markup=False, highlight=False)
    if write:
        keys = sorted({k for r in rows for k in r}, key=lambda k: [c for c, _ in COLUMNS].index(k) if k in dict(COLUMNS) else 99)
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        write_text(study_dir / "compare.csv", buf.getvalue())
        md = ["| " + " | ".join(t for _, t in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        md += ["| " + " | ".join(_fmt(r, k).replace("|", "\\|") for k, _ in COLUMNS) + " |" for r in rows]
        write_text(study_dir / "compare.md", "\n".join(md) + "\n")
        console.print(f"written: {study_dir / 'compare.csv'}, {study_dir / 'compare.md'}")
    return rows
