"""The test predictions a run recorded (``predictions.json`` + ``test_samples.safetensors``), read back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from transferlab.rundir.layout import PREDICTIONS_FILE, SAMPLES_FILE
from transferlab.rundir.rundir import RunError

__all__ = ["TestPredictions", "load_test_predictions"]


@dataclass
class TestPredictions:
    """What ``save_test_predictions`` wrote, read back: arrays over the test split and the sample images.

    Multiclass: ``true`` / ``pred`` are class indices (N,), ``prob`` the predicted class's probability (N,),
    ``true_prob`` the true class's. Multi-label (``task == "multilabel"``): ``true`` / ``pred`` are N×K 0/1,
    ``prob`` the N×K sigmoid probabilities, ``true_prob`` is empty and ``thresholds`` the K thresholds used.
    """

    class_names: list[str]
    true: np.ndarray
    pred: np.ndarray
    prob: np.ndarray
    true_prob: np.ndarray
    positions: list[int] = field(default_factory=list)
    """Test positions of the sample images, in the order of ``images``."""
    images: torch.Tensor | None = None
    """uint8 N×C×H×W sample images (``None`` when the samples file is missing)."""
    task: str = "multiclass"
    """``multiclass`` or ``multilabel`` (files written before multi-label existed are multiclass)."""
    thresholds: list[float] | None = None
    """Multi-label: each class's probability threshold (a label is predicted when its probability is >= it)."""

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"


def _arrays(rec: dict, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``true``, ``pred``, ``prob`` with the shape the task needs (N,) or N×K; a ragged or mis-shaped file is a ValueError."""
    true = np.asarray(rec["true"], dtype=np.int64)
    pred = np.asarray(rec["pred"], dtype=np.int64)
    prob = np.asarray(rec["prob"], dtype=np.float64)
    ndim = 2 if task == "multilabel" else 1
    if len(true) and not (true.ndim == pred.ndim == prob.ndim == ndim and true.shape == pred.shape == prob.shape):
        raise ValueError(f"true / pred / prob of shapes {true.shape} / {pred.shape} / {prob.shape} for task {task}")
    return true, pred, prob


def load_test_predictions(run_dir: str | Path) -> TestPredictions | None:
    """Read ``predictions.json`` (+ samples) of a run; ``None`` when the run recorded none."""
    run_dir = Path(run_dir)
    path = run_dir / PREDICTIONS_FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        task = str(rec.get("task", "multiclass"))
        true, pred, prob = _arrays(rec, task)
        thresholds = [float(t) for t in rec["thresholds"]] if task == "multilabel" else None
        out = TestPredictions(
            class_names=list(rec["class_names"]),
            true=true,
            pred=pred,
            prob=prob,
            true_prob=np.asarray(rec.get("true_prob", []), dtype=np.float64),
            task=task,
            thresholds=thresholds,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: not a transferlab predictions file ({type(e).__name__}: {e})") from None
    samples = run_dir / rec.get("samples", {}).get("file", SAMPLES_FILE)
    if samples.is_file():
        t = load_file(str(samples))
        out.images, out.positions = t["images"], t["positions"].tolist()
    return out
