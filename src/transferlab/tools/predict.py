"""Predictions of a run's model on image files from anywhere (``transferlab predict``).

``predict(run, paths)`` classifies arbitrary image files (any format and mode the data loaders accept,
read by ``transferlab.data.images.load_image``: transparency composited on white, 16-bit scaled,
CMYK/palette/1-bit converted, EXIF orientation applied) with the run's own preprocessing: the images
get the training data's channel count and square size, then the model's normalisation, and the
run's test-time augmentation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.data.images import ImageReadError, is_image_file, load_image
from transferlab.data.sources import load_dataset
from transferlab.engine.evaluation import with_tta
from transferlab.rundir import Run, load_run

__all__ = ["ImagePrediction", "PredictError", "collect_image_files", "load_images", "predict", "predictions_json", "run_input_spec"]


class PredictError(ValueError):
    """No image to predict, or a run that cannot predict. The message names the path."""


@dataclass
class ImagePrediction:
    """Top-k classes of one image file, or why the file could not be used."""

    file: str
    top: list[tuple[str, int, float]] = field(default_factory=list)
    """(class name, class index, probability), most probable first."""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"file": self.file, "error": self.error}
        return {"file": self.file, "predictions": [{"class": c, "index": i, "prob": p} for c, i, p in self.top]}


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


def run_input_spec(run: Run) -> tuple[int, int]:
    """(channels, side) of the images the run was trained on: outside images are converted to these."""
    m = run.metrics
    if m.get("status") != "ok":
        raise PredictError(f"{run.path}: the run did not finish (status {m.get('status')!r}): {m.get('error', '')}")
    size = m.get("image_size") or run.config.data.image_size
    channels = m.get("channels")
    if channels is None:  # runs written before 'channels' was recorded: ask the dataset
        try:
            channels = int(load_dataset(run.config.data).train_x.shape[1])
        except Exception as e:  # noqa: BLE001
            raise PredictError(
                f"{run.path}: metrics.json does not say how many channels the training images had and the "
                f"dataset {run.config.data.dataset!r} cannot be read to find out ({e})"
            ) from None
    if not size:
        raise PredictError(f"{run.path}: metrics.json has no image_size")
    return int(channels), int(size)


def load_images(files: Sequence[Path], channels: int, size: int) -> tuple[torch.Tensor, list[int], dict[int, str]]:
    """Decode files to uint8 N×C×size×size; returns (images, positions decoded, {position: error})."""
    arrs, ok, errors = [], [], {}
    for i, f in enumerate(files):
        try:
            arrs.append(load_image(f, channels, size).transpose(2, 0, 1))
            ok.append(i)
        except ImageReadError as e:
            errors[i] = str(e)
    x = torch.from_numpy(np.stack(arrs)) if arrs else torch.empty((0, channels, size, size), dtype=torch.uint8)
    return x, ok, errors


@torch.inference_mode()
def predict(
    run: Run | str | Path,
    paths: Sequence[str | Path],
    top_k: int = 5,
    checkpoint: str = "best",
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> list[ImagePrediction]:
    """Classify image files (or folders of them) with a run's model; one ``ImagePrediction`` per file.

    Files that cannot be decoded get ``error`` set (the reason) instead of predictions.
    """
    run = run if not isinstance(run, (str, Path)) else load_run(run)
    if top_k < 1:
        raise PredictError(f"top_k must be >= 1, got {top_k}")
    files = collect_image_files(paths)
    channels, size = run_input_spec(run)
    model = run.load_model(checkpoint).to(device)
    pre = model.preprocess()
    model = with_tta(model, run.config.train.tta)  # predict as the run was evaluated
    names = run.class_names
    x, ok, errors = load_images(files, channels, size)
    out = [ImagePrediction(str(f), error=errors.get(i)) for i, f in enumerate(files)]
    k = min(top_k, len(names))
    for start in range(0, len(ok), batch_size):
        xb = pre(x[start : start + batch_size].to(device))
        probs = model(xb).float().softmax(-1).cpu()
        values, indices = probs.topk(k, dim=-1)
        for j, (v, ix) in enumerate(zip(values.tolist(), indices.tolist(), strict=True)):
            out[ok[start + j]].top = [(names[c], int(c), float(p)) for p, c in zip(v, ix, strict=True)]
    return out


def predictions_json(run: Run, preds: Sequence[ImagePrediction], checkpoint: str = "best") -> dict[str, Any]:
    """The JSON document ``transferlab predict --json`` writes."""
    channels, size = run_input_spec(run)
    return {
        "run": str(run.path),
        "experiment": run.config.name,
        "checkpoint": checkpoint,
        "input": {"channels": channels, "image_size": size},
        "class_names": run.class_names,
        "images": [p.to_dict() for p in preds],
    }
