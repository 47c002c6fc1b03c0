"""Run a study: its graph of runs (``plan``) on an executor (``executors``); one failure never stops the others.

The scheduler here is the only place that decides *what* runs next: a run starts once everything it
needs finished ``ok``; a run whose dependency failed (or was skipped) is recorded ``skipped`` with the
reason, without running; independent runs go on. A search proposes its trials as workers free up.
*Where* a run executes is the executor's business; *how* is ``worker.execute_run``'s, the same everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from transferlab.config import ConfigError, ExecutorConfig, ExperimentConfig, Study, load_study, parse_executor
from transferlab.data.folds import FoldsLimit, folds_limit
from transferlab.engine.distributed import world
from transferlab.files import atomic_write, write_json, write_text
from transferlab.kinds import KINDS
from transferlab.kinds.base import resolve_run_config
from transferlab.rundir import METRICS_FILE, RunDir, RunError, RunStopped
from transferlab.rundir.rundir import RunLocked, study_lock
from transferlab.study.executors import EXECUTORS, Executor, SequentialExecutor
from transferlab.study.plan import PlannedRun, plan_study
from transferlab.study.progress import StudyProgress
from transferlab.study.search import SearchDriver, require_optuna
from transferlab.study.worker import TOKEN_FILE, Outcome, RunJob

__all__ = ["Interrupted", "StudyResult", "resolve_executor", "run_study"]


@dataclass
class StudyResult:
    """Where the runs went, and which experiments finished or failed."""

    study: str
    runs_dir: Path
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """Runs that failed or were skipped (a dependency did not finish), with the reason."""
    pruned: list[str] = field(default_factory=list)
    """Search trials the pruner stopped (not failures)."""
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    searches: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per searched experiment: ``search/<experiment>/search.json`` (trials, best trial on validation)."""

    @property
    def ok(self) -> bool:
        return not self.failed


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a study: which run was interrupted, and the checkpoint ``--resume`` continues from."""

    def __init__(self, run: str, run_dir: Path, others: list[str] | None = None) -> None:
        super().__init__(run)
        self.run, self.run_dir, self.others = run, run_dir, others or []
        found = [run_dir / "checkpoints" / f"{n}.safetensors" for n in ("last", "best")]
        self.checkpoint: Path | None = next((p for p in found if p.is_file()), None)

    def describe(self) -> str:
        where = f"--resume continues it from {self.checkpoint}" if self.checkpoint else "it has no checkpoint yet; --resume starts it again"
        also = f" (also interrupted: {', '.join(self.others)}; --resume continues them too)" if self.others else ""
        return f"interrupted: {self.run} ({self.run_dir}); {where}{also}"


def run_study(
    study: str | Path | Study,
    runs_dir: str | Path = "runs",
    resume: bool = False,
    overwrite: bool = False,
    only: list[str] | None = None,
    console: Console | None = None,
    executor: str | ExecutorConfig | None = None,
    workers: int | None = None,
    threads: int | None = None,
    search_storage: str | None = None,
) -> StudyResult:
    """Run a study (a YAML path or a parsed ``Study``) into ``runs_dir/<study>/``.

    ``only`` restricts to the named experiments (a sweep's name selects all its points). ``executor``
    (a name or an ``ExecutorConfig``; default the study's ``executor:``), ``workers`` and ``threads``
    override the study file. A failure is recorded in that run's ``metrics.json`` (status ``failed``),
    its dependents are recorded ``skipped``, the study goes on, and ``StudyResult.failed`` lists both.
    Ctrl-C raises ``Interrupted`` naming the run and its checkpoint.
    """
    console = console or Console()
    study = study if isinstance(study, Study) else load_study(study)
    exec_cfg = resolve_executor(study.executor, executor, workers, threads)
    runs_dir = Path(runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise RunError(f"--runs-dir {runs_dir} is a file, not a folder: give a folder (it is created if missing)")
    out = runs_dir / study.name
    _check_only(study, only)
    plan = [run for run in plan_study(study, out) if not only or _selected(run.cfg, only)]
    if any(r.search for r in plan):
        require_optuna()  # before anything runs
    ex_cls = EXECUTORS.get(exec_cfg.name)
    check_folds_fit(study, plan)  # data.folds above the smallest class: one config error, before anything is written
    # one driver per study folder: a second invocation is refused here, naming the first, before it writes anything
    with study_lock(out) if world()[0] == 0 else contextlib.nullcontext():
        if resume:
            _check_resumable([r for r in plan if not r.search], out, overwrite)
        ex = ex_cls(exec_cfg, out, console) if ex_cls is SequentialExecutor else ex_cls(exec_cfg, out)  # a missing extra fails here
        searched = {r.search: r.cfg for r in reversed(plan) if r.search}  # each searched experiment once (its first slot's config)
        drivers = {name: SearchDriver(name, study.searches[name], cfg, out, search_storage, overwrite)
                   for name, cfg in reversed(searched.items())}  # a changed search space is refused here
        out.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex if ex.parallel else ""
        if world()[0] == 0:  # under torchrun only rank 0 writes
            _record_study(study, out)
            if token:
                write_text(out / TOKEN_FILE, token)
        result = StudyResult(study.name, out)
        Scheduler(plan, ex, drivers, result, console, token, resume, overwrite).run()
        result.searches = {name: d.summary() for name, d in drivers.items()}
    return result


def resolve_executor(base: ExecutorConfig, executor: str | ExecutorConfig | None, workers: int | None, threads: int | None) -> ExecutorConfig:
    """The study's executor with the command line's overrides (``--executor``, ``--workers``, ``--threads``), checked."""
    cfg = base
    if isinstance(executor, ExecutorConfig):
        cfg = executor
    elif executor is not None:
        cfg = dataclasses.replace(base, name=executor) if executor == base.name else parse_executor(executor, "--executor")
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers {workers}: must be at least 1")
        cfg = dataclasses.replace(cfg, workers=workers)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads {threads}: must be at least 1")
        cfg = dataclasses.replace(cfg, threads=threads)
    return cfg


class Scheduler:
    """Starts every run of ``plan`` once what it needs is ``ok``; records skips; collects outcomes until all are done."""

    def __init__(self, plan: list[PlannedRun], ex: Executor, drivers: dict[str, SearchDriver], result: StudyResult,
                 console: Console, token: str, resume: bool, overwrite: bool) -> None:
        self.plan, self.ex, self.drivers, self.result, self.console = plan, ex, drivers, result, console
        self.token, self.resume, self.overwrite = token, resume, overwrite
        self.status: dict[str, str] = {r.name: "queued" for r in plan}
        self.running: dict[str, PlannedRun] = {}
        self.trials: dict[str, tuple[str, int]] = {}  # run name -> (searched experiment, trial number)
        self.progress: StudyProgress | None = None

    def run(self) -> None:
        if self.ex.parallel:
            epochs = {r.name: r.cfg.train.epochs for r in self.plan if r.cfg.uses.training}
            with StudyProgress(self.console, [r.name for r in self.plan], self.ex.study_dir, epochs, self.ex.capacity()) as p:
                self.progress = p
                self._loop()
        else:
            self._loop()

    def _loop(self) -> None:
        try:
            while True:
                self._start_ready()
                if not self.running:
                    return
                for outcome in self.ex.wait(timeout=1.0):
                    self._record(outcome)
                if self.progress is not None:
                    for name, where in self.ex.where().items():
                        self.progress.worker[name] = where
        except KeyboardInterrupt:
            self.ex.shutdown()
            names = list(self.running) or [n for n, s in self.status.items() if s == "running"]
            first = names[0] if names else next(iter(self.status), "?")
            raise Interrupted(first, self.ex.study_dir / first, names[1:]) from None

    def _blocked(self, run: PlannedRun) -> list[str]:
        return [n for n in run.needs if self.status.get(n) in ("failed", "skipped", "pruned")]

    def _ready(self, run: PlannedRun) -> bool:
        waiting = ("queued", "running") if not self.ex.submits_ahead else ("queued",)
        return not any(self.status.get(n) in waiting for n in run.needs)

    def _start_ready(self) -> None:
        for run in self.plan:
            if self.status[run.name] != "queued":
                continue
            if len(self.running) >= self.ex.capacity():
                return
            if blocked := self._blocked(run):
                self._skip(run, blocked)
                continue
            if self._ready(run):
                self._submit(run)

    def _submit(self, run: PlannedRun) -> None:
        cfg, resume, trial = run.cfg, self.resume, None
        if run.search:
            driver = self.drivers[run.search]
            slot = driver.next_trial(int(run.name.rsplit("=", 1)[1]))
            if slot is None:  # other drivers on the same storage asked the trials this slot was for
                self.status[run.name] = "unneeded"
                self.console.print(f"[dim]{escape(run.name)}: not run: the search storage already holds "
                                   f"{driver.spec.trials} trials (search.trials), some asked by another driver[/]")
                if self.progress is not None:
                    self.progress.update(run.name, "skipped")
                return
            cfg, resume = slot.cfg, resume or slot.resume
            trial = driver.trial_info(slot)
            if cfg.name != run.name:  # another process asked trials on the same storage: follow Optuna's numbering
                i = self.plan.index(run)
                self.status[cfg.name] = self.status.pop(run.name)
                run = self.plan[i] = dataclasses.replace(run, name=cfg.name, cfg=cfg)
                if self.progress is not None:
                    self.progress.add(run.name)
            self.trials[run.name] = (driver.name, slot.number)
        job = RunJob(run.name, cfg, str(self.ex.study_dir), self.token, resume=resume, overwrite=self.overwrite,
                     threads=self.ex.threads_for(run.resources), log=self.ex.parallel, trial=trial,
                     shared_features=self.ex.parallel)
        self.status[run.name] = "running"
        self.running[run.name] = run
        if self.progress is not None:
            self.progress.update(run.name, "running")
        try:
            self.ex.submit(job, run.resources, after=run.needs)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - an executor that cannot take the run: recorded, the study goes on
            self._record(Outcome(run.name, "failed", f"{type(e).__name__}: {e}"))

    def _record(self, outcome: Outcome) -> None:
        run = self.running.pop(outcome.name, None)
        status = outcome.status
        if run is not None and status != "ok" and (blocked := self._blocked(run)) and self.ex.submits_ahead:
            self._skip(run, blocked)  # the cluster cancelled it because a dependency failed
            return
        self.status[outcome.name] = status
        self.result.outcomes[outcome.name] = outcome
        if run is not None and status == "failed" and not outcome.refused and world()[0] == 0:
            # the worker died before it could record anything: the run's folder says so, as for any failure (under its lock,
            # if nothing is there yet). A run refused by its lock or its folder (held or made by someone else) is left alone.
            self._write_failure(run, RunStopped(outcome.error or "failed", status="failed"))
        if outcome.name in self.trials:
            exp, number = self.trials[outcome.name]
            self.drivers[exp].tell(number, status, outcome.value)
        if status == "ok":
            self.result.finished.append(outcome.name)
        elif status == "pruned":
            self.result.pruned.append(outcome.name)
            self.console.print(f"{escape(outcome.name)}: {escape(outcome.error or 'pruned')}")
        else:
            self.console.print(f"[red]{escape(outcome.name)} failed: {escape(outcome.error or '')}[/]")
            self.result.failed[outcome.name] = outcome.error or "failed"
        if self.progress is not None:
            self.progress.update(outcome.name, status, seconds=outcome.seconds)

    def _skip(self, run: PlannedRun, blocked: list[str]) -> None:
        reasons = "; ".join(f"{n} {self.status[n]}" + (f" ({self.result.failed[n]})" if n in self.result.failed else "") for n in blocked)
        what = "member run(s)" if run.cfg.uses.members else f"{run.cfg.model.weights}: the source run"
        error = RunStopped(f"{what} did not finish: {reasons}", status="skipped")
        if world()[0] == 0:
            self._write_failure(run, error)
        self.status[run.name] = "skipped"
        self.result.failed[run.name] = str(error)
        self.result.outcomes[run.name] = Outcome(run.name, "skipped", str(error))
        self.console.print(f"[yellow]{escape(run.name)} skipped: {escape(str(error))}[/]")
        if self.progress is not None:
            self.progress.update(run.name, "skipped")


    def _write_failure(self, run: PlannedRun, error: RunStopped) -> None:
        """Record a run that did not run (skipped) or whose worker died, under its lock: never into a folder another process holds."""
        rundir = RunDir(self.ex.study_dir / run.name)
        try:
            with rundir.lock():
                if not (rundir.path / METRICS_FILE).is_file() or error.status == "skipped":
                    rundir.write_failure(run.cfg, error)
        except RunLocked as e:
            self.console.print(f"[yellow]{escape(run.name)}: not recorded ({escape(str(e))})[/]")


def _check_resumable(plan: list[PlannedRun], out: Path, overwrite: bool) -> None:
    """``--resume``: before anything is written, refuse every run directory made with another config (one error).

    ``RunDir.open`` only reads; ``run_experiment`` checks again under the lock.
    """
    refused = []
    for run in plan:
        kind = KINDS.get(run.cfg.kind)
        try:
            cfg = resolve_run_config(run.cfg, out / run.name, resume=True)[0]  # precision: auto keeps what the run recorded
            RunDir(out / run.name).open(kind.snapshot(cfg), resume=True, overwrite=overwrite, keeps_partial=kind.keeps_partial)
        except RunError as e:
            refused.append(str(e))
    if refused:
        raise RunError("\n".join(refused) + ("" if len(refused) == 1 else f"\n({len(refused)} runs refused; nothing was run)"))


def check_folds_fit(study: Study, plan: list[PlannedRun]) -> None:
    """``data.folds`` of every run fits its data (each fold needs an image of every class): else one ConfigError
    naming the file, the experiment, the value and the largest value that works. Data that is not here is not
    checked (nothing is downloaded for this); its runs say what is missing."""
    seen: dict[str, FoldsLimit | None] = {}
    problems: list[str] = []
    for run in plan:
        d = run.cfg.data
        if d.folds is None or not run.cfg.uses.folds:
            continue
        key = json.dumps(dataclasses.asdict(dataclasses.replace(d, fold=None, folds=None)), sort_keys=True, default=str)
        if key not in seen:
            seen[key] = folds_limit(d)
        limit = seen[key]
        if limit is None or d.folds <= limit.largest:
            continue
        group = run.cfg.sweep.group if run.cfg.sweep else run.cfg.name
        fix = (f"the largest data.folds that works is {limit.largest}" if limit.largest >= 2 else
               "cross-validation needs at least 2 images of every class: remove data.folds")
        problem = (f"experiment {group!r}: data.folds={d.folds} but class {limit.smallest_class!r} of {d.dataset} has only "
                   f"{limit.largest} images ({limit.n_images} images in all; every fold needs one of each class): {fix}")
        if problem not in problems:
            problems.append(problem)
    if problems:
        raise ConfigError(f"{study.source}: " + "\n".join(problems) + "\n(nothing was run or written)")


def _check_only(study: Study, only: list[str] | None) -> None:
    names = {c.name for c in study.experiments} | {c.sweep.group for c in study.experiments if c.sweep} | {e.name for e in study.ensembles}
    for name in only or []:
        if name not in names:
            raise ValueError(f"--only {name!r}: no such experiment in {study.source}; have {', '.join(sorted(names))}")


def _selected(cfg: ExperimentConfig, only: list[str]) -> bool:
    return cfg.name in only or (cfg.sweep is not None and cfg.sweep.group in only)


def _record_study(study: Study, out: Path) -> None:
    """``study.json`` (name, source, experiment order) and ``study.yaml``, the study file as it was run."""
    order = list(dict.fromkeys(c.name for c in study.experiments))
    write_json(out / "study.json", {"study": study.name, "source": study.source, "experiments": order})
    if study.source and Path(study.source).is_file():
        atomic_write(out / "study.yaml", lambda tmp: shutil.copyfile(study.source, tmp))


def summarize(result: StudyResult) -> dict[str, Any]:
    return {"study": result.study, "runs_dir": str(result.runs_dir), "finished": result.finished, "failed": result.failed}
