"""What a run's model sees: feature maps of chosen layers, and Grad-CAM for the predicted class.

``transferlab activations <run> <image> [--layers NAME ...] [--gradcam]`` writes one PNG: the image as the
model received it (the run's channels and size, see ``transferlab.tools.predict``), optionally with the Grad-CAM
heat map of the predicted class laid over it, then a grid of feature maps per chosen layer.

Layers are named as in ``model.named_modules()`` of the run's ``TransferModel`` (``backbone.blocks.0``,
``backbone.layer2``, ...). The default is the first and a middle *stage*: the modules timm's
``feature_info`` names, or the children of the backbone's ``blocks``/``stages``/``layers``/``features``
container, or its direct children — those whose output is a N×C×H×W feature map. Grad-CAM (Selvaraju et al.,
2017: channel weights = spatially averaged gradients of the class score, ReLU of the weighted sum) is
computed on the backbone's final feature map (``forward_features``) unless ``--gradcam-layer`` names another.

The model-level core (hooks, Grad-CAM, the figure) is ``transferlab.tools.inspect``, shared with an
experiment's ``activations:`` section; this module adds the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from transferlab.files import write_bytes
from transferlab.rundir import Run, load_run
from transferlab.tools.inspect import (
    FEATURES,
    MAX_MAPS,
    ActivationError,
    GradCam,
    PredictError,
    activation_figure,
    candidate_stages,
    capture_activations,
    default_layers,
    gradcam,
    image_activations,
    load_images,
)
from transferlab.tools.predict import run_input_spec

__all__ = [
    "FEATURES",
    "MAX_MAPS",
    "ActivationError",
    "ActivationResult",
    "GradCam",
    "activation_figure",
    "candidate_stages",
    "capture_activations",
    "default_layers",
    "gradcam",
    "save_activations",
]


@dataclass
class ActivationResult:
    """What ``save_activations`` wrote and found."""

    path: Path
    layers: list[str]
    shapes: dict[str, tuple[int, ...]]
    predicted: str
    prob: float
    gradcam: GradCam | None = None


def save_activations(
    run: Run | str | Path,
    image: str | Path,
    out: str | Path | None = None,
    layers: Sequence[str] | None = None,
    gradcam_layer: str | None = None,
    max_maps: int = MAX_MAPS,
    checkpoint: str = "best",
    device: str | torch.device = "cpu",
) -> ActivationResult:
    """Feature maps of ``layers`` (default: first and middle stage) for one image file, as a PNG.

    ``gradcam_layer`` (``features`` or a layer name) adds the Grad-CAM overlay of the predicted class.
    ``out`` defaults to ``<image stem>_activations.png`` in the current directory.
    """
    run = run if not isinstance(run, (str, Path)) else load_run(run)
    image = Path(image)
    if not image.is_file():
        raise PredictError(f"{image}: no such image file")
    channels, size = run_input_spec(run)
    x_u8, _, errors = load_images([image], channels, size, run.config.data.resize, run.config.data.crop_pct)  # as the run's images
    if errors:
        raise PredictError(f"{image}: {errors[0]}")
    model = run.load_model(checkpoint).to(device)
    res = image_activations(
        model, x_u8, model.preprocess(), run.class_names, f"{run.config.name}: {image.name}", layers, gradcam_layer, max_maps, device,
        multilabel=run.record.task == "multilabel",  # a multi-label run: the top label's sigmoid, not a softmax
    )
    out = Path(out) if out else Path(f"{image.stem}_activations.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out, res.png)
    return ActivationResult(out, res.layers, res.shapes, res.predicted, res.prob, res.gradcam)
