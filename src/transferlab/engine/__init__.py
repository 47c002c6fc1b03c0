"""The engine: the training loop and its checkpoints, evaluation, optimizers and schedules, distributed
helpers, feature caching, probes and few-shot episodes on features, recorded test predictions."""

from transferlab.engine.checkpointing import LoopCheckpoints, LoopState
from transferlab.engine.distributed import make_fabric, world
from transferlab.engine.evaluation import TTA, TestTimeAugmentation, evaluate, with_tta
from transferlab.engine.loop import Callback, FitResult, Loop, TrainingDiverged, fit, train_one_epoch, validate
from transferlab.engine.optim import OPTIMIZERS, SCHEDULES, make_optimizer, make_scheduler

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "TTA",
    "Callback",
    "FitResult",
    "Loop",
    "LoopCheckpoints",
    "LoopState",
    "TestTimeAugmentation",
    "TrainingDiverged",
    "evaluate",
    "fit",
    "make_fabric",
    "make_optimizer",
    "make_scheduler",
    "train_one_epoch",
    "validate",
    "with_tta",
    "world",
]
