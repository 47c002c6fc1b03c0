"""Resizing and decoding: uint8 tensors resized once, image files decoded into memory when they fit.

``data.in_memory: auto`` decodes the selected files into one uint8 tensor when all three splits take
at most ``IN_MEMORY_MAX_BYTES``; above that the files stay on disk for the PIL DataLoader path.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F

from transferlab.config import DataConfig
from transferlab.data.images import FITS, FileImages, Problem, decode_files, fit_geometry, map_files
from transferlab.data.sources import DatasetError, RawDataset

__all__ = ["FITS", "IN_MEMORY_MAX_BYTES", "Images", "fit_geometry", "prepare_files", "resize_uint8"]

IN_MEMORY_MAX_BYTES = int(float(os.environ.get("TRANSFERLAB_IN_MEMORY_GB", "4")) * 1024**3)
"""``data.in_memory: auto`` decodes into memory up to this many bytes of uint8 pixels (all three
splits together; ``$TRANSFERLAB_IN_MEMORY_GB``, default 4), and uses the PIL path above it."""

Images = torch.Tensor | FileImages


def _interpolate(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    out = torch.empty((x.shape[0], x.shape[1], *hw), dtype=torch.uint8)
    for i in range(0, len(x), 4096):  # chunks keep the float copy small
        chunk = F.interpolate(x[i : i + 4096].float(), size=hw, mode="bilinear", antialias=True, align_corners=False)
        out[i : i + 4096] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def resize_uint8(x: torch.Tensor, size: int, fit: str = "stretch", crop_pct: float = 1.0) -> torch.Tensor:
    """Resize a uint8 N×C×H×W batch to size×size (bilinear, antialiased when shrinking), in chunks.

    ``fit`` is ``data.resize`` (``fit_geometry``); with ``stretch``, or square images, this is the plain
    resize to size×size it always was.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    rh, rw, top, left = fit_geometry(h, w, size, fit, crop_pct)
    if (rh, rw) == (h, w) == (size, size):
        return x
    resized = x if (rh, rw) == (h, w) else _interpolate(x, (rh, rw))
    if (rh, rw) == (size, size):
        return resized
    if fit == "crop":
        return resized[..., top : top + size, left : left + size].contiguous()
    out = torch.zeros((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)  # pad: black borders
    out[..., top : top + rh, left : left + rw] = resized
    return out


def _mixed_size_message(raw: RawDataset) -> str:
    for w in raw.warnings:
        if w.kind == "mixed_sizes":
            return w.message
    return "images differ in size: set data.image_size"


def prepare_files(
    cfg: DataConfig, raw: RawDataset, xs: dict[str, Images], default_size: int | None = None
) -> tuple[bool, dict[str, list[tuple[int, Problem]]]]:
    """Decode the selected files into tensors (in memory) or check them (PIL path + skip_bad_images).

    Files of mixed sizes without ``data.image_size`` go to ``default_size`` (the backbone's pretrained
    input size, given by the kind) or fail when there is none. Replaces the entries of ``xs`` in place;
    returns (in_memory, bad files per split).
    """
    files = {s: x for s, x in xs.items() if isinstance(x, FileImages)}
    for s, f in files.items():
        size = cfg.image_size or (default_size if f.size is None else None)
        if size is None and f.size is None:
            raise DatasetError(f"{raw.source}: {_mixed_size_message(raw)}")
        files[s] = dataclasses.replace(f, resize=size, fit=cfg.resize, crop_pct=cfg.crop_pct)
        xs[s] = files[s]
    total = sum(f.decoded_bytes() for f in files.values())
    in_memory = cfg.in_memory if isinstance(cfg.in_memory, bool) else total <= IN_MEMORY_MAX_BYTES
    bad: dict[str, list[tuple[int, Problem]]] = {}
    if in_memory:
        for s, f in files.items():
            xs[s], found = decode_files(f)
            if found:
                bad[s] = found
    elif cfg.skip_bad_images:  # PIL path: decode every selected file once now, so the skipped list is complete
        for s, f in files.items():
            results = map_files(f.load, range(len(f)))  # type: ignore[arg-type]
            found = [(i, Problem(f.paths[i], str(r))) for i, r in enumerate(results) if isinstance(r, Exception)]
            if found:
                bad[s] = found
    return in_memory, bad
