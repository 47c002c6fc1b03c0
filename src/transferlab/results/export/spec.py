"""What an exported model expects and how a format is declared: ``ExportSpec``, ``ExportFormat`` and the
``EXPORT_FORMATS`` registry that every format module (``onnx``, ``torchscript``, ``pt2``, ``safetensors``, ``hf``)
registers itself in.

Every exported model takes what ``TransferModel.forward`` takes: float32 N×in_chans×S×S images,
already normalised. ``ExportSpec`` records how a raw image file gets there — the colour mode it is
converted to, how it is brought to S×S (``data.resize``: ``crop`` / ``pad`` / ``stretch``,
``crop_pct``, the interpolation), the channels the model takes, mean and std — plus the class names,
the task (``multiclass``: softmax over the logits; ``multilabel``: a sigmoid per class, and the threshold
of each class chosen on validation) and the test-time augmentation, and travels inside every file: ONNX ``metadata_props`` (also as flat,
readable keys), TorchScript and ``.pt2`` extra files, the safetensors header and its JSON config, the
hf folder's ``config.json``. ``preprocess_file`` is the whole recipe from those flat keys alone (PIL
and numpy): what a stranger writes, and what the parity check runs raw image files through.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from transferlab.config import ExperimentConfig
from transferlab.data.batches import Preprocess
from transferlab.models.model import TransferModel
from transferlab.models.prompts import has_prompts
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
    "fit_box",
    "preprocess_file",
    "preprocess_image",
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
    strategy: dict[str, Any] = field(default_factory=dict)
    """``StrategyConfig`` as a dict when the strategy added modules the model keeps at inference (VPT prompts; LoRA is
    merged before export), so a reader rebuilds them before loading the weights; empty otherwise."""
    tta: str = "none"
    """The run's test-time augmentation; the file holds the bare model, ``predict`` applies it."""
    experiment: str = ""
    source: str = ""
    """The run directory the model came from."""
    checkpoint: str = "best"
    resize: str = "crop"
    """``data.resize`` of the run: how an image of any shape reaches S×S (``fit_box``). Exports written
    before it was recorded read as ``crop`` at ``crop_pct`` 1.0: what their readers did."""
    crop_pct: float = 1.0
    """``resize: crop``: the center crop keeps this share of the shorter side (timm's ``crop_pct``)."""
    interpolation: str = "bilinear"
    """PIL's resampling filter for the resize (``bilinear``: PIL's, which antialiases when shrinking)."""
    task: str = "multiclass"
    """``multiclass`` (one label per image: softmax over the logits) or ``multilabel`` (independent labels: a sigmoid per
    logit, a label where its probability reaches its threshold). Exports written before it was recorded are multiclass."""
    thresholds: tuple[float, ...] | None = None
    """``multilabel``: the probability threshold of each class, chosen on validation by the run (``metrics.json``)."""

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
            if d.get("thresholds") is not None:
                d["thresholds"] = tuple(float(t) for t in d["thresholds"])
            return cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise ExportError(f"{where}: unreadable transferlab export metadata ({e})") from None

    @property
    def image_mode(self) -> str:
        """The PIL mode a raw image is converted to first: ``L`` for a run on grayscale images, else ``RGB``."""
        return "L" if self.channels == 1 else "RGB"

    def recipe(self) -> str:
        """The preprocessing in one paragraph (the ``preprocessing`` metadata key; ``preprocess_file`` does it)."""
        s = self.image_size
        fit = {
            "crop": f"resize (aspect kept) so the shorter side is floor({s} / crop_pct) = {math.floor(s / self.crop_pct)} px, the longer "
                    f"side int(shorter × long / short) px, then cut the centered {s}×{s} window (top/left = round((side - {s}) / 2))",
            "pad": f"resize (aspect kept) so the longer side is {s} px (the shorter round(short × {s} / long), at least 1), then paste it "
                   f"centered (top/left = ({s} - side) // 2) on a black {s}×{s} canvas",
            "stretch": f"resize to {s}×{s} (aspect not kept)",
        }[self.resize]
        gray = f"; repeat the one channel {self.in_chans} times" if self.channels == 1 and self.in_chans != 1 else ""
        return (
            f"convert to {self.image_mode} (transparency composited on white); {fit} ({self.interpolation} resampling, PIL); "
            f"scale to [0, 1] (pixel / 255){gray}; subtract mean and divide by std per channel; NCHW float32"
        )

    def output(self) -> str:
        """What the model's output means (the ``output`` metadata key)."""
        if self.task == "multilabel":
            return (f"logits: float32 N×{self.num_classes}, one per label (multi-label): sigmoid for each label's probability; "
                    "the label is predicted where its probability >= its entry of thresholds")
        return f"logits: float32 N×{self.num_classes} (softmax for probabilities)"

    def metadata(self) -> dict[str, str]:
        """Flat string metadata (ONNX ``metadata_props``): readable keys for people and other tools, plus
        the whole spec under ``transferlab.spec`` for transferlab itself."""
        return {
            "input": f"images: float32 N×{self.in_chans}×{self.image_size}×{self.image_size} (NCHW, RGB order), (pixel / 255 - mean) / std",
            "output": self.output(),
            "preprocessing": self.recipe(),
            "image_mode": self.image_mode,
            "resize": self.resize,
            "crop_pct": repr(float(self.crop_pct)),
            "interpolation": self.interpolation,
            "pad_fill": "0",
            "image_size": str(self.image_size),
            "channels": str(self.channels),
            "in_chans": str(self.in_chans),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "class_names": json.dumps(list(self.class_names)),
            "task": self.task,
            "thresholds": json.dumps(None if self.thresholds is None else list(self.thresholds)),
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
    task: str = "multiclass",
    thresholds: list[float] | None = None,
) -> ExportSpec:
    """The ``ExportSpec`` of ``model`` as run ``cfg`` trained it on ``channels``-channel ``image_size`` images; a
    ``multilabel`` ``task`` needs one threshold per class (the run's, from ``metrics.json``)."""
    if task == "multilabel" and (not thresholds or len(thresholds) != len(class_names)):
        found = "none" if not thresholds else str(len(thresholds))
        raise ExportError(f"{source or cfg.name}: a multi-label model needs one threshold per class to be exported "
                          f"({len(class_names)} classes, {found} thresholds in metrics.json)")
    pre = model.preprocess()
    model_cfg = dataclasses.replace(cfg.model, weights="scratch", keep_head=False)  # the weights travel in the file
    return ExportSpec(
        class_names=tuple(str(c) for c in class_names), image_size=int(image_size), channels=int(channels),
        in_chans=int(pre.in_chans), mean=tuple(float(v) for v in pre.mean), std=tuple(float(v) for v in pre.std),
        model=dataclasses.asdict(model_cfg), head=dataclasses.asdict(model.head_cfg), tta=cfg.train.tta,
        strategy=dataclasses.asdict(cfg.strategy) if has_prompts(model.backbone) else {},
        experiment=cfg.name, source=source, checkpoint=checkpoint,
        resize=cfg.data.resize, crop_pct=float(cfg.data.crop_pct), interpolation="bilinear",  # data.images resizes with PIL's bilinear
        task=task, thresholds=tuple(float(t) for t in thresholds) if task == "multilabel" and thresholds else None,
    )


# --------------------------------------------------------------------------------------------
# the preprocessing from the metadata alone (PIL + numpy): what a stranger writes


_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}


def fit_box(h: int, w: int, size: int, resize: str, crop_pct: float = 1.0) -> tuple[int, int, int, int]:
    """(resized height, width, top, left) of an h×w image brought to size×size by ``resize`` (``ExportSpec.recipe``).

    Written from the recipe, independently of ``transferlab.data`` (whose ``fit_geometry`` the run used):
    the parity check compares the two.
    """
    if resize == "stretch" or (h == w and (resize == "pad" or crop_pct == 1.0)):
        return size, size, 0, 0
    if resize == "crop":
        short = math.floor(size / crop_pct)
        rh, rw = (short, max(short, int(short * w / h))) if h <= w else (max(short, int(short * h / w)), short)
        return rh, rw, int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    if resize == "pad":
        rh, rw = (max(1, min(size, round(side * size / max(h, w)))) for side in (h, w))
        return rh, rw, (size - rh) // 2, (size - rw) // 2
    raise ValueError(f"resize {resize!r} is not crop, pad or stretch")


def preprocess_image(img: Image.Image, metadata: dict[str, str]) -> np.ndarray:
    """One PIL image -> the float32 in_chans×S×S input of the exported model, from the flat metadata keys alone."""
    size, mode, resize = int(metadata["image_size"]), metadata.get("image_mode", "RGB"), metadata.get("resize", "crop")
    crop_pct = float(metadata.get("crop_pct", "1.0"))
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA", "P") and (img.mode != "P" or "transparency" in img.info):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    img = img.convert(mode)
    rh, rw, top, left = fit_box(img.height, img.width, size, resize, crop_pct)
    if img.size != (rw, rh):
        img = img.resize((rw, rh), _FILTERS[metadata.get("interpolation", "bilinear")])
    if resize == "crop" and (rh, rw) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    elif resize == "pad" and (rh, rw) != (size, size):
        canvas = Image.new(mode, (size, size), int(metadata.get("pad_fill", "0")))
        canvas.paste(img, (left, top))
        img = canvas
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    in_chans = int(metadata.get("in_chans", x.shape[0]))
    if x.shape[0] == 1 and in_chans != 1:
        x = np.repeat(x, in_chans, axis=0)
    elif x.shape[0] == 3 and in_chans == 1:  # an RGB run feeding a 1-channel model: luma, as transferlab's Preprocess does
        x = (x * np.asarray([0.299, 0.587, 0.114], dtype=np.float32)[:, None, None]).sum(0, keepdims=True)
    mean = np.asarray(json.loads(metadata["mean"]), dtype=np.float32)[:, None, None]
    std = np.asarray(json.loads(metadata["std"]), dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def preprocess_file(path: str | Path, metadata: dict[str, str]) -> np.ndarray:
    """An image file -> the float32 in_chans×S×S input of the exported model (``preprocess_image``)."""
    with Image.open(path) as img:
        img.load()
        return preprocess_image(img, metadata)


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
    read_spec: Callable[[Path], ExportSpec] | None = None
    """The ``ExportSpec`` inside a written file (``load_export``: what ``predict`` preprocesses with)."""

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


