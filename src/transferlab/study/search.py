"""Search: an Optuna study over dotted config keys, each trial an ordinary run directory.

The driver (``SearchDriver``, in the process that runs the study) asks Optuna for a trial when a
worker is free, so the sampler has seen every finished trial; the trial runs anywhere (any executor)
as ``<experiment>@trial=<k>``; its training loop reports the per-epoch validation metric through
``PruningCallback``, which reopens the same Optuna study from its storage in the worker and stops the
run (status ``pruned``, with the epoch) when the pruner says so. The Optuna study lives in a real
storage — SQLite in the study folder by default, any database URL, or a journal file — so workers on
other machines share it and an interrupted search resumes: finished trials are kept, a trial that was
running continues from its checkpoint with the same settings, and only the missing ones are asked.

The choice is made on validation only (``val_acc`` / ``val_loss`` of the best epoch; a multi-label experiment,
``data.task: multilabel``, optimises its macro mAP, ``val_map``, by default: ``task_metric``). The best trial's test
metrics are what the search reports, marked as such (``search/<experiment>/search.json``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferlab.config import ConfigError, ExperimentConfig, SearchSpec, SweepPoint, from_dict
from transferlab.engine.loop import Callback, Loop
from transferlab.files import write_bytes, write_json
from transferlab.rundir import RunError, RunStopped
from transferlab.rundir.rundir import hold_lock, pid_alive

__all__ = ["PruningCallback", "SearchDriver", "TrialSlot", "require_optuna", "storage_url", "task_metric"]

INSTALL = "pip install 'transferlab[search]'"
SPACE_ATTR = "transferlab_space"
"""Optuna study attribute: the search space (per key, Optuna's JSON of the distribution) the storage was made with."""
OBJECTIVE_ATTR = "transferlab_objective"
DRIVER_ATTR = "transferlab_driver"
"""Optuna trial attribute: the driver that asked the trial (study folder, host, pid)."""


def require_optuna() -> Any:
    """The ``optuna`` module, or an error naming the install that provides it (before any run starts)."""
    try:
        import optuna
    except ImportError:
        raise RunError(f"search: needs Optuna, which is not installed: {INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # transferlab prints its own progress
    return optuna


def storage_url(spec: SearchSpec, study_dir: Path, override: str | None = None) -> str:
    """Where the Optuna study lives: ``--search-storage``, else the spec's, else SQLite in the study folder."""
    return override or spec.storage or f"sqlite:///{(study_dir / 'search.db').resolve()}"


def _storage(url: str) -> Any:
    optuna = require_optuna()
    if url.startswith("journal:"):  # a journal file: safe on NFS-like cluster filesystems where SQLite locking is not
        path = url[len("journal:"):]
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    if url.startswith("sqlite:"):  # several processes write: wait for the lock instead of failing at once
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(url)


def _storage_file(url: str) -> Path | None:
    """The file of a SQLite or journal storage (``None``: a database server)."""
    if url.startswith("journal:"):
        return Path(url[len("journal:"):])
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    return None


def _describe(dist_json: str | None) -> str:
    """An Optuna distribution (as stored) in the study file's words: ``{log_uniform: [1e-05, 0.1]}``; ``(none)``."""
    if dist_json is None:
        return "(none)"
    optuna = require_optuna()
    d = optuna.distributions.json_to_distribution(dist_json)
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return f"{{choice: {list(d.choices)}}}"
    kind = "int" if isinstance(d, optuna.distributions.IntDistribution) else "log_uniform" if d.log else "uniform"
    return f"{{{kind}: [{d.low}, {d.high}]}}"


def _distributions(spec: SearchSpec) -> dict[str, Any]:
    optuna = require_optuna()
    d = optuna.distributions
    out = {}
    for key, dist in spec.distributions().items():
        if dist.kind == "choice":
            out[key] = d.CategoricalDistribution(list(dist.choices))
        elif dist.kind == "int":
            out[key] = d.IntDistribution(int(dist.low), int(dist.high))
        else:
            out[key] = d.FloatDistribution(float(dist.low), float(dist.high), log=dist.kind == "log_uniform")
    return out


def _sampler(spec: SearchSpec, n_existing: int) -> Any:
    """The sampler, seeded by the spec's seed and the trials already in the storage: a fresh search proposes the same
    trials every time, and a resumed one does not propose its first trials again (a re-seeded sampler would)."""
    optuna = require_optuna()
    seed = spec.seed + 1_000_003 * n_existing
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({k: list(v.choices) for k, v in spec.distributions().items()}, seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(spec: SearchSpec) -> Any:
    optuna = require_optuna()
    if spec.pruner == "median":  # no pruning before 2 trials finished or before epoch 1 is reported
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def task_metric(spec: SearchSpec, base: ExperimentConfig) -> SearchSpec:
    """``spec`` with the metric of the experiment's task: a multi-label experiment has no accuracy, so the default
    ``val_acc`` means its macro mAP, ``val_map`` (maximised) — as ``train.early_stopping.monitor``'s default does.
    ``val_map`` of a one-label-per-image experiment is an error naming the experiment."""
    if base.multilabel and spec.metric == "val_acc":
        return dataclasses.replace(spec, metric="val_map", direction=spec.direction or "maximize")
    if not base.multilabel and spec.metric == "val_map":
        raise ConfigError(f"{base.name}: search.metric=val_map is the macro mAP of data.task: multilabel; this experiment has one "
                          "label per image: use val_acc or val_loss")
    return spec


@dataclass
class TrialSlot:
    """A trial ready to run: its Optuna number and id, its settings, its config, and whether it continues."""

    number: int
    trial_id: int
    params: dict[str, Any]
    cfg: ExperimentConfig
    resume: bool


class SearchDriver:
    """One searched experiment's Optuna study, on the driver side: proposes trials, records their outcome."""

    def __init__(self, name: str, spec: SearchSpec, base: ExperimentConfig, study_dir: Path,
                 storage: str | None = None, overwrite: bool = False) -> None:
        optuna = require_optuna()
        self.name, self.spec, self.base, self.study_dir = name, task_metric(spec, base), base, study_dir
        self.url = storage_url(spec, study_dir, storage)
        study_dir.mkdir(parents=True, exist_ok=True)
        self.storage = _storage(self.url)
        if overwrite:
            try:
                optuna.delete_study(study_name=name, storage=self.storage)
            except KeyError:
                pass
        try:
            n_existing = len(optuna.load_study(study_name=name, storage=self.storage).trials)
        except KeyError:
            n_existing = 0
        self.study = optuna.create_study(study_name=name, storage=self.storage, sampler=_sampler(spec, n_existing), pruner=_pruner(spec),
                                         direction=self.spec.resolved_direction(), load_if_exists=True)
        self.home = str(study_dir.resolve())
        self._check_space()
        # left running by an interrupted driver of this study folder (the study lock says no other driver is here), or by
        # a driver of this host that is gone: continued. A trial running for a live driver elsewhere is not ours to take.
        self._stale = {t.number for t in self.study.get_trials(deepcopy=False)
                       if t.state == optuna.trial.TrialState.RUNNING and self._abandoned(t)}

    # ----------------------------------------------------------------------------------------
    # the space the storage was made with

    def _check_space(self) -> None:
        """Refuse a storage whose trials were drawn from another space or for another metric (a config change)."""
        optuna = require_optuna()
        now = {k: optuna.distributions.distribution_to_json(v) for k, v in _distributions(self.spec).items()}
        objective = {"metric": self.spec.metric, "direction": self.spec.resolved_direction()}
        attrs = self.study.user_attrs
        trials = self.study.get_trials(deepcopy=False)
        if SPACE_ATTR in attrs:
            recorded, rec_objective = attrs[SPACE_ATTR], attrs.get(OBJECTIVE_ATTR, objective)
        elif trials:  # a storage from before the space was recorded: the distributions its trials were drawn from
            recorded, rec_objective = {}, objective
            for t in trials:
                recorded.update({k: optuna.distributions.distribution_to_json(v) for k, v in t.distributions.items()})
        else:
            self.study.set_user_attr(SPACE_ATTR, now)
            self.study.set_user_attr(OBJECTIVE_ATTR, objective)
            return
        changes = []
        for key in sorted(set(recorded) | set(now)):
            old, new = recorded.get(key), now.get(key)
            if old is None or new is None or optuna.distributions.json_to_distribution(old) != optuna.distributions.json_to_distribution(new):
                changes.append(f"  space.{key}: {_describe(old)} → {_describe(new)}")
        changes += [f"  {k}: {rec_objective.get(k)!r} → {v!r}" for k, v in objective.items() if rec_objective.get(k) != v]
        if changes:
            raise RunError(
                f"search {self.name} in {self.url} was made with another search than the study asks for now "
                f"({len(changes)} change{'s' if len(changes) > 1 else ''}, recorded → now):\n" + "\n".join(changes) + "\n"
                f"Its {len(trials)} trial(s) would mix with trials of the new space. Pass --overwrite to start the search again "
                "(its trials are deleted), or give the experiment a new name (or another --search-storage) to keep both."
            )
        if SPACE_ATTR not in attrs:
            self.study.set_user_attr(SPACE_ATTR, now)
            self.study.set_user_attr(OBJECTIVE_ATTR, objective)

    def _abandoned(self, trial: Any) -> bool:
        """A running trial nobody runs any more: asked by a driver of this study folder, or of this host that is gone."""
        owner = trial.user_attrs.get(DRIVER_ATTR)
        if not isinstance(owner, dict) or owner.get("study_dir") == self.home:
            return True
        return owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid", 0)))

    def _ours(self, trial: Any) -> bool:
        owner = trial.user_attrs.get(DRIVER_ATTR)
        return not isinstance(owner, dict) or owner.get("study_dir") == self.home or trial.number in self._stale

    def _storage_lock(self) -> contextlib.AbstractContextManager[None]:
        """Several drivers on one storage file take turns to count and ask trials, so ``trials:`` is not exceeded."""
        path = _storage_file(self.url)
        if path is None:  # a database server: Optuna numbers the trials; the count is checked right before asking
            return contextlib.nullcontext()
        return hold_lock(Path(str(path) + ".lock"), f"search storage {path} is in use", "", wait=True)

    def trial_info(self, slot: TrialSlot) -> dict[str, Any]:
        """What a worker needs to report to and be pruned by this study (``RunJob.trial``)."""
        return {"storage": self.url, "study": self.name, "trial_id": slot.trial_id, "metric": self.spec.metric,
                "direction": self.spec.resolved_direction()}

    def next_trial(self, number: int) -> TrialSlot | None:
        """Trial ``number``: a trial of this study folder that finished or was left running continues (its run directory
        is reused); otherwise a new one is asked, unless the storage already holds ``trials:`` trials (other drivers on
        the same storage asked them): then ``None``, the slot is not needed."""
        with self._storage_lock():
            trials = self.study.get_trials(deepcopy=False)
            if number < len(trials) and self._ours(trials[number]) and (trials[number].state.is_finished() or number in self._stale):
                t = trials[number]  # finished: its run directory is reused; left running: it continues from its checkpoint
                self._stale.discard(number)
                return TrialSlot(t.number, t._trial_id, dict(t.params), self.config_for(t.number, t.params), resume=True)
            if len(trials) >= self.spec.trials:
                return None
            trial = self.study.ask(_distributions(self.spec))
            trial.set_user_attr(DRIVER_ATTR, {"study_dir": self.home, "host": socket.gethostname(), "pid": os.getpid()})
        return TrialSlot(trial.number, trial._trial_id, dict(trial.params), self.config_for(trial.number, trial.params), resume=False)

    def config_for(self, number: int, params: dict[str, Any]) -> ExperimentConfig:
        """The base experiment with ``params`` set (dotted keys), named ``<experiment>@trial=<k>``."""
        raw = self.base.to_dict()
        for key, value in params.items():
            node = raw
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = copy.deepcopy(value)
        raw["name"] = f"{self.name}@trial={number}"
        try:
            cfg = from_dict(ExperimentConfig, raw, f"search {self.name} trial {number}")
            cfg.sweep = SweepPoint(group=self.name, values=dict(params))
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{self.name}: search trial {number} ({params}) is not a valid experiment: {e}") from None
        return cfg

    def tell(self, number: int, status: str, value: float | None) -> None:
        """Record a trial's outcome in the Optuna study (ok -> its value; pruned; anything else -> failed)."""
        optuna = require_optuna()
        state = optuna.trial.TrialState
        if status == "ok" and value is not None:
            self.study.tell(number, value, skip_if_finished=True)
        elif status == "pruned":
            self.study.tell(number, state=state.PRUNED, skip_if_finished=True)
        else:
            self.study.tell(number, state=state.FAIL, skip_if_finished=True)

    def summary(self) -> dict[str, Any]:
        """``search/<experiment>/search.json``: every trial and the best one (chosen on validation), plus figures."""
        optuna = require_optuna()
        trials = self.study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = self.study.best_trial if complete else None
        out_dir = self.study_dir / "search" / self.name
        info = {
            "experiment": self.name, "metric": self.spec.metric, "direction": self.spec.resolved_direction(),
            "sampler": self.spec.sampler, "pruner": self.spec.pruner, "storage": self.url, "space": self.spec.space,
            "trials": [{"number": t.number, "run": f"{self.name}@trial={t.number}", "state": t.state.name.lower(), "value": t.value,
                        "params": t.params, "last_epoch": t.last_step} for t in trials],
            "best": None if best is None else {"number": best.number, "run": f"{self.name}@trial={best.number}", "value": best.value,
                                               "params": best.params},
            "figures": _figures(self.study, out_dir) if len(complete) >= 2 else [],
        }
        write_json(out_dir / "search.json", info)
        return info


def _figures(study: Any, out_dir: Path) -> list[str]:
    """Optimization history, parameter importances and parallel coordinates as PNGs (Optuna's matplotlib plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    names = []
    for name, plot in (("history", ovm.plot_optimization_history), ("importances", ovm.plot_param_importances),
                       ("parallel", ovm.plot_parallel_coordinate)):
        try:
            ax = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances of a one-dimensional or constant space
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        write_bytes(out_dir / f"{name}.png", buf.getvalue())
        names.append(f"{name}.png")
    return names


class PruningCallback(Callback):
    """Worker side of a trial: report the per-epoch validation metric; stop the run when the pruner says so."""

    def __init__(self, storage: str, study: str, trial_id: int, metric: str, direction: str) -> None:
        self.url, self.study_name, self.trial_id, self.metric, self.direction = storage, study, trial_id, metric, direction
        self.trial: Any = None

    def on_fit_start(self, loop: Loop) -> None:
        optuna = require_optuna()
        study = optuna.load_study(study_name=self.study_name, storage=_storage(self.url))
        self.trial = optuna.trial.Trial(study, self.trial_id)

    def on_train_epoch_end(self, loop: Loop, row: dict[str, float]) -> None:
        value, epoch = float(row[self.metric]), int(row["epoch"])
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise RunStopped(f"pruned at epoch {epoch}: {self.metric} {value:.4f} (pruner of the search)", status="pruned")
