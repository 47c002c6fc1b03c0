"""Backbones (any timm model plus transferlab's built-in CNNs), weights and heads."""

from transferlab.models import small_cnn  # noqa: F401 - registers transferlab_cnn* with timm
from transferlab.models.model import TransferModel, build_head, build_model, count_params
from transferlab.models.weights import LoadReport, WeightsError, create_backbone, load_strict, read_state_file

__all__ = [
    "LoadReport",
    "TransferModel",
    "WeightsError",
    "build_head",
    "build_model",
    "count_params",
    "create_backbone",
    "load_strict",
    "read_state_file",
]
