"""The run directory: opening (lock, resume, overwrite, config-change check), writing, failure records,
the metrics schema, and reading runs and study folders back."""

from transferlab.rundir.metrics import METRICS_FILE, SCHEMA_VERSION, RunMetrics, code_version
from transferlab.rundir.predictions import TestPredictions, load_test_predictions
from transferlab.rundir.read import RUN_ACTIONS, ExperimentRuns, Run, RunActions, StudyRuns, load_run, read_history, read_run, read_study
from transferlab.rundir.rundir import HARMLESS_KEYS, ConfigChange, Opening, RunDir, RunError, RunStopped, config_changes, run_lock

__all__ = [
    "HARMLESS_KEYS",
    "RUN_ACTIONS",
    "METRICS_FILE",
    "SCHEMA_VERSION",
    "ConfigChange",
    "ExperimentRuns",
    "Opening",
    "Run",
    "RunActions",
    "RunDir",
    "RunError",
    "RunMetrics",
    "RunStopped",
    "StudyRuns",
    "TestPredictions",
    "code_version",
    "config_changes",
    "load_run",
    "load_test_predictions",
    "read_history",
    "read_run",
    "read_study",
    "run_lock",
]
