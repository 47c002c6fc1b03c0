"""Studies: the graph of runs (``plan``), where they execute (``executors``), searches, and the scheduler (``runner``)."""

from transferlab.study.executors import EXECUTORS, Executor, slurm_parameters
from transferlab.study.plan import PlannedRun, dependency_levels, plan_study, trial_name
from transferlab.study.runner import Interrupted, StudyResult, resolve_executor, run_study, summarize
from transferlab.study.search import SearchDriver
from transferlab.study.worker import Outcome, RunJob, execute_run

__all__ = [
    "EXECUTORS",
    "Executor",
    "Interrupted",
    "Outcome",
    "PlannedRun",
    "RunJob",
    "SearchDriver",
    "StudyResult",
    "dependency_levels",
    "execute_run",
    "plan_study",
    "resolve_executor",
    "run_study",
    "slurm_parameters",
    "summarize",
    "trial_name",
]
