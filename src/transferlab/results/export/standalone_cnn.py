"""A transferlab model with a built-in CNN backbone (``transferlab_cnn*``), in plain torch: no transferlab, no timm.

This file is copied into every ``hf`` export of such a model (as ``modeling_transferlab_cnn.py``), so
anyone can load the folder with torch and safetensors alone::

    import sys
    sys.path.insert(0, "path/to/the/folder")
    from modeling_transferlab_cnn import load_model, preprocess

    model, class_names, config = load_model("path/to/the/folder")
    probs = model(preprocess("image.png", config).unsqueeze(0)).softmax(-1)

It rebuilds the network from ``config.json`` (``transferlab.standalone``: the backbone's shape and the
head) with the checkpoint's tensor names, loads ``model.safetensors`` strictly, and preprocesses an image
as the run did (``transferlab.spec``: colour mode, resize, crop_pct, mean, std). It imports nothing from
transferlab: keep it that way (the export's test runs it where transferlab cannot be imported).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torch import nn

__all__ = ["TransferlabCNN", "load_model", "preprocess"]


class _Backbone(nn.Module):
    """The built-in CNN without its classifier: blocks of [conv → (max-pool) → BN → act] → global pool."""

    def __init__(self, in_chans: int, widths: list[int], convs_per_block: int, style: str, act: str, global_pool: str) -> None:
        super().__init__()
        acts = {"relu": nn.ReLU, "gelu": nn.GELU}
        blocks: list[nn.Module] = []
        c_in = in_chans
        for width in widths:
            layers: list[nn.Module] = []
            for i in range(convs_per_block):
                layers.append(nn.Conv2d(c_in, width, 3, padding=1, bias=False))
                if style == "pool_first" and i == 0:
                    layers.append(nn.MaxPool2d(2))
                layers += [nn.BatchNorm2d(width), acts[act]()]
                c_in = width
            if style == "vgg":
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.global_pool = nn.AdaptiveAvgPool2d(1) if global_pool == "avg" else nn.AdaptiveMaxPool2d(1)
        self.num_features = c_in


class _ConvHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, channels: int, kernel_size: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(torch.relu(self.fc1(x)))


class TransferlabCNN(nn.Module):
    """Backbone and head as transferlab trained them (eval-mode forward: dropout is the identity)."""

    def __init__(self, backbone: dict[str, Any], head: dict[str, Any], num_classes: int) -> None:
        super().__init__()
        self.backbone = _Backbone(**backbone)
        width, kind = self.backbone.num_features, head.get("type", "linear")
        self.spatial = kind == "conv"
        if kind == "linear":
            self.head: nn.Module = nn.Sequential(nn.Identity(), nn.Linear(width, num_classes))
        elif kind == "mlp":
            hidden = int(head["hidden"])
            self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Identity(), nn.Linear(hidden, num_classes))
        elif kind == "conv":
            self.head = _ConvHead(width, num_classes, int(head["conv_channels"]), int(head["kernel_size"]), int(head["hidden"]))
        else:
            raise ValueError(f"unknown head type {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float N×C×S×S, normalised (``preprocess``) -> N×classes logits."""
        features = self.backbone.blocks(x)
        if self.spatial:
            return self.head(features)
        return self.head(self.backbone.global_pool(features).flatten(1))


def load_model(folder: str | Path) -> tuple[TransferlabCNN, list[str], dict[str, Any]]:
    """(the model in eval mode, its class names, the folder's ``config.json``) from an ``hf`` export folder."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    ours = config["transferlab"]
    model = TransferlabCNN(ours["standalone"]["backbone"], ours["standalone"]["head"], int(config["num_classes"]))
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval(), [str(c) for c in config["label_names"]], config


def preprocess(image: str | Path | Image.Image, config: dict[str, Any]) -> torch.Tensor:
    """An image (file or PIL image) -> the float C×S×S input, exactly as the run preprocessed it (``config.json``'s spec)."""
    spec = config["transferlab"]["spec"]
    img = Image.open(image) if isinstance(image, (str, Path)) else image
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # transparency composited on white
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    img = img.convert("L" if spec["channels"] == 1 else "RGB")
    size, resize, crop_pct = int(spec["image_size"]), spec.get("resize", "crop"), float(spec.get("crop_pct", 1.0))
    h, w = img.height, img.width
    if resize == "stretch" or (h == w and (resize == "pad" or crop_pct == 1.0)):
        rh, rw, top, left = size, size, 0, 0
    elif resize == "crop":  # shorter side to floor(size / crop_pct), centered size×size window
        short = math.floor(size / crop_pct)
        rh, rw = (short, max(short, int(short * w / h))) if h <= w else (max(short, int(short * h / w)), short)
        top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    else:  # pad: longer side to size, centered on black
        rh, rw = (max(1, min(size, round(side * size / max(h, w)))) for side in (h, w))
        top, left = (size - rh) // 2, (size - rw) // 2
    if img.size != (rw, rh):
        img = img.resize((rw, rh), Image.Resampling.BILINEAR)
    if resize == "crop" and (rh, rw) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    elif resize == "pad" and (rh, rw) != (size, size):
        canvas = Image.new(img.mode, (size, size), 0)
        canvas.paste(img, (left, top))
        img = canvas
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    if x.shape[0] == 1 and spec["in_chans"] != 1:
        x = np.repeat(x, spec["in_chans"], axis=0)
    mean = np.asarray(spec["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(spec["std"], dtype=np.float32)[:, None, None]
    return torch.from_numpy(np.ascontiguousarray((x - mean) / std))
