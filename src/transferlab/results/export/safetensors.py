"""The bare state dict as safetensors plus a JSON config to rebuild the model, run back in a freshly built model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from transferlab.config import HeadConfig, ModelConfig, StrategyConfig, from_dict
from transferlab.files import atomic_write, write_json
from transferlab.models.adapters import add_strategy_modules
from transferlab.models.model import build_model
from transferlab.results.export.spec import EXPORT_FORMATS, SPEC_FORMAT, SPEC_KEY, ExportError, ExportFormat, ExportSpec, Runner

__all__: list[str] = []

def _config_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _save_safetensors(model: nn.Module, example: torch.Tensor, spec: ExportSpec, path: Path) -> list[Path]:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": SPEC_FORMAT, SPEC_KEY: spec.to_json()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=header))
    config = {
        "format": SPEC_FORMAT,
        "weights": path.name,
        "model": spec.model,
        "head": spec.head,
        "num_classes": spec.num_classes,
        "spec": json.loads(spec.to_json()),
        "load": "build_model(from_dict(ModelConfig, model), from_dict(HeadConfig, head), num_classes) (transferlab.models.model, "
        "transferlab.config), then load_state_dict(strict=True)",
    }
    write_json(_config_path(path), config)
    return [path, _config_path(path)]


def _read_spec(path: Path) -> ExportSpec:
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if SPEC_KEY not in header:
        raise ExportError(f"{path}: safetensors file without transferlab export metadata")
    return ExportSpec.from_json(header[SPEC_KEY], str(path))


def _load_safetensors(path: Path) -> Runner:
    spec = _read_spec(path)
    model, _ = build_model(from_dict(ModelConfig, spec.model, "model"), from_dict(HeadConfig, spec.head, "head"), spec.num_classes)
    if spec.strategy:  # VPT prompts: part of the model, their weights are in the file
        add_strategy_modules(model, from_dict(StrategyConfig, spec.strategy, "strategy"))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


EXPORT_FORMATS.register(obj=ExportFormat(
    "safetensors", "model.safetensors", _save_safetensors, _load_safetensors,
    "safetensors into a freshly built TransferModel", "state_dict + JSON config",
    help="the bare state dict + a JSON config to rebuild the model", read_spec=_read_spec,
))
