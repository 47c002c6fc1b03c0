"""The dataset registry and what every loader returns: a dataset's own splits, as uint8 tensors or files.

Array datasets (MNIST family, CIFAR, digits) are decoded once into memory (N, C, H, W) uint8 —
about 47 MB for Fashion-MNIST — so every later step (selection, resizing, augmentation,
normalisation) works on whole batches of tensors on the training device instead of one PIL image at
a time. File datasets (``folder``, ``tiny_imagenet``) return ``FileImages`` (paths); ``prepare_splits``
decodes the selected files into memory when they fit, or leaves them to the PIL DataLoader path.

Each loader registers itself where it is defined (``@DATASETS.register("name")``): ``fashion_mnist``,
``mnist``, ``digits``, ``synthetic`` in ``datasets.py``; ``cifar10``, ``cifar100``, ``cifar100_coarse``
in ``cifar.py``; ``tiny_imagenet``; ``folder``. ``transferlab.data`` imports them all.
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
    "default_data_root",
    "documented_size",
    "load_dataset",
]


class DatasetError(RuntimeError):
    """A dataset cannot be found or read. The message says which file and how to get it."""


class UnknownDatasetError(DatasetError, ConfigError):
    """``data.dataset`` names no registered dataset (a config error found before any data is read)."""


@dataclass
class RawDataset:
    """A dataset's official splits: uint8 (N, C, H, W) tensors, or ``FileImages`` for image files."""

    train_x: torch.Tensor | FileImages  # (N, C, H, W) uint8, or N image files
    train_y: torch.Tensor  # (N,) int64
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


def load_dataset(cfg: DataConfig) -> RawDataset:
    """Load the dataset named by ``cfg.dataset``."""
    try:
        loader = DATASETS.get(cfg.dataset)
    except UnknownNameError as e:
        raise UnknownDatasetError(str(e)) from None
    return loader(cfg)


@register_check
def check_dataset_name(cfg: ExperimentConfig) -> None:
    """``data.dataset`` is registered (a kind that loads no data itself — an ensemble reads its members' — is not checked)."""
    if not cfg.uses.data:
        return
    try:
        DATASETS.get(cfg.data.dataset)
    except UnknownNameError as e:
        raise UnknownDatasetError(f"experiment '{cfg.name}': data.dataset: {e}") from None


def default_data_root() -> Path:
    """``$TRANSFERLAB_DATA`` or ``~/.cache/transferlab/data``."""
    return Path(os.environ.get("TRANSFERLAB_DATA", Path.home() / ".cache" / "transferlab" / "data"))
