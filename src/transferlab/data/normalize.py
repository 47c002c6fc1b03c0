"""``data.normalize``: which mean/std the images are normalised with before the backbone sees them.

* ``backbone`` (default): the backbone's pretrained config (timm's ``mean`` / ``std``) — what its weights
  were trained on; the model decides, so nothing is recorded here;
* ``dataset``: the per-channel mean/std of this run's training split (after resizing, before any
  augmentation), computed once when the splits are prepared — the usual choice from scratch;
* ``none``: pixels / 255 (mean 0, std 1).

The values of ``dataset`` and ``none`` are recorded in ``selection.json`` (``normalize``), and the
model of the run carries them (``TransferModel.set_normalization``), so evaluation, ``predict``, export
and ``load_run(...).load_model()`` normalise as training did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from transferlab.data.images import FileImages, map_files

__all__ = ["Normalization", "Preprocess", "channel_stats", "split_normalization", "to_channels"]


@dataclass(frozen=True)
class Preprocess:
    """How the backbone wants its input: channels and normalisation (from its pretrained config)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int = 3

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 N×C×H×W -> normalised float N×in_chans×H×W (grayscale repeated to RGB if needed)."""
        if x.shape[1] != self.in_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            elif self.in_chans == 1:  # RGB -> luma for a grayscale model
                w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
                x = (x.float() * w).sum(1, keepdim=True)
            else:
                raise ValueError(f"cannot feed {x.shape[1]}-channel images to a {self.in_chans}-channel model")
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1) * 255
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1) * 255
        return (x.float() - mean) / std


@dataclass(frozen=True)
class Normalization:
    """The mean/std (0..1 scale, one per image channel) a run's ``data.normalize`` chose; ``None`` = the backbone's."""

    mode: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None}

    def apply(self, preprocess: Preprocess) -> Preprocess:
        """``preprocess`` with this mean/std (as its channels), or unchanged for ``backbone``."""
        if self.mean is None or self.std is None:
            return preprocess
        n = preprocess.in_chans
        return dataclasses.replace(preprocess, mean=to_channels(self.mean, n), std=to_channels(self.std, n))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Normalization:
        """From ``selection.json``'s ``normalize`` (``backbone`` when a run recorded none: runs before the key)."""
        if not d:
            return cls("backbone")
        mean, std = d.get("mean"), d.get("std")
        return cls(str(d.get("mode", "backbone")), tuple(map(float, mean)) if mean else None, tuple(map(float, std)) if std else None)


def to_channels(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """Per-image-channel stats as a model's channels: grayscale repeated to RGB (as ``Preprocess`` repeats
    the pixels), RGB weighted with the luma weights for a 1-channel model (as it converts the pixels)."""
    if len(values) == in_chans:
        return tuple(values)
    if len(values) == 1:
        return tuple(values) * in_chans
    if in_chans == 1 and len(values) == 3:
        return (0.299 * values[0] + 0.587 * values[1] + 0.114 * values[2],)
    raise ValueError(f"normalisation of {len(values)} channels cannot feed a {in_chans}-channel model")


def channel_stats(images: torch.Tensor | FileImages) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (population, 0..1 scale) of uint8 N×C×H×W images or of image files.

    Sums in float64 per chunk (or per file), so 60 000 MNIST images cost one pass and no big float copy.
    """
    if isinstance(images, FileImages):
        def sums(i: int) -> np.ndarray:
            a = images.load(i).reshape(-1, images.channels).astype(np.float64)
            return np.stack([a.sum(0), (a * a).sum(0), np.full(images.channels, len(a), dtype=np.float64)])

        parts = map_files(sums, range(len(images)))  # type: ignore[arg-type]
        bad = next((p for p in parts if isinstance(p, Exception)), None)
        if bad is not None:
            raise bad
        total = np.sum(np.stack(parts), axis=0)  # type: ignore[arg-type]
    else:
        total = np.zeros((3, images.shape[1]))
        for i in range(0, len(images), 4096):
            chunk = images[i : i + 4096].to(torch.float64).transpose(0, 1).reshape(images.shape[1], -1)
            total += np.stack([chunk.sum(1).numpy(), (chunk * chunk).sum(1).numpy(), np.full(images.shape[1], chunk.shape[1])])
    s, ss, n = total
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
    std = np.where(std > 0, std, 255.0)  # a constant channel: scale 1 rather than a division by 0
    return tuple(float(m) / 255 for m in mean), tuple(float(v) / 255 for v in std)


def split_normalization(mode: str, train_x: torch.Tensor | FileImages) -> Normalization:
    """``data.normalize`` resolved on the training images: the stats of ``dataset``, the unit scale of ``none``."""
    channels = int(train_x.shape[1])
    if mode == "dataset":
        mean, std = channel_stats(train_x)
        return Normalization(mode, mean, std)
    if mode == "none":
        return Normalization(mode, (0.0,) * channels, (1.0,) * channels)
    return Normalization("backbone")
