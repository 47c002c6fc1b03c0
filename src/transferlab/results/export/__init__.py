"""A model out of transferlab, in the formats its users' tools read, each checked by the parity check.

One module per format, peers over one small interface (``ExportFormat``: ``save`` and ``load``,
registered in ``EXPORT_FORMATS``): ``onnx``, ``torchscript``, ``pt2`` (``exported-program``),
``safetensors`` and ``hf`` (the Hugging Face folder, its model card and ``push``). ``spec`` says what
an exported model expects (``ExportSpec``, inside every file), ``parity`` checks a written file with
its own runtime against the model, ``run`` writes a finished run's model (``export_run``, which is
what ``Run.export()`` calls).
"""

from transferlab.results.export import hf, onnx, pt2, safetensors, torchscript  # noqa: F401 - each registers its format
from transferlab.results.export.hf import HubError, HubModel, export_hf, load_hf_model, model_card, push_hf, timm_equivalent
from transferlab.results.export.onnx import ONNX_OPSET, OnnxModel, load_onnx
from transferlab.results.export.parity import PARITY_FALLBACK_IMAGES, ParityReport, Tolerance, check_parity, parity_inputs, parity_path
from transferlab.results.export.run import ExportResult, export_checkpoint, export_model, export_run, export_run_model
from transferlab.results.export.spec import (
    EXPORT_FORMATS,
    SPEC_FORMAT,
    SPEC_KEY,
    ExportError,
    ExportFormat,
    ExportParityError,
    ExportSpec,
    export_format,
    export_spec,
    require_modules,
)

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_OPSET",
    "PARITY_FALLBACK_IMAGES",
    "SPEC_FORMAT",
    "SPEC_KEY",
    "ExportError",
    "ExportFormat",
    "ExportParityError",
    "ExportResult",
    "ExportSpec",
    "HubError",
    "HubModel",
    "OnnxModel",
    "ParityReport",
    "Tolerance",
    "check_parity",
    "export_checkpoint",
    "export_format",
    "export_hf",
    "export_model",
    "export_run",
    "export_run_model",
    "export_spec",
    "load_hf_model",
    "load_onnx",
    "model_card",
    "parity_inputs",
    "parity_path",
    "push_hf",
    "require_modules",
    "timm_equivalent",
]
