"""Datasets, selections and in-memory batches."""

from transferlab.data.datasets import DATASETS, DatasetError, RawDataset, load_dataset, register_dataset
from transferlab.data.prepare import AUGMENTATIONS, ImageSplits, Preprocess, TensorBatches, prepare_splits

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DatasetError",
    "ImageSplits",
    "Preprocess",
    "RawDataset",
    "TensorBatches",
    "load_dataset",
    "prepare_splits",
    "register_dataset",
]
