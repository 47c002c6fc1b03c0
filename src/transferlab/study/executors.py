"""Executors: where the runs of a study execute. Peers behind one small interface, found by name.

* ``sequential`` — one after another in this process (the default; a run prints its own progress).
* ``local`` — a pool of N warm worker processes on this machine (``spawn``, started once per slot, each runs many
  runs: the imports are paid once), GPUs dealt round-robin through ``CUDA_VISIBLE_DEVICES`` (fixed per slot), CPU
  cores split over the slots (``torch.set_num_threads``). A run whose worker dies (SIGKILL, out of memory) is retried
  from its newest checkpoint on a fresh worker for its slot.
* ``ray`` — one Ray task per run with the experiment's ``resources``; Ray retries a task whose worker died.
* ``slurm`` — one Slurm job per run through submitit, with ``afterok`` dependencies.

Every executor runs the same function, ``worker.execute_run``; the scheduler (``runner``) decides what
is ready, the executor only starts it and reports what finished (``Outcome``).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from transferlab.config import ExecutorConfig, Resources
from transferlab.registry import Registry
from transferlab.rundir import RunError
from transferlab.study.worker import Outcome, RunJob, WarmWorker, attempts_of, execute_run

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "RayExecutor", "SequentialExecutor", "SlurmExecutor", "close_pool", "die_with_parent",
           "slurm_parameters", "visible_devices"]


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


def _pool_main(conn: Any, env: dict[str, str], parent: int | None = None) -> None:
    """A worker of the ``local`` pool: runs the jobs that arrive on ``conn`` one after another and sends each one's
    ``Outcome`` back; ends on ``None`` or when the driver's end of the pipe closes (the driver itself: ``die_with_parent``)."""
    if parent is not None:
        die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it stops the workers itself
    os.environ.update(env)  # the slot's CUDA_VISIBLE_DEVICES, before anything initialises CUDA
    worker = WarmWorker()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the driver closed the pool
            return
        if job is None:
            return
        conn.send(worker.run(job))


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
    """The slot's worker process, alive between runs (None: not started yet, or it died and was reaped)."""
    conn: Any = None
    """The driver's end of the pipe to the worker: jobs go out, outcomes come back."""
    job: RunJob | None = None
    """The run on this slot (None: the slot is free)."""
    resources: Resources | None = None
    tries: int = 0
    started: float = 0.0


@EXECUTORS.register("local")
class LocalExecutor(Executor):
    """``workers`` slots on this machine, each a warm worker process that runs one run at a time, many in a row.

    A worker is started (``spawn``) at its slot's first run and kept for the next ones, so the imports and the
    process's one-off costs are paid once per slot, not once per run; ``WarmWorker`` resets what a run leaves in the
    process. A worker that dies mid-run (SIGKILL, segfault, out of memory) is seen through its pipe and its process
    sentinel; the slot gets a fresh worker and the run is retried from its newest checkpoint (``retries`` times). The
    workers end with the executor (``shutdown``, or when it is garbage-collected after the study) and with the driver
    (``die_with_parent``)."""

    def __init__(self, cfg: ExecutorConfig, study_dir: Path) -> None:
        super().__init__(cfg, study_dir)
        devices = visible_devices()
        n = cfg.workers or max(1, len(devices))
        cores = os.cpu_count() or 1
        threads = cfg.threads or max(1, cores // n)
        self.slots = [_Slot(i, {"CUDA_VISIBLE_DEVICES": devices[i % len(devices)]} if devices else {}, threads) for i in range(n)]
        self._ctx = mp.get_context("spawn")  # fork would copy this process's threads and CUDA state
        # The scheduler has no "study finished" call: the pool closes when this executor is collected (or at exit).
        self._close = weakref.finalize(self, close_pool, self.slots)

    def capacity(self) -> int:
        return len(self.slots)

    def threads_for(self, resources: Resources) -> int | None:
        return self.slots[0].threads

    def submit(self, job: RunJob, resources: Resources, after: list[str] | None = None) -> None:
        slot = next(s for s in self.slots if s.job is None)
        job.env = {**job.env, **slot.env}
        job.threads = slot.threads
        slot.job, slot.resources, slot.tries = job, resources, 0
        try:
            self._start(slot)
        except BaseException:
            slot.job = None  # the scheduler records the run failed; the slot stays usable
            raise

    def _start(self, slot: _Slot) -> None:
        """Send the slot's run to its worker (a fresh one if it has none or it died)."""
        assert slot.job is not None
        if slot.proc is None or not slot.proc.is_alive():
            self._spawn(slot)
        slot.tries += 1
        slot.started = time.time()
        try:
            slot.conn.send(slot.job)
        except OSError:  # the worker died this instant: wait() sees it and retries like any death
            pass

    def _spawn(self, slot: _Slot) -> None:
        _reap(slot)
        ours, theirs = self._ctx.Pipe()
        slot.proc = self._ctx.Process(target=_pool_main, args=(theirs, slot.env, os.getpid()),
                                      name=f"transferlab-worker-{slot.index}", daemon=False)  # a daemon may not start DataLoader workers
        slot.proc.start()
        theirs.close()  # the worker holds the only other end: its death is an EOF here
        slot.conn = ours

    def wait(self, timeout: float) -> list[Outcome]:
        deadline = time.time() + timeout
        while True:
            busy = [s for s in self.slots if s.job is not None]
            if not busy:
                return []
            mp_connection.wait([s.conn for s in busy] + [s.proc.sentinel for s in busy], max(0.0, deadline - time.time()))
            done = [o for s in busy if (o := self._collect(s)) is not None]
            if done or time.time() >= deadline:
                return done

    def _collect(self, slot: _Slot) -> Outcome | None:
        """The slot's outcome if its run finished; a dead worker is replaced and the run retried (bounded), giving None."""
        assert slot.job is not None
        outcome: Outcome | None = None
        if slot.conn.poll():  # an outcome, or the EOF of a dead worker
            with contextlib.suppress(EOFError, OSError, pickle.UnpicklingError):
                outcome = slot.conn.recv()
        elif slot.proc.is_alive():
            return None
        job = slot.job
        if outcome is None:
            code = _reap(slot)
            if slot.tries <= self.cfg.retries:
                self._start(slot)  # a fresh worker; the run continues from its newest checkpoint (the attempt file says it is a retry)
                return None
            why = f"killed by signal {-code} ({signal.Signals(-code).name})" if code is not None and code < 0 else f"exit code {code}"
            outcome = _outcome_from_error(job, f"WorkerDied: the worker process died ({why}) on all {slot.tries} attempts", slot.tries)
        outcome.attempts = slot.tries
        slot.job = None
        return outcome

    def where(self) -> dict[str, str]:
        return {s.job.name: f"worker {s.index} (pid {s.proc.pid})" for s in self.slots if s.job is not None and s.proc is not None}

    def shutdown(self) -> None:
        for s in self.slots:
            if s.proc is not None and s.proc.is_alive():
                s.proc.terminate()
        for s in self.slots:
            _reap(s, timeout=30)
            s.job = None


def _reap(slot: _Slot, timeout: float = 5.0) -> int | None:
    """End the slot's worker (killed if it does not end within ``timeout`` s) and close its pipe; its exit code."""
    code = None
    if slot.proc is not None:
        slot.proc.join(timeout)
        if slot.proc.is_alive():
            slot.proc.kill()
            slot.proc.join()
        code = slot.proc.exitcode
        slot.proc.close()
    if slot.conn is not None:
        slot.conn.close()
    slot.proc = slot.conn = None
    return code


def close_pool(slots: list[_Slot]) -> None:
    """Stop a pool's workers: idle ones are told to end (not waited for: they exit on their own and multiprocessing
    reaps them), busy ones (a driver that gives up mid-run) are terminated and waited for."""
    for s in slots:
        if s.proc is None:
            continue
        if s.job is None and s.proc.is_alive():
            with contextlib.suppress(OSError):
                s.conn.send(None)
            s.conn.close()
            s.proc = s.conn = None
        else:
            s.proc.terminate()
            _reap(s)


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
