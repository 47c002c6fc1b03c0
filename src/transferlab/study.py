"""Run a study: every experiment (and ensemble) once per seed, in order; one failure never stops the others.

``plan_study`` turns a parsed study into the runs it makes — one ``PlannedRun`` per run folder, with
the run folders it needs first (``weights: run:<experiment>``, ensemble members). ``run_study`` runs
them in order through ``run_experiment``; a run whose dependency failed is recorded as failed with
the reason, without running.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from transferlab.config import EnsembleConfig, EnsembleSpec, ExperimentConfig, Study, load_study, run_name
from transferlab.engine.distributed import world
from transferlab.files import atomic_write, write_json
from transferlab.kinds import KINDS, run_experiment
from transferlab.rundir import RunDir, RunError

__all__ = ["Interrupted", "PlannedRun", "StudyResult", "plan_study", "run_study"]


@dataclass
class StudyResult:
    """Where the runs went, and which experiments finished or failed."""

    study: str
    runs_dir: Path
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a study: which run was interrupted, and the checkpoint ``--resume`` continues from."""

    def __init__(self, run: str, run_dir: Path) -> None:
        super().__init__(run)
        self.run, self.run_dir = run, run_dir
        found = [run_dir / "checkpoints" / f"{n}.safetensors" for n in ("last", "best")]
        self.checkpoint: Path | None = next((p for p in found if p.is_file()), None)

    def describe(self) -> str:
        where = f"--resume continues it from {self.checkpoint}" if self.checkpoint else "it has no checkpoint yet; --resume starts it again"
        return f"interrupted: {self.run} ({self.run_dir}); {where}"


@dataclass
class PlannedRun:
    """One run of a study: its folder name, its resolved config, and the run folders it needs first."""

    name: str
    cfg: ExperimentConfig
    needs: list[str] = field(default_factory=list)


def plan_study(study: Study, out: Path) -> list[PlannedRun]:
    """Every run of ``study`` (writing into ``out``), in order: the experiments, then the ensembles."""
    n_seeds = {c.name: sum(o.name == c.name for o in study.experiments) for c in study.experiments}  # sweeps may set seeds
    plan = []
    for cfg in study.experiments:
        cfg, needs = _resolve_run_weights(cfg, study, out, n_seeds)
        plan.append(PlannedRun(run_name(cfg, n_seeds[cfg.name]), cfg, needs))
    for ens in study.ensembles:
        plan += _plan_ensemble(ens, study, out, n_seeds)
    return plan


def _resolve_run_weights(cfg: ExperimentConfig, study: Study, out: Path, n_seeds: dict[str, int]) -> tuple[ExperimentConfig, list[str]]:
    """``weights: run:<experiment>`` naming an experiment of ``study`` -> ``run:<its run directory>``.

    The run of the same seed is used when the source experiment has that seed (else its first).
    ``run:<study>/<run>`` is looked up under the runs directory; any other value is a path and is
    left as it is.
    """
    weights = cfg.model.weights
    if not weights.startswith("run:"):
        return cfg, []
    ref = weights[len("run:") :]
    sources = [c for c in study.experiments if c.name == ref]
    needs = []
    if sources:
        src = next((c for c in sources if c.seed == cfg.seed), sources[0])
        needs = [run_name(src, n_seeds[src.name])]
        path = out / needs[0]
    elif not Path(ref).expanduser().exists() and (out.parent / ref).is_dir():
        path = out.parent / ref
    else:
        return cfg, []
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=f"run:{path}")), needs


def _plan_ensemble(ens: EnsembleConfig, study: Study, out: Path, n_seeds: dict[str, int]) -> list[PlannedRun]:
    """One ``ensembles:`` entry: once per seed its member experiments share (one run directory each)."""
    by_name = {m: [c for c in study.experiments if c.name == m] for m in ens.members}
    seed_sets = [{c.seed for c in cfgs} for cfgs in by_name.values() if cfgs]
    seeds: list[int | None] = sorted(set.intersection(*seed_sets)) if seed_sets else []
    seeds = seeds or [None]
    plan = []
    for seed in seeds:
        members, needs = [], []
        for m in ens.members:
            if by_name[m]:
                src = next((c for c in by_name[m] if c.seed == seed), by_name[m][0])
                needs.append(run_name(src, n_seeds[src.name]))
                members.append(str(out / needs[-1]))
            else:  # a run directory: as given, or under the runs directory
                members.append(m if Path(m).expanduser().exists() or not (out.parent / m).is_dir() else str(out.parent / m))
        cfg = ExperimentConfig(
            name=ens.name, seed=seed if seed is not None else 0, kind="ensemble", notes=ens.notes,
            ensemble=EnsembleSpec(members=members, vote=ens.vote),
        )
        cfg.validate()
        plan.append(PlannedRun(ens.name if len(seeds) == 1 else f"{ens.name}.seed{seed}", cfg, needs))
    return plan


def run_study(
    study: str | Path | Study,
    runs_dir: str | Path = "runs",
    resume: bool = False,
    overwrite: bool = False,
    only: list[str] | None = None,
    console: Console | None = None,
) -> StudyResult:
    """Run a study (a YAML path or a parsed ``Study``) into ``runs_dir/<study>/``.

    ``only`` restricts to the named experiments (a sweep's name selects all its points). A failure is
    recorded in that run's ``metrics.json`` (status ``failed``), the study goes on, and
    ``StudyResult.failed`` lists it. Ctrl-C raises ``Interrupted`` naming the run and its checkpoint.
    """
    console = console or Console()
    study = study if isinstance(study, Study) else load_study(study)
    runs_dir = Path(runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise RunError(f"--runs-dir {runs_dir} is a file, not a folder: give a folder (it is created if missing)")
    out = runs_dir / study.name
    _check_only(study, only)
    plan = [run for run in plan_study(study, out) if not only or _selected(run.cfg, only)]
    if resume:
        _check_resumable(plan, out, overwrite)
    result = StudyResult(study.name, out)
    out.mkdir(parents=True, exist_ok=True)
    if world()[0] == 0:  # under torchrun only rank 0 writes
        _record_study(study, out)
    for run in plan:
        try:
            if error := _failed_dependency(run, result):
                if world()[0] == 0:
                    RunDir(out / run.name).write_failure(run.cfg, error)
                raise error
            run_experiment(run.cfg, out / run.name, resume=resume, overwrite=overwrite, console=console)
            result.finished.append(run.name)
        except KeyboardInterrupt:
            raise Interrupted(run.name, out / run.name) from None
        except Exception as e:  # noqa: BLE001 - recorded (by run_experiment or above); the study goes on
            console.print(f"[red]{escape(run.name)} failed: {escape(type(e).__name__)}: {escape(str(e))}[/]")
            result.failed[run.name] = f"{type(e).__name__}: {e}"
    return result


def _check_resumable(plan: list[PlannedRun], out: Path, overwrite: bool) -> None:
    """``--resume``: before anything is written, refuse every run directory made with another config (one error).

    ``RunDir.open`` only reads; ``run_experiment`` checks again under the lock.
    """
    refused = []
    for run in plan:
        kind = KINDS.get(run.cfg.kind)
        try:
            RunDir(out / run.name).open(kind.snapshot(run.cfg), resume=True, overwrite=overwrite, keeps_partial=kind.keeps_partial)
        except RunError as e:
            refused.append(str(e))
    if refused:
        raise RunError("\n".join(refused) + ("" if len(refused) == 1 else f"\n({len(refused)} runs refused; nothing was run)"))


def _failed_dependency(run: PlannedRun, result: StudyResult) -> RuntimeError | None:
    failed = [n for n in run.needs if n in result.failed]
    if not failed:
        return None
    if run.cfg.kind == "ensemble":
        return RuntimeError(f"member run(s) failed: {', '.join(failed)}")
    return RuntimeError(f"{run.cfg.model.weights}: the source experiment {failed[0]} failed: {result.failed[failed[0]]}")


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
