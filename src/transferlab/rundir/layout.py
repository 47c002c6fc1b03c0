"""Every file of a run folder, named in one place.

A run directory is the contract between the layers: kinds write it (through ``RunDir``), compare /
the report / export / the trackers read it. Whoever writes or reads a file of a run folder takes its
name from here, so a reader never has to know which layer wrote it::

    runs/<study>/<experiment>[.s<seed>]/
        config.yaml                 the resolved config (CONFIG_FILE)
        metrics.json                the result, one schema (METRICS_FILE, rundir.metrics)
        history.csv                 one row per epoch / step (HISTORY_FILE)
        selection.json              indices, classes, folds, normalisation (SELECTION_FILE)
        checkpoints/{best,last}.safetensors (+ .json metadata)   (CHECKPOINTS_DIR)
        predictions.json, test_samples.safetensors               (PREDICTIONS_FILE, SAMPLES_FILE)
        lr_find.{csv,json,png}      train.lr: find (LR_FIND_*)
        outside_predictions.{json,csv,png}, activations/         predict: / activations: sections
        tracking.json               tracker run ids, so a resume continues them (TRACKING_FILE)
        export/                     transferlab export (EXPORT_DIR)
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ACTIVATIONS_DIR",
    "ACTIVATIONS_FILE",
    "CHECKPOINTS_DIR",
    "CONFIG_FILE",
    "EXPORT_DIR",
    "HISTORY_FILE",
    "LR_FIND_CSV",
    "LR_FIND_JSON",
    "LR_FIND_PNG",
    "METRICS_FILE",
    "OUTSIDE_CSV",
    "OUTSIDE_JSON",
    "OUTSIDE_PNG",
    "PREDICTIONS_FILE",
    "SAMPLES_FILE",
    "SELECTION_FILE",
    "TRACKING_FILE",
    "checkpoint_path",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
SELECTION_FILE = "selection.json"
CHECKPOINTS_DIR = "checkpoints"
PREDICTIONS_FILE = "predictions.json"
SAMPLES_FILE = "test_samples.safetensors"
LR_FIND_CSV = "lr_find.csv"
LR_FIND_JSON = "lr_find.json"
LR_FIND_PNG = "lr_find.png"
OUTSIDE_JSON = "outside_predictions.json"
OUTSIDE_CSV = "outside_predictions.csv"
OUTSIDE_PNG = "outside_predictions.png"
ACTIVATIONS_DIR = "activations"
ACTIVATIONS_FILE = "activations.json"
TRACKING_FILE = "tracking.json"
EXPORT_DIR = "export"


def checkpoint_path(run_dir: str | Path, name: str = "best") -> Path:
    """``<run>/checkpoints/<name>.safetensors`` (``best`` or ``last``)."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"{name}.safetensors"
