"""The parity check every export has to pass.

``check_parity`` runs the written file on real images — normally the run's recorded test samples —
and compares it with the model it came from: top-1 must agree on every image (a near-tie within the
tolerance is counted, not failed) and max |Δlogit| must stay within ``atol + rtol · max |logit|``.
The batch is run whole and then as a batch of one, so a batch size baked into the file (no dynamic
batch axis) fails too.

Those samples are already square and at the model's size, so they cannot catch a wrong resize. So
``check_raw_files`` also writes a few of them as non-square PNG files and runs each file through both
paths: the run's own preprocessing (``data.images.load_image`` with the run's ``data.resize`` and
``crop_pct``, then the model's normalisation) into the model, and the preprocessing that the written
file's metadata alone describes (``spec.preprocess_file``: PIL and numpy) into the exported file; top-1
must agree and the logits stay within the same tolerance (both paths decode and resize the same pixels
with PIL: a wrong resize, crop or colour mode moves them by far more); max |Δprob| is reported too
(``ParityReport.raw_files``). The result is logged, returned and written beside the file
(``<file>.parity.json``); a failed check raises ``ExportParityError``.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from transferlab.config import DataConfig
from transferlab.data.images import FileImages, load_image
from transferlab.data.normalize import Preprocess
from transferlab.data.resize import resize_uint8
from transferlab.data.sources import load_dataset
from transferlab.results.export.spec import Runner, preprocess_file

__all__ = [
    "PARITY_FALLBACK_IMAGES",
    "RAW_FILES",
    "ParityReport",
    "Tolerance",
    "check_parity",
    "check_raw_files",
    "parity_inputs",
    "parity_path",
    "raw_image_files",
]

RAW_FILES = 4
"""Non-square image files the parity check writes from its samples and runs through both preprocessing paths."""

PARITY_FALLBACK_IMAGES = 16
"""Test images of the run's dataset used for the parity check when the run recorded no test samples."""


@dataclass(frozen=True)
class Tolerance:
    """Allowed max |Δlogit|: ``atol + rtol · max |logit|`` of the reference.

    Another runtime's kernels (and torch's own at another batch size) sum in another order, so float32
    logits differ in their last digits, in proportion to their magnitude: at most 2.3e-5 on the trained
    models of ``benchmarks/export_parity.py`` (logits up to 23). This keeps two orders of margin while
    anything really wrong — a missing normalisation, a wrong op, BatchNorm in training mode — moves
    logits by far more.
    """

    atol: float = 1e-4
    rtol: float = 1e-4

    def allowed(self, scale: float) -> float:
        return self.atol + self.rtol * scale


@dataclass
class ParityReport:
    """The exported file vs the model on the same images (module docstring)."""

    format: str
    file: str
    runtime: str
    exporter: str
    samples: str
    """Which images were used, in words."""
    n: int
    batch_sizes: list[int]
    top1_agreement: float
    top1_disagreements: int
    near_ties: int
    """Disagreements where the reference's two classes are within the tolerance: counted, not failed."""
    max_abs_logit_diff: float
    max_abs_logit: float
    tolerance: Tolerance
    problem: str | None = None
    """Why the check failed (``None``: it passed)."""
    versions: dict[str, str] = field(default_factory=dict)
    raw_files: dict[str, Any] | None = None
    """The raw-file check (``check_raw_files``): files, sizes, resize, top-1 agreement, max |Δprob|, its problem."""

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def allowed(self) -> float:
        return self.tolerance.allowed(self.max_abs_logit)

    def describe(self) -> str:
        """One line: the figures and the verdict."""
        agree = self.n - self.top1_disagreements
        ties = f", {self.near_ties} near-tie(s)" if self.near_ties else ""
        verdict = "ok" if self.ok else f"FAILED: {self.problem}"
        raw, raw_text = self.raw_files, ""
        if raw:
            raw_text = (f"; {raw['n']} raw non-square files preprocessed from the file's metadata (resize {raw['resize']}, crop_pct "
                     f"{raw['crop_pct']:g}): top-1 agrees on {sum(raw['top1_same'])}/{raw['n']}, max |Δprob| {raw['max_abs_prob_diff']:.1e}")
        return (
            f"parity {self.format} ({self.runtime}) on {self.samples}: top-1 agreement {100 * self.top1_agreement:.1f}% "
            f"({agree}/{self.n}{ties}), max |Δlogit| {self.max_abs_logit_diff:.2e} (allowed {self.allowed:.2e} = "
            f"{self.tolerance.atol:g} + {self.tolerance.rtol:g} × max |logit| {self.max_abs_logit:.3g}){raw_text} — {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ok"], d["allowed"] = self.ok, self.allowed

        def finite(v: Any) -> Any:  # JSON has no NaN: a non-finite figure (a broken export) is written as its name
            return str(v) if isinstance(v, float) and not math.isfinite(v) else v

        if d.get("raw_files"):
            d["raw_files"] = {k: finite(v) for k, v in d["raw_files"].items()}
        return {k: finite(v) for k, v in d.items()}


def parity_path(path: Path) -> Path:
    """Where the parity report of an exported file (or folder) is written: ``<file>.parity.json`` beside it."""
    return path.with_name(path.name + ".parity.json")


@torch.inference_mode()
def check_parity(
    reference: nn.Module, exported: Runner, x: torch.Tensor, tolerance: Tolerance | None = None, **describe: Any
) -> ParityReport:
    """Compare ``exported`` with ``reference`` on the float input ``x`` (whole, then its first image alone).

    ``describe`` fills the report's ``format``, ``file``, ``runtime``, ``exporter``, ``samples``.
    """
    tolerance = tolerance or Tolerance()
    fields = {"format": "", "file": "", "runtime": "", "exporter": "", "samples": f"{len(x)} images", **describe}
    ref = reference(x).float()
    problem = None
    try:
        got, got_one = exported(x).float(), exported(x[:1]).float()
    except Exception as e:  # noqa: BLE001 - any runtime failure is a failed check, reported as such
        got = got_one = None
        problem = f"the exported file does not run on a batch of {len(x)} and one of 1 ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
    if got is not None and (got.shape != ref.shape or got_one.shape != ref[:1].shape):
        problem = f"output shape {tuple(got.shape)} / {tuple(got_one.shape)}, expected {tuple(ref.shape)} / {tuple(ref[:1].shape)}"
        got = None
    scale = float(ref.abs().max())
    if got is None:
        return ParityReport(**fields, n=len(x), batch_sizes=[len(x), 1], top1_agreement=0.0, top1_disagreements=len(x),
                            near_ties=0, max_abs_logit_diff=math.inf, max_abs_logit=scale, tolerance=tolerance, problem=problem)
    got_all = torch.cat([got, got_one])
    ref_all = torch.cat([ref, ref[:1]])
    diff = float((got_all - ref_all).abs().max())
    if not math.isfinite(diff):
        diff = math.inf  # NaN compares false with everything: make it fail loudly
    allowed = tolerance.allowed(scale)
    ref_top, got_top = ref_all.argmax(1), got_all.argmax(1)
    wrong = ref_top != got_top
    margin = ref_all.gather(1, ref_top[:, None]) - ref_all.gather(1, got_top[:, None])
    ties = wrong & (margin.squeeze(1) <= allowed)
    n_wrong, n_ties = int(wrong[: len(x)].sum()), int(ties[: len(x)].sum())
    if (wrong & ~ties).any():
        problem = f"top-1 differs on {int((wrong & ~ties).sum())} image(s) beyond a near-tie"
    elif diff > allowed:
        problem = f"max |Δlogit| {diff:.3g} exceeds the allowed {allowed:.3g}"
    return ParityReport(
        **fields, n=len(x), batch_sizes=[len(x), 1], top1_agreement=1 - n_wrong / len(x), top1_disagreements=n_wrong,
        near_ties=n_ties, max_abs_logit_diff=diff, max_abs_logit=scale, tolerance=tolerance, problem=problem,
    )


def raw_image_files(images: torch.Tensor, folder: Path, n: int = RAW_FILES) -> list[Path]:
    """Write the first ``n`` uint8 N×C×S×S ``images`` as RGB PNG files of non-square sizes (landscape and portrait,
    larger than S so every resize mode resizes them) in ``folder``."""
    s = int(images.shape[-1])
    shapes = [(2 * s, 3 * s), (3 * s + 1, 2 * s), (2 * s + 3, 2 * s + 7 * max(1, s // 4)), (4 * s, 2 * s + 1)]
    out = []
    for i in range(min(n, len(images))):
        arr = images[i].permute(1, 2, 0).numpy()
        img = Image.fromarray(arr[:, :, 0], "L").convert("RGB") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
        h, w = shapes[i % len(shapes)]
        path = folder / f"raw_{i}_{w}x{h}.png"
        img.resize((w, h), Image.Resampling.BICUBIC).save(path)
        out.append(path)
    return out


@torch.inference_mode()
def check_raw_files(
    reference: nn.Module, pre: Preprocess, exported: Runner, metadata: dict[str, str], images: torch.Tensor,
    channels: int, size: int, resize: str, crop_pct: float, tolerance: Tolerance | None = None,
) -> dict[str, Any]:
    """The raw-file half of the check (module docstring): ``images`` written as non-square files, each run through the
    run's preprocessing (``resize``, ``crop_pct``, ``pre``) into ``reference`` and through ``metadata``'s into ``exported``."""
    tolerance = tolerance or Tolerance()
    with tempfile.TemporaryDirectory(prefix="transferlab-parity-") as tmp:
        files = raw_image_files(images, Path(tmp))
        sizes = []
        for f in files:
            with Image.open(f) as im:  # closed here: only the size is read
                sizes.append(im.size)
        ours = torch.from_numpy(np.stack([load_image(f, channels, size, resize, crop_pct).transpose(2, 0, 1) for f in files]))
        theirs = torch.from_numpy(np.stack([preprocess_file(f, metadata) for f in files]))
    ref = reference(pre(ours)).float()
    out: dict[str, Any] = {"n": len(files), "sizes": [f"{w}x{h}" for w, h in sizes], "resize": resize, "crop_pct": float(crop_pct),
                           "top1_same": [], "max_abs_prob_diff": math.inf, "max_abs_logit_diff": math.inf, "problem": None}
    try:
        got = exported(theirs).float()
    except Exception as e:  # noqa: BLE001 - a runtime failure is a failed check
        out["problem"] = f"the exported file does not run on the metadata-preprocessed files ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        return out
    if got.shape != ref.shape:
        out["problem"] = f"input from the metadata gives output shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        return out
    prob_diff = float((got.softmax(1) - ref.softmax(1)).abs().max())
    logit_diff = float((got - ref).abs().max())
    ref_top, got_top = ref.argmax(1), got.argmax(1)
    margin = (ref.gather(1, ref_top[:, None]) - ref.gather(1, got_top[:, None])).squeeze(1)
    allowed = tolerance.allowed(float(ref.abs().max()))
    out.update(top1_same=[bool(v) for v in (ref_top == got_top)], max_abs_prob_diff=prob_diff, max_abs_logit_diff=logit_diff)
    if ((ref_top != got_top) & (margin > allowed)).any():
        out["problem"] = (f"raw non-square files preprocessed from the file's metadata get another top-1 than the run's own "
                          f"preprocessing on {int(((ref_top != got_top) & (margin > allowed)).sum())} of {len(files)}")
    elif not logit_diff <= allowed:
        out["problem"] = (f"raw non-square files: logits from the file's metadata differ from the run's own preprocessing "
                          f"by up to {logit_diff:.3g} (allowed {allowed:.3g}; max |Δprob| {prob_diff:.3g})")
    return out


def parity_inputs(
    samples: torch.Tensor | None, data: DataConfig, channels: int, size: int, n: int = PARITY_FALLBACK_IMAGES
) -> tuple[torch.Tensor, str]:
    """The uint8 N×C×size×size images the parity check uses, and what they are in words.

    The run's recorded test samples when there are any (they are stored at most 96 px wide, so they
    are resized to ``size`` when the run used larger images); otherwise the first ``n`` test images of
    the run's dataset; and when that cannot be read either, ``n`` seeded random images — said so.
    """
    if samples is not None and len(samples):
        what = f"the run's {len(samples)} recorded test samples"
        if samples.shape[-1] != size or samples.shape[-2] != size:
            what += f" (stored at {samples.shape[-1]} px, resized to {size} px)"
            samples = resize_uint8(samples.contiguous(), size)
        return samples, what
    try:
        raw = load_dataset(data)
        test = raw.test_x
        k = min(n, len(test))
        if isinstance(test, FileImages):
            images = torch.from_numpy(np.stack([load_image(test.paths[i], channels, size).transpose(2, 0, 1) for i in range(k)]))
        else:
            images = test[:k]
            if images.shape[-1] != size or images.shape[-2] != size:
                images = resize_uint8(images.contiguous(), size)
        if images.shape[1] != channels:
            raise ValueError(f"its test images have {images.shape[1]} channels, the run {channels}")
        return images.contiguous(), f"the first {k} test images of dataset {data.dataset!r} (the run recorded no test samples)"
    except Exception as e:  # noqa: BLE001 - the data may be gone; the export can still be checked on noise
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return images, f"{n} seeded random images (no recorded test samples, and dataset {data.dataset!r} unreadable: {reason})"
