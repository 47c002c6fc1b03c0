"""``transferlab plan`` / ``run --dry-run``: the study's runs, checked and estimated, without training.

Everything ``run`` checks before starting is checked (the study parses, every experiment validates,
the graph has no cycle and no missing dependency). Then, per run: what it needs first, its slot and
start on the executor, whether its dataset and weights are here (or would be downloaded, and how
large), which runs likely share one cached backbone pass, and an estimated time from a short probe:
a few real training steps of the real model (random weights: the cost does not depend on them) at
the real batch and image size on this machine. Missing data is reported, never fatal.

The estimate is an upper bound of one run's time (all epochs, no early stopping), made of parts that each say
what they assumed (``Kind.explain``: the phases of a trainability schedule, the cached prefix pass, a probe's
sweep, the data read and model build); a feature pass that several runs of one cache group read from the
feature store is counted for the first of them only (``engine.costs.count_shared_once``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from transferlab.config import ConfigError, ExecutorConfig, ExperimentConfig, Study, load_study
from transferlab.data.archives import DownloadRefused, no_downloads
from transferlab.data.folds import pool_train_test
from transferlab.data.prepare import select_parts
from transferlab.data.selection import select_classes
from transferlab.data.sources import DatasetError, dataset_size, load_dataset
from transferlab.engine.costs import Cost, Estimate, Part, count_shared_once, fmt_seconds, measure_cost
from transferlab.kinds import KINDS
from transferlab.models.backbones import weights_status
from transferlab.models.model import build_model
from transferlab.strategies import apply_strategy
from transferlab.study.executors import EXECUTORS
from transferlab.study.plan import PlannedRun, dependency_levels, plan_study
from transferlab.study.runner import check_folds_fit, resolve_executor

__all__ = ["PlanReport", "PlanRow", "dry_run", "print_plan", "probe_key"]

@dataclass
class DataFacts:
    state: str  # local | download | missing
    detail: str
    n_train: int | None = 0
    n_val: int | None = 0
    n_test: int | None = 0
    """Split sizes; ``None``: unknown (the data is not here and its size is not documented, or its selection fails)."""
    channels: int = 3
    side: int = 32
    n_classes: int = 10
    load_seconds: float = 0.0
    """Seconds the plan took to read the dataset and make the selection: every run pays it again (0 when not here)."""

    @property
    def known(self) -> bool:
        return self.n_train is not None and self.n_val is not None and self.n_test is not None

    def sizes(self) -> str:
        return f"{self.n_train}/{self.n_val}/{self.n_test} @{self.side}px" if self.known else "size unknown"


@dataclass
class PlanRow:
    """One run of the plan, as the table shows it."""

    name: str
    kind: str
    needs: list[str]
    level: int
    data: DataFacts
    weights: tuple[str, str]
    cache_group: str = ""
    estimate_s: float | None = None
    slot: int = 0
    start_s: float = 0.0
    note: str = ""
    assumed: str = ""
    """What the estimate assumed (``Estimate.describe``)."""


@dataclass
class PlanReport:
    study: str
    executor: ExecutorConfig
    rows: list[PlanRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    probe_seconds: float = 0.0
    busy: str = ""
    """Set when the machine was busy while the probes timed (``busy_note``): the estimates may be high."""

    @property
    def total_s(self) -> float:
        return sum(r.estimate_s or 0.0 for r in self.rows)

    @property
    def wall_s(self) -> float:
        return max((r.start_s + (r.estimate_s or 0.0) for r in self.rows), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study, "executor": dataclasses.asdict(self.executor), "total_s": self.total_s, "wall_s": self.wall_s,
                "problems": self.problems, "busy": self.busy, "rows": [dataclasses.asdict(r) for r in self.rows]}


def dry_run(study: str | Path | Study, runs_dir: str | Path = "runs", executor: str | ExecutorConfig | None = None,
            workers: int | None = None, probe: bool = True, only: list[str] | None = None) -> PlanReport:
    """Check and estimate every run of ``study`` (see the module docstring); nothing is trained or written."""
    study = study if isinstance(study, Study) else load_study(study)
    exec_cfg = resolve_executor(study.executor, executor, workers, None)
    EXECUTORS.get(exec_cfg.name)
    plan = [r for r in plan_study(study, Path(runs_dir) / study.name) if not only or r.cfg.name in only
            or (r.cfg.sweep is not None and r.cfg.sweep.group in only)]
    report = PlanReport(study.name, exec_cfg)
    levels = dependency_levels(plan)
    facts: dict[str, DataFacts] = {}
    probes: dict[str, tuple[Cost, float]] = {}
    explained: dict[str, Estimate] = {}
    forward: dict[str, float] = {}  # seconds per image of each probed run's model: a distillation teacher's
    data_problems: dict[str, list[str]] = {}  # one line per problem, not one per run (a 1000-fold sweep)
    t0 = time.perf_counter()
    for run in plan:
        row = PlanRow(run.name, run.cfg.kind, run.needs, levels[run.name], _data(run.cfg, facts),
                      _weights(run) if run.cfg.uses.model else ("local", "members' runs"))
        if row.data.state == "missing" or not row.data.known:
            data_problems.setdefault(row.data.detail, []).append(run.name)
        if row.weights[0] == "missing":
            report.problems.append(f"{run.name}: weights: {row.weights[1]}")
        if run.search:
            row.note = "search trial (settings chosen when it starts)"
        if probe and run.cfg.uses.model and row.data.known:  # no model is timed for data that is not there
            try:
                explained[run.name] = _estimate(run.cfg, row.data, probes)
                forward[run.name] = probes[probe_key(run.cfg, row.data)][0].forward
                explained[run.name] = _with_teacher(run, row.data, explained[run.name], forward)
                row.estimate_s = explained[run.name].seconds
            except Exception as e:  # noqa: BLE001 - a model the probe cannot build is a problem to report, not a crash
                report.problems.append(f"{run.name}: probe failed: {type(e).__name__}: {e}")
        elif not run.cfg.uses.model:  # made of other runs: what it costs is the kind's to say
            row.estimate_s = KINDS.get(run.cfg.kind).estimate(run.cfg, 0, 0, 0, None) if probe else None
        report.rows.append(row)
    report.probe_seconds = time.perf_counter() - t0
    report.busy = busy_note() if probe and explained else ""
    for detail, names in data_problems.items():
        who = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more run(s)"
        report.problems.insert(0, f"{who}: data: {detail}")
    try:
        check_folds_fit(study, plan)
    except ConfigError as e:
        report.problems.append(str(e))
    _cache_groups(report.rows, plan)
    _share_passes(report.rows, explained)
    _schedule(report.rows, exec_cfg)
    return report


def _data(cfg: ExperimentConfig, cache: dict[str, DataFacts]) -> DataFacts:
    """Is the dataset here, and how many images each split gets (from the real selection when it is)."""
    if not cfg.uses.data:
        return DataFacts("local", "the member runs' own data")
    key = json.dumps([dataclasses.asdict(cfg.data), cfg.seed], sort_keys=True, default=str)
    if key in cache:
        return cache[key]
    t0 = time.perf_counter()
    try:
        with no_downloads():
            raw = load_dataset(cfg.data)
    except DownloadRefused as e:
        facts = _known(cfg, "download", str(e))
    except DatasetError as e:
        facts = DataFacts("missing", str(e).splitlines()[0][:300] + " (size unknown)", None, None, None, side=cfg.data.image_size or 224,
                          n_classes=len(cfg.data.classes) if cfg.data.classes else 10)
    else:
        shape = tuple(raw.train_x.shape) if isinstance(raw.train_x, torch.Tensor) else None
        channels = shape[1] if shape else getattr(raw.train_x, "channels", 3) or 3
        side = cfg.data.image_size or (shape[2] if shape else 224)
        try:
            pooled = pool_train_test(raw) if cfg.data.folds is not None else raw  # as prepare_splits does
            relabel, _, names = select_classes(cfg.data.classes, raw.class_names)
            parts, _ = select_parts(cfg.data, pooled, cfg.seed, relabel, names)
            facts = DataFacts("local", raw.source, len(parts["train"][0]), len(parts["val"][0]), len(parts["test"][0]), channels, side, len(names),
                              time.perf_counter() - t0)
        except DatasetError as e:  # here, but its selection cannot be made: the run would fail; no size to estimate from
            facts = DataFacts("local", f"{raw.source}: {str(e).splitlines()[0][:300]}", None, None, None, channels, side, len(raw.class_names))
    cache[key] = facts
    return facts


def _known(cfg: ExperimentConfig, state: str, detail: str) -> DataFacts:
    """Split sizes of a dataset that is not here, from the size its loader documents (``documented_size``) and the
    selection settings (``None``: not documented, the size is unknown; nothing is invented)."""
    d = cfg.data
    size = dataset_size(d.dataset)
    classes = len(d.classes) if d.classes else (size.classes if size is not None else 10)
    if size is None:
        return DataFacts(state, detail + " (size unknown)", None, None, None, 3, d.image_size or 224, classes)
    n_train, n_test = size.train, size.test
    if d.train_subset is not None:
        n_train = int(d.train_subset if d.train_subset > 1 else n_train * d.train_subset)
    if d.test_subset is not None:
        n_test = int(d.test_subset if d.test_subset > 1 else n_test * d.test_subset)
    n_val = d.val_count if d.val_count is not None else int(n_train * d.val_fraction)
    if d.k_per_class is not None:
        n_train = d.k_per_class * classes
    return DataFacts(state, detail + " (split sizes from the dataset's documented size)", max(0, n_train - n_val), n_val, n_test,
                     size.channels, d.image_size or size.side, classes)


def _weights(run: PlannedRun) -> tuple[str, str]:
    if run.needs and run.cfg.model.weights.startswith("run:"):
        return "local", f"from run {run.needs[0]} (made first)"
    return weights_status(run.cfg.model.backbone, run.cfg.model.weights)


COSTLESS = {"model": ("weights", "keep_head", "drop_rate"), "head": ("dropout",)}
"""Settings that do not change what one training step or forward pass costs: a probe is not repeated for them
(the probe runs from random weights, and a dropout rate costs the same at any value)."""


def probe_key(cfg: ExperimentConfig, data: DataFacts) -> str:
    """What a probe's timing depends on: the architecture (backbone, truncation, head shape), what trains (strategy),
    the input (side, channels, classes), batch sizes, precision and whether a training step is timed (kind)."""
    parts: dict[str, Any] = {
        section: {k: v for k, v in dataclasses.asdict(getattr(cfg, section)).items() if k not in COSTLESS.get(section, ())}
        for section in ("model", "head", "strategy")
    }
    parts.update(side=data.side, channels=data.channels, classes=data.n_classes, batch=cfg.train.batch_size,
                 eval_batch=cfg.train.eval_batch_size, precision=cfg.train.precision, steps=cfg.uses.training)
    return json.dumps(parts, sort_keys=True, default=str)


def _estimate(cfg: ExperimentConfig, data: DataFacts, probes: dict[str, tuple[Cost, float]]) -> Estimate:
    """One run's estimate: the kind's own (``Kind.explain``) from its split sizes and the measured cost of its model (one
    probe per distinct cost: ``probe_key``), plus what every run pays before its first step: reading its data and
    building its model (both measured here)."""
    key = probe_key(cfg, data)
    if key not in probes:
        probes[key] = _probe(cfg, data)
    cost, build_seconds = probes[key]
    est = KINDS.get(cfg.kind).explain(cfg, data.n_train, data.n_val, data.n_test, cost)
    start = Part(f"data read {fmt_seconds(data.load_seconds)} + model build {fmt_seconds(build_seconds)}", data.load_seconds + build_seconds)
    return Estimate((*est.parts, start))


def _with_teacher(run: PlannedRun, data: DataFacts, est: Estimate, forward: dict[str, float]) -> Estimate:
    """A distilled run (``train.distill``) also runs its frozen teacher on every training batch: epochs × training images
    × the teacher's forward, measured by the teacher's own probe when the teacher is a run of this study planned before
    it (else said to be not counted: the probe cannot time a model that is not there)."""
    distill = run.cfg.train.distill
    if distill is None:
        return est
    teacher = Path(distill.teacher.removeprefix("run:")).name
    if teacher not in forward:
        return Estimate((*est.parts, Part(f"teacher {teacher}'s forward passes not counted (not a run of this study)", 0.0)))
    seconds = run.cfg.train.epochs * (data.n_train or 0) * forward[teacher]
    return Estimate((*est.parts, Part(f"teacher {teacher}'s forward on {run.cfg.train.epochs} × {data.n_train} training images "
                                      f"({fmt_seconds(seconds)})", seconds)))


def _probe(cfg: ExperimentConfig, data: DataFacts) -> tuple[Cost, float]:
    """The run's model (random weights, its strategy applied) timed by the engine's probe (``engine.costs``), and the
    seconds building it took."""
    model_cfg = dataclasses.replace(cfg.model, weights="scratch", keep_head=False)
    t0 = time.perf_counter()
    model, _ = build_model(model_cfg, cfg.head, data.n_classes)
    apply_strategy(model, cfg.strategy)
    build_seconds = time.perf_counter() - t0
    return measure_cost(model, cfg, data.side, data.n_classes, train=cfg.uses.training, cached=True), build_seconds


def _cache_groups(rows: list[PlanRow], plan: list[PlannedRun]) -> None:
    """Label runs that likely share one cached backbone pass (same frozen backbone, weights, data and seed)."""
    groups: dict[str, list[PlanRow]] = {}
    for row, run in zip(rows, plan, strict=True):
        c = run.cfg
        if not KINDS.get(c.kind).shares_backbone_pass(c):
            continue
        key = json.dumps([c.model.backbone, c.model.weights, dataclasses.asdict(c.model), dataclasses.asdict(c.data), c.seed],
                         sort_keys=True, default=str)
        groups.setdefault(key, []).append(row)
    shared = [g for g in groups.values() if len(g) > 1]
    for i, g in enumerate(shared):
        for row in g:
            row.cache_group = chr(ord("A") + i % 26)


def _share_passes(rows: list[PlanRow], explained: dict[str, Estimate]) -> None:
    """Each cache group's shared feature pass counted once, for its first run in plan order (the later ones read it from
    the feature store); every estimated row says what it assumed."""
    named = [(r.name, r.cache_group, explained[r.name]) for r in rows if r.name in explained]
    by_name = {r.name: r for r in rows}
    for (name, _, _), est in zip(named, count_shared_once(named), strict=True):
        by_name[name].estimate_s, by_name[name].assumed = est.seconds, est.describe()


def _schedule(rows: list[PlanRow], cfg: ExecutorConfig) -> None:
    """Slot and start time of every run on the executor: list scheduling in dependency order with the estimates."""
    n = 1 if cfg.name == "sequential" else (cfg.workers or (max(1, torch.cuda.device_count()) if cfg.name == "local" else len(rows) or 1))
    free = [0.0] * n
    end: dict[str, float] = {}
    for row in rows:
        ready = max((end.get(d, 0.0) for d in row.needs), default=0.0)
        slot = min(range(n), key=lambda i: max(free[i], ready))
        row.slot, row.start_s = slot, max(free[slot], ready)
        end[row.name] = free[slot] = row.start_s + (row.estimate_s or 0.0)


BUSY_LOAD = 1.5
"""Load average per core above which the plan warns that other work shared the CPU while the probes timed."""


def busy_note() -> str:
    """A warning when the 1-minute load average is above ``BUSY_LOAD`` per core: the probes time the fastest of a few
    steps, which does not help when other processes hold the cores for longer than the probe (a test suite beside
    ``plan`` made a 6-minute run look like 6 hours, benchmarks/RESULTS.md §15)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return ""
    if load <= BUSY_LOAD * cores:
        return ""
    return (f"the machine was busy while the probes timed (load average {load:.1f} on {cores} cores): other work shared "
            "the CPU, so the estimates may be high; plan again on a quiet machine")


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def print_plan(report: PlanReport, console: Console) -> None:
    """The plan as a table, with the totals and the problems found."""
    t = Table(title=f"plan: {report.study} on {report.executor.name}", title_justify="left", show_edge=False)
    for col in ("run", "kind", "needs", "slot", "data", "weights", "cache", "estimate", "start"):
        t.add_column(col)
    for r in report.rows:
        data = f"{r.data.state}: {r.data.sizes()}"
        weights = r.weights[0] if r.weights[0] in ("none", "local") else f"{r.weights[0]}: {r.weights[1]}"
        t.add_row(escape(r.name), r.kind, escape(", ".join(r.needs)) or "—", str(r.slot), escape(data), escape(weights),
                  r.cache_group or "—", _fmt_s(r.estimate_s), _fmt_s(r.start_s))
    console.print(t)
    for r in report.rows:
        if r.assumed:
            console.print(f"  {r.name}: {r.assumed}", markup=False, highlight=False)
    console.print(f"{len(report.rows)} runs; estimated compute {_fmt_s(report.total_s)}, wall {_fmt_s(report.wall_s)} on "
                  f"{report.executor.name} (upper bound: all epochs, no early stopping; probes took {report.probe_seconds:.0f}s)",
                  markup=False, highlight=False)
    if report.busy:
        console.print(f"[yellow]note:[/] {escape(report.busy)}")
    unknown = sum(not r.data.known for r in report.rows)
    if unknown:
        console.print(f"{unknown} run(s) not estimated: their data's size is unknown (see the problems below)", markup=False, highlight=False)
    downloads = sorted({r.data.detail for r in report.rows if r.data.state == "download"})
    for d in downloads:
        console.print(f"download: {d}", markup=False, highlight=False)
    for p in report.problems:
        console.print(f"[yellow]problem:[/] {escape(p)}")
