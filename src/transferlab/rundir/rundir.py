"""The run directory: one place that opens, writes and records failures of ``runs/<study>/<run>/``.

A run directory holds everything needed to trust and reuse a result::

    config.yaml          the fully resolved config
    metrics.json         the result (``RunMetrics``): test metrics, timings, weights source, code version, status
    history.csv          per-epoch (or per-step) rows: losses, accuracies, learning rate, seconds
    selection.json       the dataset indices of train / val / test (same seed => same indices)
    checkpoints/         best.safetensors, last.safetensors (+ .json copies of their metadata)

Opening it (``RunDir.open``) takes the single-writer lock and decides, from what is there and the
``resume`` / ``overwrite`` flags, whether the run is new, finished (skipped), continued or replaced.
Before a finished run is reused or an interrupted one continued, the config it was made with is
compared with the config asked for now: a change that can affect results is refused with the list
of changed keys, so ``--resume`` never shows an old result under a new study file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

from transferlab.config import ConfigError, ExperimentConfig, from_dict, load_yaml
from transferlab.config.schema import resolve_as_recorded
from transferlab.files import read_json, write_csv, write_json, write_text
from transferlab.rundir.metrics import METRICS_FILE, RunMetrics, code_version

try:
    import fcntl
except ImportError:  # no fcntl (Windows): run directories are written unlocked
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "HARMLESS_KEYS", "ConfigChange", "Opening", "RunDir", "RunError", "RunLocked", "RunRefused", "RunStopped", "config_changes", "flatten",
    "hold_lock", "is_harmless", "pid_alive", "run_lock", "stale_holder", "study_lock",
]

HARMLESS_KEYS = frozenset({
    "notes",
    "train.progress",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes",
    "data.num_workers",  # the PIL path's batches do not depend on the worker count (seeded per image)
    "tracking",  # where the run is also logged (and every tracking.<name>.<option> below it)
})
"""Keys whose change cannot affect a run's results: ``--resume`` allows them and lists them (a key here covers the keys below it)."""


def is_harmless(key: str) -> bool:
    """``key`` (dotted) is in ``HARMLESS_KEYS`` or below one of them (``tracking.mlflow.tracking_uri``)."""
    return any(key == k or key.startswith(k + ".") for k in HARMLESS_KEYS)


class RunError(RuntimeError):
    """A run directory is missing, incomplete, in use, or was made with another config. The message names the folder."""


class RunRefused(RunError):
    """The run directory was not taken — held by another process, made earlier (no ``--resume`` / ``--overwrite``), or
    made with another config: nothing was written into it, and nothing may be (not even a failure record)."""


class RunLocked(RunRefused):
    """Refused: another live process holds the lock (of a run directory or a study folder). Nothing was written."""


# --------------------------------------------------------------------------------------------
# locks: one writer per run directory, one driver per study folder

_HOLDER = re.compile(r"pid (\d+) on (\S+)")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # Linux: a zombie (killed, not yet reaped) holds nothing
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stale_holder(holder: str) -> bool:
    """A lock holder (``pid N on HOST``) that is a process of this host which no longer exists."""
    m = _HOLDER.search(holder)
    return m is not None and m.group(2) == socket.gethostname() and not pid_alive(int(m.group(1)))


def _same_file(path: Path, f: Any) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def hold_lock(path: Path, busy: str, hint: str, wait: bool = False) -> Iterator[None]:
    """Hold the exclusive ``flock`` of ``path`` (created if missing) and write ``pid N on HOST`` into it.

    Held by another live process: ``RunLocked("<busy> by another process (pid N on HOST); <hint>")``.
    An ``flock`` is released by the kernel when its holder dies, but a child that inherited the
    descriptor (a forked data-loader process, a worker whose driver was killed) keeps it held: when the
    recorded holder is a process of this host that no longer exists, the lock is stale and is broken
    (the file is replaced by a fresh one, which is locked instead). A live holder, or one on another
    host (its liveness cannot be seen from here), is never broken. ``wait``: wait for the lock instead (short
    critical sections, e.g. asking a search storage for a trial).
    """
    holder = ""
    for _ in range(5):
        f = open(path, "a+")  # noqa: SIM115 - held open for the duration of the lock
        try:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip()
            if stale_holder(holder) and _same_file(path, f):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # stale: its holder died; an orphan keeps the old file's lock, nobody writes for it
                f.close()
                continue
            f.close()
            raise RunLocked(f"{busy} by another process ({holder or 'unknown'}); {hint}") from None
        if not _same_file(path, f):  # another process broke a stale lock between our open and our flock: try again
            f.close()
            continue
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}")
            f.flush()
            yield
        finally:
            f.close()
        return
    raise RunLocked(f"{busy} by another process ({holder or 'unknown'}); {hint}")


@dataclass(frozen=True)
class ConfigChange:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} → {self.new!r}"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (lists and scalars are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[ConfigChange]:
    """The keys of ``new`` whose value differs in ``old`` (both resolved config snapshots)."""
    fo, fn = flatten(old), flatten(new)
    return [ConfigChange(k, fo.get(k), v) for k, v in fn.items() if fo.get(k) != v]


@dataclass
class Opening:
    """What ``RunDir.open`` found and decided."""

    finished: RunMetrics | None = None
    """The recorded result of a finished run that is reused (``--resume``): nothing is to run."""
    replace: bool = False
    """An existing directory is replaced (``--overwrite``, or a partial run of a kind that recomputes)."""
    resuming: bool = False
    """An interrupted run is continued from what it left (its checkpoints)."""
    harmless: list[ConfigChange] = field(default_factory=list)


class RunDir:
    """One run directory. Everything transferlab writes into it goes through ``transferlab.files``'s atomic write."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    # ----------------------------------------------------------------------------------------
    # opening

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold an exclusive lock on the run directory (``.<name>.lock`` beside it) while writing it.

        A second process that tries to write the same run directory is refused (``RunLocked``) with a
        message naming the holder. The lock is an OS file lock (``flock``), so a killed process never
        leaves a stale lock behind; a lock still held on behalf of a process of this host that no longer
        exists (an orphaned child kept the descriptor) is recognised as stale and taken over (``hold_lock``).
        """
        parent = self.path.parent
        if parent.exists() and not parent.is_dir():
            raise RunError(f"{parent} is a file, not a folder: --runs-dir must name a folder (it is created if missing)")
        parent.mkdir(parents=True, exist_ok=True)
        return hold_lock(parent / f".{self.path.name}.lock", f"run directory {self.path} is being written",
                         "wait for it or use another --runs-dir")

    def finished_metrics(self) -> RunMetrics | None:
        """The recorded result when the run finished (``metrics.json`` with status ``ok``), else ``None``."""
        path = self.path / METRICS_FILE
        try:
            record = RunMetrics.from_dict(read_json(path)) if path.is_file() else None
        except (ValueError, TypeError) as e:
            raise RunError(f"{path}: not a transferlab metrics file ({e}); --overwrite replaces the run") from None
        return record if record is not None and record.ok else None

    def open(self, snapshot: dict[str, Any], resume: bool, overwrite: bool, keeps_partial: bool = True) -> Opening:
        """Decide what to do with this directory for a run whose resolved config is ``snapshot``.

        Reads only; ``begin`` then changes the directory (separately, so that under DDP every rank
        decides from the same view before rank 0 changes anything). ``keeps_partial``: an interrupted
        run of this kind continues from what it left; otherwise a partial directory is redone.
        """
        if not self.path.exists() or not any(self.path.iterdir()):
            return Opening()
        if not resume:
            if not overwrite:
                raise RunRefused(f"run directory {self.path} already exists: pass --resume to continue it or --overwrite to replace it")
            return Opening(replace=True)
        finished = self.finished_metrics()
        harmless = self.check_config(snapshot, finished is not None)
        if finished is not None:
            return Opening(finished=finished, harmless=harmless)
        return Opening(replace=not keeps_partial, resuming=keeps_partial, harmless=harmless)

    def check_config(self, snapshot: dict[str, Any], finished: bool) -> list[ConfigChange]:
        """Compare ``snapshot`` with the recorded ``config.yaml``; refuse changes that can affect results."""
        path = self.path / "config.yaml"
        if not path.is_file():
            return []
        try:
            old = from_dict(ExperimentConfig, load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}).to_dict()
        except ConfigError as e:
            raise RunRefused(f"{path} cannot be read by this version of transferlab ({e}); pass --overwrite to redo the run") from None
        changes = config_changes(old, resolve_as_recorded(old, snapshot))  # train.lr: find matches the lr it found
        relevant = [c for c in changes if not is_harmless(c.key)]
        if relevant:
            what = "finished" if finished else "was started"
            listed = "\n".join(f"  {c}" for c in relevant)
            raise RunRefused(
                f"run directory {self.path} {what} with another config than the study asks for now "
                f"({len(relevant)} changed key{'s' if len(relevant) > 1 else ''}, recorded → now):\n{listed}\n"
                f"--resume would {'show its old result' if finished else 'continue it'} under the new config. "
                "Pass --overwrite to redo it with the new config, or give the experiment a new name to keep both."
            )
        return [c for c in changes if is_harmless(c.key)]

    def begin(self, opening: Opening, snapshot: dict[str, Any], writer: bool = True) -> None:
        """Act on ``opening``: replace the directory if decided, create it, write ``config.yaml`` (writer only)."""
        if not writer:
            return
        if opening.replace and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.path / "config.yaml", yaml.safe_dump(snapshot, sort_keys=False))

    @staticmethod
    def say_reused(opening: Opening, name: str, path: Path, console: Console) -> None:
        """The console line of a finished run that is reused, with the harmless changes it allowed."""
        console.print(f"[dim]{escape(name)}: already finished in {escape(str(path))}, skipped[/]")
        if opening.harmless:
            console.print(f"[dim]  changes that cannot affect its results: {escape('; '.join(map(str, opening.harmless)))}[/]")

    # ----------------------------------------------------------------------------------------
    # writing

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        write_text(self.path / name, text)

    def write_rows(self, name: str, rows: list[dict[str, Any]]) -> None:
        write_csv(self.path / name, rows)

    def write_metrics(self, metrics: RunMetrics) -> dict[str, Any]:
        """Write ``metrics.json``; returns it as the dict the API hands back."""
        out = metrics.to_dict()
        write_json(self.path / METRICS_FILE, out)
        return out

    def write_failure(self, cfg: ExperimentConfig, error: BaseException, status: str | None = None) -> dict[str, Any]:
        """Record a run that did not finish so the comparison and the report show it (the directory's other files stay).

        The status is ``failed``, or ``error.status`` (``RunStopped``: ``pruned``), or ``status`` (``skipped``).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        failed = RunMetrics(
            status=status or getattr(error, "status", "failed"), kind=cfg.kind, experiment=cfg.name, seed=cfg.seed, backbone=cfg.model.backbone,
            weights=cfg.model.weights, head=cfg.head.type, strategy=cfg.strategy.name, dataset=cfg.data.dataset,
            notes=cfg.notes, error=str(error) if isinstance(error, RunStopped) else f"{type(error).__name__}: {error}",
            code_version=code_version(),
        )
        if cfg.uses.members and not cfg.uses.model:  # made of other runs: no backbone of its own
            failed.backbone, failed.weights, failed.strategy = "ensemble", "ensemble of runs", f"{cfg.ensemble.vote} vote"
        return self.write_metrics(failed)


class RunStopped(Exception):
    """A run that stopped on purpose before the end; recorded with ``status`` (e.g. a pruned search trial)."""

    status = "stopped"

    def __init__(self, message: str, status: str = "stopped") -> None:
        super().__init__(message)
        self.status = status


def run_lock(run_dir: str | Path) -> contextlib.AbstractContextManager[None]:
    """The single-writer lock of ``run_dir`` (``RunDir(run_dir).lock()``)."""
    return RunDir(run_dir).lock()


def study_lock(study_dir: str | Path) -> contextlib.AbstractContextManager[None]:
    """The one-driver lock of a study folder (``.<study>.study.lock`` beside it), held while ``run_study`` runs it.

    A second invocation of the same study into the same runs folder is refused at once, naming the first's
    pid and host. The folder that holds the lock is created if missing (nothing else is written).
    """
    study_dir = Path(study_dir)
    parent = study_dir.parent
    if parent.exists() and not parent.is_dir():
        raise RunError(f"--runs-dir {parent} is a file, not a folder: give a folder (it is created if missing)")
    parent.mkdir(parents=True, exist_ok=True)
    return hold_lock(parent / f".{study_dir.name}.study.lock", f"study folder {study_dir} is being run",
                     "wait for it to finish, or give another --runs-dir (two drivers of one study would overwrite each other's runs)")
