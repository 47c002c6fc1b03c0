"""Multi-label mosaics of a single-label dataset: 2×2 grids of random images, labelled with every class they show.

A multi-label task that exists on every machine with Fashion-MNIST (or scikit-learn's digits), for the
multi-label study and tests. The recipe (``make_mosaics``), exactly:

1. the source split is one split of the single-label dataset — **train mosaics are made only from its
   train split, test mosaics only from its test split**, so no source image is in both;
2. a generator ``numpy.random.default_rng(seed)`` draws ``sources = rng.integers(0, N, size=(count, 4))``:
   four source images per mosaic, each uniformly at random from the N images of the split, independently
   (with replacement: an image may appear in several mosaics, rarely twice in one);
3. mosaic ``i`` pastes ``sources[i, 0..3]`` row-major into a 2×2 grid — top-left, top-right, bottom-left,
   bottom-right — without resizing (28×28 tiles make a 56×56 image);
4. its labels are the set of the four source images' classes (1 to 4 of the K classes), a multi-hot row.

Registered datasets (``data.task: multilabel``; both fixed, like ``digits``' test split, so the data does
not change with the experiment seed — the experiment seed picks the subsets and the validation split):

=========================  ==============================================================================
``fashion_mnist_mosaic``   20 000 train mosaics (seed 0) from Fashion-MNIST's 60 000 train images, 4 000
                           test mosaics (seed 1) from its 10 000 test images; 56×56 grayscale, 10 classes
``digits_mosaic``          4 000 train mosaics (seed 0) from the 1 347 train images of ``digits``, 1 000 test
                           mosaics (seed 1) from its 450 test images; 16×16 grayscale, 10 classes
=========================  ==============================================================================

Fewer mosaics: ``data.train_subset`` / ``data.test_subset`` (iteratively stratified); other counts, grids or
seeds: call ``make_mosaics`` and register a loader of your own.
"""

from __future__ import annotations

import numpy as np
import torch

from transferlab.config import DataConfig
from transferlab.data.datasets import digits, fashion_mnist
from transferlab.data.sources import DATASETS, DatasetError, RawDataset, dataset_tasks, documented_size

__all__ = ["MOSAIC_GRID", "make_mosaics", "mosaic_dataset"]

MOSAIC_GRID = 2
"""Tiles per side of a mosaic."""

TRAIN_SEED, TEST_SEED = 0, 1
"""The generators of the train and test mosaics (fixed: the mosaics are the dataset, not a selection)."""


def make_mosaics(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, count: int, seed: int, grid: int = MOSAIC_GRID,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``count`` mosaics of ``grid``×``grid`` random tiles from ``images`` (N×C×h×w uint8, labels (N,) int64).

    Returns (count×C×(grid·h)×(grid·w) uint8 mosaics, count×K float32 multi-hot labels, count×grid² source
    indices, row-major): the recipe of the module docstring.
    """
    n, c, h, w = images.shape
    sources = np.random.default_rng(seed).integers(0, n, size=(count, grid * grid))
    idx = torch.from_numpy(sources)
    tiles = images[idx].reshape(count, grid, grid, c, h, w)  # [i, row, col] is tile row * grid + col
    mosaics = tiles.permute(0, 3, 1, 4, 2, 5).reshape(count, c, grid * h, grid * w)
    targets = torch.zeros(count, num_classes, dtype=torch.float32).scatter_(1, labels[idx], 1.0)
    return mosaics.contiguous(), targets, sources


def mosaic_dataset(source: RawDataset, train: int, test: int, name: str) -> RawDataset:
    """The mosaics of ``source``: ``train`` from its train split (seed 0), ``test`` from its test split (seed 1)."""
    k = len(source.class_names)
    if not isinstance(source.train_x, torch.Tensor) or not isinstance(source.test_x, torch.Tensor):
        raise DatasetError(f"{name}: mosaics are made of an array dataset (uint8 tensors), not of image files")
    train_x, train_y, _ = make_mosaics(source.train_x, source.train_y, k, train, TRAIN_SEED)
    test_x, test_y, _ = make_mosaics(source.test_x, source.test_y, k, test, TEST_SEED)
    where = (f"{name}: {MOSAIC_GRID}x{MOSAIC_GRID} mosaics of {source.source} ({train} from its train split, seed {TRAIN_SEED}; "
             f"{test} from its test split, seed {TEST_SEED})")
    return RawDataset(train_x, train_y, test_x, test_y, list(source.class_names), where)


@DATASETS.register("fashion_mnist_mosaic")
@dataset_tasks("multilabel")
@documented_size(train=20_000, test=4_000, channels=1, side=56, classes=10)
def fashion_mnist_mosaic(cfg: DataConfig) -> RawDataset:
    """Fashion-MNIST 2×2 mosaics (multi-label): 20 000 train / 4 000 test, 56×56 grayscale, 10 classes.

    Train mosaics from the train split only (seed 0), test mosaics from the test split only (seed 1): the
    recipe in ``transferlab.data.mosaic``. Fashion-MNIST itself is found as ``fashion_mnist`` finds it (``data.root``).
    """
    return mosaic_dataset(fashion_mnist(cfg), 20_000, 4_000, "fashion_mnist_mosaic")


@DATASETS.register("digits_mosaic")
@dataset_tasks("multilabel")
@documented_size(train=4_000, test=1_000, channels=1, side=16, classes=10)
def digits_mosaic(cfg: DataConfig) -> RawDataset:
    """scikit-learn digits 2×2 mosaics (multi-label): 4 000 train / 1 000 test, 16×16 grayscale, 10 classes.

    Train mosaics from ``digits``' train split only (seed 0), test mosaics from its test split only (seed 1): the
    recipe in ``transferlab.data.mosaic``.
    """
    return mosaic_dataset(digits(cfg), 4_000, 1_000, "digits_mosaic")
