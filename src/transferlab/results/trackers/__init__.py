"""Trackers as peers: a run also logged to TensorBoard and/or MLflow while it runs (``tracking: [tensorboard, mlflow]``).

Each module registers one tracker in ``transferlab.engine.tracking.TRACKERS`` (the ``Tracker`` interface
and ``RunTracking``, which the kinds and the training loop drive, live there). Their packages are optional
extras, imported only by a run that uses them.
"""

from transferlab.results.trackers import mlflow, tensorboard  # noqa: F401 - each registers its tracker
from transferlab.results.trackers.mlflow import LOG_MODEL_FORMATS, PARENT_FILE, MlflowOptions, MlflowTracker, log_study_artifacts, tracking_uri
from transferlab.results.trackers.tensorboard import TensorBoardOptions, TensorBoardTracker

__all__ = [
    "LOG_MODEL_FORMATS",
    "PARENT_FILE",
    "MlflowOptions",
    "MlflowTracker",
    "TensorBoardOptions",
    "TensorBoardTracker",
    "log_study_artifacts",
    "tracking_uri",
]
