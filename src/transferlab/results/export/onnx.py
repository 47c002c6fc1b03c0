"""ONNX: torch's dynamo exporter, onnxruntime for the parity check and ``predict model.onnx``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferlab.files import atomic_write
from transferlab.results.export.spec import EXPORT_FORMATS, SPEC_KEY, ExportError, ExportFormat, ExportSpec, batch_dim, require_modules

__all__ = ["ONNX_OPSET", "OnnxModel", "load_onnx"]

ONNX_OPSET = 20
"""The opset the dynamo exporter of torch 2.14 emits natively; asking for another one runs onnxscript's
version converter, one more step that can fail on an op."""


def _save_onnx(model: nn.Module, example: torch.Tensor, spec: ExportSpec, path: Path) -> list[Path]:
    # The dynamo exporter (torch.export -> ONNX through onnxscript), not the TorchScript-based one:
    # torch 2.14 marks the TorchScript exporter deprecated ("will be removed", a warning on every
    # call), while the dynamo exporter handles every family here (timm ResNet / EfficientNet incl. the
    # TF "same" padding, the built-in CNNs, truncated backbones, conv heads; tested) with a symbolic
    # batch axis, and traces through the same torch.export graph as the exported-program format.
    # Its cost is a few seconds per model and the onnxscript dependency.
    program = torch.onnx.export(
        model, (example,), dynamo=True, verbose=False, opset_version=ONNX_OPSET,
        input_names=["images"], output_names=["logits"], dynamic_shapes=(batch_dim(),),
    )
    program.model.metadata_props.update(spec.metadata())
    # one self-contained file (the 2 GB protobuf limit is far above these models)
    atomic_write(path, lambda tmp: program.save(str(tmp), external_data=False))
    return [path]


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime (CPU provider) behind a module call: float N×C×H×W -> logits.

    ``metadata`` holds the file's ``metadata_props``; ``spec`` the transferlab ``ExportSpec`` in them
    (``None`` for an ONNX file transferlab did not write).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        require_modules(("onnxruntime",), "onnx", "running an ONNX file")
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"ONNX file not found: {self.path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its notes on graph optimisation are not the user's business
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for a bad file
            raise ExportError(f"{self.path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.spec = ExportSpec.from_json(self.metadata[SPEC_KEY], str(self.path)) if SPEC_KEY in self.metadata else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(np.ascontiguousarray(out))


def load_onnx(path: str | Path) -> tuple[OnnxModel, ExportSpec]:
    """An ONNX file written by ``transferlab export`` and its ``ExportSpec`` (an error for any other ONNX file)."""
    model = OnnxModel(path)
    if model.spec is None:
        raise ExportError(
            f"{path}: no transferlab metadata ({SPEC_KEY} in metadata_props), so its input size, normalisation "
            "and class names are unknown; export the run with `transferlab export <run> --format onnx`"
        )
    return model, model.spec


EXPORT_FORMATS.register(obj=ExportFormat(
    "onnx", "model.onnx", _save_onnx, OnnxModel, "onnxruntime (CPUExecutionProvider)",
    f"torch.onnx.export(dynamo=True), opset {ONNX_OPSET}, dynamic batch axis",
    requires=("onnx", "onnxruntime", "onnxscript"), extra="onnx",
    help="ONNX (dynamo exporter), preprocessing and class names in metadata_props",
    read_spec=lambda path: load_onnx(path)[1],
))
