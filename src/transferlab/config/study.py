"""Study files: a name, defaults, seeds, sweeps, experiments and ensembles -> resolved experiments.

``parse_study`` checks the structure, every key and type (``transferlab.config.convert``) and every
value range (``ExperimentConfig.validate``, which also runs the registered name checks), so a study
that parses is a study whose every experiment can start.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transferlab.config.convert import deep_merge, from_dict, suggest
from transferlab.config.scaling import Distribution, ExecutorConfig, Resources, SearchSpec, parse_executor, parse_resources, parse_search
from transferlab.config.schema import ConfigError, ExperimentConfig, SweepPoint, resolve_paths
from transferlab.config.yamlio import load_yaml, load_yaml_file

__all__ = [
    "EnsembleConfig",
    "Study",
    "config_from_yaml_text",
    "load_study",
    "parse_study",
    "run_name",
    "sweep_keys",
    "sweep_point_name",
]


@dataclass
class EnsembleConfig:
    """A study's ``ensembles:`` entry: a vote over finished runs (see ``transferlab.kinds.ensemble``)."""

    name: str
    members: list[str]
    """Experiments of this study (their run of the same seed), or run directories."""
    vote: Literal["hard", "soft"] = "hard"
    """``hard``: majority of the members' predicted classes; ``soft``: highest mean probability."""
    notes: str = ""


@dataclass
class Study:
    """A parsed study file: a name and the list of fully resolved experiments (one per seed)."""

    name: str
    experiments: list[ExperimentConfig]
    source: str | None = None
    ensembles: list[EnsembleConfig] = field(default_factory=list)
    """Ensembles run after the experiments, in order."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """Where the runs execute (``executor:``; ``--executor`` overrides)."""
    resources: dict[str, Resources] = field(default_factory=dict)
    """Per experiment name (sweep points and seeds included): what one of its runs asks of a worker."""
    searches: dict[str, SearchSpec] = field(default_factory=dict)
    """Experiments with a ``search:``: their trials are proposed by Optuna while the study runs."""

    def resources_of(self, name: str) -> Resources:
        return self.resources.get(name, Resources())


_STUDY_KEYS = ("study", "defaults", "seeds", "sweep", "experiments", "ensembles", "description", "executor", "resources",
               "tracking")


def _parse_ensembles(raw: Any, source: str, experiment_names: set[str]) -> list[EnsembleConfig]:
    """Validate a study's ``ensembles:`` list; members naming no experiment must be run directories."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: 'ensembles' must be a list of {{name, members, vote}} mappings")
    out: list[EnsembleConfig] = []
    for i, entry in enumerate(raw):
        where = f"ensembles[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"] or "/" in entry["name"]:
            raise ConfigError(f"{source}: {where} must be a mapping with a 'name' (no '/')")
        if not isinstance(entry.get("members"), list):
            raise ConfigError(f"{source}: {where}.members: expected a list of experiments or run directories, got {entry.get('members')!r}")
        try:
            ens = from_dict(EnsembleConfig, entry, where)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if ens.name in experiment_names or ens.name in {o.name for o in out}:
            raise ConfigError(f"{source}: {where}: name {ens.name!r} is already used by an experiment or an ensemble")
        if len(ens.members) < 2:
            raise ConfigError(f"{source}: {where}.members={ens.members!r}: an ensemble needs at least 2 members")
        for j, m in enumerate(ens.members):
            if m not in experiment_names and "/" not in m:
                raise ConfigError(
                    f"{source}: {where}.members[{j}]={m!r} is not an experiment of this study{suggest(m, experiment_names)} "
                    "(or give a run directory path)"
                )
        out.append(ens)
    return out


# --------------------------------------------------------------------------------------------
# sweeps


def sweep_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key a ``sweep:`` may expand over (``head.dropout``, ``strategy``, ``seed``, ...)."""
    cls = cls or ExperimentConfig
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if key in ("name", "sweep"):
            continue
        out.append(key)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += sweep_keys(tp, key + ".")
    return out


def _check_sweep(spec: Any, where: str) -> dict[str, list[Any]]:
    """Validate a ``sweep:`` mapping (dotted key -> non-empty list of distinct values)."""
    if spec is None:
        return {}
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{where}: expected a mapping of dotted keys to lists of values, e.g. {{head.dropout: [0.1, 0.2]}}, got {spec!r}")
    valid = sweep_keys()
    for key, values in spec.items():
        if key in ("name", "sweep"):
            raise ConfigError(f"{where}: '{key}' cannot be swept (points are named after the swept values)")
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{where}: unknown key '{key}'{hint}; a sweep key is a dotted config key such as head.dropout, train.lr, strategy.stages"
            )
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{key}: expected a non-empty list of values, got {values!r}")
        reprs = [repr(v) for v in values]
        if len(set(reprs)) != len(reprs):
            raise ConfigError(f"{where}.{key}: a value is listed twice in {values!r}")
        if key == "seed" and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}.seed: seeds must be integers, got {values!r}")
    return dict(spec)


def _format_sweep_value(value: Any) -> str:
    """A short, filesystem-safe text for a swept value (``0.1``, ``true``, ``flip+crop``, ``none``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "+".join(_format_sweep_value(v) for v in value) or "none"
    elif isinstance(value, dict):
        text = "+".join(f"{k}-{_format_sweep_value(v)}" for k, v in value.items()) or "none"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text)


def sweep_point_name(base: str, point: dict[str, Any]) -> str:
    """Name (and run folder) of a sweep point: ``<base>@<key>=<value>[,<key>=<value>...]``."""
    return base + "@" + ",".join(f"{k}={_format_sweep_value(v)}" for k, v in point.items())


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``tree`` with ``key`` (dotted) set to ``value`` — replaced, not merged."""
    out = copy.deepcopy(tree)
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = copy.deepcopy(value)
    return out


def parse_study(raw: dict[str, Any], source: str = "<dict>") -> Study:
    """Turn a study mapping into experiments. ``source`` names the file in error messages.

    Layout::

        study: my_study            # name, used as the run folder runs/<study>/
        defaults: {...}            # merged into every experiment (any ExperimentConfig keys)
        seeds: [0, 1, 2]           # optional: every experiment runs once per seed
        sweep: {train.lr: [1e-3, 1e-2]}   # optional: every experiment once per value (grid over keys)
        experiments:
          - name: cnn_scratch
            model: {backbone: transferlab_cnn}
            strategy: {name: scratch}
          - name: dropout
            sweep: {head.dropout: [0.1, 0.2, 0.3]}   # -> dropout@head.dropout=0.1, ... (grid with the study's)

    A sweep point is its own experiment named ``<name>@<key>=<value>,...`` (``sweep_point_name``) whose
    ``sweep`` field records the group and the values; each value replaces that key's setting. ``seed``
    in a sweep lists that experiment's seeds (runs ``<name>.seed<k>``), like ``seeds`` does for all.
    """
    name, defaults, study_sweep, seeds, entries = _study_header(raw, source)
    try:
        executor = parse_executor(raw.get("executor", "sequential"), "executor")
        default_res = parse_resources(raw.get("resources"), "resources")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    experiments: list[ExperimentConfig] = []
    resources: dict[str, Resources] = {}
    searches: dict[str, SearchSpec] = {}
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{source}: experiments[{i}] must be a mapping with a 'name'")
        if entry["name"] in seen or "/" in entry["name"] or not entry["name"]:
            raise ConfigError(f"{source}: experiments[{i}]: name {entry['name']!r} is empty, repeated or contains '/'")
        seen.add(entry["name"])
        entry = dict(entry)
        res_raw, search_raw = entry.pop("resources", None), entry.pop("search", None)
        expanded = _expand_entry(i, entry, defaults, study_sweep, seeds, source, seen)
        try:
            res = parse_resources(res_raw, f"experiments[{i}].resources", default_res)
            if search_raw is not None:
                searches[entry["name"]] = _check_search(search_raw, f"experiments[{i}].search", expanded)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        resources.update({c.name: res for c in expanded})
        experiments += expanded
    ensembles = _parse_ensembles(raw.get("ensembles"), source, {c.name for c in experiments})
    return Study(name=name, experiments=experiments, source=source, ensembles=ensembles, executor=executor,
                 resources=resources, searches=searches)


def _check_search(raw: Any, where: str, expanded: list[ExperimentConfig]) -> SearchSpec:
    """A ``search:`` of one experiment: the spec, and every bound of its space builds a valid config."""
    if expanded[0].sweep is not None:
        raise ConfigError(f"{where}: an experiment cannot have both a sweep and a search (search the swept key instead)")
    spec = parse_search(raw, where, sweep_keys())
    base = expanded[0].to_dict()
    for key, dist in spec.distributions().items():
        _check_drawn_type(base, key, dist, f"{where}.space.{key}")
        for value in dist.extremes():
            try:
                from_dict(ExperimentConfig, _set_dotted(base, key, value), f"{where}.space.{key}={value!r}").validate()
            except ConfigError as e:
                raise ConfigError(f"{where}.space.{key}: the value {value!r} gives an invalid experiment: {e}") from None
    return spec


def _check_drawn_type(base: dict[str, Any], key: str, dist: Distribution, where: str) -> None:
    """A range distribution draws values of its own type (``uniform`` / ``log_uniform``: real numbers, ``int``:
    integers); they must be values ``key`` takes. Checked on a value from inside the range, as a trial would get
    it: the bounds alone (``uniform: [16, 64]`` are integers) pass for a key that takes integers and trial 0 would fail."""
    if dist.kind == "choice":
        return
    low, high = dist.low, dist.high
    if dist.kind == "int":
        sample: Any = (int(low) + int(high)) // 2  # type: ignore[arg-type]
        draws = "integers"
    else:
        sample = float(f"{low + (high - low) * 0.37:.4g}")  # type: ignore[operator]  # a draw from inside the range
        draws = "real numbers"
    try:
        from_dict(ExperimentConfig, _set_dotted(base, key, sample), where)
    except ConfigError as e:
        m = re.search(r"expected (.+?), got", str(e))
        expected = m.group(1) if m else str(e)
        bounds = f"[{low}, {high}]"
        fix = (f"use {{int: {bounds}}} or {{choice: [...]}}" if dist.kind != "int" and all(float(b).is_integer() for b in (low, high))
               else "use {choice: [...]} with values it takes")
        raise ConfigError(f"{where}: {{{dist.kind}: {bounds}}} draws {draws} (e.g. {sample!r}) but {key} expects {expected}: {fix}") from None


def _study_header(raw: Any, source: str) -> tuple[str, dict[str, Any], dict[str, list[Any]], list[int] | None, list[Any]]:
    """The top level of a study file, checked: (name, defaults, study sweep, seeds, experiment entries)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a study file must be a mapping with 'study' and 'experiments'")
    for key in raw:
        if key not in _STUDY_KEYS:
            raise ConfigError(f"{source}: unknown top-level key '{key}'{suggest(str(key), _STUDY_KEYS)}; valid: {', '.join(_STUDY_KEYS)}")
    name = raw.get("study")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{source}: 'study' must be a non-empty name without '/', got {name!r}")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: 'defaults' must be a mapping")
    if "tracking" in raw:  # the study's trackers: a default of every experiment, as if in `defaults`
        if "tracking" in defaults:
            raise ConfigError(f"{source}: 'tracking' is given twice: at the top level and in 'defaults' (keep one)")
        try:
            from_dict(ExperimentConfig, {"tracking": raw["tracking"]})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        defaults = {**defaults, "tracking": raw["tracking"]}
    if "sweep" in defaults:
        raise ConfigError(f"{source}: 'defaults.sweep': put 'sweep' at the top level of the study (all experiments) or in an experiment")
    study_sweep = _check_sweep(raw.get("sweep"), f"{source}: sweep")
    try:  # check defaults on their own so an error names 'defaults.<key>', not the first experiment
        from_dict(ExperimentConfig, defaults, "defaults")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    seeds = raw.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or not seeds):
        raise ConfigError(f"{source}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    entries = raw.get("experiments")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: 'experiments' must be a non-empty list")
    return name, defaults, study_sweep, seeds, entries


def _expand_entry(
    i: int, entry: dict[str, Any], defaults: dict[str, Any], study_sweep: dict[str, list[Any]], seeds: list[int] | None,
    source: str, seen: set[str],
) -> list[ExperimentConfig]:
    """One ``experiments[i]`` entry -> its resolved, validated experiments: one per sweep point and seed."""
    exp_name = entry["name"]
    grid = {**study_sweep, **_check_sweep(entry.pop("sweep", None), f"{source}: experiments[{i}].sweep")}
    exp_seeds = grid.pop("seed", seeds)
    merged = deep_merge(defaults, entry)
    try:
        from_dict(ExperimentConfig, merged, f"experiments[{i}]")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    out = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        point_raw, where = merged, f"experiments[{i}]"
        if point:
            point_raw = dict(merged, name=sweep_point_name(exp_name, point))
            for key, value in point.items():
                point_raw = _set_dotted(point_raw, key, value)
            where = f"experiments[{i}] (sweep point {', '.join(f'{k}={v!r}' for k, v in point.items())})"
            if point_raw["name"] in seen or len(point_raw["name"].encode()) > 200:
                raise ConfigError(f"{source}: {where}: sweep point name {point_raw['name']!r} is repeated or too long")
            seen.add(point_raw["name"])
        try:
            base = from_dict(ExperimentConfig, point_raw, where)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if Path(source).is_file():  # outside images (predict:, activations:) are named relative to the study file
            resolve_paths(base, Path(source).parent)
        if point:
            base.sweep = SweepPoint(group=exp_name, values=point)
        if base.data.folds is not None and base.data.fold is not None:
            raise ConfigError(f"{source}: {where}: data.fold is set per run by data.folds (not written by hand in a study)")
        # data.folds: k runs per seed, like seeds (run folders <name>[.seed<s>].fold<k>, one row in compare)
        folds: list[int | None] = list(range(base.data.folds)) if isinstance(base.data.folds, int) and base.data.folds >= 2 else [base.data.fold]
        for seed, fold in itertools.product(exp_seeds if exp_seeds is not None else [base.seed], folds):
            cfg = copy.deepcopy(base)
            cfg.seed, cfg.data.fold = seed, fold
            try:
                cfg.validate()
            except ConfigError as e:
                raise ConfigError(f"{source}: {where}: {e}" if point else f"{source}: {e}") from None
            out.append(cfg)
    return out


def load_study(path: str | Path) -> Study:
    """Read and validate a study YAML file."""
    return parse_study(load_yaml_file(path), str(Path(path)))


def run_name(cfg: ExperimentConfig, n_seeds: int) -> str:
    """Folder name of a run: the experiment name, plus ``.seed<k>`` when a study repeats seeds and ``.fold<k>``
    for a fold of ``data.folds``. ``n_seeds`` counts the experiment's runs (seeds × folds)."""
    folds = cfg.data.folds if cfg.data.fold is not None and cfg.data.folds else 1  # a study expands every fold
    name = f"{cfg.name}.seed{cfg.seed}" if n_seeds // folds > 1 else cfg.name
    return f"{name}.fold{cfg.data.fold}" if cfg.data.fold is not None else name


def config_from_yaml_text(text: str, source: str) -> ExperimentConfig:
    """Load an ExperimentConfig saved by transferlab (``config.yaml`` in a run directory)."""
    raw = load_yaml(text, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of experiment settings, got {type(raw).__name__}")
    try:
        return from_dict(ExperimentConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
