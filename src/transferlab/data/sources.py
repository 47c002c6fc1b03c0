"""The dataset registry and what every loader returns: a dataset's own splits, as uint8 tensors or files.

Array datasets (MNIST family, CIFAR, digits) are decoded once into memory (N, C, H, W) uint8 —
about 47 MB for Fashion-MNIST — so every later step (selection, resizing, augmentation,
normalisation) works on whole batches of tensors on the training device instead of one PIL image at
a time. File datasets (``folder``, ``tiny_imagenet``) return ``FileImages`` (paths); ``prepare_splits``
decodes the selected files into memory when they fit, or leaves them to the PIL DataLoader path.

Each loader registers itself where it is defined (``@DATASETS.register("name")``): ``fashion_mnist``,
``mnist``, ``digits``, ``synthetic`` in ``datasets.py``; ``cifar10``, ``cifar100``, ``cifar100_coarse``
in ``cifar.py``; ``tiny_imagenet``; ``folder``; ``fashion_mnist_mosaic``, ``digits_mosaic`` in ``mosaic.py``.
``transferlab.data`` imports them all.

A loader declares the tasks it can load (``dataset_tasks``; multiclass only when it declares none): multiclass
labels are int64 (N,) class indices, multi-label ones (``data.task: multilabel``) float32 N×K multi-hot rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transferlab.config import ConfigError, DataConfig, ExperimentConfig, register_check
from transferlab.data.images import FileImages, Problem
from transferlab.registry import Registry, UnknownNameError

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetSize",
    "RawDataset",
    "UnknownDatasetError",
    "dataset_size",
    "dataset_tasks",
    "default_data_root",
    "documented_size",
    "load_dataset",
    "supported_tasks",
]


class DatasetError(RuntimeError):
    """A dataset cannot be found or read. The message says which file and how to get it."""


class UnknownDatasetError(DatasetError, ConfigError):
    """``data.dataset`` names no registered dataset (a config error found before any data is read)."""


@dataclass
class RawDataset:
    """A dataset's official splits: uint8 (N, C, H, W) tensors, or ``FileImages`` for image files."""

    train_x: torch.Tensor | FileImages  # (N, C, H, W) uint8, or N image files
    train_y: torch.Tensor  # (N,) int64 class indices, or (N, K) float32 0/1 rows with data.task: multilabel
    test_x: torch.Tensor | FileImages
    test_y: torch.Tensor
    class_names: list[str]
    source: str  # where it was read from, recorded in the run
    val_x: torch.Tensor | FileImages | None = None
    """The dataset's own validation split, when it has one (a ``val/`` folder next to ``train/`` and ``test/``)."""
    val_y: torch.Tensor | None = None
    skipped: list[Problem] = field(default_factory=list)
    """Bad images left out because ``data.skip_bad_images`` is on (recorded in the run)."""
    warnings: list[Problem] = field(default_factory=list)
    """Non-fatal findings (ignored non-image files, huge images), listed by ``check-data``."""


DatasetLoader = Callable[[DataConfig], RawDataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset", "data.dataset: where the images come from")


@dataclass(frozen=True)
class DatasetSize:
    """A dataset's documented size, declared by its loader: what ``transferlab plan`` assumes before the data is here."""

    train: int
    test: int
    channels: int
    side: int
    classes: int


def documented_size(train: int, test: int, channels: int, side: int, classes: int) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorate a dataset loader with its documented size (``dataset_size`` reads it)::

        @DATASETS.register("cifar10")
        @documented_size(train=50_000, test=10_000, channels=3, side=32, classes=10)
        def load_cifar10(cfg): ...
    """
    def declare(loader: DatasetLoader) -> DatasetLoader:
        loader.documented_size = DatasetSize(train, test, channels, side, classes)  # type: ignore[attr-defined]
        return loader
    return declare


def dataset_size(name: str) -> DatasetSize | None:
    """The documented size the dataset ``name`` declares (``None``: it declares none — a folder of the user's images)."""
    loader = DATASETS.get(name) if name in DATASETS else None
    return getattr(loader, "documented_size", None)


def dataset_tasks(*tasks: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorate a dataset loader with the tasks (``data.task``) it can load; a loader without it loads ``multiclass``::

        @DATASETS.register("fashion_mnist_mosaic")
        @dataset_tasks("multilabel")
        def fashion_mnist_mosaic(cfg): ...
    """
    def declare(loader: DatasetLoader) -> DatasetLoader:
        loader.tasks = tuple(tasks)  # type: ignore[attr-defined]
        return loader
    return declare


def supported_tasks(name: str) -> tuple[str, ...]:
    """The tasks the dataset ``name`` can load (``dataset_tasks``; ``("multiclass",)`` when it declares none)."""
    loader = DATASETS.get(name) if name in DATASETS else None
    return getattr(loader, "tasks", ("multiclass",))


def _task_mismatch(cfg: DataConfig) -> str | None:
    """Why ``cfg.dataset`` cannot be read as ``cfg.task`` (``None``: it can)."""
    tasks = supported_tasks(cfg.dataset)
    if cfg.task in tasks:
        return None
    if cfg.task == "multilabel":
        multi = ", ".join(n for n in DATASETS.names() if "multilabel" in supported_tasks(n))
        return (f"data.task: multilabel, but dataset {cfg.dataset!r} has one label per image; use a multi-label source ({multi}; "
                "folder: a CSV or JSON-lines list with several labels per image) or data.task: multiclass")
    return f"dataset {cfg.dataset!r} is multi-label (several labels per image): set data.task: multilabel (data.task is {cfg.task})"


def load_dataset(cfg: DataConfig) -> RawDataset:
    """Load the dataset named by ``cfg.dataset`` as ``cfg.task`` says (a source of the other task is a ``DatasetError``)."""
    try:
        loader = DATASETS.get(cfg.dataset)
    except UnknownNameError as e:
        raise UnknownDatasetError(str(e)) from None
    why = _task_mismatch(cfg)
    if why is not None:
        raise DatasetError(why)
    raw = loader(cfg)
    if (raw.train_y.ndim == 2) != (cfg.task == "multilabel"):  # a loader that reads both tasks read the wrong one
        got = "multi-hot label rows" if raw.train_y.ndim == 2 else "one class index per image"
        raise DatasetError(f"dataset {cfg.dataset!r} ({raw.source}) gave {got}, which does not match data.task: {cfg.task}")
    return raw


@register_check
def check_dataset_name(cfg: ExperimentConfig) -> None:
    """``data.dataset`` is registered and can be read as ``data.task`` (a kind that loads no data itself — an ensemble
    reads its members' — is not checked)."""
    if not cfg.uses.data:
        return
    try:
        DATASETS.get(cfg.data.dataset)
    except UnknownNameError as e:
        raise UnknownDatasetError(f"experiment '{cfg.name}': data.dataset: {e}") from None
    why = _task_mismatch(cfg.data)
    if why is not None:
        raise cfg.error(why)


def default_data_root() -> Path:
    """``$TRANSFERLAB_DATA`` or ``~/.cache/transferlab/data``."""
    return Path(os.environ.get("TRANSFERLAB_DATA", Path.home() / ".cache" / "transferlab" / "data"))
