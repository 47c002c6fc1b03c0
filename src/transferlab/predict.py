"""Predictions: a run's model on image files from anywhere, and the test-set predictions a run records.

``predict(run, paths)`` classifies arbitrary image files (any format and mode the data loaders accept,
read by ``transferlab.data.images.load_image``: transparency composited on white, 16-bit scaled,
CMYK/palette/1-bit converted, EXIF orientation applied) with the run's own preprocessing: the images
get the training data's channel count and square size, then the model's normalisation.

While a run is tested, ``PredictionRecorder`` keeps the predicted class and its probability for every
test image (on the device, cheap) and ``save_test_predictions`` writes them to ``predictions.json`` with
a small seeded sample of the test images as ``test_samples.safetensors`` — what the report's
prediction grid shows, without needing the dataset again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from transferlab.evaluation import with_tta

if TYPE_CHECKING:
    from transferlab.data.prepare import ImageSplits
    from transferlab.runs import Run

PREDICTIONS_FILE = "predictions.json"
SAMPLES_FILE = "test_samples.safetensors"
SAMPLE_RANDOM = 32
"""Test images kept per run for the report's grid: a seeded random sample of this many ..."""
SAMPLE_WRONG = 16
"""... plus up to this many misclassified ones."""
SAMPLE_MAX_SIDE = 96
"""Sample images larger than this are stored downscaled to this side."""


class PredictError(ValueError):
    """No image to predict, or a run that cannot predict. The message names the path."""


# --------------------------------------------------------------------------------------------
# recording test predictions while a run is evaluated


class PredictionRecorder(nn.Module):
    """Wraps a model: every forward pass also keeps argmax class and softmax probability (on the device).

    Use ``recorder`` in place of the model and ``recorder.batches(batches)`` in place of the batches, so
    the labels are recorded in the same order as the predictions.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._pred: list[torch.Tensor] = []
        self._prob: list[torch.Tensor] = []
        self._true_prob: list[torch.Tensor] = []
        self._true: list[torch.Tensor] = []
        self._pending: torch.Tensor | None = None

    def batches(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``batches`` unchanged, remembering each batch's labels for the next forward pass."""
        for x, y in batches:
            self._pending = y
            yield x, y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        with torch.no_grad():
            probs = logits.detach().float().softmax(-1)
            prob, pred = probs.max(-1)
            self._pred.append(pred)
            self._prob.append(prob)
            if self._pending is not None and len(self._pending) == len(pred):
                y = self._pending.to(probs.device)
                self._true.append(y)
                self._true_prob.append(probs.gather(1, y.view(-1, 1)).squeeze(1))
            self._pending = None
        return logits

    def result(self) -> dict[str, list[Any]]:
        """``true``, ``pred``, ``prob`` (of the predicted class), ``true_prob`` as Python lists."""
        if not self._pred:
            return {"true": [], "pred": [], "prob": [], "true_prob": []}
        if len(self._true) != len(self._pred):
            raise RuntimeError("PredictionRecorder: labels were not recorded for every batch (use recorder.batches(...))")
        cat = lambda ts: torch.cat(ts).cpu()  # noqa: E731
        return {
            "true": cat(self._true).tolist(),
            "pred": cat(self._pred).tolist(),
            "prob": [round(float(v), 5) for v in cat(self._prob)],
            "true_prob": [round(float(v), 5) for v in cat(self._true_prob)],
        }


def _sample_positions(true: np.ndarray, pred: np.ndarray, seed: int) -> list[int]:
    """A seeded random sample of test positions, then misclassified ones not in it (report grid)."""
    order = np.random.default_rng(seed).permutation(len(true))
    sample = [int(i) for i in order[:SAMPLE_RANDOM]]
    taken = set(sample)
    wrong = [int(i) for i in order if true[i] != pred[i] and int(i) not in taken][:SAMPLE_WRONG]
    return sample + wrong


def _images_at(x: Any, positions: list[int]) -> torch.Tensor:
    """uint8 N×C×H×W of the test images at ``positions`` (in-memory tensor or ``FileImages``)."""
    from transferlab.data.images import FileImages, load_image
    from transferlab.data.prepare import resize_uint8

    if isinstance(x, FileImages):
        arrs = [load_image(x.paths[i], x.channels, x.resize) for i in positions]
        if len({a.shape for a in arrs}) != 1:  # mixed native sizes without data.image_size: common square
            arrs = [load_image(x.paths[i], x.channels, SAMPLE_MAX_SIDE) for i in positions]
        out = torch.from_numpy(np.stack([a.transpose(2, 0, 1) for a in arrs]))
    else:
        out = x[torch.as_tensor(positions, dtype=torch.long)].cpu()
    if max(out.shape[-2:]) > SAMPLE_MAX_SIDE:
        out = resize_uint8(out.contiguous(), SAMPLE_MAX_SIDE)
    return out.contiguous()


def save_test_predictions(run_dir: str | Path, recorder: PredictionRecorder, splits: ImageSplits, seed: int) -> dict[str, Any]:
    """Write ``predictions.json`` (every test image: true, pred, prob) and ``test_samples.safetensors``.

    The sample images (a seeded random sample plus misclassified ones) are stored so the report can
    show them without the dataset. Returns the JSON record.
    """
    from safetensors.torch import save_file

    from transferlab.training.checkpoint import atomic_write

    run_dir = Path(run_dir)
    rec = recorder.result()
    true, pred = np.asarray(rec["true"]), np.asarray(rec["pred"])
    if len(true) != len(splits.test_y):
        raise RuntimeError(f"{run_dir}: recorded {len(true)} test predictions for {len(splits.test_y)} test images")
    positions = _sample_positions(true, pred, seed)
    record: dict[str, Any] = {
        "split": "test",
        "n": len(true),
        "class_names": list(splits.class_names),
        "dataset_index": splits.indices.get("test", []),
        **rec,
        "samples": {"file": SAMPLES_FILE, "positions": positions},
    }
    if positions:
        images = _images_at(splits.test_x, positions)
        tensors = {"images": images, "positions": torch.as_tensor(positions, dtype=torch.int64)}
        atomic_write(run_dir / SAMPLES_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "transferlab-test-samples-v1"}))
    atomic_write(run_dir / PREDICTIONS_FILE, lambda p: Path(p).write_text(json.dumps(record)))
    return record


@dataclass
class TestPredictions:
    """What ``save_test_predictions`` wrote, read back: arrays over the test split and the sample images."""

    class_names: list[str]
    true: np.ndarray
    pred: np.ndarray
    prob: np.ndarray
    true_prob: np.ndarray
    positions: list[int] = field(default_factory=list)
    """Test positions of the sample images, in the order of ``images``."""
    images: torch.Tensor | None = None
    """uint8 N×C×H×W sample images (``None`` when the samples file is missing)."""


def load_test_predictions(run_dir: str | Path) -> TestPredictions | None:
    """Read ``predictions.json`` (+ samples) of a run; ``None`` when the run recorded none."""
    run_dir = Path(run_dir)
    path = run_dir / PREDICTIONS_FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        out = TestPredictions(
            class_names=list(rec["class_names"]),
            true=np.asarray(rec["true"], dtype=np.int64),
            pred=np.asarray(rec["pred"], dtype=np.int64),
            prob=np.asarray(rec["prob"], dtype=np.float64),
            true_prob=np.asarray(rec.get("true_prob", []), dtype=np.float64),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise PredictError(f"{path}: not a transferlab predictions file ({type(e).__name__}: {e})") from None
    samples = run_dir / rec.get("samples", {}).get("file", SAMPLES_FILE)
    if samples.is_file():
        from safetensors.torch import load_file

        t = load_file(str(samples))
        out.images, out.positions = t["images"], t["positions"].tolist()
    return out


# --------------------------------------------------------------------------------------------
# outside images


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
    from transferlab.data.images import is_image_file

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
            from transferlab.data.datasets import load_dataset

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
    from transferlab.data.images import ImageReadError, load_image

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
    from transferlab.runs import load_run

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
        for j, (v, ix) in enumerate(zip(values.tolist(), indices.tolist())):
            out[ok[start + j]].top = [(names[c], int(c), float(p)) for p, c in zip(v, ix)]
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
