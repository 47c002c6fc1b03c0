"""A model out of transferlab, in the formats its users' tools read, each checked by the parity check.

One module per format, peers over one small interface (``ExportFormat``: ``save``, ``load``, ``read_spec``,
registered in ``EXPORT_FORMATS``): ``onnx``, ``torchscript``, ``pt2`` (``exported-program``),
``safetensors`` and ``hf`` (the Hugging Face folder, its model card and ``push``). ``spec`` says what
an exported model expects (``ExportSpec``, inside every file), ``parity`` checks a written file with
its own runtime against the model, ``run`` writes a finished run's model (``export_run``, which is
what ``Run.export()`` calls).
"""

from transferlab.results.export import hf, onnx, pt2, safetensors, torchscript  # noqa: F401 - each registers its format
from transferlab.results.export.hf import HubError, HubModel, export_hf, load_hf_model, model_card, push_hf, timm_equivalent, timm_preprocessing
from transferlab.results.export.onnx import ONNX_OPSET, OnnxModel, load_onnx
from transferlab.results.export.parity import (
    PARITY_FALLBACK_IMAGES,
    ParityReport,
    Tolerance,
    check_parity,
    check_raw_files,
    parity_inputs,
    parity_path,
)
from transferlab.results.export.run import ExportResult, export_checkpoint, export_format_of, export_model, export_run, export_run_model, load_export
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
    fit_box,
    preprocess_file,
    preprocess_image,
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
    "check_raw_files",
    "export_checkpoint",
    "export_format",
    "export_format_of",
    "export_hf",
    "export_model",
    "export_run",
    "export_run_model",
    "export_spec",
    "fit_box",
    "load_hf_model",
    "load_export",
    "load_onnx",
    "model_card",
    "parity_inputs",
    "parity_path",
    "preprocess_file",
    "preprocess_image",
    "push_hf",
    "require_modules",
    "timm_equivalent",
    "timm_preprocessing",
]
