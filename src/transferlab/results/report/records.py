"""The study as the report sees it: experiments with their runs, their comparison row and a plot colour.

A thin layer over ``transferlab.rundir.read_study`` (which reads the run folders) and
``transferlab.results.compare.experiment_row`` (mean ± std over seeds), so the report shows exactly
the numbers ``transferlab compare`` shows. Reading problems become ``ReportError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.config import SweepPoint
from transferlab.results.compare import experiment_row
from transferlab.rundir import Run, RunError
from transferlab.rundir import read_study as read_runs

__all__ = ["ExperimentRecord", "ReportError", "StudyRecord", "read_study"]

PALETTE = [f"C{i}" for i in range(10)]
"""matplotlib's default cycle: experiment ``i`` keeps colour ``C{i % 10}`` in every plot."""


class ReportError(ValueError):
    """The study folder cannot be reported on. The message names the folder or file."""


@dataclass
class ExperimentRecord:
    """All runs (seeds) of one experiment and its row of the comparison table."""

    name: str
    runs: list[Run]
    row: dict[str, Any]
    color: str = "C0"

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def failed_runs(self) -> list[Run]:
        return [r for r in self.runs if not r.ok]

    @property
    def sweep(self) -> SweepPoint | None:
        """The sweep point this experiment is, from the first run whose config says so."""
        for r in self.runs:
            if r.config is not None and r.config.sweep is not None:
                return r.config.sweep
        return None

    @property
    def class_names(self) -> list[str]:
        """The class names of the first finished run that recorded any (``[]`` when none did)."""
        for r in self.ok_runs:
            if r.class_names:
                return r.class_names
        return []


@dataclass
class StudyRecord:
    """A study folder read back: name, where it came from, and its experiments in study order."""

    path: Path
    name: str
    source: str | None
    experiments: list[ExperimentRecord] = field(default_factory=list)

    @property
    def ok_experiments(self) -> list[ExperimentRecord]:
        """The experiments with at least one finished run: the ones with numbers to plot."""
        return [e for e in self.experiments if e.ok_runs]

    @property
    def failed_runs(self) -> list[Run]:
        """Every failed run, in study order."""
        return [r for e in self.experiments for r in e.failed_runs]


def read_study(study_dir: str | Path) -> StudyRecord:
    """Every run folder of ``study_dir`` (``*/metrics.json``), grouped by experiment in study order."""
    try:
        study = read_runs(study_dir)
    except (FileNotFoundError, RunError) as e:
        raise ReportError(str(e)) from None
    record = StudyRecord(study.path, study.name, study.source)
    for i, exp in enumerate(study.experiments):
        record.experiments.append(ExperimentRecord(exp.name, exp.runs, experiment_row(exp), PALETTE[i % len(PALETTE)]))
    return record
