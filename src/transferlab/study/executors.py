"""Executors: where the runs of a study execute. Peers behind one small interface, found by name.

* ``sequential`` — one after another in this process (the default; a run prints its own progress).
* ``local`` — N worker slots on this machine, one fresh process per run (``spawn``), GPUs dealt
  round-robin through ``CUDA_VISIBLE_DEVICES``, CPU cores split over the slots (``torch.set_num_threads``).
  A run whose process dies (SIGKILL, out of memory) is retried from its newest checkpoint.
* ``ray`` — one Ray task per run with the experiment's ``resources``; Ray retries a task whose worker died.
* ``slurm`` — one Slurm job per run through submitit, with ``afterok`` dependencies.

Every executor runs the same function, ``worker.execute_run``; the scheduler (``runner``) decides what
is ready, the executor only starts it and reports what finished (``Outcome``).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from transferlab.config import ExecutorConfig, Resources
from transferlab.files import read_json, write_json
from transferlab.registry import Registry
from transferlab.rundir import RunError
from transferlab.study.worker import Outcome, RunJob, attempts_of, execute_run

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "die_with_parent", "RayExecutor", "SequentialExecutor", "SlurmExecutor", "slurm_parameters",
           "visible_devices"]


class Executor:
    """Starts runs and reports the ones that finished. Subclasses set ``name`` and implement the four methods."""

    name = ""
    parallel = True
    """Runs overlap: their output goes to log files and the study shows one live table."""
    submits_ahead = False
    """Runs may be submitted before their dependencies finished (the cluster holds them: Slurm ``afterok``)."""

    def __init__(self, cfg: ExecutorConfig, study_dir: Path) -> None:
        self.cfg, self.study_dir = cfg, study_dir

    def capacity(self) -> int:
        """How many runs may be in flight at once."""
        return self.cfg.workers or 1_000_000

    def threads_for(self, resources: Resources) -> int | None:
        """torch threads of one run (``None``: leave torch's default)."""
        return self.cfg.threads or resources.cpus

    def submit(self, job: RunJob, resources: Resources, after: list[str] | None = None) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def wait(self, timeout: float) -> list[Outcome]:  # pragma: no cover - interface
        """Outcomes of runs that finished since the last call (waits up to ``timeout`` s for one)."""
        raise NotImplementedError

    def where(self) -> dict[str, str]:
        """Run name -> the worker it runs on, for the runs in flight."""
        return {}

    def shutdown(self) -> None:
        """Stop everything still running (Ctrl-C); their run directories keep their checkpoints."""


EXECUTORS: Registry[type[Executor]] = Registry("executor", "executor: where the runs of a study execute")


def _outcome_from_error(job: RunJob, error: str, attempts: int) -> Outcome:
    return Outcome(job.name, "failed", error, attempts=attempts)


# --------------------------------------------------------------------------------------------
# sequential: this process


@EXECUTORS.register("sequential")
class SequentialExecutor(Executor):
    """One run after another in this process; Ctrl-C reaches the run directly."""

    parallel = False

    def __init__(self, cfg: ExecutorConfig, study_dir: Path, console: Console | None = None) -> None:
        super().__init__(cfg, study_dir)
        self.console = console
        self._done: list[Outcome] = []

    def capacity(self) -> int:
        return 1

    def threads_for(self, resources: Resources) -> int | None:
        return self.cfg.threads  # torch's own default unless asked

    def submit(self, job: RunJob, resources: Resources, after: list[str] | None = None) -> None:
        self._done.append(execute_run(job, self.console))

    def wait(self, timeout: float) -> list[Outcome]:
        done, self._done = self._done, []
        return done


# --------------------------------------------------------------------------------------------
# local: worker processes on this machine


PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_S = 1.0


def die_with_parent(parent: int) -> None:
    """End this process when process ``parent`` (the driver that started it) dies, even by SIGKILL.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, the kernel kills this process when its parent exits. Everywhere
    (and in case the call is unavailable): a daemon thread that checks every second whether the parent is still
    this process's parent (an orphan is re-parented to init or a subreaper). A worker that outlived its driver
    would go on training unsupervised and keep its run directory's lock, so ``--resume`` could not continue it.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl (another libc): the watchdog below still ends it
            pass
    if os.getppid() != parent:  # the driver died before the line above took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="transferlab-parent-watchdog", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)  # like the kernel's PDEATHSIG: the checkpoints on disk are whole (atomic writes)


def _local_main(job: RunJob, result_path: str, parent: int | None = None) -> None:
    """A local worker process: run the job, leave the outcome in ``result_path`` (no file: the process died)."""
    if parent is not None:
        die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it stops the workers itself
    outcome = execute_run(job)
    write_json(Path(result_path), asdict(outcome))


def visible_devices() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries for the worker slots (empty: no GPU).

    The parent's own ``CUDA_VISIBLE_DEVICES`` (ids, UUIDs or MIG names) is kept: a driver started with ``3`` deals card 3
    to its workers, not card 0. Without it, torch's device indices ``0 … n-1``."""
    count = torch.cuda.device_count()
    if not count:
        return []
    parent = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return parent[:count] if parent else [str(i) for i in range(count)]


@dataclass
class _Slot:
    index: int
    env: dict[str, str]
    threads: int
    proc: Any = None
    job: RunJob | None = None
    resources: Resources | None = None
    tries: int = 0
    started: float = 0.0


@EXECUTORS.register("local")
class LocalExecutor(Executor):
    """``workers`` slots on this machine; each run is a fresh process (a crash or leak cannot touch the others)."""

    def __init__(self, cfg: ExecutorConfig, study_dir: Path) -> None:
        super().__init__(cfg, study_dir)
        devices = visible_devices()
        n = cfg.workers or max(1, len(devices))
        cores = os.cpu_count() or 1
        threads = cfg.threads or max(1, cores // n)
        self.slots = [_Slot(i, {"CUDA_VISIBLE_DEVICES": devices[i % len(devices)]} if devices else {}, threads) for i in range(n)]
        self._ctx = mp.get_context("spawn")  # fork would copy this process's threads and CUDA state

    def capacity(self) -> int:
        return len(self.slots)

    def threads_for(self, resources: Resources) -> int | None:
        return self.slots[0].threads

    def _result_path(self, job: RunJob) -> Path:
        return self.study_dir / ".attempts" / f"{job.name}.outcome.json"

    def submit(self, job: RunJob, resources: Resources, after: list[str] | None = None) -> None:
        slot = next(s for s in self.slots if s.proc is None)
        job.env = {**job.env, **slot.env}
        job.threads = slot.threads
        slot.job, slot.resources, slot.tries = job, resources, 0
        self._start(slot)

    def _start(self, slot: _Slot) -> None:
        assert slot.job is not None
        self._result_path(slot.job).unlink(missing_ok=True)
        slot.proc = self._ctx.Process(target=_local_main, args=(slot.job, str(self._result_path(slot.job)), os.getpid()),
                                      name=f"transferlab-{slot.job.name}", daemon=False)
        slot.tries += 1
        slot.started = time.time()
        slot.proc.start()

    def wait(self, timeout: float) -> list[Outcome]:
        deadline = time.time() + timeout
        while True:
            done = [o for s in self.slots if s.proc is not None and not s.proc.is_alive() and (o := self._collect(s)) is not None]
            if done or time.time() >= deadline or all(s.proc is None for s in self.slots):
                return done
            time.sleep(0.1)

    def _collect(self, slot: _Slot) -> Outcome | None:
        """The finished slot's outcome; a dead worker is restarted (bounded) and gives None meanwhile."""
        assert slot.job is not None
        slot.proc.join()
        code, job = slot.proc.exitcode, slot.job
        path = self._result_path(job)
        if path.is_file():
            outcome = Outcome(**read_json(path))
            path.unlink(missing_ok=True)
        elif slot.tries <= self.cfg.retries:
            self._start(slot)  # continues from the newest checkpoint (the attempt file says it is a retry)
            return None
        else:
            why = f"killed by signal {-code} ({signal.Signals(-code).name})" if code is not None and code < 0 else f"exit code {code}"
            outcome = _outcome_from_error(job, f"WorkerDied: the worker process died ({why}) on all {slot.tries} attempts", slot.tries)
        outcome.attempts = slot.tries
        slot.proc, slot.job = None, None
        return outcome

    def where(self) -> dict[str, str]:
        return {s.job.name: f"worker {s.index} (pid {s.proc.pid})" for s in self.slots if s.job is not None and s.proc is not None}

    def shutdown(self) -> None:
        for s in self.slots:
            if s.proc is not None and s.proc.is_alive():
                s.proc.terminate()
        for s in self.slots:
            if s.proc is not None:
                s.proc.join(timeout=30)
                if s.proc.is_alive():
                    s.proc.kill()


# --------------------------------------------------------------------------------------------
# ray: tasks on a Ray cluster

RAY_INSTALL = "pip install 'transferlab[ray]'"


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RunError(f"executor ray: Ray is not installed: {RAY_INSTALL}") from None
    return ray


@EXECUTORS.register("ray")
class RayExecutor(Executor):
    """One Ray task per run (``resources`` -> ``num_cpus`` / ``num_gpus`` / ``memory``); Ray retries a dead worker's task."""

    def __init__(self, cfg: ExecutorConfig, study_dir: Path) -> None:
        super().__init__(cfg, study_dir)
        self.ray = require_ray()
        if not self.ray.is_initialized():
            kwargs: dict[str, Any] = {"address": cfg.ray_address} if cfg.ray_address else {"num_cpus": os.cpu_count()}
            self.ray.init(**kwargs, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        self._remote = self.ray.remote(execute_run)
        self._refs: dict[Any, RunJob] = {}

    def submit(self, job: RunJob, resources: Resources, after: list[str] | None = None) -> None:
        opts: dict[str, Any] = {"num_cpus": resources.cpus, "num_gpus": resources.gpus, "max_retries": self.cfg.retries,
                                "retry_exceptions": False, "name": job.name}
        if resources.mem_gb:
            opts["memory"] = int(resources.mem_gb * 2**30)
        job.threads = self.cfg.threads or resources.cpus
        self._refs[self._remote.options(**opts).remote(job)] = job

    def wait(self, timeout: float) -> list[Outcome]:
        if not self._refs:
            return []
        ready, _ = self.ray.wait(list(self._refs), num_returns=len(self._refs), timeout=timeout)
        out = []
        for ref in ready:
            job = self._refs.pop(ref)
            try:
                out.append(self.ray.get(ref))
            except self.ray.exceptions.RayError as e:  # the worker died more often than max_retries, the node was lost, ...
                tries = attempts_of(self.study_dir, job.name, job.token)
                out.append(_outcome_from_error(job, f"WorkerDied: {type(e).__name__}: {str(e).splitlines()[0]}", tries))
        return out

    def where(self) -> dict[str, str]:
        return {job.name: "ray task" for job in self._refs.values()}

    def shutdown(self) -> None:
        for ref in list(self._refs):
            self.ray.cancel(ref, force=True)
        self._refs.clear()


# --------------------------------------------------------------------------------------------
# slurm: jobs through submitit

SLURM_INSTALL = "pip install 'transferlab[slurm]'"


def require_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise RunError(f"executor slurm: submitit is not installed: {SLURM_INSTALL}") from None
    return submitit


def slurm_parameters(cfg: ExecutorConfig, resources: Resources, job_name: str, after: list[str] | None = None) -> dict[str, Any]:
    """submitit ``update_parameters`` for one run: size from ``resources`` (or the Slurm options), ``afterok`` dependencies."""
    o = cfg.slurm
    params: dict[str, Any] = {
        "timeout_min": o.time_min, "name": job_name,
        "cpus_per_task": o.cpus_per_task or resources.cpus, "tasks_per_node": 1, "nodes": 1,
    }
    gpus = o.gpus_per_node if o.gpus_per_node is not None else int(resources.gpus)
    if gpus:
        params["gpus_per_node"] = gpus
    if o.mem_gb or resources.mem_gb:
        params["mem_gb"] = o.mem_gb or resources.mem_gb
    extra = dict(o.additional)
    if after:
        extra["dependency"] = "afterok:" + ":".join(after)
        extra["kill-on-invalid-dep"] = "yes"  # a failed dependency cancels the job instead of leaving it pending forever
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(o, key):
            params[f"slurm_{key}"] = getattr(o, key)
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


@EXECUTORS.register("slurm")
class SlurmExecutor(Executor):
    """One Slurm job per run (submitit); a run's job waits on its dependencies' jobs (``afterok``)."""

    def __init__(self, cfg: ExecutorConfig, study_dir: Path) -> None:
        super().__init__(cfg, study_dir)
        self.submitit = require_submitit()
        self.submits_ahead = cfg.slurm.cluster == "slurm"  # submitit's local backend knows no dependencies
        self._jobs: dict[str, tuple[Any, RunJob]] = {}
        self.job_ids: dict[str, str] = {}

    def executor(self, resources: Resources, job_name: str, after: list[str] | None) -> Any:
        ex = self.submitit.AutoExecutor(folder=self.study_dir / "slurm" / "%j", cluster=self.cfg.slurm.cluster)
        params = slurm_parameters(self.cfg, resources, job_name, after)
        if self.cfg.slurm.cluster != "slurm":  # the local backends take only the generic parameters
            params = {k: v for k, v in params.items() if not k.startswith("slurm_") and k != "mem_gb"}
        ex.update_parameters(**params)
        return ex

    def submit(self, job: RunJob, resources: Resources, after: list[str] | None = None) -> None:
        deps = [self.job_ids[n] for n in after or [] if n in self.job_ids] if self.submits_ahead else []
        job.threads = self.cfg.threads or resources.cpus
        submitted = self.executor(resources, job.name, deps).submit(execute_run, job)
        self._jobs[job.name] = (submitted, job)
        self.job_ids[job.name] = str(submitted.job_id)

    def wait(self, timeout: float) -> list[Outcome]:
        deadline = time.time() + timeout
        while True:
            out = []
            for name, (sj, job) in list(self._jobs.items()):
                if sj.done():
                    del self._jobs[name]
                    try:
                        out.append(sj.result())
                    except Exception as e:  # noqa: BLE001 - a job that failed, was cancelled (dependency) or timed out
                        out.append(_outcome_from_error(job, f"SlurmJobFailed: job {sj.job_id}: {str(e).splitlines()[0][:300]}",
                                                       attempts_of(self.study_dir, name, job.token)))
            if out or time.time() >= deadline or not self._jobs:
                return out
            time.sleep(0.5)

    def where(self) -> dict[str, str]:
        return {name: f"slurm job {sj.job_id}" for name, (sj, _) in self._jobs.items()}

    def shutdown(self) -> None:
        for sj, _ in self._jobs.values():
            try:
                sj.cancel(check=False)
            except Exception:  # noqa: BLE001, S110 - best effort on Ctrl-C
                pass
