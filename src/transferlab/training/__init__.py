"""Training loop (Lightning Fabric), optimizers, schedules and safetensors checkpoints."""

from transferlab.training.checkpoint import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint
from transferlab.training.engine import FitResult, TrainingDiverged, fit
from transferlab.training.optim import make_optimizer, make_scheduler

__all__ = [
    "CheckpointError",
    "FitResult",
    "TrainingDiverged",
    "fit",
    "load_checkpoint",
    "load_model_weights",
    "make_optimizer",
    "make_scheduler",
    "save_checkpoint",
]
