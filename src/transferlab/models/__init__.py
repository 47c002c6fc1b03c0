"""Backbones (any timm model plus transferlab's built-in CNNs), weight sources, heads, truncation, per-architecture facts."""

from transferlab.models.archs import ARCHS, arch_meta, sequential_pieces
from transferlab.models.backbones import WEIGHT_SOURCES, create_backbone
from transferlab.models.heads import HEADS, ConvHead, build_head
from transferlab.models.model import BN_TYPES, TransferModel, build_model, count_params
from transferlab.models.runs import load_run_model  # also what Run.load_model() calls
from transferlab.models.weights import LoadReport, WeightsError, load_model_weights, load_strict, read_state_file

__all__ = [
    "ARCHS",
    "BN_TYPES",
    "HEADS",
    "WEIGHT_SOURCES",
    "ConvHead",
    "LoadReport",
    "TransferModel",
    "WeightsError",
    "arch_meta",
    "build_head",
    "build_model",
    "count_params",
    "create_backbone",
    "load_model_weights",
    "load_run_model",
    "load_strict",
    "read_state_file",
    "sequential_pieces",
]
