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
import itertools
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
    """Registered dataset name: ``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``cifar100_coarse``,
    ``tiny_imagenet``, ``folder``, ``digits``, ``synthetic`` (see ``transferlab.data``)."""
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
    augment: list[str | dict[str, Any]] = field(default_factory=list)
    """Training augmentations, in order: a name or ``{name: parameters}`` — ``flip``, ``vflip``, ``crop``,
    ``translate``, ``rotate``, ``affine``, ``erase``, ``resized_crop`` (see ``transferlab.data.augment``)."""
    val_count: int | None = None
    """Hold out exactly this many training images (stratified) for validation, instead of ``val_fraction``."""
    k_per_class: int | None = None
    """Use exactly this many training images of every class (seeded), instead of ``train_subset``."""
    classes: list[int | str] | None = None
    """Keep only these classes (indices or names), relabelled 0..k-1 in this order."""
    test_fraction: float = 0.2
    """Fixed stratified test split held out of datasets that have none (a ``folder`` without ``test/``)."""
    in_memory: bool | Literal["auto"] = "auto"
    """``true``: decode once into a uint8 tensor, augment in batches on the device; ``false``: PIL DataLoader
    path; ``auto``: in memory when the decoded images fit (``transferlab.data.prepare.IN_MEMORY_MAX_BYTES``)."""
    skip_bad_images: bool = False
    """Skip unreadable/corrupt image files (listed and counted in the run) instead of failing."""
    num_workers: int | None = None
    """DataLoader workers of the PIL path; ``None``: all cores but one (at most 8)."""
    synthetic_classes: int = 4
    """Number of classes of the ``synthetic`` dataset (tests only)."""
    synthetic_size: int = 256
    """Images per split of the ``synthetic`` dataset (tests only)."""


@dataclass
class TruncateConfig:
    """Keep the backbone only up to a cut (exactly one key). See ``transferlab.models.truncate``."""

    stages: int | None = None
    """Keep the stem and the first N stages (timm's coarse stages, as in ``freeze_first``)."""
    after: str | None = None
    """Keep everything up to and including this module (e.g. ``layer2`` or ``layer2.2``)."""


@dataclass
class ModelConfig:
    """The backbone and where its weights come from."""

    backbone: str = "transferlab_cnn"
    """Any timm model name, or a transferlab built-in such as ``transferlab_cnn``."""
    weights: str = "scratch"
    """``scratch`` | ``imagenet`` (timm hub) | ``embedded`` (offline ImageNet EfficientNet-Lite0) | ``file:<path>``
    | ``run:<run dir or experiment of this study>`` (the backbone of an earlier run)."""
    truncate: TruncateConfig | None = None
    """Cut the backbone after its first stages (``{stages: 2}``) or after a module (``{after: layer2}``)."""
    keep_head: bool = False
    """With ``weights: run:…``: also load that run's head (same head and classes) instead of a new one."""
    drop_rate: float = 0.0
    """Dropout inside the backbone where the architecture supports it."""
    channels_last: bool = True
    """Use the channels_last memory format (faster convolutions on CPU and GPU)."""


@dataclass
class HeadConfig:
    """The new classifier put on top of the backbone's pooled features."""

    type: Literal["linear", "mlp", "conv"] = "linear"
    hidden: int = 256
    """Hidden width of the ``mlp`` and ``conv`` heads."""
    dropout: float = 0.0
    """Dropout before the (last) linear layer of the head."""
    conv_channels: int = 32
    """``conv`` head: filters of its convolution (on the unpooled features)."""
    kernel_size: int = 3
    """``conv`` head: kernel size of its convolution ('same' padding)."""


@dataclass
class UnfreezeConfig:
    """Unfreeze-by-milestones: ``{at_epochs: [2, 4], stages_per_step: 1}``."""

    at_epochs: list[int] = field(default_factory=list)
    """Epochs (0-based, strictly increasing, >= 1) at whose start the next stages unfreeze."""
    stages_per_step: int | None = 1
    """Stage groups unfrozen per milestone, topmost frozen first; ``null`` = all of them at once."""


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
    unfreeze: UnfreezeConfig | None = None
    """Gradual unfreezing: at these epochs the next frozen stages (from the top) start to train."""
    freeze_epochs: int | None = None
    """fastai's ``fine_tune``: the strategy's frozen part trains too from this epoch on (all at once)."""


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
    eval_batch_size: int = 128
    """Batch of validation, test, predictions and ensembles. 128: on a CPU larger batches are slower
    (512 measured 1.7-2.4x slower for three of four models, benchmarks/eval_batch.py); raise it on a GPU."""
    tta: Literal["none", "flip"] = "none"
    """Test-time augmentation for validation and test (and ``predict``, ensembles): ``flip`` averages the
    softmax of each image and its horizontal mirror (train with ``data.augment: [flip]``). Twice the
    inference cost; ``kind: train`` only; frozen-feature caching is off with it (the cache holds unflipped images)."""
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "adamw"
    lr: float = 1e-3
    lr_ratio: float | list[float] | None = None
    """Discriminative learning rates: a ratio per stage going down (head ``lr``, top stage ``lr·r``, …,
    stem ``lr·r^n``), or one multiplier of ``lr`` per group from the stem to the head."""
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
    """Lightning Fabric precision, e.g. ``32-true``, ``bf16-mixed``, ``16-mixed``. ``bf16-mixed`` runs the
    convolutions in bfloat16 on CPUs with AVX512-BF16/AMX too (see benchmarks/RESULTS.md for the measured gain)."""
    compile: bool = False
    """Train through ``torch.compile`` (opt-in: the first steps pay the compile time, and on the CPU it
    needs a C++ compiler). Checkpoints and evaluation use the plain module, so runs stay interchangeable."""
    max_grad_norm: float | None = None
    checkpoint_every_steps: int | None = None
    """Also write the ``last`` checkpoint every N optimizer steps inside an epoch (exact mid-epoch resume)."""
    checkpoint_every_minutes: float | None = 10.0
    """Also write the ``last`` checkpoint when this much time passed since the previous one."""
    progress: bool = True
    """Show progress bars."""
    cache: Literal["auto", "on", "off"] = "auto"
    """Frozen-prefix feature caching (``transferlab.features``): ``auto`` trains on cached features whenever the
    frozen part can be cut off exactly; ``on`` requires it (an error says why not); ``off`` never caches."""
    cache_views: int = 0
    """With ``data.augment``: cache this many augmented views of every training image (epoch e uses view e mod K);
    0 = caching is off for augmented runs."""


@dataclass
class SweepPoint:
    """Where an experiment sits in a sweep: the study entry it was expanded from and its swept values."""

    group: str = ""
    """Name of the study entry whose ``sweep:`` produced this experiment (shared by all its points)."""
    values: dict[str, Any] = field(default_factory=dict)
    """Dotted key -> value of this point, e.g. ``{'head.dropout': 0.3}``."""


@dataclass
class ProbeConfig:
    """``kind: logistic`` / ``kind: knn``: classifiers fitted on the frozen backbone's cached pooled features."""

    l2: list[float] = field(default_factory=lambda: [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0])
    """``logistic``: L2 strengths tried (loss = mean cross-entropy + l2/2 * |W|^2 on standardised features); the best on val is kept."""
    max_iter: int = 1000
    """``logistic``: L-BFGS iterations per L2 strength, at most."""
    k: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20, 50, 100, 200])
    """``knn``: neighbour counts tried (cosine similarity); the best on val is kept."""
    temperature: float = 0.07
    """``knn``: each neighbour votes with weight exp(similarity / temperature) (DINO's weighted k-NN)."""


@dataclass
class FewShotConfig:
    """``kind: fewshot``: N-way K-shot episodes classified by Prototypical Networks on the backbone's features."""

    ways: int = 5
    shots: int = 5
    queries: int = 15
    """Query images per class and episode."""
    episodes: int = 600
    distance: Literal["euclidean", "cosine"] = "euclidean"
    """Distance to the prototypes reported as ``test_acc`` (the other one is reported beside it, same episodes)."""
    split: Literal["train", "val", "test"] = "test"
    """Split the evaluation episodes are drawn from."""
    classes: list[int | str] | None = None
    """Classes the evaluation episodes are drawn from (names or indices of the task's classes); ``None`` = all."""
    finetune_episodes: int = 0
    """Episodic ProtoNet fine-tuning of the backbone on the train split before evaluating (``strategy`` says what
    trains; ``train.optimizer``/``lr``/``weight_decay`` how); 0 = none."""
    finetune_classes: list[int | str] | None = None
    """Classes of the fine-tuning episodes; ``None`` = the classes not in ``classes`` (all when ``classes`` is ``None``)."""


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
    kind: Literal["train", "logistic", "knn", "fewshot"] = "train"
    """``train``: the training loop; ``logistic`` / ``knn``: a probe on cached frozen features (``probe``);
    ``fewshot``: episodic ProtoNet evaluation (``fewshot``)."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    sweep: SweepPoint | None = None
    """Set by a study's ``sweep:``: which sweep this experiment is a point of, and its values (not written by hand)."""

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
        d = self.data
        checks += [
            (d.val_count is None or d.val_count >= 1, "data.val_count", d.val_count, "must be >= 1"),
            (d.k_per_class is None or d.k_per_class >= 1, "data.k_per_class", d.k_per_class, "must be >= 1"),
            (d.k_per_class is None or d.train_subset is None, "data.k_per_class", d.k_per_class, "and data.train_subset cannot both be set"),
            (0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "must be in (0, 1)"),
            (d.num_workers is None or d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0"),
            (d.classes is None or len(d.classes) >= 2, "data.classes", d.classes, "must list at least 2 classes"),
            (d.classes is None or len(set(map(str, d.classes))) == len(d.classes), "data.classes", d.classes, "lists a class twice"),
            (d.classes is None or all(isinstance(c, str) or c >= 0 for c in d.classes), "data.classes", d.classes, "has a negative index"),
        ]
        pr, fs = self.probe, self.fewshot
        checks += [
            (self.train.cache_views >= 0, "train.cache_views", self.train.cache_views, "must be >= 0"),
            (bool(pr.l2) and all(v > 0 for v in pr.l2), "probe.l2", pr.l2, "must be a non-empty list of numbers > 0"),
            (pr.max_iter >= 1, "probe.max_iter", pr.max_iter, "must be >= 1"),
            (bool(pr.k) and all(v >= 1 for v in pr.k), "probe.k", pr.k, "must be a non-empty list of integers >= 1"),
            (pr.temperature > 0, "probe.temperature", pr.temperature, "must be > 0"),
            (fs.ways >= 2, "fewshot.ways", fs.ways, "must be >= 2"),
            (fs.shots >= 1, "fewshot.shots", fs.shots, "must be >= 1"),
            (fs.queries >= 1, "fewshot.queries", fs.queries, "must be >= 1"),
            (fs.episodes >= 1, "fewshot.episodes", fs.episodes, "must be >= 1"),
            (fs.finetune_episodes >= 0, "fewshot.finetune_episodes", fs.finetune_episodes, "must be >= 0"),
            (self.kind != "logistic" or self.head.type == "linear", "head.type", self.head.type, "must be linear for kind: logistic (it fits a linear head)"),
            (self.kind == "train" or self.train.tta == "none", "train.tta", self.train.tta, f"applies to kind: train only (this is kind: {self.kind})"),
        ]
        for ok, key, value, why in checks:
            if not ok:
                raise ConfigError(f"experiment '{self.name}': {key}={value!r} {why}")
        from transferlab.data.augment import AugmentationError, parse_augmentations  # late import: data imports config

        try:
            parse_augmentations(self.data.augment)
        except AugmentationError as e:
            raise ConfigError(f"experiment '{self.name}': {e}") from None
        from transferlab.strategies import STRATEGIES, check_surgery_config  # late import: strategies import models

        if self.strategy.name not in STRATEGIES:
            raise ConfigError(
                f"experiment '{self.name}': unknown strategy.name {self.strategy.name!r}"
                f"{_suggest(self.strategy.name, STRATEGIES)}; valid: {', '.join(STRATEGIES)}"
            )
        check_surgery_config(self)  # truncation, conv head, unfreezing schedule, discriminative lr


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
    if tp is Any:  # free-form values (e.g. augmentation parameters), checked by their consumer
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_check_type(k, key_tp, where): _check_type(v, value_tp, f"{where}.{k}") for k, v in value.items()}
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
class EnsembleConfig:
    """A study's ``ensembles:`` entry: a vote over finished runs (see ``transferlab.ensemble``)."""

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


_STUDY_KEYS = ("study", "defaults", "seeds", "sweep", "experiments", "ensembles", "description")


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
                    f"{source}: {where}.members[{j}]={m!r} is not an experiment of this study{_suggest(m, experiment_names)} "
                    "(or give a run directory path)"
                )
        out.append(ens)
    return out


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``3E4`` as floats (PyYAML's YAML 1.1 rules want ``1.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


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
            raise ConfigError(f"{where}: unknown key '{key}'{hint}; a sweep key is a dotted config key such as head.dropout, train.lr, strategy.stages")
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

    experiments: list[ExperimentConfig] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{source}: experiments[{i}] must be a mapping with a 'name'")
        exp_name = entry["name"]
        if exp_name in seen or "/" in exp_name or not exp_name:
            raise ConfigError(f"{source}: experiments[{i}]: name {exp_name!r} is empty, repeated or contains '/'")
        seen.add(exp_name)
        entry = dict(entry)
        grid = {**study_sweep, **_check_sweep(entry.pop("sweep", None), f"{source}: experiments[{i}].sweep")}
        exp_seeds = grid.pop("seed", seeds)
        merged = deep_merge(defaults, entry)
        try:
            from_dict(ExperimentConfig, merged, f"experiments[{i}]")
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values))
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
            if point:
                base.sweep = SweepPoint(group=exp_name, values=point)
            for seed in exp_seeds if exp_seeds is not None else [base.seed]:
                cfg = copy.deepcopy(base)
                cfg.seed = seed
                try:
                    cfg.validate()
                except ConfigError as e:
                    raise ConfigError(f"{source}: {where}: {e}" if point else f"{source}: {e}") from None
                experiments.append(cfg)
    ensembles = _parse_ensembles(raw.get("ensembles"), source, {c.name for c in experiments})
    return Study(name=name, experiments=experiments, source=source, ensembles=ensembles)


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
