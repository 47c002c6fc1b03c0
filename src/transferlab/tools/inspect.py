"""What a trained model makes of images from outside its dataset: top-k classes, feature maps, Grad-CAM.

A multi-label model (``data.task: multilabel``) reads its logits as independent probabilities (sigmoid per class):
an image gets every label whose probability is at least that label's threshold (chosen on validation, recorded in
``metrics.json``), most probable first, besides its top-k; a multiclass model's probabilities are the softmax.

The model-level core of ``transferlab predict`` / ``transferlab activations`` (``tools.predict`` and
``tools.activations``, which load a finished run and call these) and of an experiment's ``predict:`` /
``activations:`` sections: registered here as ``RUN_SECTIONS`` (``kinds.base``), which a kind that trains
runs on its model right after testing — the model is in memory with its best weights then, and the
results land in its own run directory::

    outside_predictions.json / .csv / .png   top-k classes of every image, and a grid of them
    activations/<image>.png                  feature maps (and Grad-CAM) per image; activations.json lists them

Outside images get the run's preprocessing: the training images' channel count and square size, reached
the ``data.resize`` way (``load_images``, through ``transferlab.data.images.load_image``: transparency
composited on white, 16-bit scaled, EXIF orientation applied), then the model's normalisation
(``model.preprocess()``: the backbone's, or the run's ``data.normalize`` stats).

Layers are named as in ``model.named_modules()`` of a ``TransferModel`` (``backbone.blocks.0``,
``backbone.layer2``, ...). The default is the first and a middle *stage*: the modules timm's ``feature_info``
names, or the children of the backbone's ``blocks``/``stages``/``layers``/``features`` container, or its direct
children — those whose output is an N×C×H×W feature map. Grad-CAM (Selvaraju et al., 2017: channel weights =
spatially averaged gradients of the class score, ReLU of the weighted sum) is computed on the backbone's final
feature map (``forward_features``) unless another layer is named.
"""

from __future__ import annotations

import difflib
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferlab.config import ActivationsConfig, ExperimentConfig, PredictConfig, register_check
from transferlab.data.batches import Preprocess
from transferlab.data.images import ImageReadError, is_image_file, load_image, probe_image
from transferlab.engine.multilabel import predicted
from transferlab.files import write_bytes, write_csv, write_json
from transferlab.kinds.base import RUN_SECTIONS, RunSection, Tested
from transferlab.models.archs import arch_meta, feature_maps
from transferlab.rundir import load_test_predictions
from transferlab.rundir.layout import ACTIVATIONS_DIR, ACTIVATIONS_FILE, OUTSIDE_CSV, OUTSIDE_JSON, OUTSIDE_PNG

__all__ = [
    "ACTIVATIONS_DIR",
    "ACTIVATIONS_FILE",
    "FEATURES",
    "MAX_MAPS",
    "OUTSIDE_CSV",
    "OUTSIDE_JSON",
    "OUTSIDE_PNG",
    "ActivationError",
    "GradCam",
    "ImageActivations",
    "ImagePrediction",
    "PredictError",
    "activation_figure",
    "candidate_stages",
    "capture_activations",
    "check_layer",
    "check_layers",
    "collect_image_files",
    "default_layers",
    "fill_predictions",
    "gradcam",
    "image_activations",
    "image_probabilities",
    "labels_above",
    "load_images",
    "predict_images",
    "prediction_grid",
    "save_activation_maps",
    "save_outside_predictions",
    "top_classes",
]

"""Files a run's ``predict:`` / ``activations:`` sections write (the report reads them back)."""

FEATURES = "features"
"""Grad-CAM layer name meaning the backbone's final feature map (``forward_features`` output)."""
MAX_MAPS = 16
"""Feature maps shown per layer (the strongest channels by mean activation)."""


class PredictError(ValueError):
    """No image to predict, or a run that cannot predict. The message names the path."""


class ActivationError(ValueError):
    """A layer name that does not exist or has no spatial output. The message lists what exists."""


# --------------------------------------------------------------------------------------------
# outside images: finding and decoding them


def collect_image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Image files from files and folders: a folder gives its image files (recursively, sorted, by
    extension); a file named explicitly is used whatever its name. A missing path is an error."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                Path(root) / name
                for root, _, names in os.walk(p)
                for name in names
                if is_image_file(name) and not name.startswith(".")
            )
            if not found:
                raise PredictError(f"{p}: folder holds no image files")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise PredictError(f"{p}: no such file or folder")
    if not files:
        raise PredictError("no image files given")
    return files


def load_images(
    files: Sequence[Path], channels: int, size: int, fit: str = "crop", crop_pct: float = 1.0
) -> tuple[torch.Tensor, list[int], dict[int, str]]:
    """Decode files to uint8 N×C×size×size, brought to size as the run's ``data.resize`` / ``data.crop_pct``
    (default: theirs) say; returns (images, positions decoded, {position: error})."""
    arrs, ok, errors = [], [], {}
    for i, f in enumerate(files):
        try:
            arrs.append(load_image(f, channels, size, fit, crop_pct).transpose(2, 0, 1))
            ok.append(i)
        except ImageReadError as e:
            errors[i] = str(e)
    x = torch.from_numpy(np.stack(arrs)) if arrs else torch.empty((0, channels, size, size), dtype=torch.uint8)
    return x, ok, errors


# --------------------------------------------------------------------------------------------
# top-k predictions


@dataclass
class ImagePrediction:
    """Top-k classes of one image file (multi-label: and every label at or above its threshold), or why the file
    could not be used."""

    file: str
    top: list[tuple[str, int, float]] = field(default_factory=list)
    """(class name, class index, probability), most probable first."""
    error: str | None = None
    labels: list[tuple[str, int, float]] | None = None
    """Multi-label: (label name, index, probability) of every label whose probability is at least its threshold, most
    probable first (possibly none); ``None`` for a multiclass model."""

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"file": self.file, "error": self.error}
        out: dict[str, Any] = {"file": self.file}
        if self.labels is not None:
            out["labels"] = [{"class": c, "index": i, "prob": p} for c, i, p in self.labels]
        return out | {"predictions": [{"class": c, "index": i, "prob": p} for c, i, p in self.top]}


@torch.inference_mode()
def image_probabilities(
    model: nn.Module, pre: Preprocess, x: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 64,
    multilabel: bool = False,
) -> torch.Tensor:
    """N×K probabilities (float32, CPU) of the uint8 images ``x``, normalised by ``pre``: the softmax of the logits, or
    with ``multilabel`` the sigmoid of each (independent labels).

    ``model`` may be a test-time-augmentation wrapper (``transferlab.engine.evaluation.with_tta``).
    """
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        logits = model(pre(x[start : start + batch_size].to(device))).float()
        out.append((logits.sigmoid() if multilabel else logits.softmax(-1)).cpu())
    return torch.cat(out) if out else torch.empty((0, 0))


def top_classes(probs: torch.Tensor, class_names: Sequence[str], top_k: int = 5) -> list[list[tuple[str, int, float]]]:
    """The ``top_k`` (class name, index, probability) of each row of ``probs``, most probable first."""
    if top_k < 1:
        raise PredictError(f"top_k must be >= 1, got {top_k}")
    if len(probs) == 0:
        return []
    values, indices = probs.topk(min(top_k, len(class_names)), dim=-1)
    return [[(class_names[c], int(c), float(p)) for p, c in zip(v, ix, strict=True)] for v, ix in zip(values.tolist(), indices.tolist(), strict=True)]


def labels_above(probs: torch.Tensor, class_names: Sequence[str], thresholds: Sequence[float]) -> list[list[tuple[str, int, float]]]:
    """Per row of the multi-label ``probs``: (label name, index, probability) of every label whose probability is at
    least its threshold (``engine.multilabel.predicted``: ``p >= t``, as the run's test did), most probable first."""
    if len(thresholds) != len(class_names):
        raise PredictError(f"{len(thresholds)} thresholds for {len(class_names)} classes")
    if len(probs) == 0:
        return []
    chosen = predicted(probs, thresholds).bool()
    out = []
    for row, keep in zip(probs.tolist(), chosen.tolist(), strict=True):
        found = [(class_names[k], k, float(p)) for k, (p, on) in enumerate(zip(row, keep, strict=True)) if on]
        out.append(sorted(found, key=lambda t: -t[2]))
    return out


def predict_images(
    model: nn.Module, pre: Preprocess, x: torch.Tensor, class_names: Sequence[str], top_k: int = 5,
    device: str | torch.device = "cpu", batch_size: int = 64,
) -> list[list[tuple[str, int, float]]]:
    """Top-k (class name, index, softmax probability) of each uint8 image in ``x``, normalised by ``pre``."""
    if top_k < 1:
        raise PredictError(f"top_k must be >= 1, got {top_k}")
    return top_classes(image_probabilities(model, pre, x, device, batch_size), class_names, top_k)


def fill_predictions(
    preds: Sequence[ImagePrediction], ok: Sequence[int], model: nn.Module, pre: Preprocess, x: torch.Tensor,
    class_names: Sequence[str], top_k: int = 5, device: str | torch.device = "cpu", batch_size: int = 64,
    thresholds: Sequence[float] | None = None,
) -> None:
    """Set ``top`` of ``preds[i]`` for each decoded image ``x[j]`` (``i = ok[j]``); with ``thresholds`` (a multi-label
    model, one per class) the probabilities are sigmoids and ``labels`` lists every label at or above its threshold."""
    if top_k < 1:
        raise PredictError(f"top_k must be >= 1, got {top_k}")
    probs = image_probabilities(model, pre, x, device, batch_size, multilabel=thresholds is not None)
    labels = labels_above(probs, class_names, thresholds) if thresholds is not None else [None] * len(ok)
    for i, top, found in zip(ok, top_classes(probs, class_names, top_k), labels, strict=True):
        preds[i].top, preds[i].labels = top, found


def prediction_grid(images: torch.Tensor, preds: Sequence[ImagePrediction], title: str = "", cols: int = 6) -> bytes:
    """PNG bytes: each decoded image (uint8 N×C×H×W, as the model saw it) with its file name and top class."""
    from matplotlib.figure import Figure

    shown = [p for p in preds if p.error is None]
    n = max(len(shown), 1)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.1 * cols, 2.5 * rows + (0.4 if title else 0)), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes:
        ax.set_axis_off()
    for ax, img, p in zip(axes, images, shown, strict=False):
        _show_image(ax, img.permute(1, 2, 0).numpy())
        if p.labels is not None:  # multi-label: every label at or above its threshold
            said = "\n".join(f"{name} ({100 * prob:.1f}%)" for name, _, prob in p.labels[:4]) or "no label"
            more = f"\n+{len(p.labels) - 4} more" if len(p.labels) > 4 else ""
            ax.set_title(_label(f"{Path(p.file).name}\n{said}{more}"), fontsize=8)
            continue
        name, _, prob = p.top[0]
        ax.set_title(_label(f"{Path(p.file).name}\n{name} ({100 * prob:.1f}%)"), fontsize=8)
    if title:
        fig.suptitle(_label(title), fontsize=10)
    return _png(fig)


# --------------------------------------------------------------------------------------------
# feature maps


def _unknown_layer(name: str, model: nn.Module) -> ActivationError:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    stages = ", ".join(candidate_stages(model)[:12]) if isinstance(model, nn.Module) else ""
    return ActivationError(f"no layer named {name!r} in the model{hint}; its stages: {stages or 'none found'}")


def candidate_stages(model: nn.Module) -> list[str]:
    """Qualified names of the model's stages, shallow to deep (see the module docstring)."""
    modules = dict(model.named_modules())
    backbone = getattr(model, "backbone", model)
    prefix = "backbone." if backbone is not model else ""
    info = getattr(backbone, "feature_info", None)
    names: list[str] = []
    if isinstance(info, list) and info and all(isinstance(d, dict) and d.get("module") for d in info):
        names = [prefix + str(d["module"]) for d in info]
    else:
        for container in ("blocks", "stages", "layers", "features"):
            sub = getattr(backbone, container, None)
            if isinstance(sub, (nn.Sequential, nn.ModuleList)) and len(sub) > 1:
                names = [f"{prefix}{container}.{n}" for n, _ in sub.named_children()]
                break
        if not names:
            names = [prefix + n for n, _ in backbone.named_children()]
    return [n for n in names if n in modules]


def check_layer(model: nn.Module, name: str, key: str) -> None:
    """``name`` is a module of ``model``; otherwise an error naming the config ``key``, the closest names and the stages."""
    if name not in dict(model.named_modules()):
        raise ActivationError(f"{key}: {_unknown_layer(name, model)}")


def check_layers(model: nn.Module, layers: Sequence[str], key: str = "activations.layers") -> None:
    """Every name in ``layers`` is a module of ``model`` (the error names ``key[i]``)."""
    for i, name in enumerate(layers):
        check_layer(model, name, f"{key}[{i}]")


def _spatial_stages(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The candidate stages whose output is a N×C×H×W map (one trial forward pass)."""
    names = candidate_stages(model)
    shapes = {n: t.shape for n, t in capture_activations(model, x, names, check=False).items()}
    return [n for n in names if len(shapes.get(n, ())) == 4]


def default_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The first and a middle stage with a spatial output (seed 004 shows an early and a middle layer)."""
    stages = _spatial_stages(model, x)
    if not stages:
        raise ActivationError("found no stage with a N×C×H×W output; name the layers")
    picks = [stages[0], stages[(len(stages) - 1) // 2]]
    return list(dict.fromkeys(picks))


@torch.inference_mode()
def capture_activations(model: nn.Module, x: torch.Tensor, layers: Sequence[str], check: bool = True) -> dict[str, torch.Tensor]:
    """Outputs of the named modules for input ``x`` (one forward pass with forward hooks).

    With ``check`` every output must be a N×C×H×W feature map.
    """
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules:
            raise _unknown_layer(name, model)
    backbone = getattr(model, "backbone", model)
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name in dict.fromkeys(layers):

        def hook(_m: nn.Module, _inp: Any, output: Any, name: str = name) -> None:
            if isinstance(output, torch.Tensor):  # a ViT's tokens / a Swin stage's N×H×W×C as N×C×H×W maps
                out[name] = feature_maps(backbone, output.detach()).float().cpu().clone()

        handles.append(modules[name].register_forward_hook(hook))
    try:
        model.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
    if check:
        for name in layers:
            t = out.get(name)
            if t is None or t.dim() != 4:
                shape = "no tensor" if t is None else "×".join(map(str, t.shape))
                raise ActivationError(f"layer {name!r} outputs {shape}, not a N×C×H×W feature map; choose a convolutional layer")
    return out


@dataclass
class GradCam:
    """A Grad-CAM heat map: ``cam`` is H×W in [0, 1] at the input's size."""

    cam: np.ndarray
    class_index: int
    prob: float
    layer: str
    weights: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    """Channel weights (spatially averaged gradients)."""


def gradcam(model: nn.Module, x: torch.Tensor, layer: str = FEATURES, class_index: int | None = None,
            multilabel: bool = False) -> GradCam:
    """Grad-CAM of ``class_index`` (default: the predicted class — multi-label: the most probable label) on ``layer`` for
    one preprocessed image; ``prob`` is the class's softmax probability, with ``multilabel`` its sigmoid.

    ``layer`` is a module name, or ``features`` for the backbone's final feature map (a ``TransferModel``;
    a module named ``features`` takes precedence).
    """
    import torch.nn.functional as F

    if x.dim() != 4 or len(x) != 1:
        raise ValueError(f"gradcam takes one image as a 1×C×H×W tensor, got shape {tuple(x.shape)}")
    model.eval()
    store: dict[str, torch.Tensor] = {}
    handle = None
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)  # a graph even when every parameter is frozen
        modules = dict(model.named_modules())
        backbone = getattr(model, "backbone", model)
        layer = _token_cam_layer(model, layer, modules)
        if layer == FEATURES and layer not in modules:  # a module of that name wins
            if not hasattr(model, "forward_features") or not hasattr(model, "forward_head"):
                raise ActivationError("layer 'features' needs a model with forward_features/forward_head; name a layer instead")
            feats = model.forward_features(x)
            feats.retain_grad()
            store["act"] = feats
            logits = model.forward_head(feats)
        else:
            if layer not in modules:
                raise _unknown_layer(layer, model)

            def hook(_m: nn.Module, _inp: Any, output: Any) -> Any:
                if not isinstance(output, torch.Tensor):
                    return None
                output.retain_grad()
                store["act"] = output
                return output.clone()  # later in-place ops change the clone, not the stored activation

            handle = modules[layer].register_forward_hook(hook)
            try:
                logits = model(x)
            finally:
                handle.remove()
        act = store.get("act")
        maps = feature_maps(backbone, act) if act is not None else None
        if maps is None or maps.dim() != 4:
            shape = "no tensor" if act is None else "×".join(map(str, act.shape))
            raise ActivationError(f"layer {layer!r} outputs {shape}, not a N×C×H×W feature map; Grad-CAM needs a convolutional layer")
        probs = logits.detach().float().sigmoid()[0] if multilabel else logits.detach().float().softmax(-1)[0]
        idx = int(probs.argmax()) if class_index is None else int(class_index)
        if not 0 <= idx < logits.shape[-1]:
            raise ValueError(f"class index {idx} out of range 0..{logits.shape[-1] - 1}")
        model.zero_grad(set_to_none=True)
        logits[0, idx].backward()
    if act.grad is None:
        raise ActivationError(f"no gradient reached layer {layer!r} (is it used by the forward pass?)")
    grad = feature_maps(backbone, act.grad)  # the same layout change as the activation's
    weights = grad[0].float().mean(dim=(1, 2))  # C
    cam = F.relu((weights.view(-1, 1, 1) * maps.detach()[0].float()).sum(0))
    cam = F.interpolate(cam[None, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    top = float(cam.max())
    cam = cam / top if top > 0 else cam
    return GradCam(cam.detach().cpu().numpy(), idx, float(probs[idx]), layer, weights.detach().cpu().numpy())


def _token_cam_layer(model: nn.Module, layer: str, modules: dict[str, nn.Module]) -> str:
    """``features`` of a class-token ViT means its last block's input norm: the head reads only the class token, so the
    final patch tokens get no gradient and their Grad-CAM would be blank (the choice of pytorch-grad-cam's ViT recipe)."""
    backbone = getattr(model, "backbone", model)
    if layer != FEATURES or FEATURES in modules or arch_meta(backbone).layout != "tokens":
        return layer
    if getattr(backbone, "global_pool", "token") not in ("token", ""):
        return layer  # pooled over the patches: the final tokens do get gradients
    blocks = getattr(backbone, "blocks", None)
    prefix = "backbone." if backbone is not model else ""
    name = f"{prefix}blocks.{len(blocks) - 1}.norm1" if blocks is not None and len(blocks) else ""
    return name if name in modules else layer


def _show_image(ax: Any, img: np.ndarray) -> None:
    """img: uint8 H×W×C."""
    if img.shape[2] == 1:
        ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(img)
    ax.set_axis_off()


def _label(text: str) -> str:
    return str(text).replace("$", r"\$")  # no matplotlib math mode in file and class names


def _png(fig: Any, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def activation_figure(
    image: np.ndarray,
    acts: dict[str, torch.Tensor],
    title: str = "",
    cam: GradCam | None = None,
    class_names: Sequence[str] = (),
    max_maps: int = MAX_MAPS,
    cols: int = 8,
) -> bytes:
    """PNG bytes: the input (and Grad-CAM overlay), then up to ``max_maps`` feature maps per layer.

    ``image`` is uint8 H×W×C; ``acts`` maps layer names to 1×C×h×w activations. Each layer shows its
    strongest channels (highest mean activation), each map scaled to its own range.
    """
    from matplotlib.figure import Figure

    n_maps = {name: min(max_maps, a.shape[1]) for name, a in acts.items()}
    rows = {name: math.ceil(n / cols) for name, n in n_maps.items()}
    heights = [2.6] + [0.45 + 1.25 * r for r in rows.values()]
    fig = Figure(figsize=(1.25 * cols + 0.4, sum(heights)), layout="constrained")
    subs = fig.subfigures(len(heights), 1, height_ratios=heights)
    subs = np.atleast_1d(subs)
    top = subs[0]
    panels = 2 if cam is not None else 1
    axes = np.atleast_1d(top.subplots(1, panels))
    _show_image(axes[0], image)
    axes[0].set_title("input (as the model sees it)", fontsize=9)
    if cam is not None:
        _show_image(axes[1], image)
        axes[1].imshow(cam.cam, cmap="jet", alpha=0.45, vmin=0, vmax=1, extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
        name = class_names[cam.class_index] if cam.class_index < len(class_names) else str(cam.class_index)
        axes[1].set_title(_label(f"Grad-CAM: {name} ({100 * cam.prob:.1f}%) on {cam.layer}"), fontsize=9)
    if title:
        top.suptitle(_label(title), fontsize=10)
    for sub, (name, a) in zip(subs[1:], acts.items(), strict=False):
        maps = a[0]
        order = maps.mean(dim=(1, 2)).argsort(descending=True)[: n_maps[name]]
        grid = np.atleast_2d(sub.subplots(rows[name], cols, squeeze=False))
        for k, ax in enumerate(grid.flat):
            ax.set_axis_off()
            if k < len(order):
                ax.imshow(maps[order[k]].numpy(), cmap="viridis")
                ax.set_title(f"ch {int(order[k])}", fontsize=7)
        c, h, w = maps.shape
        sub.suptitle(_label(f"{name}: {c} channels, {h}×{w} — {len(order)} strongest"), fontsize=9)
    return _png(fig)


@dataclass
class ImageActivations:
    """One image's feature maps: the PNG, the layers and their output shapes, the predicted class."""

    png: bytes
    layers: list[str]
    shapes: dict[str, tuple[int, ...]]
    predicted: str
    prob: float
    gradcam: GradCam | None = None


def image_activations(
    model: nn.Module, x_u8: torch.Tensor, pre: Preprocess, class_names: Sequence[str], title: str,
    layers: Sequence[str] | None = None, gradcam_layer: str | None = None, max_maps: int = MAX_MAPS,
    device: str | torch.device = "cpu", multilabel: bool = False,
) -> ImageActivations:
    """Feature maps of ``layers`` (default: first and middle stage) for one uint8 1×C×H×W image, as a PNG.

    ``gradcam_layer`` (``features`` or a layer name) adds the Grad-CAM overlay of the predicted class.
    ``title`` is followed by `` → <predicted class> (<probability>)``: with ``multilabel``, the most probable label
    and its sigmoid probability.
    """
    x = pre(x_u8.to(device))
    names = list(layers) if layers else default_layers(model, x)
    acts = capture_activations(model, x, names)
    with torch.inference_mode():
        logits = model(x).float()[0].cpu()
    probs = logits.sigmoid() if multilabel else logits.softmax(-1)
    pred = int(probs.argmax())
    cam = gradcam(model, x, gradcam_layer, multilabel=multilabel) if gradcam_layer else None
    pred_name = class_names[pred] if pred < len(class_names) else str(pred)
    title = f"{title} → {pred_name} ({100 * float(probs[pred]):.1f}%)"
    png = activation_figure(x_u8[0].permute(1, 2, 0).numpy(), acts, title, cam, class_names, max_maps)
    return ImageActivations(png, names, {n: tuple(a.shape) for n, a in acts.items()}, pred_name, float(probs[pred]), cam)


# --------------------------------------------------------------------------------------------
# an experiment's predict: / activations: sections, into its run directory


def save_outside_predictions(
    run_dir: str | Path, model: nn.Module, pre: Preprocess, cfg: PredictConfig, class_names: Sequence[str],
    channels: int, size: int, title: str = "", device: str | torch.device = "cpu", batch_size: int = 64,
    fit: tuple[str, float] = ("crop", 1.0), thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """``predict:``: top-k classes of its images, written to ``outside_predictions.json`` / ``.csv`` / ``.png``.

    ``fit`` is the run's (``data.resize``, ``data.crop_pct``): the images are brought to size as its own were.
    ``thresholds`` (a multi-label run: one per class, chosen on validation) adds every label at or above its threshold
    (``labels`` in the JSON, ``above_threshold`` in the CSV).

    A file that cannot be decoded is recorded with the reason (and left out of the grid) instead of
    failing the run. Returns the summary kept in ``metrics.json`` (``predict``).
    """
    run_dir = Path(run_dir)
    files = collect_image_files(cfg.images)
    x, ok, errors = load_images(files, channels, size, *fit)
    preds = [ImagePrediction(str(f), error=errors.get(i)) for i, f in enumerate(files)]
    fill_predictions(preds, ok, model, pre, x, class_names, cfg.top_k, device, batch_size, thresholds)
    doc: dict[str, Any] = {
        "input": {"channels": channels, "image_size": size},
        "top_k": cfg.top_k,
        "task": "multiclass" if thresholds is None else "multilabel",
        "thresholds": None if thresholds is None else [float(t) for t in thresholds],
        "class_names": list(class_names),
        "images": [p.to_dict() for p in preds],
    }
    write_json(run_dir / OUTSIDE_JSON, doc)
    rows = [{"file": p.file, "rank": r, "class": c, "index": i, "prob": round(q, 6), "error": ""}
            for p in preds for r, (c, i, q) in enumerate(p.top, 1)]
    if thresholds is not None:  # a multi-label run: whether each top-k label reached its threshold
        above = {(p.file, i) for p in preds for _, i, _ in p.labels or []}
        rows = [{**row, "above_threshold": (row["file"], row["index"]) in above} for row in rows]
    rows += [{"file": p.file, "rank": "", "class": "", "index": "", "prob": "", "error": p.error} for p in preds if p.error]
    write_csv(run_dir / OUTSIDE_CSV, rows)
    if ok:
        write_bytes(run_dir / OUTSIDE_PNG, prediction_grid(x, preds, title))
    return {"images": len(preds), "errors": len(errors), "file": OUTSIDE_JSON}


def save_activation_maps(
    run_dir: str | Path, model: nn.Module, pre: Preprocess, cfg: ActivationsConfig, class_names: Sequence[str],
    channels: int, size: int, title: str = "", device: str | torch.device = "cpu", fit: tuple[str, float] = ("crop", 1.0),
    multilabel: bool = False,
) -> dict[str, Any]:
    """``activations:``: one PNG of feature maps per image in ``activations/``, listed in ``activations.json``
    (``fit``: the run's ``data.resize`` and ``data.crop_pct``; ``multilabel``: sigmoid probabilities).

    A file that cannot be decoded is recorded with the reason instead of failing the run. Returns the
    summary kept in ``metrics.json`` (``activations``).
    """
    out_dir = Path(run_dir) / ACTIVATIONS_DIR
    files = collect_image_files(cfg.images)
    x, ok, errors = load_images(files, channels, size, *fit)
    decoded = dict(zip(ok, x, strict=True))
    entries, used = [], set()
    for i, f in enumerate(files):
        if i in errors:
            entries.append({"file": str(f), "error": errors[i]})
            continue
        res = image_activations(
            model, decoded[i][None], pre, class_names, f"{title}: {f.name}" if title else f.name, cfg.layers,
            cfg.gradcam_layer if cfg.gradcam else None, cfg.max_maps, device, multilabel,
        )
        png = _unique_name(f.stem, used)
        write_bytes(out_dir / png, res.png)
        entries.append({
            "file": str(f), "png": png, "layers": res.layers, "shapes": {k: list(v) for k, v in res.shapes.items()},
            "predicted": res.predicted, "prob": res.prob, "gradcam": res.gradcam.layer if res.gradcam else None,
        })
    write_json(out_dir / ACTIVATIONS_FILE, {"input": {"channels": channels, "image_size": size}, "images": entries})
    return {"images": len(entries), "errors": len(errors), "folder": ACTIVATIONS_DIR}


def _unique_name(stem: str, used: set[str]) -> str:
    """``<stem>.png`` (file-name safe), numbered when two images share a stem."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", stem) or "image"
    name, k = f"{base}.png", 2
    while name in used:
        name, k = f"{base}_{k}.png", k + 1
    used.add(name)
    return name


@register_check
def check_outside_images(cfg: ExperimentConfig) -> None:
    """Every file or folder ``predict.images`` / ``activations.images`` names exists and holds readable images.

    Runs with the other checks, so a missing photo stops the study before its first experiment trains.
    Relative paths are taken from the current folder; a study file's are resolved against its own
    folder first (``transferlab.config.resolve_paths``).
    """
    for key, images in (("predict.images", cfg.predict.images), ("activations.images", cfg.activations.images)):
        for i, path in enumerate(images):
            try:
                files = collect_image_files([path])
            except PredictError as e:
                raise cfg.error(f"{key}[{i}]={path!r}: {str(e).removeprefix(f'{path}: ')}") from None
            for f in files:
                try:
                    probe_image(f)
                except ImageReadError as e:
                    raise cfg.error(f"{key}[{i}]: {f}: {e}") from None


# --------------------------------------------------------------------------------------------
# the sections, registered for the kinds that train


def _check_activations(model: nn.Module, cfg: ExperimentConfig) -> None:
    a = cfg.activations
    try:
        check_layers(model, a.layers or [])
        if a.gradcam and a.gradcam_layer != FEATURES:  # 'features': the backbone's final feature map
            check_layer(model, a.gradcam_layer, "activations.gradcam_layer")
    except ActivationError as e:
        raise cfg.error(str(e)) from None


def _run_predict(t: Tested) -> dict[str, Any]:
    cfg = t.cfg
    thresholds = None
    if cfg.multilabel:  # the thresholds the run chose on validation and tested with, as its predictions.json records them
        recorded = load_test_predictions(t.run_dir)  # written right after the test, before the sections run
        thresholds = recorded.thresholds if recorded is not None else None
        if thresholds is None:
            raise PredictError(f"{cfg.name}: predict: a multi-label run needs the thresholds it chose on validation, and "
                               f"{t.run_dir} records none (no predictions.json)")
    with t.autocast():
        return save_outside_predictions(
            t.run_dir, t.predictor, t.model.preprocess(), cfg.predict, t.class_names, t.channels, t.size, cfg.name, t.device,
            cfg.train.eval_batch_size, (cfg.data.resize, cfg.data.crop_pct), thresholds,
        )


def _run_activations(t: Tested) -> dict[str, Any]:
    cfg = t.cfg
    return save_activation_maps(t.run_dir, t.model, t.model.preprocess(), cfg.activations, t.class_names, t.channels, t.size,
                                cfg.name, t.device, (cfg.data.resize, cfg.data.crop_pct), cfg.multilabel)


RUN_SECTIONS.register(obj=RunSection("predict", lambda cfg: bool(cfg.predict.images), None, _run_predict))
RUN_SECTIONS.register(obj=RunSection("activations", lambda cfg: bool(cfg.activations.images), _check_activations, _run_activations))
