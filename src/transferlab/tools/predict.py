"""Predictions of a run's model on image files from anywhere (``transferlab predict``).

``predict(run, paths)`` classifies arbitrary image files (any format and mode the data loaders accept,
read by ``transferlab.data.images.load_image``: transparency composited on white, 16-bit scaled,
CMYK/palette/1-bit converted, EXIF orientation applied) with the run's own preprocessing: the images
get the training data's channel count and square size, then the model's normalisation, and the
run's test-time augmentation. ``predict("model.onnx", paths)`` does the same with a file (or ``hf``
folder) written by ``transferlab export`` in any format, run by its own runtime (onnxruntime for
ONNX), with the preprocessing recorded in it (``ExportSpec``: colour mode, ``resize``, ``crop_pct``,
interpolation, channels, mean, std) — so a deployed file can be checked against its run. The model-level core (decoding, top-k, the file search) is
``transferlab.tools.inspect``, shared with an experiment's ``predict:`` section; this module adds the run.

A multi-label run (``metrics.json``: ``task: multilabel``) or its export (``ExportSpec.task``) predicts with sigmoid
probabilities: every label whose probability is at least its threshold — the thresholds the run chose on validation,
recorded in ``metrics.json`` and in every export's metadata — plus the top-k as for a multiclass model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from transferlab.data.sources import load_dataset
from transferlab.engine.evaluation import with_tta
from transferlab.engine.precision import autocast_for
from transferlab.results.export import ExportSpec, export_format_of, load_export
from transferlab.rundir import Run, load_run
from transferlab.tools.inspect import ImagePrediction, PredictError, collect_image_files, fill_predictions, load_images

__all__ = [
    "ImagePrediction", "PredictError", "collect_image_files", "is_export", "is_onnx_file", "load_images", "predict", "predictions_json",
    "run_input_spec", "run_task",
]


def is_export(source: object) -> bool:
    """True for a path naming an exported model (``.onnx``, ``.pt``, ``.pt2``, ``.safetensors``, an ``hf`` folder)
    rather than a run directory."""
    if not isinstance(source, (str, Path)):
        return False
    path = Path(source)
    if path.is_dir():
        return not (path / "metrics.json").exists() and export_format_of(path) is not None
    return export_format_of(path) is not None


is_onnx_file = is_export
"""The name ``transferlab predict`` used when ONNX was the only exported format it read."""


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


def run_task(run: Run) -> tuple[str, list[float] | None]:
    """(task, thresholds) of a finished run: ``multiclass`` and ``None``, or ``multilabel`` and the K thresholds it chose
    on validation (``metrics.json``; an error when they are missing, as nothing else says where a label starts)."""
    rec = run.record
    if rec.task != "multilabel":
        return rec.task, None
    if not rec.thresholds or len(rec.thresholds) != len(run.class_names):
        found = "none" if not rec.thresholds else f"{len(rec.thresholds)}"
        raise PredictError(f"{run.path}: a multi-label run whose metrics.json records {found} thresholds for {len(run.class_names)} classes")
    return rec.task, [float(t) for t in rec.thresholds]


def _spec_task(spec: ExportSpec, where: object) -> list[float] | None:
    """The thresholds of a multi-label export (``None`` for a multiclass one)."""
    if spec.task != "multilabel":
        return None
    if not spec.thresholds or len(spec.thresholds) != spec.num_classes:
        raise PredictError(f"{where}: a multi-label export without one threshold per class in its metadata")
    return [float(t) for t in spec.thresholds]


def predict(
    run: Run | str | Path,
    paths: Sequence[str | Path],
    top_k: int = 5,
    checkpoint: str = "best",
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> list[ImagePrediction]:
    """Classify image files (or folders of them) with a run's model, or with an exported file of any format (its own
    runtime on the CPU; ``checkpoint`` is the one it was exported from); one ``ImagePrediction`` per file.

    A multi-label model's ``ImagePrediction.labels`` lists every label at or above its recorded threshold. Files that
    cannot be decoded get ``error`` set (the reason) instead of predictions.
    """
    if top_k < 1:
        raise PredictError(f"top_k must be >= 1, got {top_k}")
    if is_export(run):
        if str(device) != "cpu":
            raise PredictError(f"{run}: an exported file runs on its own runtime's CPU path here; leave the device at cpu")
        model, spec, _ = load_export(run)
        files = collect_image_files(paths)
        channels, size, pre, tta, names = spec.channels, spec.image_size, spec.preprocess(), spec.tta, list(spec.class_names)
        fit, precision = (spec.resize, spec.crop_pct), "32-true"  # brought to size as the file's metadata says
        thresholds = _spec_task(spec, run)
    else:
        run = run if not isinstance(run, (str, Path)) else load_run(run)
        files = collect_image_files(paths)
        channels, size = run_input_spec(run)
        thresholds = run_task(run)[1]
        model = run.load_model(checkpoint).to(device)
        pre, tta, names = model.preprocess(), run.config.train.tta, run.class_names
        fit = (run.config.data.resize, run.config.data.crop_pct)  # brought to size as the run's images were
        precision = run.config.train.precision
    tested = with_tta(model, tta)  # predict as the run was evaluated
    x, ok, errors = load_images(files, channels, size, *fit)
    out = [ImagePrediction(str(f), error=errors.get(i)) for i, f in enumerate(files)]
    with autocast_for(precision, device):  # in the run's precision (bf16-mixed runs evaluated in bf16)
        fill_predictions(out, ok, tested, pre, x, names, top_k, device, batch_size, thresholds)
    return out


def predictions_json(run: Run | str | Path, preds: Sequence[ImagePrediction], checkpoint: str = "best") -> dict[str, Any]:
    """The JSON document ``transferlab predict --json`` writes (for a run, or an exported file)."""
    if is_export(run):
        fmt = export_format_of(run)
        assert fmt is not None and fmt.read_spec is not None
        spec: ExportSpec = fmt.read_spec(Path(run))
        return {
            "model": str(run), "format": fmt.name, "run": spec.source, "experiment": spec.experiment, "checkpoint": spec.checkpoint,
            "input": _input(spec.channels, spec.image_size, spec.resize, spec.crop_pct), "task": spec.task,
            "thresholds": _spec_task(spec, run), "class_names": list(spec.class_names), "images": [p.to_dict() for p in preds],
        }
    run = run if isinstance(run, Run) else load_run(run)
    channels, size = run_input_spec(run)
    task, thresholds = run_task(run)
    return {
        "run": str(run.path),
        "experiment": run.config.name,
        "checkpoint": checkpoint,
        "input": _input(channels, size, run.config.data.resize, run.config.data.crop_pct),
        "task": task,
        "thresholds": thresholds,
        "class_names": run.class_names,
        "images": [p.to_dict() for p in preds],
    }


def _input(channels: int, size: int, resize: str, crop_pct: float) -> dict[str, Any]:
    return {"channels": channels, "image_size": size, "resize": resize, "crop_pct": float(crop_pct)}
