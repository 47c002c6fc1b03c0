"""Voting ensembles over finished runs, evaluated and recorded like any run.

Each member is a run directory. It keeps its own preprocessing: its test images are taken from
its dataset by the indices in its ``selection.json``, resized to its own ``data.image_size`` and
normalised by its own model (``Run.load_model().preprocess()``), so members with different
backbones, input sizes and normalisations vote on exactly the same test images. Members must agree
on the class names (same order) and on the test images; anything else is an error naming the run.

Votes (``combine_votes``):

* ``soft`` — the class with the highest mean softmax probability over the members; an exact tie
  goes to the lowest class index.
* ``hard`` — every member votes for its top class (its own exact ties: lowest index); the class
  with the most votes wins. A tie between classes (e.g. three members, three different answers)
  goes to the tied class with the highest summed probability over the members, and an exact tie of
  those sums to the lowest class index. The number of tied images is recorded (``vote_ties``).

``kind: ensemble`` writes a run directory like any kind (``metrics.json`` with status ``ok``, test
accuracy, per-class accuracy, confusion matrix, inference images/s; ``config.yaml`` and, as before,
``ensemble.yaml`` with the members and the vote), so ``transferlab compare`` lists it beside its
members. In a study, the members are experiments whose runs it depends on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from transferlab.config import EnsembleSpec, ExperimentConfig, TrainConfig
from transferlab.config.kinds import KindUses
from transferlab.data.batches import TensorBatches
from transferlab.data.images import FileImages, decode_files, format_problems
from transferlab.data.resize import resize_uint8
from transferlab.data.sources import load_dataset
from transferlab.engine.calibration import CalibrationSums
from transferlab.engine.evaluation import Calibration, with_tta
from transferlab.kinds.base import KINDS, Kind, RunContext, run_experiment
from transferlab.kinds.common import calibration_part
from transferlab.rundir import Run, RunError, RunMetrics, code_version, load_run

__all__ = ["VOTES", "EnsembleError", "EnsembleKind", "EnsembleResult", "combine_votes", "evaluate_ensemble", "run_ensemble"]

VOTES: tuple[str, ...] = typing.get_args(typing.get_type_hints(EnsembleSpec)["vote"])
"""The vote rules (``ensemble.vote``); their tie rules are ``combine_votes``'s."""


class EnsembleError(RunError):
    """Members that cannot vote together (other classes, other test images). The message names the run."""


def combine_votes(probs: torch.Tensor, vote: str) -> tuple[torch.Tensor, int]:
    """Predicted class per image from the members' probabilities ``probs`` (members × images × classes).

    Returns (predictions, number of images whose vote was a tie). Tie rules: module docstring.
    """
    if vote not in VOTES:
        raise ValueError(f"unknown vote {vote!r}; use one of {', '.join(VOTES)}")
    if probs.ndim != 3:
        raise ValueError(f"expected members × images × classes probabilities, got shape {tuple(probs.shape)}")
    total = probs.sum(0)
    if vote == "soft":
        ties = int(((total == total.max(1, keepdim=True).values).sum(1) > 1).sum())
        return total.argmax(1), ties  # argmax returns the first (lowest) index of equal maxima
    counts = F.one_hot(probs.argmax(2), probs.shape[2]).sum(0)  # images × classes: votes per class
    tied = counts == counts.max(1, keepdim=True).values
    ties = int((tied.sum(1) > 1).sum())
    key = torch.where(tied, total, torch.full_like(total, -float("inf")))
    return key.argmax(1), ties


# --------------------------------------------------------------------------------------------
# the members' test images


_RAW_CACHE: dict[str, Any] = {}


def _raw_dataset(run: Run) -> Any:
    """The member's raw dataset, loaded once per dataset (selection keys do not change what is loaded)."""
    d = run.config.data
    selection_free = dict(image_size=None, augment=[], train_subset=None, test_subset=None, k_per_class=None, val_count=None,
                          classes=None, num_workers=None, val_fraction=0.1)
    key = repr(dataclasses.replace(d, **selection_free))
    if key not in _RAW_CACHE:
        _RAW_CACHE.clear()  # one dataset in memory at a time
        _RAW_CACHE[key] = load_dataset(d)
    return _RAW_CACHE[key]


def member_test_images(run: Run) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(uint8 images as the member saw them, labels, dataset indices) of the member's test split."""
    sel_path = run.path / "selection.json"
    if not sel_path.is_file():
        raise EnsembleError(f"{run.path}: no selection.json, so its test images are unknown")
    sel = json.loads(sel_path.read_text())
    idx = [int(i) for i in sel["test"]]
    raw = _raw_dataset(run)
    labels = raw.test_y[torch.tensor(idx, dtype=torch.long)]
    if "classes" in sel:  # data.classes: dataset class index -> this task's class index
        relabel = {c: i for i, c in enumerate(sel["classes"]["dataset_index"])}
        labels = torch.tensor([relabel[int(v)] for v in labels.tolist()], dtype=torch.long)
    x = raw.test_x[torch.tensor(idx, dtype=torch.long)]
    size = run.config.data.image_size
    if isinstance(x, FileImages):
        x, bad = decode_files(dataclasses.replace(x, resize=size))
        if bad:
            raise EnsembleError(f"{run.path}: {len(bad)} test image(s) cannot be read now:\n{format_problems([p for _, p in bad])}")
    elif size:
        x = resize_uint8(x, size)
    return x, labels, idx


# --------------------------------------------------------------------------------------------
# evaluation


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.inference_mode()
def member_probabilities(run: Run, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, float, Any]:
    """(softmax probabilities images × classes on the CPU, seconds of preprocessing + forward passes,
    the member's ``Preprocess``)."""
    cfg = run.config
    plain = run.load_model().to(device)
    batches = TensorBatches(x, y, cfg.train.eval_batch_size, plain.preprocess(), device, channels_last=cfg.model.channels_last)
    model = with_tta(plain, cfg.train.tta)  # as the member's own run was tested
    out = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with _autocast(cfg.train.precision, device):
        for xb, _ in batches:
            out.append(model(xb).float().softmax(1))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return torch.cat(out).cpu(), seconds, batches.preprocess


def _load_member(path: Path) -> Run:
    run = load_run(path)
    if run.record.kind == "ensemble":
        raise EnsembleError(f"{path}: an ensemble, not a finished single-model run (list its members instead)")
    return run


@dataclass
class EnsembleResult:
    """The ensemble's result (what ``metrics.json`` holds) and its predictions."""

    record: RunMetrics
    predictions: torch.Tensor
    labels: torch.Tensor
    member_predictions: torch.Tensor
    """members × images: each member's own top class."""

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record.to_dict()


def _same_task(m: Run, first: Run, ref_idx: list[int] | None, ref_y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The member's test images, labels and indices, checked to be those of the first member."""
    names = first.class_names
    if m.class_names != names:
        raise EnsembleError(
            f"{m.path}: class names differ from {first.path}: expected {names[:10]}{' …' if len(names) > 10 else ''}, "
            f"found {m.class_names[:10]}{' …' if len(m.class_names) > 10 else ''}"
        )
    x, y, idx = member_test_images(m)
    if ref_idx is not None and (idx != ref_idx or m.config.data.dataset != first.config.data.dataset or not torch.equal(y, ref_y)):
        raise EnsembleError(
            f"{m.path}: tested on other images than {first.path} ({m.config.data.dataset}, {len(idx)} test images vs "
            f"{first.config.data.dataset}, {len(ref_idx)}): members must share dataset, data.classes and data.test_subset"
        )
    return x, y, idx


def _metrics(preds: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, Any]:
    return {
        "acc": float(MulticlassAccuracy(num_classes, average="micro")(preds, y)),
        "per_class_acc": [float(v) for v in MulticlassAccuracy(num_classes, average="none")(preds, y)],
        "confusion_matrix": MulticlassConfusionMatrix(num_classes)(preds, y).tolist(),
    }


def evaluate_ensemble(
    runs: Sequence[str | Path | Run], vote: str = "hard", device: str | torch.device = "auto", console: Console | None = None
) -> EnsembleResult:
    """Evaluate a ``vote`` ensemble of finished runs on their (common) test images."""
    console = console or Console(quiet=True)
    if vote not in VOTES:
        raise ValueError(f"unknown vote {vote!r}; use one of {', '.join(VOTES)}")
    members = [r if isinstance(r, Run) else _load_member(Path(r)) for r in runs]
    if len(members) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 runs, got {len(members)}")
    for m in members:
        if not m.ok or m.record.kind == "ensemble":
            raise EnsembleError(f"{m.path}: not a finished single-model run (status {m.record.status!r}, kind {m.record.kind!r})")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else device)
    first = members[0]
    names = first.class_names
    all_probs, seconds, rows = [], 0.0, []
    ref_idx: list[int] | None = None
    ref_y: torch.Tensor | None = None
    wall0 = time.perf_counter()
    for m in members:
        x, y, idx = _same_task(m, first, ref_idx, ref_y)
        ref_idx, ref_y = idx, y
        probs, s, pre = member_probabilities(m, x, y, dev)
        seconds += s
        all_probs.append(probs)
        acc = _metrics(probs.argmax(1), y, len(names))["acc"]  # torchmetrics, as the member's own run computed it
        rows.append({
            "run": str(m.path), "experiment": m.record.experiment, "backbone": m.config.model.backbone, "image_size": int(x.shape[-1]),
            "normalization": {"mean": list(pre.mean), "std": list(pre.std)}, "test_acc": acc,
            "recorded_test_acc": m.record.test_acc, "inference_seconds": s,
        })
        console.print(f"  member {m.path.name}: {m.config.model.backbone} at {x.shape[-1]}px, test acc {acc:.4f}")
    assert ref_y is not None
    probs = torch.stack(all_probs)
    preds, ties = combine_votes(probs, vote)
    k = len(names)
    metrics_ = _metrics(preds, ref_y, k)
    mean = probs.mean(0)
    top5 = float(MulticlassAccuracy(k, top_k=5, average="micro")(mean, ref_y)) if vote == "soft" and k > 5 else None
    loss = float(F.nll_loss(mean.clamp_min(1e-12).log(), ref_y)) if vote == "soft" else None
    n = len(ref_y)
    m = RunMetrics(
        status="ok", kind="ensemble", seed=first.config.seed, backbone="+".join(r.config.model.backbone for r in members),
        weights="ensemble of runs", strategy=f"{vote} vote", head="—", dataset=first.config.data.dataset,
        image_size=rows[0]["image_size"], n_train=first.record.n_train, n_val=first.record.n_val, n_test=n, class_names=names,
        test_acc=metrics_["acc"], test_top5=top5, test_loss=loss, per_class_acc=metrics_["per_class_acc"],
        confusion_matrix=metrics_["confusion_matrix"], epochs_run=0,
        train_seconds=float(sum(r.record.train_seconds or 0.0 for r in members)), data_seconds=0.0,
        wall_seconds=time.perf_counter() - wall0, inference_images_per_s=n / seconds if seconds > 0 else float("nan"),
        total_params=int(sum(r.record.total_params or 0 for r in members)), trainable_params=0, device=str(dev),
        code_version=code_version(),
    )
    m.extra.update(vote=vote, vote_ties=ties, tie_rule=TIE_RULES[vote], members=rows, inference_seconds=seconds)
    if vote == "soft":  # the mean probability is the ensemble's prediction: its calibration, as a run's (hard votes have none)
        sums = CalibrationSums(k, mean.device)
        sums.update(mean.clamp_min(1e-12).log(), ref_y)  # softmax(log p) = p
        m.add(calibration_part(Calibration.from_sums(sums.compute(sums.sums, n))))
    return EnsembleResult(m, preds, ref_y, probs.argmax(2))


TIE_RULES = {
    "hard": "hard: most votes; tied classes -> highest summed probability, then lowest class index",
    "soft": "soft: highest mean probability; exact ties -> lowest class index",
}


class EnsembleKind(Kind):
    """A hard or soft vote of finished runs, evaluated on their common test images."""

    name = "ensemble"
    uses = KindUses(data=False, model=False, members=True, folds=False)  # votes of finished runs, on their test images

    def snapshot(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """Only what an ensemble is: its name, members, vote (the data, model and training are the members')."""
        d = cfg.to_dict()
        return {k: d[k] for k in ("name", "seed", "kind", "notes", "ensemble", "sweep")} | {"train": {"accelerator": cfg.train.accelerator}}

    def run(self, cfg: ExperimentConfig, ctx: RunContext) -> RunMetrics:
        ens = cfg.ensemble
        ctx.begin()
        spec = {"name": cfg.name, "vote": ens.vote, "members": list(ens.members), "notes": cfg.notes}
        ctx.rundir.write_text("ensemble.yaml", yaml.safe_dump(spec, sort_keys=False))
        ctx.console.print(f"[bold]{cfg.name}[/]: {ens.vote} vote of {len(ens.members)} runs")
        result = evaluate_ensemble(ens.members, ens.vote, device=cfg.train.accelerator, console=ctx.console)
        m = result.record
        m.experiment = cfg.name
        m.notes = cfg.notes or f"{ens.vote} vote of " + ", ".join(Path(r).name for r in ens.members)
        ctx.console.print(
            f"  [green]{cfg.name}[/]: test acc {m.test_acc:.4f} (members "
            + ", ".join(f"{r['test_acc']:.4f}" for r in m.extra["members"])
            + f"), {m.extra['vote_ties']} tied votes, inference {m.inference_images_per_s:.0f} img/s -> {ctx.rundir.path}"
        )
        return m


KINDS.register("ensemble", EnsembleKind())


def run_ensemble(
    runs: Sequence[str | Path],
    out_dir: str | Path,
    vote: str = "hard",
    name: str | None = None,
    notes: str = "",
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    console: Console | None = None,
) -> dict[str, Any]:
    """Evaluate an ensemble of ``runs`` and write it as run directory ``out_dir``; returns its metrics.

    Like ``run_experiment`` (it is one, of ``kind: ensemble``): an existing finished directory is
    skipped with ``resume``, replaced with ``overwrite``, and an error otherwise.
    """
    out = Path(out_dir)
    cfg = ExperimentConfig(
        name=name or out.name, kind="ensemble", notes=notes, train=TrainConfig(accelerator=device),
        ensemble=EnsembleSpec(members=[str(Path(r)) for r in runs], vote=vote),
    )
    cfg.validate()
    return run_experiment(cfg, out, resume=resume, overwrite=overwrite, console=console)
