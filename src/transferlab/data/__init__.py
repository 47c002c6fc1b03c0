"""Datasets (each registers itself), image decoding, archives, augmentations, selections, batches, check-data."""

from transferlab.data import cifar, datasets, folder, mosaic, tiny_imagenet  # noqa: F401 - each registers its datasets
from transferlab.data.augment import AUGMENTATIONS, Augmentation, AugmentationError, augment_batch, parse_augmentations
from transferlab.data.batches import Batches, ImageDataset, LoaderBatches, Preprocess, TensorBatches, make_batches
from transferlab.data.images import FileImages, Problem
from transferlab.data.prepare import ImageSplits, prepare_splits
from transferlab.data.resize import resize_uint8
from transferlab.data.sources import DATASETS, DatasetError, RawDataset, load_dataset

__all__ = [
    "Batches",
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
    "resize_uint8",
]
