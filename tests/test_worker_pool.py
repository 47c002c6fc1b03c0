"""The ``local`` executor's warm worker pool: which GPU each slot sees, many runs per worker, what is reset between runs."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from rich.console import Console

from transferlab.config import ExecutorConfig, Resources, parse_study
from transferlab.engine.features import STORE
from transferlab.study import plan_study, run_study
from transferlab.study import worker as worker_module
from transferlab.study.executors import LocalExecutor
from transferlab.study.worker import TOKEN_FILE, Outcome, RunJob, WarmWorker

QUIET = Console(quiet=True)


@pytest.mark.parametrize("parent, count, workers, expected", [
    ("3", 1, 2, ["3", "3"]),                    # the parent's only card, not card 0
    ("1,3", 2, 3, ["1", "3", "1"]),             # round-robin over the parent's list
    ("GPU-aa,GPU-bb", 2, 2, ["GPU-aa", "GPU-bb"]),  # UUIDs kept as they are
    (None, 2, 3, ["0", "1", "0"]),              # no variable: torch's indices
])
def test_local_workers_get_cards_from_the_parents_visible_list(tmp_path, monkeypatch, parent, count, workers, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if parent is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    ex = LocalExecutor(ExecutorConfig(name="local", workers=workers), tmp_path)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in ex.slots] == expected


def test_local_workers_without_a_gpu_get_no_cuda_variable(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    ex = LocalExecutor(ExecutorConfig(name="local"), tmp_path)
    assert len(ex.slots) == 1 and ex.slots[0].env == {}


# --------------------------------------------------------------------------------------------
# the warm pool: one process per slot runs many runs


def _study(name: str, n: int, extra: list[dict] | None = None) -> dict:
    return {
        "study": name,
        "defaults": {"data": {"dataset": "synthetic", "synthetic_classes": 4, "synthetic_size": 64, "val_fraction": 0.25},
                     "model": {"backbone": "transferlab_cnn"},
                     "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "progress": False, "accelerator": "cpu",
                               "precision": "32-true", "checkpoint_every_minutes": None}},
        "experiments": [{"name": f"r{i}", "seed": i} for i in range(n)] + (extra or []),
    }


def _jobs(raw: dict, study_dir: Path, token: str = "t0ken") -> list[RunJob]:
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / TOKEN_FILE).write_text(token)
    return [RunJob(r.name, r.cfg, str(study_dir), token, log=True, shared_features=True) for r in plan_study(parse_study(raw), study_dir)]


def _run(ex: LocalExecutor, job: RunJob) -> Outcome:
    ex.submit(job, Resources())
    deadline = time.time() + 300
    while time.time() < deadline:
        if done := ex.wait(1.0):
            return done[0]
    raise AssertionError(f"{job.name} did not finish")


def _status(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` field in kB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_one_worker_runs_twenty_runs_without_growing(tmp_path):
    """20 runs (a trained CNN and a cached linear probe, alternating) on one warm worker: one process, its memory and
    open files level off (each run's log file, mmapped features and models are released)."""
    probe = {"model": {"backbone": "test_efficientnet"}, "strategy": {"name": "linear_probe"}, "train": {"cache": "on"}}
    raw = _study("pool20", 0, [{"name": f"cnn{i}", "seed": i} if i % 2 == 0 else {"name": f"probe{i}", "seed": i, **probe} for i in range(20)])
    ex = LocalExecutor(ExecutorConfig(name="local", workers=1, threads=1), tmp_path / "pool20")
    rss, fds, pids = [], [], set()
    for job in _jobs(raw, tmp_path / "pool20"):
        out = _run(ex, job)
        assert out.status == "ok" and out.attempts == 1, out.error
        pid = ex.slots[0].proc.pid
        pids.add(pid)
        rss.append(_status(pid, "VmRSS"))
        fds.append(len(list(Path(f"/proc/{pid}/fd").iterdir())))
    print(f"\nworker RSS after each run (MB): {[round(r / 1024) for r in rss]}\nopen files: {fds}")
    assert len(pids) == 1  # one warm process ran all twenty
    assert fds[-1] <= fds[3] + 2  # no file handle left per run (log files, feature files)
    assert rss[-1] - rss[5] < 64 * 1024, f"RSS grew {(rss[-1] - rss[5]) / 1024:.0f} MB from run 6 to run 20"
    ex.shutdown()
    assert _gone(pid, 30)


def test_a_study_on_one_worker_reuses_it_and_the_pool_ends_with_the_study(tmp_path):
    res = run_study(parse_study(_study("reuse", 3)), tmp_path / "runs", console=QUIET, executor="local", workers=1)
    assert res.ok and len({o.worker for o in res.outcomes.values()}) == 1  # the three runs on one warm process
    pid = int(res.outcomes["r0"].worker.rsplit(":", 1)[1])
    gc.collect()
    assert _gone(pid, 30), "the pool's worker outlived its study"


def test_a_worker_that_died_while_idle_is_replaced_at_the_next_run(tmp_path):
    jobs = _jobs(_study("idle", 2), tmp_path / "idle")
    ex = LocalExecutor(ExecutorConfig(name="local", workers=1, threads=1), tmp_path / "idle")
    assert _run(ex, jobs[0]).status == "ok"
    first = ex.slots[0].proc.pid
    os.kill(first, signal.SIGKILL)
    assert _gone(first, 30)
    out = _run(ex, jobs[1])
    # the death is seen when the next run is handed over at the latest (its pipe then fails): that run goes to a fresh
    # worker, as a first attempt or a retry (this CPU: a retry — is_alive() still answered True after the kill)
    assert out.status == "ok" and out.attempts in (1, 2) and ex.slots[0].proc.pid != first
    ex.shutdown()


# --------------------------------------------------------------------------------------------
# what a warm worker resets between runs


def test_a_warm_worker_undoes_what_a_run_leaves_in_the_process(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = logging.getLogger("transferlab.test.pool")
    store_seen: list[int] = []

    def leaky_run(job: RunJob, console=None) -> Outcome:
        store_seen.append(STORE.bytes_in_memory)
        if not STORE.bytes_in_memory:  # a feature set this study's later runs may share
            STORE.compute(job.name, {}, 4, (3,), torch.float32, [(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64))], None)
        log.addHandler(logging.FileHandler(tmp_path / f"{job.name}.txt"))
        plt.figure()
        warnings.simplefilter("ignore")
        return Outcome(job.name, "ok")

    monkeypatch.setattr(worker_module, "execute_run", leaky_run)
    filters = list(warnings.filters)
    cfg = plan_study(parse_study(_study("x", 1)), tmp_path / "x")[0].cfg
    w = WarmWorker()
    for name, study in (("a", "x"), ("b", "x"), ("c", "y")):
        assert w.run(RunJob(name, cfg, str(tmp_path / study))).status == "ok"
        assert not [h for h in log.handlers if isinstance(h, logging.FileHandler)]  # closed and removed with the run
        assert plt.get_fignums() == [] and warnings.filters == filters
    assert store_seen[1] > 0 and store_seen[2] == 0  # kept within study x, forgotten for study y
    STORE.clear()
