"""Run every experiment of a study file; one failing experiment never stops the others."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from transferlab.distributed import world
from transferlab.config import EnsembleConfig, ExperimentConfig, Study, load_study, run_name
from transferlab.runs import run_experiment, write_failure


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


def run_study(
    study: str | Path | Study,
    runs_dir: str | Path = "runs",
    resume: bool = False,
    overwrite: bool = False,
    only: list[str] | None = None,
    console: Console | None = None,
) -> StudyResult:
    """Run a study (a YAML path or a parsed ``Study``) into ``runs_dir/<study>/``.

    ``only`` restricts to the named experiments. A failure is recorded in that run's
    ``metrics.json`` (status ``failed``), the study goes on, and ``StudyResult.failed`` lists it.
    """
    console = console or Console()
    study = study if isinstance(study, Study) else load_study(study)
    out = Path(runs_dir) / study.name
    n_seeds = {c.name: sum(o.name == c.name for o in study.experiments) for c in study.experiments}  # per experiment: sweeps may set seeds
    result = StudyResult(study.name, out)
    out.mkdir(parents=True, exist_ok=True)
    order = list(dict.fromkeys(c.name for c in study.experiments))
    if world()[0] == 0:  # under torchrun only rank 0 writes
        (out / "study.json").write_text(json.dumps({"study": study.name, "source": study.source, "experiments": order}, indent=2))
        if study.source and Path(study.source).is_file():
            shutil.copyfile(study.source, out / "study.yaml")  # the study file as it was when run
    names = {c.name for c in study.experiments} | {c.sweep.group for c in study.experiments if c.sweep}  # a sweep's name selects its points
    names |= {e.name for e in study.ensembles}
    for name in only or []:
        if name not in names:
            raise ValueError(f"--only {name!r}: no such experiment in {study.source}; have {', '.join(sorted(names))}")
    for cfg in study.experiments:
        if only and cfg.name not in only and not (cfg.sweep and cfg.sweep.group in only):
            continue
        run = run_name(cfg, n_seeds[cfg.name])
        try:
            cfg = resolve_run_weights(cfg, study, out, n_seeds, result)  # weights: run:<experiment of this study>
            run_experiment(cfg, out / run, resume=resume, overwrite=overwrite, console=console)
            result.finished.append(run)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - record and continue with the next experiment
            from transferlab.runs import RunError

            console.print(f"[red]{escape(run)} failed: {escape(type(e).__name__)}: {escape(str(e))}[/]")
            if not isinstance(e, RunError):  # never overwrite somebody else's run directory
                write_failure(out / run, cfg, e)
            result.failed[run] = f"{type(e).__name__}: {e}"
    for ens in study.ensembles:
        if only and ens.name not in only:
            continue
        _run_study_ensemble(ens, study, out, n_seeds, result, resume, overwrite, console)
    return result


def resolve_run_weights(cfg: ExperimentConfig, study: Study, out: Path, n_seeds: dict[str, int], result: StudyResult | None = None) -> ExperimentConfig:
    """``weights: run:<experiment>`` naming an experiment of ``study`` -> ``run:<its run directory>``.

    The run of the same seed is used when the source experiment has that seed (else its first).
    ``run:<study>/<run>`` is looked up under the runs directory; any other value is a path and is
    left as it is. A source that failed in this invocation is an error naming it.
    """
    weights = cfg.model.weights
    if not weights.startswith("run:"):
        return cfg
    ref = weights[len("run:") :]
    sources = [c for c in study.experiments if c.name == ref]
    if sources:
        src = next((c for c in sources if c.seed == cfg.seed), sources[0])
        src_run = run_name(src, n_seeds[src.name])
        if result is not None and src_run in result.failed:
            raise RuntimeError(f"weights run:{ref}: the source experiment {src_run} failed: {result.failed[src_run]}")
        path = out / src_run
    elif not Path(ref).expanduser().exists() and (out.parent / ref).is_dir():
        path = out.parent / ref
    else:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=f"run:{path}"))


def _run_study_ensemble(
    ens: EnsembleConfig, study: Study, out: Path, n_seeds: dict[str, int], result: StudyResult, resume: bool, overwrite: bool, console: Console
) -> None:
    """Run one ``ensembles:`` entry: once per seed its member experiments share (one run directory each)."""
    from transferlab.ensemble import run_ensemble, write_ensemble_failure

    by_name = {m: [c for c in study.experiments if c.name == m] for m in ens.members}
    seed_sets = [{c.seed for c in cfgs} for cfgs in by_name.values() if cfgs]
    seeds = sorted(set.intersection(*seed_sets)) if seed_sets else [None]
    if not seeds:
        seeds = [None]
    for seed in seeds:
        run = ens.name if len(seeds) == 1 else f"{ens.name}.seed{seed}"
        members = []
        for m in ens.members:
            cfgs = by_name[m]
            if cfgs:
                src = next((c for c in cfgs if c.seed == seed), cfgs[0])
                members.append(out / run_name(src, n_seeds[src.name]))
            else:
                members.append(Path(m) if Path(m).expanduser().exists() or not (out.parent / m).is_dir() else out.parent / m)
        try:
            failed = [str(p.name) for p in members if p.name in result.failed]
            if failed:
                raise RuntimeError(f"member run(s) failed: {', '.join(failed)}")
            run_ensemble(members, out / run, vote=ens.vote, name=ens.name, notes=ens.notes, resume=resume, overwrite=overwrite, console=console)
            result.finished.append(run)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - record and continue
            from transferlab.runs import RunError

            console.print(f"[red]{escape(run)} failed: {escape(type(e).__name__)}: {escape(str(e))}[/]")
            if not isinstance(e, RunError) or type(e).__name__ == "EnsembleError":
                write_ensemble_failure(out / run, ens.name, ens.vote, e)
            result.failed[run] = f"{type(e).__name__}: {e}"


def summarize(result: StudyResult) -> dict[str, Any]:
    return {"study": result.study, "runs_dir": str(result.runs_dir), "finished": result.finished, "failed": result.failed}
