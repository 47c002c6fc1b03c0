"""The test-set predictions a run records, for the report's confusion analysis and prediction grid.

While a run is tested, ``PredictionRecorder`` keeps the predicted class and its probability for every
test image (on the device, cheap) and ``save_test_predictions`` writes them to ``predictions.json`` with
a small seeded sample of the test images as ``test_samples.safetensors`` — what the report's
prediction grid shows, without needing the dataset again. Multi-label runs (``data.task: multilabel``) write
N×K ``true`` / ``pred`` / ``prob`` and their ``thresholds`` (``engine.multilabel.multilabel_predictions``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from transferlab.data.images import FileImages, load_image
from transferlab.data.prepare import ImageSplits
from transferlab.data.resize import resize_uint8
from transferlab.files import atomic_write, write_json
from transferlab.rundir.layout import PREDICTIONS_FILE, SAMPLES_FILE

__all__ = ["PredictionRecorder", "save_test_predictions"]

SAMPLE_RANDOM = 32
"""Test images kept per run for the report's grid: a seeded random sample of this many ..."""
SAMPLE_WRONG = 16
"""... plus up to this many misclassified ones."""
SAMPLE_MAX_SIDE = 96
"""Sample images larger than this are stored downscaled to this side."""


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
    wrong = [int(i) for i in order if np.any(true[i] != pred[i]) and int(i) not in taken][:SAMPLE_WRONG]  # multi-label: any label
    return sample + wrong


def _images_at(x: Any, positions: list[int]) -> torch.Tensor:
    """uint8 N×C×H×W of the test images at ``positions`` (in-memory tensor or ``FileImages``)."""
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


def save_test_predictions(run_dir: str | Path, recorder: PredictionRecorder | dict[str, Any], splits: ImageSplits, seed: int) -> dict[str, Any]:
    """Write ``predictions.json`` (every test image: true, pred, prob) and ``test_samples.safetensors``.

    ``recorder`` is the ``PredictionRecorder`` the test pass went through, or the per-image record itself (multi-label:
    ``transferlab.engine.multilabel.multilabel_predictions``, which adds ``task`` and ``thresholds``; ``true`` / ``pred``
    / ``prob`` are then N×K). The sample images (a seeded random sample plus misclassified ones — for multi-label, any
    label wrong) are stored so the report can show them without the dataset. Returns the JSON record.
    """
    run_dir = Path(run_dir)
    rec = recorder if isinstance(recorder, dict) else recorder.result()
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
    write_json(run_dir / PREDICTIONS_FILE, record, indent=None)
    return record
