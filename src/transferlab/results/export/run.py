"""Export = write + check: a model (``export_model``) or a finished run's model (``export_run_model``,
``export_checkpoint``) written in a registered format and parity-checked on the run's test samples."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from transferlab.config import ExperimentConfig
from transferlab.data.normalize import Normalization
from transferlab.files import read_json, write_json
from transferlab.models.model import TransferModel
from transferlab.models.runs import rebuild_model
from transferlab.results.export.parity import ParityReport, Tolerance, check_parity, check_raw_files, parity_inputs, parity_path
from transferlab.results.export.spec import (
    EXPORT_FORMATS,
    ExportError,
    ExportFormat,
    ExportParityError,
    ExportSpec,
    Runner,
    export_format,
    export_spec,
)
from transferlab.rundir import RUN_ACTIONS, Run, RunError, load_run, load_test_predictions
from transferlab.rundir.layout import EXPORT_DIR, SAMPLES_FILE, SELECTION_FILE, checkpoint_path

__all__ = ["ExportResult", "export_checkpoint", "export_format_of", "export_model", "export_run", "export_run_model", "load_export"]

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """What ``export_model`` did: the file, everything written with it, and the parity check."""

    format: str
    path: Path
    files: list[Path]
    parity: ParityReport
    report_path: Path
    seconds: float
    """Time to write the file (the check not included)."""


def export_model(
    model: TransferModel,
    spec: ExportSpec,
    fmt: str | ExportFormat,
    out: str | Path,
    images: torch.Tensor,
    samples: str = "",
    tolerance: Tolerance | None = None,
    run_resize: tuple[str, float] | None = None,
) -> ExportResult:
    """Write ``model`` to ``out`` as ``fmt`` and check the file on ``images`` (uint8, described by ``samples``),
    on the CPU, against a copy of ``model`` in eval mode; then on raw non-square files made from them, the run's
    preprocessing (``run_resize``: its ``data.resize`` and ``crop_pct``, default the spec's) vs the written file's metadata.

    The report is written to ``parity_path(out)`` and logged whatever the verdict; a failed check then
    raises ``ExportParityError`` (the file is kept, for inspection — do not deploy it).
    """
    fmt = export_format(fmt)
    out = Path(out)
    if len(images) == 0:
        raise ExportError("the parity check needs at least one image")
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    x = spec.preprocess()(images.cpu())
    example = x[:2] if len(x) >= 2 else x.repeat(2, 1, 1, 1)  # 2: a batch of 1 would let exporters specialise it
    # A contiguous copy for the exporters: channels_last weights make torch.export.save warn about
    # tensors it cannot place, and the exported graphs do not depend on the memory format anyway.
    clean = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            files = fmt.save(clean, example, spec, out)
    except Exception as e:
        first = str(e).splitlines()[0][:500] if str(e) else ""
        raise ExportError(f"--format {fmt.name}: exporting {spec.experiment or 'the model'} failed ({type(e).__name__}: {first})") from e
    seconds = time.perf_counter() - start
    runner = fmt.load(out)
    report = check_parity(
        model, runner, x, tolerance, format=fmt.name, file=str(out), runtime=fmt.runtime, exporter=fmt.exporter,
        samples=samples or f"{len(images)} images",
    )
    if report.ok and fmt.read_spec is not None:
        resize, crop_pct = run_resize or (spec.resize, spec.crop_pct)
        metadata = fmt.read_spec(out).metadata()  # what the written file says, not what was meant
        report.raw_files = check_raw_files(
            model, spec.preprocess(), runner, metadata, images.cpu(), spec.channels, spec.image_size, resize, crop_pct, tolerance,
        )
        report.problem = report.raw_files["problem"]
    report.versions = _versions(fmt)
    report_path = parity_path(out)
    write_json(report_path, report.to_dict())
    (log.info if report.ok else log.error)("%s", report.describe())
    if not report.ok:
        raise ExportParityError(f"{out}: {report.describe()}; report: {report_path} (the file is kept for inspection; do not deploy it)", report)
    return ExportResult(fmt.name, out, files, report, report_path, seconds)


def _versions(fmt: ExportFormat) -> dict[str, str]:
    out = {"torch": torch.__version__}
    for dist in fmt.requires:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def export_checkpoint(
    run_dir: str | Path,
    cfg: ExperimentConfig,
    metrics: dict[str, Any],
    fmt: str | ExportFormat,
    out: str | Path | None = None,
    checkpoint: str = "best",
    tolerance: Tolerance | None = None,
) -> ExportResult:
    """Export the model of a finished run directory from the engine's pieces alone (``cfg``, ``metrics.json``
    as a dict, ``checkpoints/<checkpoint>.safetensors``, ``test_samples.safetensors``), parity-checked.

    What ``export_run`` does from a run folder that is still being written (the MLflow tracker's ``log_model``
    at the end of a run, before its ``metrics.json`` exists).
    The default ``out`` is ``<run>/export/<format's filename>``.
    """
    fmt = export_format(fmt)
    run_dir = Path(run_dir)
    class_names = [str(c) for c in metrics.get("class_names") or []]
    model = rebuild_model(cfg, len(class_names), checkpoint_path(run_dir, checkpoint))
    selection = run_dir / SELECTION_FILE
    norm = Normalization.from_dict(read_json(selection).get("normalize") if selection.is_file() else None)
    if norm.mean is not None and norm.std is not None:  # data.normalize: dataset / none, as the run trained (as load_run_model)
        model.set_normalization(norm.mean, norm.std)
    samples_file = run_dir / SAMPLES_FILE
    samples = load_file(str(samples_file))["images"] if samples_file.is_file() else None
    size = metrics.get("image_size") or cfg.data.image_size
    if not size:
        raise ExportError(f"{run_dir}: metrics.json records no image_size, so the input size of the export is unknown")
    return export_run_model(model, cfg, class_names, metrics, samples, run_dir, fmt, out, checkpoint, tolerance, size)


def export_run_model(
    model: TransferModel, cfg: ExperimentConfig, class_names: list[str], metrics: dict[str, Any], samples: torch.Tensor | None,
    run_dir: Path, fmt: ExportFormat, out: str | Path | None, checkpoint: str, tolerance: Tolerance | None, size: int,
) -> ExportResult:
    """The part of a run's export after its model is loaded (``Run.export`` and ``export_checkpoint``): the spec (with the
    task and, multi-label, the thresholds of ``metrics``), the parity inputs (the recorded test samples, else test images),
    the output path (default ``<run>/export/<filename>``)."""
    channels = metrics.get("channels") or (samples.shape[1] if samples is not None else model.preprocess().in_chans)
    task = metrics.get("task") or cfg.data.task  # metrics.json says what ran; one written before tasks existed: the config
    spec = export_spec(model, cfg, class_names, size, channels, source=str(run_dir), checkpoint=checkpoint, task=task,
                       thresholds=metrics.get("thresholds"))
    images, described = parity_inputs(samples, cfg.data, spec.channels, spec.image_size)
    out = Path(out) if out is not None else run_dir / EXPORT_DIR / fmt.filename
    if out.is_dir() and Path(fmt.filename).suffix:  # a folder given for a one-file format: the default name in it
        out = out / fmt.filename
    return export_model(model, spec, fmt, out, images, described, tolerance, (cfg.data.resize, float(cfg.data.crop_pct)))


def export_run(
    run: Run | str | Path, format: str | ExportFormat = "onnx", out: str | Path | None = None, checkpoint: str = "best",
    tolerance: Tolerance | None = None,
) -> ExportResult:
    """Write a finished run's model as ``format`` (``onnx``, ``torchscript``, ``exported-program``, ``safetensors``,
    ``hf``) to ``out`` (default ``<run>/export/<format's filename>``) and check it (``Run.export`` calls this).

    The parity check runs the file with its own runtime on the run's recorded test samples (or, when
    it recorded none, on test images of its dataset) and raises ``ExportParityError`` if it disagrees
    with the model; its report is written to ``<file>.parity.json``.
    """
    fmt = export_format(format)  # an unknown name or a missing extra fails before any work
    run = run if isinstance(run, Run) else load_run(run)
    if run.config is None:
        raise RunError(f"{run.path}: no readable config.yaml; nothing to export")
    if not run.config.uses.model:
        raise RunError(f"{run.path}: a {run.config.kind} run has no single model (it combines other runs); nothing to export")
    if not run.ok:
        why = f": {run.record.error}" if run.record.error else ""
        raise RunError(f"{run.path}: the run did not finish (status {run.record.status!r}{why}); nothing to export")
    model = run.load_model(checkpoint)
    recorded = load_test_predictions(run.path)
    samples = recorded.images if recorded is not None else None
    m = run.metrics
    size = m.get("image_size") or run.config.data.image_size
    if not size:
        raise RunError(f"{run.path}: metrics.json records no image_size, so the input size of the export is unknown")
    return export_run_model(model, run.config, run.class_names, m, samples, run.path, fmt, out, checkpoint, tolerance, size)


def export_format_of(path: str | Path) -> ExportFormat | None:
    """The registered format that wrote ``path`` (by its suffix, or a folder for ``hf``), or ``None``."""
    path = Path(path)
    for fmt in EXPORT_FORMATS.values():
        if fmt.folder:
            if path.is_dir() and (path / "config.json").is_file():
                return fmt
        elif path.suffix.lower() == Path(fmt.filename).suffix and not path.is_dir():
            return fmt
    return None


def load_export(path: str | Path) -> tuple[Runner, ExportSpec, ExportFormat]:
    """An exported file (any format) run by its own runtime, its ``ExportSpec`` (the preprocessing, the classes), its format.

    What ``transferlab predict <exported file>`` uses: the images are preprocessed as the spec says.
    """
    path = Path(path)
    fmt = export_format_of(path)
    if fmt is None or fmt.read_spec is None:
        suffixes = ", ".join(f.filename if f.folder else Path(f.filename).suffix for f in EXPORT_FORMATS.values())
        raise ExportError(f"{path}: not an exported model transferlab can read (expected one of {suffixes})")
    if not path.exists():
        raise ExportError(f"{path}: not found")
    fmt.check_available()
    spec = fmt.read_spec(path)
    return fmt.load(path), spec, fmt


RUN_ACTIONS.export = export_run
