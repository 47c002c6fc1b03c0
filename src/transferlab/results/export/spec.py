"""What an exported model expects and how a format is declared: ``ExportSpec``, ``ExportFormat`` and the
``EXPORT_FORMATS`` registry that every format module (``onnx``, ``torchscript``, ``pt2``, ``safetensors``, ``hf``)
registers itself in.

Every exported model takes what ``TransferModel.forward`` takes: float32 N×in_chans×S×S images,
already normalised. ``ExportSpec`` records how to get there (size, channels, mean, std, class
names, test-time augmentation) and travels inside every file: ONNX ``metadata_props``, TorchScript
and ``.pt2`` extra files, the safetensors header and its JSON config.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from transferlab.config import ExperimentConfig
from transferlab.data.batches import Preprocess
from transferlab.models.model import TransferModel
from transferlab.registry import Registry

if TYPE_CHECKING:
    from transferlab.results.export.parity import ParityReport

__all__ = [
    "EXPORT_FORMATS",
    "SPEC_FORMAT",
    "SPEC_KEY",
    "ExportError",
    "ExportFormat",
    "ExportParityError",
    "ExportSpec",
    "Runner",
    "batch_dim",
    "export_format",
    "export_spec",
    "require_modules",
]

SPEC_FORMAT = "transferlab-export-v1"
SPEC_KEY = "transferlab.spec"
"""Where the full ``ExportSpec`` JSON sits in a file (ONNX metadata key, extra-file name, header key)."""


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


def batch_dim() -> dict[int, Any]:
    # A symbolic batch axis: the example batch is 2 but the file takes any N >= 1 (the parity check
    # runs N and 1). Without a Dim the exporters would bake the example's batch size into the graph.
    return {0: torch.export.Dim("batch", min=1)}


