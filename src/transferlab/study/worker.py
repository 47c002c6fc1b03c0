"""What a worker does with one run, whatever the executor: ``execute_run(job) -> outcome``.

The same function runs in this process (``sequential``), in a worker process (``local``), as a Ray task
or as a Slurm job, so a run behaves the same everywhere: it sets its thread count, checks that it
sees the study folder, and calls ``run_experiment`` (the run directory's lock stays the single-writer
guarantee). A retry after a dead worker is recognised by the attempt file the first attempt left
(``<study>/.attempts/<run>.json``, holding this study invocation's token): it continues the run from
its newest checkpoint (``resume``) instead of refusing the half-written directory.

``WarmWorker`` is the same function in a long-lived process that runs many runs (the ``local`` executor's pool):
after each run it undoes what a run may leave behind in the process (file logging handlers, matplotlib figures,
warning filters, garbage), and forgets the in-memory feature store when the next run belongs to another study.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from transferlab.config import ExperimentConfig
from transferlab.engine.features import STORE
from transferlab.files import read_json, write_json
from transferlab.kinds import run_experiment
from transferlab.rundir import RunError
from transferlab.rundir.rundir import RunRefused
from transferlab.study.search import PruningCallback

__all__ = ["Outcome", "RunJob", "WarmWorker", "execute_run"]

TOKEN_FILE = ".study_token"


@dataclass
class RunJob:
    """Everything a worker needs for one run; picklable (sent to worker processes, Ray, Slurm)."""

    name: str
    cfg: ExperimentConfig
    study_dir: str
    token: str = ""
    """This study invocation's id (also in ``<study_dir>/.study_token``): the shared-filesystem check and retry detection.
    Empty for runs in the driver's own process (``sequential``), which need neither."""
    resume: bool = False
    overwrite: bool = False
    threads: int | None = None
    log: bool = False
    """Write the run's console output to ``<study_dir>/logs/<run>.log`` instead of the terminal (parallel executors)."""
    trial: dict[str, Any] | None = None
    """For a search trial: ``{storage, study, trial_id, metric, direction}`` so the loop can report and be pruned."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment of the worker's slot (``CUDA_VISIBLE_DEVICES``), set before the run."""
    shared_features: bool = False
    """Other workers of the study run at the same time: frozen-feature sets are computed under a lock and written to
    the study's disk store, so runs on the same backbone share one pass (``engine.features``)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.study_dir) / self.name


@dataclass
class Outcome:
    """What came of a run: ``ok``, ``failed``, ``pruned`` or ``skipped``, with the reason, where and how long."""

    name: str
    status: str
    error: str | None = None
    worker: str = ""
    seconds: float = 0.0
    attempts: int = 1
    value: float | None = None
    """For a search trial: the objective (the best epoch's validation metric)."""
    started: float = 0.0
    ended: float = 0.0
    """Wall-clock start and end (``time.time()``) of the last attempt."""
    refused: bool = False
    """The run's folder was not taken (``RunRefused``: held by another process, or made earlier or with another
    config): nothing may be written into it, not even this failure."""


def execute_run(job: RunJob, console: Console | None = None) -> Outcome:
    """Run ``job`` here; never raises for a failed run (the outcome says it), only for Ctrl-C.

    ``console``: where an in-process run prints (``sequential``); elsewhere a fresh one, or the log file.
    """
    t0, started = time.perf_counter(), time.time()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    os.environ.update(job.env)
    threads_before = torch.get_num_threads()
    if job.threads:
        torch.set_num_threads(job.threads)
    attempt, refused = 1, False
    try:
        if job.token:  # a parallel executor: another process or node; in this process (sequential) there is nothing to check
            check_shared_folder(job)
            attempt = _next_attempt(job)
        callbacks = [PruningCallback(**job.trial)] if job.trial is not None else []
        with _console(job, console) as out:
            run_experiment(job.cfg, job.run_dir, resume=job.resume or attempt > 1, overwrite=job.overwrite and attempt == 1,
                           console=out, callbacks=callbacks, shared_features=job.shared_features)
        status, error = "ok", None
    except Exception as e:  # noqa: BLE001 - recorded in the run's metrics.json by run_experiment; reported in the outcome
        status, error = getattr(e, "status", "failed"), f"{type(e).__name__}: {e}"
        refused = isinstance(e, RunRefused)
    finally:
        torch.set_num_threads(threads_before)  # in-process (sequential) runs leave the driver as it was
    return Outcome(job.name, status, error, worker, time.perf_counter() - t0, attempt, _objective(job), started, time.time(), refused)


class WarmWorker:
    """``execute_run`` for a process that runs many runs one after another (a ``local`` pool worker).

    A run starts as it would in a fresh process as far as the run can tell: torch's thread count is restored by
    ``execute_run``; after each run the logging file handlers it added are closed and removed, matplotlib figures
    closed, warning filters restored, the garbage collected (models, memory-mapped feature files, optimiser state)
    and CUDA's cached blocks released. The process-wide feature store (``engine.features.STORE``) is kept between
    runs of one study — runs on one backbone share its sets, within its memory budget — and cleared when a run of
    another study arrives.
    """

    def __init__(self) -> None:
        self.study_dir: str | None = None
        self.runs = 0

    def run(self, job: RunJob) -> Outcome:
        if job.study_dir != self.study_dir:  # another study's feature sets are of no use to this one: free them
            STORE.clear()
            self.study_dir = job.study_dir
        handlers = file_handlers()
        try:
            with warnings.catch_warnings():  # filters a run installs end with it
                return execute_run(job)
        finally:
            self.runs += 1
            for handler, logger in file_handlers().items():
                if handler not in handlers:  # a file a run's logging opened: closed with the run
                    logger.removeHandler(handler)
                    handler.close()
            if (plt := sys.modules.get("matplotlib.pyplot")) is not None:
                plt.close("all")
            gc.collect()
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()


def file_handlers() -> dict[logging.Handler, logging.Logger]:
    """Every ``logging.FileHandler`` attached to a logger of this process, with its logger."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    return {h: lg for lg in loggers for h in lg.handlers if isinstance(h, logging.FileHandler)}


def check_shared_folder(job: RunJob) -> None:
    """The worker sees the study folder the driver wrote (same token): else the runs directory is not shared."""
    token_path = Path(job.study_dir) / TOKEN_FILE
    try:
        seen = token_path.read_text(encoding="utf-8").strip()
    except OSError:
        seen = None
    if seen != job.token:
        raise RunError(
            f"worker {socket.gethostname()} does not see the study folder {job.study_dir} the study was started in "
            f"({token_path} is {'missing' if seen is None else 'from another invocation'}): put --runs-dir on a filesystem every node mounts"
        )


def _next_attempt(job: RunJob) -> int:
    """Count this attempt in ``<study>/.attempts/<run>.json``; > 1 means an earlier attempt of this invocation died."""
    path = Path(job.study_dir) / ".attempts" / f"{job.name}.json"
    try:
        old = read_json(path)
    except (OSError, ValueError):
        old = {}
    attempt = int(old.get("attempt", 0)) + 1 if old.get("token") == job.token else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"token": job.token, "attempt": attempt, "pid": os.getpid(), "host": socket.gethostname()})
    return attempt


def attempts_of(study_dir: str | Path, name: str, token: str) -> int:
    """How many attempts of run ``name`` this invocation (``token``) started (0: none)."""
    try:
        old = read_json(Path(study_dir) / ".attempts" / f"{name}.json")
    except (OSError, ValueError):
        return 0
    return int(old.get("attempt", 0)) if old.get("token") == token else 0


@contextlib.contextmanager
def _console(job: RunJob, console: Console | None) -> Iterator[Console]:
    if not job.log:
        yield console or Console()
        return
    log = Path(job.study_dir) / "logs" / f"{job.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:  # a log, appended per attempt; not a result file
        yield Console(file=f, width=120, force_terminal=False)


def _objective(job: RunJob) -> float | None:
    """A search trial's value: its best epoch's validation metric, from ``metrics.json``."""
    if job.trial is None:
        return None
    try:
        m = read_json(job.run_dir / "metrics.json")
    except (OSError, ValueError):
        return None
    return m.get("best_val") if m.get("monitor") == job.trial["metric"] else _best_from_history(job)


def _best_from_history(job: RunJob) -> float | None:
    """The best per-epoch value of the search metric when the run monitored another one."""
    path = job.run_dir / "history.csv"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        values = [float(r[job.trial["metric"]]) for r in csv.DictReader(f) if r.get(job.trial["metric"]) not in (None, "")]
    if not values:
        return None
    return max(values) if job.trial["direction"] == "maximize" else min(values)
