"""TorchScript: a traced module with the spec as an extra file, run back with ``torch.jit.load``."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from transferlab.files import atomic_write
from transferlab.results.export.spec import EXPORT_FORMATS, SPEC_KEY, ExportError, ExportFormat, ExportSpec, Runner

__all__: list[str] = []

def _save_torchscript(model: nn.Module, example: torch.Tensor, spec: ExportSpec, path: Path) -> list[Path]:
    # Tracing, not scripting: torch.jit.script fails on every family here (TransferModel's Python
    # head dispatch, a truncated backbone's annotations, timm's modules), while all of them are plain
    # feed-forward graphs that a trace records faithfully. A value that a trace would freeze (a
    # batch size) is caught by the parity check's batch of one.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch calls TorchScript deprecated; asked for by name
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # shape arithmetic traced as constants: see above
        traced = torch.jit.trace(model, (example,), check_trace=False)
        atomic_write(path, lambda tmp: torch.jit.save(traced, str(tmp), _extra_files={SPEC_KEY: spec.to_json()}))
    return [path]


def _load_torchscript(path: Path) -> Runner:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def _read_spec(path: Path) -> ExportSpec:
    extra = {SPEC_KEY: ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[SPEC_KEY]:
        raise ExportError(f"{path}: a TorchScript file without transferlab export metadata (extra file {SPEC_KEY})")
    return ExportSpec.from_json(extra[SPEC_KEY], str(path))


EXPORT_FORMATS.register(obj=ExportFormat(
    "torchscript", "model.torchscript.pt", _save_torchscript, _load_torchscript, "torch.jit.load",
    "torch.jit.trace", help="TorchScript (traced), loads with torch.jit.load", read_spec=_read_spec,
))
