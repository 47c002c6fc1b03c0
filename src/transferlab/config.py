"""Experiment configuration: one dataclass tree per experiment, parsed strictly from YAML.

Every key a user writes is checked against the dataclass fields; an unknown key is an error that
names the key, where it was found, and the closest valid name. Types are checked too, so a typo
such as ``lr: 1e-3x`` fails before any data is loaded. The fully resolved config (defaults filled
in) is what gets saved in every run directory, so a run can always be reproduced from its folder.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A study file or config dict is invalid. The message names the file, key and value."""


@dataclass
class DataConfig:
    """Which images, how they are split and how they are prepared."""

    dataset: str = "fashion_mnist"
    """Registered dataset name: ``fashion_mnist``, ``digits``, ``synthetic`` (see ``transferlab.data``)."""
    root: str | None = None
    """Directory holding the dataset files; ``None`` searches the default locations."""
    image_size: int | None = None
    """Square side the images are resized to, once, at load time. ``None`` keeps the native size."""
    val_fraction: float = 0.1
    """Fraction of the training split held out, stratified and seeded, for validation."""
    train_subset: float | None = None
    """Use only part of the training split: a fraction (<= 1) or a count (> 1), stratified."""
    test_subset: float | None = None
    """Use only part of the test split (fraction or count, stratified). ``None`` = all of it."""
    augment: list[str] = field(default_factory=list)
    """Batch augmentations applied on the training device: ``flip``, ``crop`` (pad 4 + random crop)."""
    synthetic_classes: int = 4
    """Number of classes of the ``synthetic`` dataset (tests only)."""
    synthetic_size: int = 256
    """Images per split of the ``synthetic`` dataset (tests only)."""


@dataclass
class ModelConfig:
    """The backbone and where its weights come from."""

    backbone: str = "transferlab_cnn"
    """Any timm model name, or a transferlab built-in such as ``transferlab_cnn``."""
    weights: str = "scratch"
    """``scratch`` | ``imagenet`` (timm hub) | ``embedded`` (offline ImageNet EfficientNet-Lite0) | ``file:<path>``."""
    drop_rate: float = 0.0
    """Dropout inside the backbone where the architecture supports it."""
    channels_last: bool = True
    """Use the channels_last memory format (faster convolutions on CPU and GPU)."""


@dataclass
class HeadConfig:
    """The new classifier put on top of the backbone's pooled features."""

    type: Literal["linear", "mlp"] = "linear"
    hidden: int = 256
    """Hidden width of the ``mlp`` head."""
    dropout: float = 0.0
    """Dropout before the (last) linear layer of the head."""


@dataclass
class StrategyConfig:
    """What trains. See ``transferlab.strategies`` for the list."""

    name: str = "finetune"
    stages: int | None = None
    """``freeze_first``: freeze the stem and the first N stages (timm's coarse layer groups)."""
    children: int | None = None
    """``freeze_first``: freeze the first N direct children of the backbone (``named_children``)."""
    params: int | None = None
    """``freeze_first``: freeze the first N parameter tensors (``named_parameters`` order)."""


@dataclass
class EarlyStoppingConfig:
    monitor: Literal["val_acc", "val_loss"] = "val_acc"
    """Metric used for early stopping and for choosing the best checkpoint."""
    patience: int | None = None
    """Stop after this many epochs without improvement. ``None`` never stops early."""
    min_delta: float = 0.0


@dataclass
class TrainConfig:
    """The optimisation loop."""

    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 512
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    """Momentum for sgd and rmsprop."""
    schedule: Literal["cosine", "step", "onecycle", "none"] = "cosine"
    step_size: int = 10
    """``step`` schedule: epochs between decays."""
    gamma: float = 0.1
    """``step`` schedule: decay factor."""
    warmup_epochs: float = 0.0
    """Linear warm-up length (epochs) for ``cosine``."""
    label_smoothing: float = 0.0
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    accelerator: str = "auto"
    """Lightning Fabric accelerator: ``auto``, ``cpu``, ``cuda``."""
    precision: str = "32-true"
    """Lightning Fabric precision, e.g. ``32-true``, ``bf16-mixed``, ``16-mixed``."""
    max_grad_norm: float | None = None
    checkpoint_every_steps: int | None = None
    """Also write the ``last`` checkpoint every N optimizer steps inside an epoch (exact mid-epoch resume)."""
    checkpoint_every_minutes: float | None = 10.0
    """Also write the ``last`` checkpoint when this much time passed since the previous one."""
    progress: bool = True
    """Show progress bars."""


@dataclass
class ExperimentConfig:
    """One experiment of a study: data, model, head, strategy and training settings."""

    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    notes: str = ""
    """Free text shown in the comparison table (e.g. 'train subset 6 000, 32 px')."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check value ranges that types alone cannot express."""
        checks = [
            (self.train.epochs >= 1, "train.epochs", self.train.epochs, "must be >= 1"),
            (self.train.lr > 0, "train.lr", self.train.lr, "must be > 0"),
            (self.train.batch_size >= 1, "train.batch_size", self.train.batch_size, "must be >= 1"),
            (self.train.weight_decay >= 0, "train.weight_decay", self.train.weight_decay, "must be >= 0"),
            (0 <= self.train.label_smoothing < 1, "train.label_smoothing", self.train.label_smoothing, "must be in [0, 1)"),
            (0 < self.data.val_fraction < 1, "data.val_fraction", self.data.val_fraction, "must be in (0, 1)"),
            (0 <= self.head.dropout < 1, "head.dropout", self.head.dropout, "must be in [0, 1)"),
            (self.head.hidden >= 1, "head.hidden", self.head.hidden, "must be >= 1"),
            (self.data.image_size is None or self.data.image_size >= 8, "data.image_size", self.data.image_size, "must be >= 8"),
        ]
        for subset_key in ("train_subset", "test_subset"):
            v = getattr(self.data, subset_key)
            checks.append((v is None or v > 0, f"data.{subset_key}", v, "must be > 0 (fraction <= 1 or count > 1)"))
        for ok, key, value, why in checks:
            if not ok:
                raise ConfigError(f"experiment '{self.name}': {key}={value!r} {why}")
        from transferlab.strategies import STRATEGIES  # late import: strategies import models

        if self.strategy.name not in STRATEGIES:
            raise ConfigError(
                f"experiment '{self.name}': unknown strategy.name {self.strategy.name!r}"
                f"{_suggest(self.strategy.name, STRATEGIES)}; valid: {', '.join(STRATEGIES)}"
            )


def _suggest(word: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --------------------------------------------------------------------------------------------
# strict dict -> dataclass conversion


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` where lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}"
                f"{_suggest(str(value), map(str, allowed))}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # programming error


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types.

    ``where`` is a dotted prefix used in error messages (e.g. ``experiments[2].train``).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(
                f"unknown key '{path}'{_suggest(str(key), fields)}; valid keys here: {', '.join(fields)}"
            )
        kwargs[key] = _check_type(value, hints[key], path)
    return cls(**kwargs)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (mappings merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --------------------------------------------------------------------------------------------
# study files


@dataclass
class Study:
    """A parsed study file: a name and the list of fully resolved experiments (one per seed)."""

    name: str
    experiments: list[ExperimentConfig]
    source: str | None = None


_STUDY_KEYS = ("study", "defaults", "seeds", "experiments", "description")


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``3E4`` as floats (PyYAML's YAML 1.1 rules want ``1.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_study(raw: dict[str, Any], source: str = "<dict>") -> Study:
    """Turn a study mapping into experiments. ``source`` names the file in error messages.

    Layout::

        study: my_study            # name, used as the run folder runs/<study>/
        defaults: {...}            # merged into every experiment (any ExperimentConfig keys)
        seeds: [0, 1, 2]           # optional: every experiment runs once per seed
        experiments:
          - name: cnn_scratch
            model: {backbone: transferlab_cnn}
            strategy: {name: scratch}
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a study file must be a mapping with 'study' and 'experiments'")
    for key in raw:
        if key not in _STUDY_KEYS:
            raise ConfigError(
                f"{source}: unknown top-level key '{key}'{_suggest(str(key), _STUDY_KEYS)}; "
                f"valid: {', '.join(_STUDY_KEYS)}"
            )
    name = raw.get("study")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{source}: 'study' must be a non-empty name without '/', got {name!r}")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: 'defaults' must be a mapping")
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

    experiments: list[ExperimentConfig] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{source}: experiments[{i}] must be a mapping with a 'name'")
        exp_name = entry["name"]
        if exp_name in seen or "/" in exp_name or not exp_name:
            raise ConfigError(f"{source}: experiments[{i}]: name {exp_name!r} is empty, repeated or contains '/'")
        seen.add(exp_name)
        merged = deep_merge(defaults, entry)
        try:
            base = from_dict(ExperimentConfig, merged, f"experiments[{i}]")
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        for seed in seeds if seeds is not None else [base.seed]:
            cfg = copy.deepcopy(base)
            cfg.seed = seed
            try:
                cfg.validate()
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
            experiments.append(cfg)
    return Study(name=name, experiments=experiments, source=source)


def load_study(path: str | Path) -> Study:
    """Read and validate a study YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_YamlLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_study(raw, str(path))


def run_name(cfg: ExperimentConfig, n_seeds: int) -> str:
    """Folder name of a run: the experiment name, plus ``.seed<k>`` when a study repeats seeds."""
    return f"{cfg.name}.seed{cfg.seed}" if n_seeds > 1 else cfg.name


def config_from_yaml_text(text: str, source: str) -> ExperimentConfig:
    """Load an ExperimentConfig saved by transferlab (``config.yaml`` in a run directory)."""
    try:
        raw = yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of experiment settings, got {type(raw).__name__}")
    try:
        return from_dict(ExperimentConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
