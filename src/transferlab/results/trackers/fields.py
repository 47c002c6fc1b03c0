"""What the trackers log of a multi-label run, shared by the peers (TensorBoard, MLflow, W&B)."""

from __future__ import annotations

__all__ = ["MULTILABEL_EPOCH_METRICS", "MULTILABEL_TEST_METRICS"]

MULTILABEL_TEST_METRICS = ("test_map", "test_map_micro", "test_f1", "test_f1_micro", "test_precision", "test_recall", "test_exact_match",
                           "test_hamming")
"""The test scores of ``data.task: multilabel`` (``metrics.json``): logged where a multiclass run's ``test_acc`` is (a
multiclass run has none of them, so every tracker logs them whenever they are there)."""
MULTILABEL_EPOCH_METRICS = ("val_map",)
"""The history column of a multi-label run in place of ``val_acc``."""
