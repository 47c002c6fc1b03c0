"""Datasets, selections, image files, augmentations and batches (in memory or through PIL)."""

from transferlab.data.augment import AUGMENTATIONS, Augmentation, AugmentationError, augment_batch, parse_augmentations
from transferlab.data.datasets import DATASETS, DatasetError, RawDataset, load_dataset, register_dataset
from transferlab.data.images import FileImages, Problem
from transferlab.data.prepare import (
    ImageDataset,
    ImageSplits,
    LoaderBatches,
    Preprocess,
    TensorBatches,
    make_batches,
    prepare_splits,
)

__all__ = [
    "AUGMENTATIONS",
    "Augmentation",
    "AugmentationError",
    "DATASETS",
    "DatasetError",
    "FileImages",
    "ImageDataset",
    "ImageSplits",
    "LoaderBatches",
    "Preprocess",
    "Problem",
    "RawDataset",
    "TensorBatches",
    "augment_batch",
    "load_dataset",
    "make_batches",
    "parse_augmentations",
    "prepare_splits",
    "register_dataset",
]
