"""Experiment kinds: peers behind one small interface, found by name, run by ``run_experiment``.

A kind (``train``, ``logistic``, ``knn``, ``fewshot``, ``ensemble``) is an object with

* ``check(cfg)`` — what only this kind needs of a config, before any data is loaded (it runs in
  ``ExperimentConfig.validate``, so every experiment of a study is checked before the first runs);
* ``run(cfg, ctx) -> RunMetrics`` — do the work into ``ctx.rundir`` and return the result.

``run_experiment`` is the one way in: it locks and opens the run directory (``RunDir.open``: new,
finished, continued or replaced), hands the kind a ``RunContext``, writes ``metrics.json`` from the
``RunMetrics`` it returns, and records a failure when the kind raises. Kinds never import each other;
what several of them share is in ``transferlab.kinds.common``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from transferlab.config import ConfigError, ExperimentConfig, load_yaml, register_check, register_choices
from transferlab.config.kinds import KindUses, declare_kinds
from transferlab.data.prepare import ImageSplits
from transferlab.engine.costs import Cost, Estimate, Part
from transferlab.engine.distributed import world
from transferlab.engine.loop import Callback
from transferlab.engine.precision import AUTO, auto_precision, device_type
from transferlab.engine.tracking import RunTracking
from transferlab.models.model import TransferModel
from transferlab.registry import Registry
from transferlab.rundir import Opening, RunDir, RunMetrics, code_version

__all__ = [
    "KINDS",
    "RUN_SECTIONS",
    "Kind",
    "RunContext",
    "RunSection",
    "Tested",
    "check_sections",
    "recorded_precision",
    "resolve_run_config",
    "run_experiment",
    "run_sections",
]


@dataclass
class RunContext:
    """What a kind gets besides its config: its run directory and what ``open`` decided, and the session."""

    rundir: RunDir
    opening: Opening
    snapshot: dict[str, Any]
    """The resolved config the directory records (``config.yaml``)."""
    resume: bool = False
    console: Console = field(default_factory=Console)
    splits: ImageSplits | None = None
    """Data prepared by the caller (tests, ``rank``), instead of ``prepare_splits(cfg.data)``."""
    model: TransferModel | None = None
    """A ready model instead of building ``cfg.model`` (e.g. ``transferlab fewshot <run>``)."""
    callbacks: list[Callback] = field(default_factory=list)
    """Extra training-loop hooks (e.g. a search's pruning), after the built-in ones; kinds that train pass them to ``fit``."""
    tracking: RunTracking = field(default_factory=RunTracking)
    """The run's trackers (``tracking:``); started by ``begin``, finished by ``run_experiment``; also in ``callbacks``."""
    shared_features: bool = False
    """Other processes of the study compute frozen features at the same time: share them through the disk store."""

    def begin(self, writer: bool = True) -> None:
        """Create (or replace) the directory and write ``config.yaml``; call once the kind is ready to write."""
        self.rundir.begin(self.opening, self.snapshot, writer)
        self.tracking.start(self.opening.resuming)  # params / hparams; a resumed run continues its tracker runs


class Kind:
    """An experiment kind (see the module docstring). Subclasses set ``name`` and implement ``run``."""

    name: str = ""
    keeps_partial: bool = False
    """An interrupted run continues from what it left (``--resume``); otherwise it is redone."""
    uses_tta: bool = False
    """The kind evaluates images itself, so ``train.tta`` applies to it."""
    uses: KindUses = KindUses()
    """What it uses of a config (data, a model, training, member runs, folds, frozen features): every layer below
    reads this through ``cfg.uses`` instead of testing the kind's name."""

    def check(self, cfg: ExperimentConfig) -> None:
        """Raise ``cfg.error(...)`` for what this kind cannot run. Called before any data is loaded."""

    def snapshot(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """The resolved config recorded in ``config.yaml`` and compared on ``--resume``."""
        return cfg.to_dict()

    def run(self, cfg: ExperimentConfig, ctx: RunContext) -> RunMetrics:  # pragma: no cover - interface
        raise NotImplementedError

    def estimate(self, cfg: ExperimentConfig, n_train: int, n_val: int, n_test: int, cost: Cost | None) -> float:
        """Seconds one run takes (``transferlab plan``), from its split sizes and the measured ``cost`` of its model
        (``None`` for a kind that builds none). The default is one pass of the frozen backbone over every image — what a
        kind on frozen features does; the classifier on top costs seconds."""
        return (n_train + n_val + n_test) * cost.forward if cost is not None else 0.0

    def explain(self, cfg: ExperimentConfig, n_train: int, n_val: int, n_test: int, cost: Cost | None) -> Estimate:
        """``estimate`` with what it assumed (``engine.costs.Estimate``: its parts, and which of them is a feature pass
        the other runs of a cache group reuse, which the plan counts once). The default: one part, ``estimate``'s."""
        seconds = self.estimate(cfg, n_train, n_val, n_test, cost)
        return Estimate((Part("", seconds),))

    def shares_backbone_pass(self, cfg: ExperimentConfig) -> bool:
        """Its frozen backbone's features can come from another run's pass over the same data (the plan groups them)."""
        return cfg.uses.features


KINDS: Registry[Kind] = Registry("kind", "kind: what an experiment does")


# --------------------------------------------------------------------------------------------
# sections that run after testing, with the tested model in memory


@dataclass
class Tested:
    """A run's tested model, handed to the ``RUN_SECTIONS`` after testing."""

    cfg: ExperimentConfig
    model: TransferModel
    """Best weights, eval mode, on ``device``."""
    predictor: torch.nn.Module
    """``model`` with the run's test-time augmentation: what the test split was predicted with."""
    class_names: list[str]
    channels: int
    size: int
    """The channels and square size of the run's training images: outside images are brought to these."""
    device: torch.device
    autocast: Callable[[], AbstractContextManager[Any]]
    run_dir: Path


@dataclass(frozen=True)
class RunSection:
    """A config section worked on a run's tested model (``predict:``, ``activations:``): ``applies(cfg)`` says whether
    this experiment asks for it, ``check(model, cfg)`` refuses what cannot work before training (``None``: nothing to
    check), ``run(tested)`` writes its files into the run directory and returns the summary kept in ``metrics.json``.

    Sections register themselves where they are implemented (``transferlab.tools.inspect``), above the kinds: a kind
    that trains calls every registered section and imports none of them.
    """

    name: str
    applies: Callable[[ExperimentConfig], bool]
    check: Callable[[torch.nn.Module, ExperimentConfig], None] | None
    run: Callable[[Tested], dict[str, Any]]


RUN_SECTIONS: Registry[RunSection] = Registry("run section", "work on a run's tested model, after testing")


def check_sections(model: torch.nn.Module, cfg: ExperimentConfig) -> None:
    """Every section ``cfg`` asks for accepts ``model`` (e.g. ``activations.layers`` exist): before anything trains."""
    for section in RUN_SECTIONS.values():
        if section.check is not None and section.applies(cfg):
            section.check(model, cfg)


def run_sections(tested: Tested, console: Console) -> dict[str, Any]:
    """Run every section the config asks for on the tested model; ``{name: summary}`` for ``metrics.json``."""
    out = {s.name: s.run(tested) for s in RUN_SECTIONS.values() if s.applies(tested.cfg)}
    if out:
        done = ", ".join(f"{k} ({v['images']} images)" for k, v in out.items())
        console.print(f"  outside images: {done}")
    return out


register_choices(ExperimentConfig, "kind", KINDS.names)
declare_kinds(lambda name: KINDS.get(name).uses if name in KINDS else None)


@register_check
def check_kind(cfg: ExperimentConfig) -> None:
    """The kind accepts the config (``kind`` itself is a registered choice)."""
    kind = KINDS.get(cfg.kind)
    if cfg.train.tta != "none" and not kind.uses_tta:
        raise cfg.error(f"train.tta={cfg.train.tta!r} applies to kind: train only (this is kind: {cfg.kind})")
    kind.check(cfg)


def recorded_precision(run_dir: str | Path) -> str | None:
    """``train.precision`` as the run directory's ``config.yaml`` recorded it (``None``: no readable config).

    A config recorded without the key is from before ``auto`` existed, when the default was ``32-true``.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, ConfigError):
        return None  # RunDir.open reports an unreadable config
    if not isinstance(data, dict):
        return None
    train = data.get("train")
    value = train.get("precision", "32-true") if isinstance(train, dict) else "32-true"
    return value if isinstance(value, str) and value != AUTO else None


def resolve_run_config(cfg: ExperimentConfig, run_dir: str | Path, resume: bool = False) -> tuple[ExperimentConfig, str | None]:
    """``cfg`` with its resolved values, before ``config.yaml`` records it, and a note on what was resolved.

    ``train.precision: auto`` becomes the concrete precision of this machine (``engine.precision``), except
    that a run continued or reused with ``resume`` keeps the precision its directory recorded: a run made
    with ``32-true`` (the default before ``auto``) resumes in ``32-true`` and compares equal to its config.
    """
    if cfg.train.precision != AUTO:
        return cfg, None
    recorded = recorded_precision(run_dir) if resume else None
    if recorded is not None:
        precision, why = recorded, "as the run directory recorded it"
    else:
        precision, why = auto_precision(device_type(cfg.train.accelerator))
    resolved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    return resolved, f"precision auto → {precision} ({why})"


def run_experiment(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    splits: ImageSplits | None = None,
    model: TransferModel | None = None,
    callbacks: list[Callback] | None = None,
    shared_features: bool = False,
) -> dict[str, Any]:
    """Run one experiment of any kind into ``run_dir``; returns the metrics dict also written to ``metrics.json``.

    ``resume=True`` skips a finished run and continues an interrupted one (after checking that its
    config has not changed). Without it, an existing run directory is an error unless
    ``overwrite=True``. A failure inside the run is recorded in ``metrics.json`` (status ``failed``)
    and raised; a refusal to open the directory (in use, exists, config changed) records nothing.
    An exception with a ``status`` attribute (``rundir.RunStopped``, e.g. a pruned search trial) is
    recorded with that status. ``callbacks`` are extra training-loop hooks. ``shared_features``: parallel workers
    of one study run at the same time (the study engine says so): frozen-feature sets go through the shared disk store.
    """
    console = console or Console()
    kind = KINDS.get(cfg.kind)
    rundir = RunDir(run_dir)
    rank = world()[0]
    if rank != 0:  # under torchrun only rank 0 prints, locks and writes
        console = Console(quiet=True)
    # resolved values (train.precision: auto) are resolved before the snapshot, so config.yaml records what ran
    cfg, resolved = resolve_run_config(cfg, rundir.path, resume)
    snapshot = kind.snapshot(cfg)
    tracking = RunTracking.for_run(cfg, rundir.path, console, code_version)  # a missing tracker package fails here, before any work
    with rundir.lock() if rank == 0 else contextlib.nullcontext():
        opening = rundir.open(snapshot, resume, overwrite, kind.keeps_partial)
        if opening.finished is not None:
            RunDir.say_reused(opening, cfg.name, rundir.path, console)
            return opening.finished.to_dict()
        if resolved and cfg.kind != "ensemble":
            console.print(f"[dim]{escape(cfg.name)}: {escape(resolved)}[/]")
        ctx = RunContext(rundir, opening, snapshot, resume, console, splits, model, [*tracking.hooks(), *(callbacks or [])], tracking,
                         shared_features)
        try:
            metrics = kind.run(cfg, ctx)
        except BaseException as e:  # Ctrl-C too: the tracker runs are closed (KILLED), --resume continues them
            failure = rundir.write_failure(cfg, e) if rank == 0 and isinstance(e, Exception) else None
            tracking.finish(failure, e)
            raise
        out = rundir.write_metrics(metrics) if rank == 0 else metrics.to_dict()
        tracking.finish(out)  # test metrics, artifacts (config.yaml, metrics.json, history.csv)
        return out
