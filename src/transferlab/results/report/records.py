"""The study as the report sees it: experiments with their runs, their comparison row and a plot colour.

A thin layer over ``transferlab.rundir.read_study`` (which reads the run folders) and
``transferlab.results.compare.study_rows`` (mean ± std and 95 % interval over seeds, each experiment tested
against the reference), so the report shows exactly the numbers ``transferlab compare`` shows. Reading
problems become ``ReportError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.results.compare import headline, study_rows
from transferlab.rundir import ExperimentRuns, RunError, StudyRuns
from transferlab.rundir import read_study as read_runs

__all__ = ["ExperimentRecord", "ReportError", "StudyRecord", "read_study"]

PALETTE = [f"C{i}" for i in range(10)]
"""matplotlib's default cycle: experiment ``i`` keeps colour ``C{i % 10}`` in every plot."""


class ReportError(ValueError):
    """The study folder cannot be reported on. The message names the folder or file."""


@dataclass
class ExperimentRecord(ExperimentRuns):
    """All runs (seeds) of one experiment, its row of the comparison table and its plot colour."""

    row: dict[str, Any] = field(default_factory=dict)
    color: str = "C0"

    @property
    def multilabel(self) -> bool:
        """Its runs are multi-label (``data.task: multilabel``): ranked by mAP, with label sets instead of classes."""
        return self.row.get("task") == "multilabel"

    @property
    def headline(self) -> str:
        """The metric that ranks it: ``test_map`` (multi-label) or ``test_acc``."""
        return headline(self.row)


@dataclass
class StudyRecord(StudyRuns):
    """A study folder read back for the report: its experiments are ``ExperimentRecord``s, in study order."""

    experiments: list[ExperimentRecord] = field(default_factory=list)  # type: ignore[assignment]


def read_study(study_dir: str | Path, metric: str | None = None, against: str | None = None) -> StudyRecord:
    """Every run folder of ``study_dir`` (``*/metrics.json``), grouped by experiment in study order; each row is
    tested on ``metric`` (default: its task's headline) against ``against`` (default: the best experiment of its task)."""
    try:
        study = read_runs(study_dir)
    except (FileNotFoundError, RunError) as e:
        raise ReportError(str(e)) from None
    record = StudyRecord(study.path, study.name, study.source)
    rows = study_rows(study.experiments, metric, against)
    for i, (exp, row) in enumerate(zip(study.experiments, rows, strict=True)):
        record.experiments.append(ExperimentRecord(exp.name, exp.runs, row, PALETTE[i % len(PALETTE)]))
    return record
