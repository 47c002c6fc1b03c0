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
"""

from __future__ import annotations

import difflib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferlab.files import write_bytes
from transferlab.rundir import Run, load_run
from transferlab.tools.predict import PredictError, load_images, run_input_spec

FEATURES = "features"
"""Grad-CAM layer name meaning the backbone's final feature map (``forward_features`` output)."""
MAX_MAPS = 16
"""Feature maps shown per layer (the strongest channels by mean activation)."""


class ActivationError(ValueError):
    """A layer name that does not exist or has no spatial output. The message lists what exists."""


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


def _spatial_stages(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The candidate stages whose output is a N×C×H×W map (one trial forward pass)."""
    names = candidate_stages(model)
    shapes = {n: t.shape for n, t in capture_activations(model, x, names, check=False).items()}
    return [n for n in names if len(shapes.get(n, ())) == 4]


def default_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The first and a middle stage with a spatial output (seed 004 shows an early and a middle layer)."""
    stages = _spatial_stages(model, x)
    if not stages:
        raise ActivationError("found no stage with a N×C×H×W output; name layers with --layers")
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
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name in dict.fromkeys(layers):

        def hook(_m: nn.Module, _inp: Any, output: Any, name: str = name) -> None:
            if isinstance(output, torch.Tensor):
                out[name] = output.detach().float().cpu().clone()

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


def gradcam(model: nn.Module, x: torch.Tensor, layer: str = FEATURES, class_index: int | None = None) -> GradCam:
    """Grad-CAM of ``class_index`` (default: the predicted class) on ``layer`` for one preprocessed image.

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
        if act is None or act.dim() != 4:
            shape = "no tensor" if act is None else "×".join(map(str, act.shape))
            raise ActivationError(f"layer {layer!r} outputs {shape}, not a N×C×H×W feature map; Grad-CAM needs a convolutional layer")
        probs = logits.detach().float().softmax(-1)[0]
        idx = int(probs.argmax()) if class_index is None else int(class_index)
        if not 0 <= idx < logits.shape[-1]:
            raise ValueError(f"class index {idx} out of range 0..{logits.shape[-1] - 1}")
        model.zero_grad(set_to_none=True)
        logits[0, idx].backward()
    grad = act.grad
    if grad is None:
        raise ActivationError(f"no gradient reached layer {layer!r} (is it used by the forward pass?)")
    weights = grad[0].float().mean(dim=(1, 2))  # C
    cam = F.relu((weights.view(-1, 1, 1) * act.detach()[0].float()).sum(0))
    cam = F.interpolate(cam[None, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    top = float(cam.max())
    cam = cam / top if top > 0 else cam
    return GradCam(cam.detach().cpu().numpy(), idx, float(probs[idx]), layer, weights.detach().cpu().numpy())


def _show_image(ax: Any, img: np.ndarray) -> None:
    """img: uint8 H×W×C."""
    if img.shape[2] == 1:
        ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(img)
    ax.set_axis_off()


def _label(text: str) -> str:
    return str(text).replace("$", r"\$")


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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


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
    x_u8, _, errors = load_images([image], channels, size)
    if errors:
        raise PredictError(f"{image}: {errors[0]}")
    model = run.load_model(checkpoint).to(device)
    x = model.preprocess()(x_u8.to(device))
    names = list(layers) if layers else default_layers(model, x)
    acts = capture_activations(model, x, names)
    with torch.inference_mode():
        probs = model(x).float().softmax(-1)[0].cpu()
    pred = int(probs.argmax())
    cam = gradcam(model, x, gradcam_layer) if gradcam_layer else None
    class_names = run.class_names
    pred_name = class_names[pred] if pred < len(class_names) else str(pred)
    title = f"{run.config.name}: {image.name} → {pred_name} ({100 * float(probs[pred]):.1f}%)"
    png = activation_figure(x_u8[0].permute(1, 2, 0).numpy(), acts, title, cam, class_names, max_maps)
    out = Path(out) if out else Path(f"{image.stem}_activations.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out, png)
    return ActivationResult(out, names, {n: tuple(a.shape) for n, a in acts.items()}, pred_name, float(probs[pred]), cam)
