"""Outside images in the report: what the experiments' ``predict:`` / ``activations:`` sections left in their runs.

``transferlab.tools.inspect`` writes, per run, ``outside_predictions.json`` (+ its PNG grid) and
``activations/`` (one PNG per image, listed in ``activations.json``). Read back here from the run folders
alone, like every other part of the report; each experiment shows its first finished run, as the test
grid does. ``outside_table`` is seed 003's "images from the internet" table: one row per image, one
column per experiment, the top class and its probability in each cell (a multi-label run: every label at or above
its threshold).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transferlab.results.report.records import ExperimentRecord
from transferlab.results.report.text import MISSING
from transferlab.rundir.layout import ACTIVATIONS_DIR, ACTIVATIONS_FILE, OUTSIDE_JSON, OUTSIDE_PNG

__all__ = ["ActivationImage", "OutsidePredictions", "activation_images", "outside_predictions", "outside_table"]


@dataclass
class OutsidePredictions:
    """One run's ``predict:`` results: per image file its top classes (name, probability) or its error, and the grid."""

    run: str
    files: list[str] = field(default_factory=list)
    """The image files, in the order the run recorded them."""
    top: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    labels: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    """A multi-label run: per image file every label whose probability reached its threshold (possibly none)."""
    errors: dict[str, str] = field(default_factory=dict)
    png: bytes | None = None
    problem: str | None = None
    """Why the recorded file could not be read (shown instead of the results)."""


@dataclass
class ActivationImage:
    """One image of a run's ``activations:`` section: its PNG, the predicted class and layers, or its error."""

    file: str
    png: bytes | None = None
    predicted: str | None = None
    prob: float | None = None
    layers: list[str] = field(default_factory=list)
    error: str | None = None


def _first_ok(e: ExperimentRecord) -> Path | None:
    return e.ok_runs[0].path if e.ok_runs else None


def outside_predictions(e: ExperimentRecord) -> OutsidePredictions | None:
    """The ``predict:`` results of the experiment's first finished run; ``None`` when it has none."""
    run = _first_ok(e)
    if run is None or not (run / OUTSIDE_JSON).is_file():
        return None
    out = OutsidePredictions(run.name)
    try:
        doc = json.loads((run / OUTSIDE_JSON).read_text(encoding="utf-8"))
        for item in doc["images"]:
            out.files.append(str(item["file"]))
            if "error" in item:
                out.errors[str(item["file"])] = str(item["error"])
            else:
                out.top[str(item["file"])] = [(str(p["class"]), float(p["prob"])) for p in item["predictions"]]
                if "labels" in item:
                    out.labels[str(item["file"])] = [(str(p["class"]), float(p["prob"])) for p in item["labels"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        out.problem = f"{run / OUTSIDE_JSON}: not a transferlab outside-predictions file ({type(err).__name__}: {err})"
        return out
    if (run / OUTSIDE_PNG).is_file():
        out.png = (run / OUTSIDE_PNG).read_bytes()
    return out


def activation_images(e: ExperimentRecord) -> list[ActivationImage]:
    """The ``activations:`` images of the experiment's first finished run, in the order they were given."""
    run = _first_ok(e)
    listing = run / ACTIVATIONS_DIR / ACTIVATIONS_FILE if run is not None else None
    if listing is None or not listing.is_file():
        return []
    try:
        entries = json.loads(listing.read_text(encoding="utf-8"))["images"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [ActivationImage(str(listing), error=f"not a transferlab activations listing ({type(err).__name__}: {err})")]
    out = []
    for item in entries:
        img = ActivationImage(str(item.get("file", "?")), error=item.get("error"))
        if img.error is None:
            png = listing.parent / str(item.get("png", ""))
            img.png = png.read_bytes() if png.is_file() else None
            img.error = None if img.png is not None else f"{png}: missing"
            img.predicted, img.prob, img.layers = item.get("predicted"), item.get("prob"), list(item.get("layers", []))
        out.append(img)
    return out


def outside_table(experiments: list[ExperimentRecord]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(image files in first-seen order, {experiment: {file: "class (p%)" or the error}}), for experiments with ``predict:``;
    a multi-label experiment's cell lists every label at or above its threshold."""
    files: dict[str, None] = {}
    cells: dict[str, dict[str, str]] = {}
    for e in experiments:
        found = outside_predictions(e)
        if found is None or found.problem:
            continue
        row = {f: f"{top[0][0]} ({100 * top[0][1]:.1f}%)" if top else MISSING for f, top in found.top.items()}
        row |= {f: ", ".join(f"{c} ({100 * p:.1f}%)" for c, p in labels) or "no label above its threshold" for f, labels in found.labels.items()}
        row |= {f: f"error: {err}" for f, err in found.errors.items()}
        for f in found.files:
            files.setdefault(f)
        cells[e.name] = row
    return list(files), cells
