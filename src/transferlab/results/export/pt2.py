"""``torch.export``: an ExportedProgram (``.pt2``) with a dynamic batch axis, run back with ``torch.export.load``."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from transferlab.files import write_bytes
from transferlab.results.export.spec import EXPORT_FORMATS, SPEC_KEY, ExportError, ExportFormat, ExportSpec, Runner, batch_dim

__all__: list[str] = []

def _save_exported_program(model: nn.Module, example: torch.Tensor, spec: ExportSpec, path: Path) -> list[Path]:
    program = torch.export.export(model, (example,), dynamic_shapes=(batch_dim(),))
    buf = io.BytesIO()  # torch.export.save wants a name ending in .pt2 or a buffer; atomic_write's temp file is neither
    torch.export.save(program, buf, extra_files={SPEC_KEY: spec.to_json()})
    write_bytes(path, buf.getvalue())
    return [path]


class _Program(nn.Module):
    """An ExportedProgram's module behind a plain module: ``eval()`` / ``train()`` are no-ops here, where torch's raise
    ("not supported yet") — the graph was captured from a model in eval mode, so it already is in eval form."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "program", module)  # not a submodule: Module.train() would recurse into it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def _load_exported_program(path: Path) -> Runner:
    with open(path, "rb") as f:
        program = torch.export.load(f)
    return _Program(program.module())


def _read_spec(path: Path) -> ExportSpec:
    extra = {SPEC_KEY: ""}
    with open(path, "rb") as f:
        torch.export.load(f, extra_files=extra)
    if not extra[SPEC_KEY]:
        raise ExportError(f"{path}: an ExportedProgram without transferlab export metadata (extra file {SPEC_KEY})")
    return ExportSpec.from_json(extra[SPEC_KEY], str(path))


EXPORT_FORMATS.register(obj=ExportFormat(
    "exported-program", "model.pt2", _save_exported_program, _load_exported_program, "torch.export.load",
    "torch.export.export, dynamic batch axis", help="torch.export ExportedProgram (.pt2)", read_spec=_read_spec,
))
