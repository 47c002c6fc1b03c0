"""How a study runs, as opposed to what it runs: the executor, per-experiment resources, and searches.

These sections sit beside the experiments in a study file and never change a run's result, so they
are not part of ``ExperimentConfig`` (nor of ``config.yaml``): moving a study from ``sequential`` to
``ray`` or giving a run more CPUs does not make ``--resume`` refuse it.

    executor: {name: local, workers: 2}          # or just: executor: local
    resources: {cpus: 1}                        # default for every experiment; an experiment may override
    experiments:
      - name: lr_search
        resources: {cpus: 2, gpus: 1}
        search:
          space: {train.lr: {log_uniform: [1e-5, 1e-2]}, head.dropout: {uniform: [0, 0.5]}}
          trials: 8
          pruner: median
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from transferlab.config.convert import from_dict, suggest
from transferlab.config.schema import ConfigError

__all__ = [
    "DISTRIBUTIONS",
    "SEARCH_METRICS",
    "Distribution",
    "ExecutorConfig",
    "Resources",
    "SearchSpec",
    "SlurmOptions",
    "parse_executor",
    "parse_resources",
    "parse_search",
]

EXECUTOR_NAMES = ("sequential", "local", "ray", "slurm")


@dataclass
class SlurmOptions:
    """``executor: {name: slurm, slurm: {...}}``: what every job asks Slurm for (sbatch options)."""

    partition: str | None = None
    time_min: int = 60
    """Wall-time limit per job, minutes (``--time``)."""
    gpus_per_node: int | None = None
    """GPUs per job; default: the experiment's ``resources.gpus``."""
    cpus_per_task: int | None = None
    """CPUs per job; default: the experiment's ``resources.cpus``."""
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    additional: dict[str, str] = field(default_factory=dict)
    """Any other sbatch option, e.g. ``{exclude: node12}``."""
    cluster: Literal["slurm", "local", "debug"] = "slurm"
    """submitit's backend: ``slurm`` submits with sbatch; ``local`` runs the same jobs as local processes
    (no Slurm needed: how the tests run it); ``debug`` runs them in this process."""


@dataclass
class ExecutorConfig:
    """Where the runs of a study execute (``executor:`` in the study, ``--executor`` on the command line)."""

    name: Literal["sequential", "local", "ray", "slurm"] = "sequential"
    """``sequential``: one after another in this process; ``local``: ``workers`` processes on this machine;
    ``ray``: Ray tasks on the cluster ``ray_address`` finds; ``slurm``: one Slurm job per run via submitit."""
    workers: int | None = None
    """Runs at the same time. ``local``: default 1 per visible GPU, else 1; ``ray``/``slurm``: default unbounded
    (the cluster queues them)."""
    threads: int | None = None
    """torch threads per run. Default: ``sequential`` torch's own; ``local``: the CPU cores split over the workers;
    ``ray``/``slurm``: the run's ``resources.cpus``. Results are bit-identical at the same thread count."""
    retries: int = 2
    """A run whose worker died (killed, node lost) is retried this many times from its newest checkpoint."""
    ray_address: str | None = None
    """``ray.init(address=...)``: ``auto`` joins a running cluster; unset starts a local one."""
    slurm: SlurmOptions = field(default_factory=SlurmOptions)


@dataclass
class Resources:
    """What one run asks of its worker (Ray task resources, Slurm job size)."""

    cpus: int = 1
    gpus: float = 0.0
    mem_gb: float | None = None


# --------------------------------------------------------------------------------------------
# search spaces


@dataclass(frozen=True)
class Distribution:
    """One dimension of a search space: ``log_uniform``/``uniform`` [low, high], ``int`` [low, high], ``choice``."""

    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()

    def extremes(self) -> list[Any]:
        """The values that bound the space (every choice; both ends of a range), checked at parse time."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]


DISTRIBUTIONS = ("log_uniform", "uniform", "int", "choice")

SEARCH_METRICS = {"val_acc": "maximize", "val_loss": "minimize", "val_map": "maximize"}
"""What a search may optimise (per-epoch validation metrics the training loop reports) and its direction; ``val_map``
(macro mAP) is multi-label only, and a multi-label experiment's default ``val_acc`` means it (``study.search.task_metric``)."""


@dataclass
class SearchSpec:
    """``search:`` of an experiment: an Optuna study over dotted config keys; each trial is a run."""

    space: dict[str, Any] = field(default_factory=dict)
    """Dotted config key -> distribution, e.g. ``train.lr: {log_uniform: [1e-5, 1e-2]}``."""
    trials: int = 20
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    metric: str = "val_acc"
    """A validation metric (``val_acc``, ``val_loss`` or, multi-label, ``val_map``, of the best epoch); never a test metric."""
    direction: Literal["maximize", "minimize"] | None = None
    """Default: ``maximize`` for ``val_acc`` and ``val_map``, ``minimize`` for ``val_loss``."""
    pruner: Literal["none", "median", "halving"] = "median"
    """Stop unpromising trials early on the per-epoch validation metric (median rule or successive halving)."""
    seed: int = 0
    """The sampler's seed: the same study file proposes the same trials."""
    storage: str | None = None
    """Where the Optuna study lives: default SQLite in the study's runs folder (``search.db``); any database URL,
    or ``journal:<file>`` for a journal file on a cluster filesystem. ``--search-storage`` overrides."""

    def resolved_direction(self) -> str:
        return self.direction or SEARCH_METRICS[self.metric]

    def distributions(self) -> dict[str, Distribution]:
        """The parsed space (validated by ``parse_search``)."""
        return {key: _distribution(key, spec, "search.space") for key, spec in self.space.items()}


def parse_executor(raw: Any, where: str) -> ExecutorConfig:
    """``executor: local`` or ``executor: {name: local, workers: 2, ...}`` -> ExecutorConfig (checked)."""
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an executor name ({', '.join(EXECUTOR_NAMES)}) or a mapping, got {raw!r}")
    cfg = from_dict(ExecutorConfig, raw, where)
    if cfg.workers is not None and cfg.workers < 1:
        raise ConfigError(f"{where}.workers={cfg.workers}: must be at least 1")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"{where}.threads={cfg.threads}: must be at least 1")
    if cfg.retries < 0:
        raise ConfigError(f"{where}.retries={cfg.retries}: must be 0 or more")
    if cfg.slurm.time_min < 1:
        raise ConfigError(f"{where}.slurm.time_min={cfg.slurm.time_min}: must be at least 1 minute")
    return cfg


def parse_resources(raw: Any, where: str, base: Resources | None = None) -> Resources:
    """``resources: {cpus, gpus, mem_gb}`` over ``base`` (the study's default)."""
    if raw is None:
        return base or Resources()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping like {{cpus: 4, gpus: 1}}, got {raw!r}")
    merged = {**(vars(base) if base else {}), **raw}
    res = from_dict(Resources, merged, where)
    if res.cpus < 1:
        raise ConfigError(f"{where}.cpus={res.cpus}: must be at least 1")
    if res.gpus < 0 or (res.gpus > 1 and res.gpus != int(res.gpus)):
        raise ConfigError(f"{where}.gpus={res.gpus}: a whole number of GPUs, or a fraction of one")
    return res


def _distribution(key: str, spec: Any, where: str) -> Distribution:
    here = f"{where}.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{here}: expected one of {{log_uniform: [low, high]}}, {{uniform: [low, high]}}, {{int: [low, high]}}, "
                          f"{{choice: [a, b, ...]}}, got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{here}: unknown distribution {kind!r}{suggest(str(kind), DISTRIBUTIONS)}; use {', '.join(DISTRIBUTIONS)}")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{here}.choice: expected a non-empty list of values, got {args!r}")
        if len({repr(a) for a in args}) != len(args):
            raise ConfigError(f"{here}.choice: a value is listed twice in {args!r}")
        return Distribution("choice", choices=tuple(args))
    if not isinstance(args, list) or len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{here}.{kind}: expected [low, high] numbers, got {args!r}")
    low, high = args
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{here}.int: bounds must be integers, got {args!r}")
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"{here}.{kind}: need low < high (finite), got {args!r}")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"{here}.log_uniform: bounds must be > 0, got {args!r}")
    return Distribution(kind, low, high)


def parse_search(raw: Any, where: str, valid_keys: list[str]) -> SearchSpec:
    """Check a ``search:`` mapping: known keys, distributions, metric (never a test metric)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with 'space' (and trials, sampler, metric, pruner), got {raw!r}")
    spec = from_dict(SearchSpec, raw, where)
    if not spec.space:
        raise ConfigError(f"{where}.space: expected a non-empty mapping of dotted config keys to distributions")
    for key, dist in spec.space.items():
        if key in ("name", "sweep", "seed", "kind"):
            raise ConfigError(f"{where}.space.{key}: '{key}' cannot be searched")
        if key not in valid_keys:
            raise ConfigError(f"{where}.space: unknown key '{key}'{suggest(str(key), valid_keys)}; a search key is a dotted config key "
                              "such as train.lr, head.dropout, strategy.stages")
        _distribution(key, dist, f"{where}.space")
    if spec.metric.startswith("test"):
        raise ConfigError(f"{where}.metric={spec.metric!r}: a search never chooses on the test split; use "
                          f"{' or '.join(SEARCH_METRICS)} (the test metrics of the best trial are reported)")
    if spec.metric not in SEARCH_METRICS:
        raise ConfigError(f"{where}.metric={spec.metric!r}{suggest(spec.metric, SEARCH_METRICS)}: use one of {', '.join(SEARCH_METRICS)}")
    if spec.trials < 1:
        raise ConfigError(f"{where}.trials={spec.trials}: must be at least 1")
    if spec.sampler == "grid" and any(d.kind != "choice" for d in spec.distributions().values()):
        raise ConfigError(f"{where}.sampler=grid: every dimension must be a 'choice' list (a grid of ranges is undefined)")
    return spec
