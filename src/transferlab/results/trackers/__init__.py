"""Trackers as peers: a run also logged to TensorBoard, MLflow and/or W&B while it runs (``tracking: [tensorboard, mlflow, wandb]``).

Each module registers one tracker in ``transferlab.engine.tracking.TRACKERS`` (the ``Tracker`` interface
and ``RunTracking``, which the kinds and the training loop drive, live there). Their packages are optional
extras, imported only by a run that uses them.
"""

from transferlab.results.trackers import mlflow, tensorboard, wandb  # noqa: F401 - each registers its tracker
from transferlab.results.trackers.mlflow import LOG_MODEL_FORMATS, PARENT_FILE, MlflowOptions, MlflowTracker, log_study_artifacts, tracking_uri
from transferlab.results.trackers.tensorboard import HPARAMS, TensorBoardOptions, TensorBoardTracker
from transferlab.results.trackers.wandb import WandbOptions, WandbTracker, api_key_configured, wandb_mode

__all__ = [
    "HPARAMS",
    "LOG_MODEL_FORMATS",
    "PARENT_FILE",
    "MlflowOptions",
    "MlflowTracker",
    "TensorBoardOptions",
    "TensorBoardTracker",
    "WandbOptions",
    "WandbTracker",
    "api_key_configured",
    "log_study_artifacts",
    "tracking_uri",
    "wandb_mode",
]
