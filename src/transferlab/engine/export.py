"""A model out of transferlab — ONNX, TorchScript, torch.export, bare safetensors — and the parity check
every export has to pass.

An export format is an ``ExportFormat`` registered in ``EXPORT_FORMATS`` (``transferlab export
--format``): ``save`` writes the file, ``load`` reads it back with the format's *own* runtime
(onnxruntime, ``torch.jit.load``, ``torch.export.load``, a freshly built model) as a callable
images -> logits. ``export_model`` knows only those two, so a new format (the Hugging Face folder) is
one more registration beside these.

The parity check (``check_parity``) runs the written file on real images — normally the run's
recorded test samples — and compares it with the model it came from: top-1 must agree on every image
(a near-tie within the tolerance is counted, not failed) and max |Δlogit| must stay within
``atol + rtol · max |logit|``. The batch is run whole and then as a batch of one, so a batch size
baked into the file (no dynamic batch axis) fails too. The result is logged, returned and written
beside the file (``<file>.parity.json``); a failed check raises ``ExportParityError``.

Every exported model takes what ``TransferModel.forward`` takes: float32 N×in_chans×S×S images,
already normalised. ``ExportSpec`` records how to get there (size, channels, mean, std, class
names, test-time augmentation) and travels inside every file: ONNX ``metadata_props``, TorchScript
and ``.pt2`` extra files, the safetensors header and its JSON config.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from transferlab.config import DataConfig, ExperimentConfig, HeadConfig, ModelConfig, from_dict
from transferlab.data.batches import Preprocess
from transferlab.data.images import FileImages, load_image
from transferlab.data.resize import resize_uint8
from transferlab.data.sources import load_dataset
from transferlab.engine.predictions import SAMPLES_FILE
from transferlab.files import atomic_write, write_bytes, write_json
from transferlab.models.model import TransferModel, build_model
from transferlab.models.weights import load_model_weights
from transferlab.registry import Registry

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_OPSET",
    "PARITY_FALLBACK_IMAGES",
    "SPEC_FORMAT",
    "ExportError",
    "ExportFormat",
    "ExportParityError",
    "ExportResult",
    "ExportSpec",
    "OnnxModel",
    "ParityReport",
    "Tolerance",
    "check_parity",
    "export_checkpoint",
    "export_format",
    "export_model",
    "export_run_model",
    "export_spec",
    "load_onnx",
    "parity_inputs",
    "parity_path",
    "require_modules",
]

log = logging.getLogger(__name__)

SPEC_FORMAT = "transferlab-export-v1"
SPEC_KEY = "transferlab.spec"
"""Where the full ``ExportSpec`` JSON sits in a file (ONNX metadata key, extra-file name, header key)."""
ONNX_OPSET = 20
"""The opset the dynamo exporter of torch 2.14 emits natively; asking for another one runs onnxscript's
version converter, one more step that can fail on an op."""
PARITY_FALLBACK_IMAGES = 16
"""Test images of the run's dataset used for the parity check when the run recorded no test samples."""


class ExportError(RuntimeError):
    """An export that cannot be made: a missing extra, a run without a model, an exporter failure."""


class ExportParityError(ExportError):
    """The exported file, run by its own runtime, disagrees with the model. ``report`` says by how much."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


def require_modules(modules: tuple[str, ...], extra: str | None, what: str) -> None:
    """Import ``modules`` or fail naming the ``pip install transferlab[extra]`` that provides them."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        fix = f"pip install 'transferlab[{extra}]'" if extra else f"pip install {' '.join(missing)}"
        raise ExportError(f"{what} needs {', '.join(missing)}, which is not installed: {fix}")


# --------------------------------------------------------------------------------------------
# what an exported model expects


@dataclass(frozen=True)
class ExportSpec:
    """What an exported file says about its model: the input it expects, its classes, its architecture."""

    class_names: tuple[str, ...]
    image_size: int
    """Square side of the input."""
    channels: int
    """Channels of the images the run was trained on (1 = grayscale); ``Preprocess`` makes ``in_chans`` of them."""
    in_chans: int
    """Channels of the model input."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    """Normalisation on pixel values scaled to [0, 1]: ``(x / 255 - mean) / std``."""
    model: dict[str, Any] = field(default_factory=dict)
    """``ModelConfig`` as a dict (weights ``scratch``: the weights are in the file)."""
    head: dict[str, Any] = field(default_factory=dict)
    """``HeadConfig`` as a dict."""
    tta: str = "none"
    """The run's test-time augmentation; the file holds the bare model, ``predict`` applies it."""
    experiment: str = ""
    source: str = ""
    """The run directory the model came from."""
    checkpoint: str = "best"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def preprocess(self) -> Preprocess:
        """uint8 N×channels×S×S images -> the float input of the exported model."""
        return Preprocess(mean=self.mean, std=self.std, in_chans=self.in_chans)

    def to_json(self) -> str:
        return json.dumps({"format": SPEC_FORMAT, **dataclasses.asdict(self)})

    @classmethod
    def from_json(cls, text: str, where: str) -> ExportSpec:
        """Read ``to_json`` output back; ``where`` (the file) names the problem in errors."""
        try:
            d = json.loads(text)
            if d.pop("format", None) != SPEC_FORMAT:
                raise ValueError(f"not a {SPEC_FORMAT} record")
            for key in ("class_names", "mean", "std"):
                d[key] = tuple(d[key])
            return cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise ExportError(f"{where}: unreadable transferlab export metadata ({e})") from None

    def metadata(self) -> dict[str, str]:
        """Flat string metadata (ONNX ``metadata_props``): readable keys for people and other tools, plus
        the whole spec under ``transferlab.spec`` for transferlab itself."""
        return {
            "input": f"images: float32 N×{self.in_chans}×{self.image_size}×{self.image_size} (NCHW, RGB order), (pixel / 255 - mean) / std",
            "output": f"logits: float32 N×{self.num_classes} (softmax for probabilities)",
            "image_size": str(self.image_size),
            "channels": str(self.channels),
            "in_chans": str(self.in_chans),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "class_names": json.dumps(list(self.class_names)),
            "tta": self.tta,
            "backbone": str(self.model.get("backbone", "")),
            "experiment": self.experiment,
            "source_run": self.source,
            SPEC_KEY: self.to_json(),
        }


def export_spec(
    model: TransferModel,
    cfg: ExperimentConfig,
    class_names: list[str],
    image_size: int,
    channels: int,
    source: str = "",
    checkpoint: str = "best",
) -> ExportSpec:
    """The ``ExportSpec`` of ``model`` as run ``cfg`` trained it on ``channels``-channel ``image_size`` images."""
    pre = model.preprocess()
    model_cfg = dataclasses.replace(cfg.model, weights="scratch", keep_head=False)  # the weights travel in the file
    return ExportSpec(
        class_names=tuple(str(c) for c in class_names), image_size=int(image_size), channels=int(channels),
        in_chans=int(pre.in_chans), mean=tuple(float(v) for v in pre.mean), std=tuple(float(v) for v in pre.std),
        model=dataclasses.asdict(model_cfg), head=dataclasses.asdict(model.head_cfg), tta=cfg.train.tta,
        experiment=cfg.name, source=source, checkpoint=checkpoint,
    )


# --------------------------------------------------------------------------------------------
# the formats


Runner = Callable[[torch.Tensor], torch.Tensor]
"""An exported file loaded by its own runtime: float N×C×S×S input -> N×classes logits."""


@dataclass(frozen=True)
class ExportFormat:
    """One ``--format``: how to write a model and how to run the written file with its own runtime."""

    name: str
    filename: str
    """Default file (or folder) name in ``<run>/export/``."""
    save: Callable[[nn.Module, torch.Tensor, ExportSpec, Path], list[Path]]
    """(model in eval mode on the CPU, example input, spec, path) -> the files written."""
    load: Callable[[Path], Runner]
    runtime: str
    """What the parity check runs the file with (reported)."""
    exporter: str
    """How the file is made (reported)."""
    requires: tuple[str, ...] = ()
    """Modules the format needs beyond the base install ..."""
    extra: str | None = None
    """... and the ``transferlab[extra]`` that installs them."""
    help: str = ""
    folder: bool = False
    """It writes a folder (``hf``), not one file: an ``--out`` folder that exists is the export itself, not where it goes."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "__doc__", self.help)  # what `transferlab list` shows for this entry

    def check_available(self) -> None:
        """Fail now, before any work, when a module this format needs is missing."""
        require_modules(self.requires, self.extra, f"--format {self.name}")


EXPORT_FORMATS: Registry[ExportFormat] = Registry("export format", "transferlab export --format")


def export_format(fmt: str | ExportFormat) -> ExportFormat:
    """The registered format ``fmt`` (did-you-mean otherwise), checked to be usable here."""
    out = fmt if isinstance(fmt, ExportFormat) else EXPORT_FORMATS.get(fmt)
    out.check_available()
    return out


def _batch_dim() -> dict[int, Any]:
    # A symbolic batch axis: the example batch is 2 but the file takes any N >= 1 (the parity check
    # runs N and 1). Without a Dim the exporters would bake the example's batch size into the graph.
    return {0: torch.export.Dim("batch", min=1)}


# ---- ONNX


def _save_onnx(model: nn.Module, example: torch.Tensor, spec: ExportSpec, path: Path) -> list[Path]:
    # The dynamo exporter (torch.export -> ONNX through onnxscript), not the TorchScript-based one:
    # torch 2.14 marks the TorchScript exporter deprecated ("will be removed", a warning on every
    # call), while the dynamo exporter handles every family here (timm ResNet / EfficientNet incl. the
    # TF "same" padding, the built-in CNNs, truncated backbones, conv heads; tested) with a symbolic
    # batch axis, and traces through the same torch.export graph as the exported-program format.
    # Its cost is a few seconds per model and the onnxscript dependency.
    program = torch.onnx.export(
        model, (example,), dynamo=True, verbose=False, opset_version=ONNX_OPSET,
        input_names=["images"], output_names=["logits"], dynamic_shapes=(_batch_dim(),),
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


# ---- TorchScript


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


# ---- torch.export


def _save_exported_program(model: nn.Module, example: torch.Tensor, spec: ExportSpec, path: Path) -> list[Path]:
    program = torch.export.export(model, (example,), dynamic_shapes=(_batch_dim(),))
    buf = io.BytesIO()  # torch.export.save wants a name ending in .pt2 or a buffer; atomic_write's temp file is neither
    torch.export.save(program, buf, extra_files={SPEC_KEY: spec.to_json()})
    write_bytes(path, buf.getvalue())
    return [path]


def _load_exported_program(path: Path) -> Runner:
    with open(path, "rb") as f:
        program = torch.export.load(f)
    return program.module()  # already in eval form: the graph was captured from a model in eval mode


# ---- safetensors: the bare state dict + a JSON config


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


def _load_safetensors(path: Path) -> Runner:
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if SPEC_KEY not in header:
        raise ExportError(f"{path}: safetensors file without transferlab export metadata")
    spec = ExportSpec.from_json(header[SPEC_KEY], str(path))
    model, _ = build_model(from_dict(ModelConfig, spec.model, "model"), from_dict(HeadConfig, spec.head, "head"), spec.num_classes)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


EXPORT_FORMATS.register(obj=ExportFormat(
    "onnx", "model.onnx", _save_onnx, OnnxModel, "onnxruntime (CPUExecutionProvider)",
    f"torch.onnx.export(dynamo=True), opset {ONNX_OPSET}, dynamic batch axis",
    requires=("onnx", "onnxruntime", "onnxscript"), extra="onnx",
    help="ONNX (dynamo exporter), preprocessing and class names in metadata_props",
))
EXPORT_FORMATS.register(obj=ExportFormat(
    "torchscript", "model.torchscript.pt", _save_torchscript, _load_torchscript, "torch.jit.load",
    "torch.jit.trace", help="TorchScript (traced), loads with torch.jit.load",
))
EXPORT_FORMATS.register(obj=ExportFormat(
    "exported-program", "model.pt2", _save_exported_program, _load_exported_program, "torch.export.load",
    "torch.export.export, dynamic batch axis", help="torch.export ExportedProgram (.pt2)",
))
EXPORT_FORMATS.register(obj=ExportFormat(
    "safetensors", "model.safetensors", _save_safetensors, _load_safetensors,
    "safetensors into a freshly built TransferModel", "state_dict + JSON config",
    help="the bare state dict + a JSON config to rebuild the model",
))


# --------------------------------------------------------------------------------------------
# the parity check


@dataclass(frozen=True)
class Tolerance:
    """Allowed max |Δlogit|: ``atol + rtol · max |logit|`` of the reference.

    Another runtime's kernels (and torch's own at another batch size) sum in another order, so float32
    logits differ in their last digits, in proportion to their magnitude: at most 2.3e-5 on the trained
    models of ``benchmarks/export_parity.py`` (logits up to 23). This keeps two orders of margin while
    anything really wrong — a missing normalisation, a wrong op, BatchNorm in training mode — moves
    logits by far more.
    """

    atol: float = 1e-4
    rtol: float = 1e-4

    def allowed(self, scale: float) -> float:
        return self.atol + self.rtol * scale


@dataclass
class ParityReport:
    """The exported file vs the model on the same images (module docstring)."""

    format: str
    file: str
    runtime: str
    exporter: str
    samples: str
    """Which images were used, in words."""
    n: int
    batch_sizes: list[int]
    top1_agreement: float
    top1_disagreements: int
    near_ties: int
    """Disagreements where the reference's two classes are within the tolerance: counted, not failed."""
    max_abs_logit_diff: float
    max_abs_logit: float
    tolerance: Tolerance
    problem: str | None = None
    """Why the check failed (``None``: it passed)."""
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def allowed(self) -> float:
        return self.tolerance.allowed(self.max_abs_logit)

    def describe(self) -> str:
        """One line: the figures and the verdict."""
        agree = self.n - self.top1_disagreements
        ties = f", {self.near_ties} near-tie(s)" if self.near_ties else ""
        verdict = "ok" if self.ok else f"FAILED: {self.problem}"
        return (
            f"parity {self.format} ({self.runtime}) on {self.samples}: top-1 agreement {100 * self.top1_agreement:.1f}% "
            f"({agree}/{self.n}{ties}), max |Δlogit| {self.max_abs_logit_diff:.2e} (allowed {self.allowed:.2e} = "
            f"{self.tolerance.atol:g} + {self.tolerance.rtol:g} × max |logit| {self.max_abs_logit:.3g}) — {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ok"], d["allowed"] = self.ok, self.allowed
        # JSON has no NaN: a non-finite figure (a broken export) is written as its name
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def parity_path(path: Path) -> Path:
    """Where the parity report of an exported file (or folder) is written: ``<file>.parity.json`` beside it."""
    return path.with_name(path.name + ".parity.json")


@torch.inference_mode()
def check_parity(
    reference: nn.Module, exported: Runner, x: torch.Tensor, tolerance: Tolerance | None = None, **describe: Any
) -> ParityReport:
    """Compare ``exported`` with ``reference`` on the float input ``x`` (whole, then its first image alone).

    ``describe`` fills the report's ``format``, ``file``, ``runtime``, ``exporter``, ``samples``.
    """
    tolerance = tolerance or Tolerance()
    fields = {"format": "", "file": "", "runtime": "", "exporter": "", "samples": f"{len(x)} images", **describe}
    ref = reference(x).float()
    problem = None
    try:
        got, got_one = exported(x).float(), exported(x[:1]).float()
    except Exception as e:  # noqa: BLE001 - any runtime failure is a failed check, reported as such
        got = got_one = None
        problem = f"the exported file does not run on a batch of {len(x)} and one of 1 ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
    if got is not None and (got.shape != ref.shape or got_one.shape != ref[:1].shape):
        problem = f"output shape {tuple(got.shape)} / {tuple(got_one.shape)}, expected {tuple(ref.shape)} / {tuple(ref[:1].shape)}"
        got = None
    scale = float(ref.abs().max())
    if got is None:
        return ParityReport(**fields, n=len(x), batch_sizes=[len(x), 1], top1_agreement=0.0, top1_disagreements=len(x),
                            near_ties=0, max_abs_logit_diff=math.inf, max_abs_logit=scale, tolerance=tolerance, problem=problem)
    got_all = torch.cat([got, got_one])
    ref_all = torch.cat([ref, ref[:1]])
    diff = float((got_all - ref_all).abs().max())
    if not math.isfinite(diff):
        diff = math.inf  # NaN compares false with everything: make it fail loudly
    allowed = tolerance.allowed(scale)
    ref_top, got_top = ref_all.argmax(1), got_all.argmax(1)
    wrong = ref_top != got_top
    margin = ref_all.gather(1, ref_top[:, None]) - ref_all.gather(1, got_top[:, None])
    ties = wrong & (margin.squeeze(1) <= allowed)
    n_wrong, n_ties = int(wrong[: len(x)].sum()), int(ties[: len(x)].sum())
    if (wrong & ~ties).any():
        problem = f"top-1 differs on {int((wrong & ~ties).sum())} image(s) beyond a near-tie"
    elif diff > allowed:
        problem = f"max |Δlogit| {diff:.3g} exceeds the allowed {allowed:.3g}"
    return ParityReport(
        **fields, n=len(x), batch_sizes=[len(x), 1], top1_agreement=1 - n_wrong / len(x), top1_disagreements=n_wrong,
        near_ties=n_ties, max_abs_logit_diff=diff, max_abs_logit=scale, tolerance=tolerance, problem=problem,
    )


def parity_inputs(
    samples: torch.Tensor | None, data: DataConfig, channels: int, size: int, n: int = PARITY_FALLBACK_IMAGES
) -> tuple[torch.Tensor, str]:
    """The uint8 N×C×size×size images the parity check uses, and what they are in words.

    The run's recorded test samples when there are any (they are stored at most 96 px wide, so they
    are resized to ``size`` when the run used larger images); otherwise the first ``n`` test images of
    the run's dataset; and when that cannot be read either, ``n`` seeded random images — said so.
    """
    if samples is not None and len(samples):
        what = f"the run's {len(samples)} recorded test samples"
        if samples.shape[-1] != size or samples.shape[-2] != size:
            what += f" (stored at {samples.shape[-1]} px, resized to {size} px)"
            samples = resize_uint8(samples.contiguous(), size)
        return samples, what
    try:
        raw = load_dataset(data)
        test = raw.test_x
        k = min(n, len(test))
        if isinstance(test, FileImages):
            images = torch.from_numpy(np.stack([load_image(test.paths[i], channels, size).transpose(2, 0, 1) for i in range(k)]))
        else:
            images = test[:k]
            if images.shape[-1] != size or images.shape[-2] != size:
                images = resize_uint8(images.contiguous(), size)
        if images.shape[1] != channels:
            raise ValueError(f"its test images have {images.shape[1]} channels, the run {channels}")
        return images.contiguous(), f"the first {k} test images of dataset {data.dataset!r} (the run recorded no test samples)"
    except Exception as e:  # noqa: BLE001 - the data may be gone; the export can still be checked on noise
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return images, f"{n} seeded random images (no recorded test samples, and dataset {data.dataset!r} unreadable: {reason})"


# --------------------------------------------------------------------------------------------
# export = write + check


@dataclass
class ExportResult:
    """What ``export_model`` did: the file, everything written with it, and the parity check."""

    format: str
    path: Path
    files: list[Path]
    parity: ParityReport
    report_path: Path
    seconds: float
    """Time to write the file (the check not included)."""


def export_model(
    model: TransferModel,
    spec: ExportSpec,
    fmt: str | ExportFormat,
    out: str | Path,
    images: torch.Tensor,
    samples: str = "",
    tolerance: Tolerance | None = None,
) -> ExportResult:
    """Write ``model`` to ``out`` as ``fmt`` and check the file on ``images`` (uint8, described by ``samples``),
    on the CPU, against a copy of ``model`` in eval mode.

    The report is written to ``parity_path(out)`` and logged whatever the verdict; a failed check then
    raises ``ExportParityError`` (the file is kept, for inspection — do not deploy it).
    """
    fmt = export_format(fmt)
    out = Path(out)
    if len(images) == 0:
        raise ExportError("the parity check needs at least one image")
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    x = spec.preprocess()(images.cpu())
    example = x[:2] if len(x) >= 2 else x.repeat(2, 1, 1, 1)  # 2: a batch of 1 would let exporters specialise it
    # A contiguous copy for the exporters: channels_last weights make torch.export.save warn about
    # tensors it cannot place, and the exported graphs do not depend on the memory format anyway.
    clean = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            files = fmt.save(clean, example, spec, out)
    except Exception as e:
        first = str(e).splitlines()[0][:500] if str(e) else ""
        raise ExportError(f"--format {fmt.name}: exporting {spec.experiment or 'the model'} failed ({type(e).__name__}: {first})") from e
    seconds = time.perf_counter() - start
    runner = fmt.load(out)
    report = check_parity(
        model, runner, x, tolerance, format=fmt.name, file=str(out), runtime=fmt.runtime, exporter=fmt.exporter,
        samples=samples or f"{len(images)} images",
    )
    report.versions = _versions(fmt)
    report_path = parity_path(out)
    write_json(report_path, report.to_dict())
    (log.info if report.ok else log.error)("%s", report.describe())
    if not report.ok:
        raise ExportParityError(f"{out}: {report.describe()}; report: {report_path} (the file is kept for inspection; do not deploy it)", report)
    return ExportResult(fmt.name, out, files, report, report_path, seconds)


def _versions(fmt: ExportFormat) -> dict[str, str]:
    out = {"torch": torch.__version__}
    for dist in fmt.requires:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def export_checkpoint(
    run_dir: str | Path,
    cfg: ExperimentConfig,
    metrics: dict[str, Any],
    fmt: str | ExportFormat,
    out: str | Path | None = None,
    checkpoint: str = "best",
    tolerance: Tolerance | None = None,
) -> ExportResult:
    """Export the model of a finished run directory from the engine's pieces alone (``cfg``, ``metrics.json``
    as a dict, ``checkpoints/<checkpoint>.safetensors``, ``test_samples.safetensors``), parity-checked.

    What ``Run.export`` does, for callers below the ``rundir`` layer (the MLflow tracker's ``log_model``).
    The default ``out`` is ``<run>/export/<format's filename>``.
    """
    fmt = export_format(fmt)
    run_dir = Path(run_dir)
    class_names = [str(c) for c in metrics.get("class_names") or []]
    model, _ = build_model(dataclasses.replace(cfg.model, weights="scratch"), cfg.head, len(class_names))
    load_model_weights(model, run_dir / "checkpoints" / f"{checkpoint}.safetensors")
    model.eval()
    samples_file = run_dir / SAMPLES_FILE
    samples = load_file(str(samples_file))["images"] if samples_file.is_file() else None
    size = metrics.get("image_size") or cfg.data.image_size
    if not size:
        raise ExportError(f"{run_dir}: metrics.json records no image_size, so the input size of the export is unknown")
    return export_run_model(model, cfg, class_names, metrics, samples, run_dir, fmt, out, checkpoint, tolerance, size)


def export_run_model(
    model: TransferModel, cfg: ExperimentConfig, class_names: list[str], metrics: dict[str, Any], samples: torch.Tensor | None,
    run_dir: Path, fmt: ExportFormat, out: str | Path | None, checkpoint: str, tolerance: Tolerance | None, size: int,
) -> ExportResult:
    """The part of a run's export after its model is loaded (``Run.export`` and ``export_checkpoint``): the spec, the
    parity inputs (the recorded test samples, else test images), the output path (default ``<run>/export/<filename>``)."""
    channels = metrics.get("channels") or (samples.shape[1] if samples is not None else model.preprocess().in_chans)
    spec = export_spec(model, cfg, class_names, size, channels, source=str(run_dir), checkpoint=checkpoint)
    images, described = parity_inputs(samples, cfg.data, spec.channels, spec.image_size)
    out = Path(out) if out is not None else run_dir / "export" / fmt.filename
    if out.is_dir() and Path(fmt.filename).suffix:  # a folder given for a one-file format: the default name in it
        out = out / fmt.filename
    return export_model(model, spec, fmt, out, images, described, tolerance)
