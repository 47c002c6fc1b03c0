"""A study as a graph: every run it makes, what each needs first, in an order that respects it.

``plan_study`` turns a parsed study into ``PlannedRun`` s — one per run folder — with the run folders
each needs to have finished ``ok`` first: ``weights: run:<experiment>`` (the run of the same seed) and
ensemble members, and every other run reference of a config (a distillation teacher, soup members: ``config.schema.
run_references``). A dependency on an experiment that does not exist, or a cycle, is a ``ConfigError``
before anything runs. A searched experiment (``search:``) is planned as its trials,
``<experiment>@trial=<k>``, whose settings Optuna proposes when each starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transferlab.config import ConfigError, EnsembleConfig, EnsembleSpec, ExperimentConfig, Resources, Study, run_name, suggest
from transferlab.config.schema import run_references, with_run_references

__all__ = ["PlannedRun", "dependency_levels", "plan_study", "trial_name"]


@dataclass
class PlannedRun:
    """One run of a study: its folder name, its resolved config, the run folders it needs first, its resources."""

    name: str
    cfg: ExperimentConfig
    needs: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)
    search: str | None = None
    """For a search trial: the searched experiment (the trial's settings are chosen when it starts)."""


def trial_name(experiment: str, number: int) -> str:
    """The run folder (and experiment name) of trial ``number`` of a searched experiment."""
    return f"{experiment}@trial={number}"


def plan_study(study: Study, out: Path) -> list[PlannedRun]:
    """Every run of ``study`` (writing into ``out``) in dependency order: what a run needs comes before it.

    Raises ``ConfigError`` for a ``run:<name>`` that is no experiment, no run directory and no path, for a
    dependency on a searched experiment, and for a cycle.
    """
    n_seeds = {c.name: sum(o.name == c.name for o in study.experiments) for c in study.experiments}  # sweeps may set seeds
    plan: list[PlannedRun] = []
    for cfg in study.experiments:
        res = study.resources_of(cfg.name)
        if cfg.name in study.searches:
            if n_seeds[cfg.name] == 1 or cfg.seed == min(c.seed for c in study.experiments if c.name == cfg.name):
                spec = study.searches[cfg.name]
                plan += [PlannedRun(trial_name(cfg.name, k), cfg, [], res, search=cfg.name) for k in range(spec.trials)]
            continue
        cfg, needs = _resolve_run_weights(cfg, study, out, n_seeds)
        plan.append(PlannedRun(run_name(cfg, n_seeds[cfg.name]), cfg, needs, res))
    for ens in study.ensembles:
        plan += _plan_ensemble(ens, study, out, n_seeds)
    return _dependency_order(plan, study)


def _resolve_run_weights(cfg: ExperimentConfig, study: Study, out: Path, n_seeds: dict[str, int]) -> tuple[ExperimentConfig, list[str]]:
    """Every run reference of ``cfg`` (``config.schema.run_references``: ``weights: run:<experiment>``, a distillation
    teacher, soup members, a WiSE-FT base) naming an experiment of ``study`` -> its run directory, and those runs
    as what ``cfg`` needs first.

    The run of the same seed is used when the source experiment has that seed (else its first).
    ``run:<study>/<run>`` is looked up under the runs directory; an existing path is left as it is.
    """
    resolved, needs = {}, []
    for key, ref in run_references(cfg).items():
        shown = ref if key.startswith("soup.members") else f"run:{ref}"
        if ref in study.searches:
            raise ConfigError(f"{study.source}: experiment '{cfg.name}': {key}={shown!r} names a searched experiment; "
                              "run the search first, then name its best trial's run directory")
        sources = [c for c in study.experiments if c.name == ref]
        if sources:
            src = next((c for c in sources if c.seed == cfg.seed), sources[0])
            needs.append(run_name(src, n_seeds[src.name]))
            resolved[key] = str(out / needs[-1])
        elif not Path(ref).expanduser().exists() and (out.parent / ref).is_dir():
            resolved[key] = str(out.parent / ref)
        elif not Path(ref).expanduser().exists():
            names = sorted({c.name for c in study.experiments})
            raise ConfigError(
                f"{study.source}: experiment '{cfg.name}': {key}={shown!r}: {ref!r} is no experiment of this study"
                f"{suggest(ref, names)}, no run directory under {out.parent} and no path"
            )
    return with_run_references(cfg, resolved), needs


def _plan_ensemble(ens: EnsembleConfig, study: Study, out: Path, n_seeds: dict[str, int]) -> list[PlannedRun]:
    """One ``ensembles:`` entry: once per seed its member experiments share (one run directory each)."""
    for m in ens.members:
        if m in study.searches:
            raise ConfigError(f"{study.source}: ensemble '{ens.name}': member {m!r} is a searched experiment; "
                              "name its best trial's run directory instead")
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
        first = next((cfgs[0] for cfgs in by_name.values() if cfgs), None)
        cfg = ExperimentConfig(
            name=ens.name, seed=seed if seed is not None else 0, kind="ensemble", notes=ens.notes,
            ensemble=EnsembleSpec(members=members, vote=ens.vote),
            tracking=first.tracking if first is not None else ExperimentConfig().tracking,  # tracked where its members are
        )
        cfg.validate()
        plan.append(PlannedRun(ens.name if len(seeds) == 1 else f"{ens.name}.seed{seed}", cfg, needs))
    return plan


def _dependency_order(plan: list[PlannedRun], study: Study) -> list[PlannedRun]:
    """``plan`` reordered so that every run comes after what it needs (study order otherwise); a cycle is an error."""
    by_name = {r.name: r for r in plan}
    state: dict[str, int] = {}  # 1: on the current path, 2: placed
    ordered: list[PlannedRun] = []

    def visit(run: PlannedRun, path: list[str]) -> None:
        if state.get(run.name) == 2:
            return
        if state.get(run.name) == 1:
            cycle = path[path.index(run.name):] + [run.name]
            raise ConfigError(f"{study.source}: the experiments depend on each other in a cycle: {' -> '.join(cycle)} "
                              "(through weights: run:<experiment>, a teacher or soup members)")
        state[run.name] = 1
        for need in run.needs:
            if need in by_name:
                visit(by_name[need], [*path, run.name])
        state[run.name] = 2
        ordered.append(run)

    for run in plan:
        visit(run, [])
    return ordered


def dependency_levels(plan: list[PlannedRun]) -> dict[str, int]:
    """Level of every run: 0 needs nothing of the plan, k needs something of level k-1 (Slurm job arrays, the plan table)."""
    levels: dict[str, int] = {}
    for run in plan:  # plan is in dependency order
        levels[run.name] = 1 + max((levels[n] for n in run.needs if n in levels), default=-1)
    return levels
