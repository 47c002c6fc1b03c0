"""Tracking: a run also logged to TensorBoard and/or MLflow while it runs (``tracking: [tensorboard, mlflow]``).

``core`` holds the ``TRACKERS`` registry, the ``Tracker`` interface and ``RunTracking`` (a run's
trackers, driven by ``kinds.run_experiment`` and the training loop); ``tensorboard`` and ``mlflow``
register one tracker each. Their packages are optional extras, imported only by a run that uses them.
"""

from transferlab.engine.tracking import mlflow, tensorboard  # noqa: F401 - each registers its tracker
from transferlab.engine.tracking.core import TRACKERS, TRACKING_FILE, RunInfo, RunTracking, Tracker, check_tracking, flat_config
from transferlab.engine.tracking.mlflow import LOG_MODEL_FORMATS, PARENT_FILE, MlflowOptions, MlflowTracker, log_study_artifacts, tracking_uri
from transferlab.engine.tracking.tensorboard import TensorBoardOptions, TensorBoardTracker

__all__ = [
    "LOG_MODEL_FORMATS",
    "PARENT_FILE",
    "TRACKERS",
    "TRACKING_FILE",
    "MlflowOptions",
    "MlflowTracker",
    "RunInfo",
    "RunTracking",
    "TensorBoardOptions",
    "TensorBoardTracker",
    "Tracker",
    "check_tracking",
    "flat_config",
    "log_study_artifacts",
    "tracking_uri",
]
