"""A run's trackers: the ``TRACKERS`` registry, the ``Tracker`` interface and ``RunTracking``, which drives them.

This is the seam between the training loop and the trackers: the trackers themselves (TensorBoard,
MLflow, Weights & Biases) are peers in ``transferlab.results.trackers`` and register here when imported
(``import transferlab`` does), so the engine and the kinds never import them.

Each run makes its own trackers inside the process that runs it (``kinds.run_experiment``), so every
executor works the same way (one writer per run) and under DDP only rank 0 logs. ``RunTracking``

* ``start(resuming)`` — when the run directory is ready (``RunContext.begin``): hyperparameters,
  params, tags; ``tracking.json`` in the run directory records where the run is logged (an MLflow
  run id that ``--resume`` continues);
* is a loop ``Callback``: per-step train loss and lr (kept on the device and written at the epoch's
  end, so the loop keeps its one host sync per epoch), per-epoch metrics;
* ``finish(metrics, error)`` — after ``metrics.json``: test metrics, confusion matrix, artifacts, status.

Tracking never fails a run: the first error of a tracker (a server that is down, a full disk) turns
that tracker off for the rest of the run, with one line saying so and why. A configured tracker whose
package is missing is a config error (``check_tracking``), before any run starts.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from transferlab.config import ConfigError, ExperimentConfig, choice_message, from_dict, register_check
from transferlab.config.tracking import tracking_specs
from transferlab.engine.distributed import world
from transferlab.engine.figures import draw_confusion
from transferlab.engine.loop import Callback, Loop
from transferlab.files import read_json, write_json
from transferlab.registry import Registry
from transferlab.rundir.layout import TRACKING_FILE

__all__ = ["TRACKERS", "TRACKING_FILE", "RunInfo", "RunTracking", "Tracker", "check_tracking", "confusion_image", "flat_config",
    "strategy_label", "missing_modules"]



@dataclass
class RunInfo:
    """What a tracker knows of its run."""

    cfg: ExperimentConfig
    run_dir: Path
    console: Console
    version: Callable[[], dict[str, str]] = dict
    """transferlab / torch versions and the git commit (``rundir.code_version``, handed down by the kinds layer)."""

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def study_dir(self) -> Path:
        return self.run_dir.parent

    @property
    def study(self) -> str:
        return self.study_dir.resolve().name


class Tracker:
    """One destination of one run's logs. Subclasses are registered in ``TRACKERS`` under their ``name``.

    Every method may raise: ``RunTracking`` turns the tracker off on the first error and says why.
    """

    name: ClassVar[str] = ""
    extra: ClassVar[str] = ""
    """The pip extra that installs what it needs: ``pip install 'transferlab[<extra>]'``."""
    Options: ClassVar[type] = object
    """Dataclass of its options (``tracking: {name: {option: value}}``), checked like any config key."""
    wants_steps: ClassVar[bool] = False
    """It logs per-step values (``log_steps``)."""

    def __init__(self, run: RunInfo, options: Any) -> None:
        self.run, self.options = run, options

    @classmethod
    def modules(cls, options: Any) -> tuple[str, ...]:
        """The modules it imports with these options (checked before any run)."""
        return ()

    @classmethod
    def check(cls, options: Any) -> str | None:
        """What is wrong with ``options`` (``'<option>=<value> must be ...'``), or ``None``."""
        return None

    def start(self, resuming: bool, previous: dict[str, Any] | None) -> None:
        """The run directory exists; ``previous`` is this tracker's record in ``tracking.json`` of the interrupted run."""

    def record(self) -> dict[str, Any]:
        """What ``tracking.json`` keeps for this tracker (read back as ``previous`` on ``--resume``)."""
        return {}

    def resolved(self) -> None:
        """``run.cfg`` now holds values resolved during the run (``train.lr: find`` -> a number): log them."""

    def fit_start(self, first_step: int, steps_per_epoch: int, history: list[dict[str, float]]) -> None:
        """Training starts at global step ``first_step``; ``history`` holds the epochs a resumed run already did."""

    def log_steps(self, steps: list[tuple[int, float, float]]) -> None:
        """(global step, train loss, lr) of the steps since the last call."""

    def log_epoch(self, row: dict[str, float], step: int) -> None:
        """One ``history.csv`` row; ``step`` is the global step at the epoch's end."""

    def finish(self, metrics: dict[str, Any] | None, error: BaseException | None) -> None:
        """The run ended: ``metrics`` is ``metrics.json`` when it finished; ``error`` what stopped it otherwise."""

    def close(self) -> None:
        """Release files and connections (also after an error)."""


TRACKERS: Registry[type[Tracker]] = Registry("tracker", "tracking: where a run is also logged while it runs")


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of ``names`` that cannot be imported (``sys.modules[name] = None`` counts as missing)."""
    out = []
    for name in names:
        if name in sys.modules:
            if sys.modules[name] is None:
                out.append(name)
        elif importlib.util.find_spec(name) is None:
            out.append(name)
    return out


def _parse(cfg: ExperimentConfig) -> list[tuple[type[Tracker], Any]]:
    """The configured trackers with their parsed options; a ``ConfigError`` naming the key otherwise."""
    out = []
    for name, options in tracking_specs(cfg.tracking).items():
        if name not in TRACKERS:
            raise cfg.error(choice_message("tracking", name, TRACKERS.names()))
        cls = TRACKERS.get(name)
        try:
            opts = from_dict(cls.Options, options, f"tracking.{name}")
        except ConfigError as e:
            raise cfg.error(str(e)) from None
        if problem := cls.check(opts):
            raise cfg.error(f"tracking.{name}.{problem}")
        if missing := missing_modules(cls.modules(opts)):
            raise cfg.error(
                f"tracking: {name} needs {', '.join(missing)}, which is not installed: pip install 'transferlab[{cls.extra}]'"
            )
        out.append((cls, opts))
    return out


@register_check
def check_tracking(cfg: ExperimentConfig) -> None:
    """Tracker names are registered (did-you-mean), their options valid, their packages installed."""
    _parse(cfg)


def strategy_label(cfg: ExperimentConfig) -> str:
    """What a tracker shows as the run's strategy: the strategy of a kind that trains; the kind itself otherwise (a probe,
    few-shot, an ensemble have no ``strategy:`` of their own)."""
    return cfg.strategy.name if cfg.uses.training else cfg.kind


def flat_config(cfg: ExperimentConfig) -> dict[str, str | int | float | bool]:
    """The resolved config as dotted keys -> scalars (lists, mappings and ``None`` as JSON text): params, hparams.

    A value the run resolves later (``train.lr: find``) is left out until it is a number (``Tracker.resolved``):
    MLflow refuses to change a logged param, and ``find`` is not what the run trained with.
    """

    def walk(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(walk(v, key + "."))
            else:
                out[key] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
        return out

    flat = walk(cfg.to_dict(), "")
    if flat.get("train.lr") == "find":
        for key in ("train.lr", "train.lr_find.found"):
            flat.pop(key, None)
    return flat


def confusion_image(matrix: list[list[int]], class_names: list[str]) -> np.ndarray:
    """The test confusion matrix as an RGB image (H, W, 3, uint8): rows true, columns predicted, counts written in.

    Drawn by ``engine.figures.draw_confusion``, as the report's figure is. matplotlib without pyplot: no global
    state, no display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: only tracked runs pay for matplotlib
    from matplotlib.figure import Figure

    cm = np.asarray(matrix, dtype=np.int64)
    n = len(cm)
    side = min(max(4.0, 0.38 * n + 1.8), 14)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    labels = [" " + str(c).replace("$", r"\$") for c in class_names]  # no math mode, no legend-hidden '_' names
    draw_confusion(fig.add_subplot(), cm, labels)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class RunTracking(Callback):
    """The trackers of one run, driven by ``run_experiment`` (start / finish) and the training loop (hooks).

    Empty (no trackers) when the run has no ``tracking`` or this process is not rank 0; every call is
    then a no-op.
    """

    def __init__(self, trackers: list[Tracker] | None = None, run: RunInfo | None = None) -> None:
        self.trackers = list(trackers or [])
        self.run = run
        self.started = False
        self.steps_per_epoch = 0
        self.pending: list[tuple[int, torch.Tensor, float]] = []  # (global step, loss on the device, lr)

    @classmethod
    def for_run(
        cls, cfg: ExperimentConfig, run_dir: str | Path, console: Console, version: Callable[[], dict[str, str]] = dict
    ) -> RunTracking:
        """The trackers ``cfg.tracking`` asks for; a ``ConfigError`` (before any work) for a bad name or a missing package."""
        parsed = _parse(cfg)
        if not parsed or world()[0] != 0:  # under DDP rank 0 alone logs
            return cls()
        run = RunInfo(cfg, Path(run_dir), console, version)
        return cls([tracker(run, opts) for tracker, opts in parsed], run)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def hooks(self) -> list[Callback]:
        """The loop callbacks to add: this object when it tracks anything."""
        return [self] if self else []

    def _call(self, method: str, *args: Any) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # noqa: BLE001 - tracking never fails a run
                self._off(t, e)

    def _off(self, tracker: Tracker, error: BaseException) -> None:
        self.trackers.remove(tracker)
        lines = str(error).strip().splitlines() or [""]
        reason = f"{type(error).__name__}: {lines[0][:300]}"
        assert self.run is not None
        self.run.console.print(f"[yellow]tracking: {tracker.name} is off for {escape(self.run.name)} ({escape(reason)}); the run goes on[/]")
        try:
            tracker.close()
        except Exception:  # noqa: BLE001, S110 - it is already off
            pass

    # ----------------------------------------------------------------------------------------
    # the run

    def start(self, resuming: bool) -> None:
        """Open every tracker (the run directory exists now) and write ``tracking.json``."""
        if not self or self.run is None:
            return
        self.started = True
        path = self.run.run_dir / TRACKING_FILE
        previous: dict[str, Any] = {}
        if resuming and path.is_file():
            try:
                previous = read_json(path)
            except ValueError:  # a damaged record: start new tracker runs
                previous = {}
        for t in list(self.trackers):
            try:
                t.start(resuming, previous.get(t.name))
            except Exception as e:  # noqa: BLE001 - tracking never fails a run
                self._off(t, e)
        try:
            write_json(path, {**previous, **{t.name: t.record() for t in self.trackers}})
        except OSError as e:
            say = f"tracking: could not write {path} ({e}); --resume will start new tracker runs"
            self.run.console.print(f"[yellow]{escape(say)}[/]")

    def resolved(self, cfg: ExperimentConfig) -> None:
        """``cfg`` with the values resolved during the run (``train.lr: find``): every tracker logs what is new."""
        if self.started and self.run is not None:
            self.run.cfg = cfg
            self._call("resolved")

    def finish(self, metrics: dict[str, Any] | None, error: BaseException | None = None) -> None:
        """The run ended (``metrics.json`` written, or ``error`` raised): final logs, then close every tracker."""
        if not self.started:
            return
        self.flush_steps()
        self._call("finish", metrics, error)
        for t in self.trackers:
            try:
                t.close()
            except Exception:  # noqa: BLE001, S110 - closing never fails a run
                pass
        self.started = False

    # ----------------------------------------------------------------------------------------
    # loop hooks

    def on_fit_start(self, loop: Loop) -> None:
        self.steps_per_epoch = len(loop.train)
        first = loop.state.epoch * self.steps_per_epoch + loop.state.step + 1  # a resumed run continues at its checkpoint
        self._call("fit_start", first, self.steps_per_epoch, list(loop.history))

    def on_train_batch_end(self, loop: Loop) -> None:
        if loop.step_loss is not None and any(t.wants_steps for t in self.trackers):
            self.pending.append((loop.state.epoch * self.steps_per_epoch + loop.state.step, loop.step_loss, loop.step_lr))

    def on_train_epoch_end(self, loop: Loop, row: dict[str, float]) -> None:
        self.flush_steps()
        self._call("log_epoch", row, int(row["epoch"]) * self.steps_per_epoch)

    def on_fit_end(self, loop: Loop) -> None:
        self.flush_steps()  # also on Ctrl-C or divergence: the steps done so far are logged

    def flush_steps(self) -> None:
        """Hand the buffered per-step losses to the trackers: one host sync for all of them."""
        if not self.pending:
            return
        losses = torch.stack([loss.float() for _, loss, _ in self.pending]).tolist()
        steps = [(step, loss, lr) for (step, _, lr), loss in zip(self.pending, losses, strict=True)]
        self.pending = []
        self._call("log_steps", steps)
