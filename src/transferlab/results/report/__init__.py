"""The study report: one self-contained HTML file and a Markdown summary, from a study's run directories.

``transferlab report runs/<study>`` (or ``build_report``) reads every run folder of the study —
``metrics.json``, ``config.yaml``, ``history.csv``, ``predictions.json`` and ``test_samples.safetensors`` —
and writes ``report.html`` and ``report.md`` into the study folder:

* the comparison table (``transferlab.results.compare``: mean ± std and 95 % interval over seeds, every
  experiment tested against the best one or ``against``), sortable, the best value of each column marked;
* test accuracy against training time, with the Pareto front;
* learning curves (train/val loss and accuracy per epoch) of every experiment;
* confusion matrix, per-class accuracy and the most-confused pairs of every experiment;
* a grid of test images with predicted and true labels, wrong ones marked;
* for multi-label experiments (``data.task: multilabel``), instead of the confusion matrix: the test mAP ± std,
  per-class average precision, the label co-occurrence of the test set, the per-class thresholds (chosen on
  validation) with recall and precision, the most-missed labels, and a grid with every predicted label (right
  ones and wrong ones marked, missed ones listed);
* for sweeps, the metrics against the swept value;
* failed runs with their error.

Every number comes from the run folders. The parts, in the order the data flows:

* ``records`` — the study as the report sees it (read through ``transferlab.rundir``), ``ReportError``;
* ``stats`` — the numbers derived from the runs (best values, Pareto front, confusion, sweep rows);
* ``text`` — how those numbers are written, the same on both pages;
* ``figures`` — every plot and test image as PNG (the only module that uses matplotlib);
* ``html`` — the page: sections, styles, script, Content-Security-Policy, escaping;
* ``markdown`` — the summary;
* ``browser`` — renders a page in headless Chromium to check it (used by ``transferlab report --check``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transferlab.files import write_text
from transferlab.results.report import html, markdown
from transferlab.results.report.records import ReportError, read_study
from transferlab.results.report.stats import confused_pairs, pareto_front

__all__ = [
    "GRID_IMAGES",
    "GRID_WRONG",
    "REPORT_HTML",
    "REPORT_MD",
    "Report",
    "ReportError",
    "build_report",
    "confused_pairs",
    "pareto_front",
]

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
GRID_IMAGES = 16
"""Test images in each experiment's prediction grid (seed 001 shows 16) ..."""
GRID_WRONG = 8
"""... followed by up to this many misclassified ones."""


@dataclass
class Report:
    """What ``build_report`` wrote: the two files and the ids of the HTML page's sections, in order."""

    html_path: Path
    md_path: Path
    sections: list[str]


def build_report(
    study_dir: str | Path,
    html_path: str | Path | None = None,
    md_path: str | Path | None = None,
    grid_images: int = GRID_IMAGES,
    grid_wrong: int = GRID_WRONG,
    metric: str | None = None,
    against: str | None = None,
) -> Report:
    """Write the HTML report and the Markdown summary of ``study_dir`` (default: inside it).

    ``grid_images`` test images are shown per experiment, then up to ``grid_wrong`` more misclassified
    ones. Every experiment is tested on ``metric`` (default: its task's headline, test accuracy or test mAP) against
    ``against`` (default: the best experiment of its task), as ``transferlab compare`` does. Raises ``ReportError``
    when the folder holds no readable runs.
    """
    study_dir = Path(study_dir)
    study = read_study(study_dir, metric, against)
    html_path = Path(html_path) if html_path else study_dir / REPORT_HTML
    md_path = Path(md_path) if md_path else study_dir / REPORT_MD
    sections = html.sections(study, grid_images, grid_wrong)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(html_path, html.page(study, sections))
    write_text(md_path, markdown.summary(study, html_path.name))
    return Report(html_path, md_path, [s.id for s in sections])
