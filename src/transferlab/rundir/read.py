"""Reading run directories back: one run (``load_run``) or a whole study folder (``read_study``).

``compare``, the report and the API read runs only through here. Run directories written by earlier
versions stay readable: ``metrics.json`` of any schema version (``RunMetrics.from_dict``), and
ensembles written before they had a ``config.yaml`` (their ``ensemble.yaml`` says what they were).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from transferlab.config import ConfigError, EnsembleSpec, ExperimentConfig, SweepPoint, config_from_yaml_text
from transferlab.data.normalize import Normalization
from transferlab.files import read_json
from transferlab.rundir.layout import CONFIG_FILE, HISTORY_FILE, METRICS_FILE, SELECTION_FILE
from transferlab.rundir.metrics import RunMetrics
from transferlab.rundir.rundir import RunError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["RUN_ACTIONS", "ExperimentRuns", "Run", "RunActions", "StudyRuns", "load_run", "read_history", "read_run", "read_study"]


@dataclass
class RunActions:
    """What a run folder can do beyond being read, supplied by the layers that know how.

    The run folder is read by every layer, so ``rundir`` sits low and imports neither the models nor the
    exporters; ``transferlab.models`` sets ``load_model`` and ``transferlab.results.export`` sets
    ``export`` when they are imported (``import transferlab`` imports both), which is what
    ``Run.load_model()`` and ``Run.export()`` call.
    """

    load_model: Callable[..., nn.Module] | None = None
    export: Callable[..., Any] | None = None


RUN_ACTIONS = RunActions()


def read_history(path: Path) -> list[dict[str, float]]:
    """``history.csv`` as float rows (an empty cell is NaN); ``[]`` when there is none."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out = {}
            for k, v in row.items():
                try:
                    out[k] = float(v) if v not in (None, "") else math.nan
                except ValueError:
                    out[k] = math.nan
            rows.append(out)
    return rows


@dataclass
class Run:
    """A run directory read back: its config, its result, its history, and its model on demand."""

    path: Path
    config: ExperimentConfig | None
    """``None`` only for a run read leniently (``read_study``) whose config is missing or unreadable."""
    record: RunMetrics

    @cached_property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json`` as a dict (in the current schema)."""
        return self.record.to_dict()

    @property
    def ok(self) -> bool:
        return self.record.ok

    @property
    def seed(self) -> Any:
        return self.record.seed if self.record.seed is not None else (self.config.seed if self.config else None)

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.record.class_names]

    @cached_property
    def history(self) -> list[dict[str, float]]:
        return read_history(self.path / HISTORY_FILE)

    def load_model(self, checkpoint: str = "best") -> nn.Module:
        """Rebuild the model and load the ``best`` (or ``last``) checkpoint strictly, normalised as the run
        trained (``transferlab.models.load_run_model``). A full checkpoint needs nothing else; an adapter-only one
        (``lora``, ``bitfit``, … runs) is completed with the run's base weights (``model.weights``): the embedded
        package or a local file as the run read them, ``imagenet`` from the Hugging Face cache (downloaded when online
        and not cached)."""
        if RUN_ACTIONS.load_model is None:
            raise RunError("Run.load_model needs transferlab.models: `import transferlab` (or transferlab.models) first")
        return RUN_ACTIONS.load_model(self, checkpoint)

    @cached_property
    def selection(self) -> dict[str, Any]:
        """``selection.json`` (indices, classes, folds, normalisation); ``{}`` when the run wrote none."""
        path = self.path / SELECTION_FILE
        return read_json(path) if path.is_file() else {}

    @property
    def normalization(self) -> Normalization:
        """The mean/std the run's inputs were normalised with (``data.normalize``; ``backbone``: the model's own).

        ``dataset`` stats come from ``selection.json``; a run whose config says ``dataset`` but that
        recorded no stats cannot be rebuilt faithfully, and says so.
        """
        norm = Normalization.from_dict(self.selection.get("normalize"))
        wanted = self.config.data.normalize if self.config is not None else "backbone"
        if wanted != "backbone" and norm.mean is None:
            raise RunError(f"{self.path}: data.normalize={wanted!r} but selection.json records no mean/std, "
                           "so its inputs cannot be normalised as in training")
        return norm

    def export(self, format: Any = "onnx", out: str | Path | None = None, checkpoint: str = "best", tolerance: Any = None) -> Any:
        """Write the run's model as ``format`` (``onnx``, ``torchscript``, ``exported-program``, ``safetensors``,
        ``hf``) to ``out`` (default ``<run>/export/<file>``) and check its parity: ``transferlab.results.export.export_run``."""
        if RUN_ACTIONS.export is None:
            raise RunError("Run.export needs transferlab.results.export: `import transferlab` first")
        return RUN_ACTIONS.export(self, format, out, checkpoint, tolerance)


def _read_metrics(path: Path) -> RunMetrics:
    try:
        return RunMetrics.from_dict(read_json(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None
    except (ValueError, TypeError) as e:
        raise RunError(f"{path}: not a transferlab metrics file ({e})") from None


def _read_config(path: Path) -> ExperimentConfig | None:
    cfg_path = path / CONFIG_FILE
    if cfg_path.is_file():
        return config_from_yaml_text(cfg_path.read_text(encoding="utf-8"), str(cfg_path))
    ens_path = path / "ensemble.yaml"  # ensembles written before they had a config.yaml
    if ens_path.is_file():
        spec = yaml.safe_load(ens_path.read_text(encoding="utf-8")) or {}
        ensemble = EnsembleSpec(members=[str(m) for m in spec.get("members", [])], vote=str(spec.get("vote", "hard")))
        return ExperimentConfig(name=str(spec.get("name") or path.name), kind="ensemble", notes=str(spec.get("notes") or ""), ensemble=ensemble)
    return None


def load_run(path: str | Path) -> Run:
    """Read a run directory written by transferlab (strict: its config and metrics must be there)."""
    path = Path(path)
    config = _read_config(path)
    if config is None:
        if (path / METRICS_FILE).is_file():  # a run that never started (skipped: a dependency failed) has only its record
            record = _read_metrics(path / METRICS_FILE)
            if not record.ok:
                raise RunError(f"{path}: the run was {record.status}, so it has no model: {record.error or 'no reason recorded'}")
        raise RunError(f"{path} is not a transferlab run directory (no config.yaml)")
    if not (path / METRICS_FILE).is_file():
        raise RunError(f"{path}: run not finished (no {METRICS_FILE}); continue it with --resume")
    return Run(path, config, _read_metrics(path / METRICS_FILE))


def read_run(path: str | Path) -> Run:
    """Read a run directory leniently: ``metrics.json`` must be there, an unreadable config becomes ``None``."""
    path = Path(path)
    try:
        config = _read_config(path)
    except ConfigError:
        config = None  # an older or hand-edited config: the metrics still count
    return Run(path, config, _read_metrics(path / METRICS_FILE))


@dataclass
class ExperimentRuns:
    """All runs (seeds) of one experiment, sorted by seed."""

    name: str
    runs: list[Run]

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def failed_runs(self) -> list[Run]:
        return [r for r in self.runs if not r.ok]

    @property
    def class_names(self) -> list[str]:
        """The class names of the first finished run that recorded any (``[]`` when none did)."""
        for r in self.ok_runs:
            if r.class_names:
                return r.class_names
        return []

    @property
    def sweep(self) -> SweepPoint | None:
        """The sweep point this experiment is, from the first run whose config says so."""
        for r in self.runs:
            if r.config is not None and r.config.sweep is not None:
                return r.config.sweep
        return None


@dataclass
class StudyRuns:
    """A study folder read back: its name, where it came from, and its experiments in study order."""

    path: Path
    name: str
    source: str | None
    experiments: list[ExperimentRuns] = field(default_factory=list)

    @property
    def ok_experiments(self) -> list[ExperimentRuns]:
        """The experiments with at least one finished run."""
        return [e for e in self.experiments if e.ok_runs]

    @property
    def failed_runs(self) -> list[Run]:
        """Every failed run, in study order."""
        return [r for e in self.experiments for r in e.failed_runs]


def read_study(study_dir: str | Path) -> StudyRuns:
    """Every run folder of ``study_dir`` (``*/metrics.json``), grouped by experiment in study order.

    The order is the study file's (``study.json``); experiments it does not list come after, by name.
    """
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise FileNotFoundError(f"no such study directory: {study_dir}")
    info: dict[str, Any] = {}
    if (study_dir / "study.json").is_file():
        try:
            info = read_json(study_dir / "study.json")
        except json.JSONDecodeError as e:
            raise RunError(f"{study_dir / 'study.json'}: not valid JSON ({e})") from None
    groups: dict[str, list[Run]] = {}
    for metrics_path in sorted(study_dir.glob(f"*/{METRICS_FILE}")):
        run = read_run(metrics_path.parent)
        groups.setdefault(str(run.record.experiment), []).append(run)
    if not groups:
        raise FileNotFoundError(f"{study_dir} holds no runs (no */metrics.json); run the study first")
    order = list(info.get("experiments") or [])
    names = sorted(groups, key=lambda n: (order.index(n) if n in order else len(order), n))
    experiments = [ExperimentRuns(n, sorted(groups[n], key=lambda r: (str(r.seed), r.path.name))) for n in names]
    return StudyRuns(study_dir, str(info.get("study") or study_dir.name), info.get("source"), experiments)
