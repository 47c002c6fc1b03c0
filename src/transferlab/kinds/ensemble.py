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

Multi-label members (``data.task: multilabel``, told by their ``metrics.json``) vote per label:

* ``soft`` — the mean of the members' sigmoid probabilities. Its thresholds are chosen on the *validation* images
  (the members' ``selection.json``), from the mean of the members' validation probabilities, the way the members
  chose theirs (their recorded ``threshold_mode``; an ensemble experiment with ``data.task: multilabel`` uses its own
  ``train.threshold``) — never on test.
* ``hard`` — each member predicts a label at its own thresholds (chosen on validation by its run, in its
  ``metrics.json``); the ensemble predicts a label that a strict majority of the members predicts (an exact half is
  not a majority). The share of members voting for a label is its score (the mAP ranks images by it), and the
  recorded threshold is the smallest strict-majority share, (⌊m/2⌋ + 1) / m for m members (``threshold_mode:
  fixed``).

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
from transferlab.engine.multilabel import MultilabelEvaluation, choose_thresholds, multilabel_part, multilabel_scores, predicted
from transferlab.kinds.base import KINDS, Kind, RunContext, run_experiment
from transferlab.kinds.common import calibration_part, multilabel_test_part
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


def member_test_images(run: Run, split: str = "test") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(uint8 images as the member saw them, labels, dataset indices) of the member's test split (``split="val"``: its
    validation split). Multi-label labels are N×K multi-hot rows."""
    sel_path = run.path / "selection.json"
    if not sel_path.is_file():
        raise EnsembleError(f"{run.path}: no selection.json, so its {split} images are unknown")
    sel = json.loads(sel_path.read_text())
    idx = [int(i) for i in sel[split]]
    raw = _raw_dataset(run)
    if split == "test":
        xs, ys = raw.test_x, raw.test_y
    else:  # the validation images: the dataset's own split, or held out of its training split
        xs, ys = (raw.val_x, raw.val_y) if sel.get("val_from") == "dataset" else (raw.train_x, raw.train_y)
    labels = ys[torch.tensor(idx, dtype=torch.long)]
    if "classes" in sel:  # data.classes: dataset class index -> this task's class index
        if labels.ndim == 2:  # multi-label: the task's columns of the multi-hot rows
            labels = labels[:, torch.tensor(sel["classes"]["dataset_index"], dtype=torch.long)]
        else:
            relabel = {c: i for i, c in enumerate(sel["classes"]["dataset_index"])}
            labels = torch.tensor([relabel[int(v)] for v in labels.tolist()], dtype=torch.long)
    x = xs[torch.tensor(idx, dtype=torch.long)]
    size = run.config.data.image_size
    if isinstance(x, FileImages):
        x, bad = decode_files(dataclasses.replace(x, resize=size))
        if bad:
            raise EnsembleError(f"{run.path}: {len(bad)} {split} image(s) cannot be read now:\n{format_problems([p for _, p in bad])}")
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
    """(softmax probabilities images × classes on the CPU — multi-label labels ``y`` (N×K): sigmoid probabilities —,
    seconds of preprocessing + forward passes, the member's ``Preprocess``)."""
    cfg = run.config
    multilabel = y.ndim == 2
    plain = run.load_model().to(device)
    batches = TensorBatches(x, y, cfg.train.eval_batch_size, plain.preprocess(), device, channels_last=cfg.model.channels_last)
    model = with_tta(plain, cfg.train.tta, multilabel)  # as the member's own run was tested
    out = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with _autocast(cfg.train.precision, device):
        for xb, _ in batches:
            logits = model(xb).float()
            out.append(logits.sigmoid() if multilabel else logits.softmax(1))
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
    """The predicted class per image (multi-label: images × classes 0/1 at the ensemble's thresholds)."""
    labels: torch.Tensor
    member_predictions: torch.Tensor
    """members × images: each member's own top class (multi-label: members × images × classes 0/1, each member at its
    own thresholds)."""

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record.to_dict()


def _same_task(m: Run, first: Run, ref_idx: list[int] | None, ref_y: torch.Tensor | None,
               split: str = "test") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The member's test (or ``split``) images, labels and indices, checked to be those of the first member."""
    names = first.class_names
    if m.class_names != names:
        raise EnsembleError(
            f"{m.path}: class names differ from {first.path}: expected {names[:10]}{' …' if len(names) > 10 else ''}, "
            f"found {m.class_names[:10]}{' …' if len(m.class_names) > 10 else ''}"
        )
    x, y, idx = member_test_images(m, split)
    if ref_idx is not None and (idx != ref_idx or m.config.data.dataset != first.config.data.dataset or not torch.equal(y, ref_y)):
        raise EnsembleError(
            f"{m.path}: {'tested' if split == 'test' else 'validated'} on other images than {first.path} ({m.config.data.dataset}, "
            f"{len(idx)} {split} images vs {first.config.data.dataset}, {len(ref_idx)}): members must share dataset, data.classes and "
            + ("data.test_subset" if split == "test" else "their validation split (data.val_fraction, seed)")
        )
    return x, y, idx


def _metrics(preds: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, Any]:
    return {
        "acc": float(MulticlassAccuracy(num_classes, average="micro")(preds, y)),
        "per_class_acc": [float(v) for v in MulticlassAccuracy(num_classes, average="none")(preds, y)],
        "confusion_matrix": MulticlassConfusionMatrix(num_classes)(preds, y).tolist(),
    }


def _record(members: Sequence[Run], vote: str, rows: list[dict[str, Any]], n: int, seconds: float, dev: torch.device,
            wall0: float) -> RunMetrics:
    """What an ensemble's ``metrics.json`` holds besides its test metrics: the members' identity, costs and timings."""
    first = members[0]
    return RunMetrics(
        status="ok", kind="ensemble", seed=first.config.seed, backbone="+".join(r.config.model.backbone for r in members),
        weights="ensemble of runs", strategy=f"{vote} vote", head="—", dataset=first.config.data.dataset,
        image_size=rows[0]["image_size"], n_train=first.record.n_train, n_val=first.record.n_val, n_test=n,
        class_names=first.class_names, epochs_run=0, train_seconds=float(sum(r.record.train_seconds or 0.0 for r in members)),
        data_seconds=0.0, wall_seconds=time.perf_counter() - wall0, inference_images_per_s=n / seconds if seconds > 0 else float("nan"),
        total_params=int(sum(r.record.total_params or 0 for r in members)), trainable_params=0, device=str(dev),
        code_version=code_version(),
    )


def _member_row(m: Run, x: torch.Tensor, pre: Any, seconds: float, **scores: Any) -> dict[str, Any]:
    return {"run": str(m.path), "experiment": m.record.experiment, "backbone": m.config.model.backbone, "image_size": int(x.shape[-1]),
            "normalization": {"mean": list(pre.mean), "std": list(pre.std)}, **scores, "inference_seconds": seconds}


def _checked_members(runs: Sequence[str | Path | Run]) -> list[Run]:
    """The member runs: at least two finished single-model runs of one task."""
    members = [r if isinstance(r, Run) else _load_member(Path(r)) for r in runs]
    if len(members) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 runs, got {len(members)}")
    for m in members:
        if not m.ok or m.record.kind == "ensemble":
            raise EnsembleError(f"{m.path}: not a finished single-model run (status {m.record.status!r}, kind {m.record.kind!r})")
        if m.record.task != members[0].record.task:
            raise EnsembleError(f"{m.path}: a {m.record.task} run, {members[0].path} a {members[0].record.task} one: members share "
                                "data.task")
    return members


def evaluate_ensemble(
    runs: Sequence[str | Path | Run], vote: str = "hard", device: str | torch.device = "auto", console: Console | None = None,
    threshold: str | float | None = None,
) -> EnsembleResult:
    """Evaluate a ``vote`` ensemble of finished runs on their (common) test images.

    ``threshold``: for multi-label members, the soft vote's ``train.threshold`` (``None``: the members' own mode)."""
    console = console or Console(quiet=True)
    if vote not in VOTES:
        raise ValueError(f"unknown vote {vote!r}; use one of {', '.join(VOTES)}")
    members = _checked_members(runs)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else device)
    if members[0].record.task == "multilabel":
        return _multilabel_vote(members, vote, threshold, dev, console)
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
        rows.append(_member_row(m, x, pre, s, test_acc=acc, recorded_test_acc=m.record.test_acc))
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
    m = _record(members, vote, rows, n, seconds, dev, wall0).add({
        "test_acc": metrics_["acc"], "test_top5": top5, "test_loss": loss, "per_class_acc": metrics_["per_class_acc"],
        "confusion_matrix": metrics_["confusion_matrix"]})
    m.extra.update(vote=vote, vote_ties=ties, tie_rule=TIE_RULES[vote], members=rows, inference_seconds=seconds)
    if vote == "soft":  # the mean probability is the ensemble's prediction: its calibration, as a run's (hard votes have none)
        sums = CalibrationSums(k, mean.device)
        sums.update(mean.clamp_min(1e-12).log(), ref_y)  # softmax(log p) = p
        m.add(calibration_part(Calibration.from_sums(sums.compute(sums.sums, n))))
    return EnsembleResult(m, preds, ref_y, probs.argmax(2))


TIE_RULES = {
    "hard": "hard: most votes; tied classes -> highest summed probability, then lowest class index",
    "soft": "soft: highest mean probability; exact ties -> lowest class index",
    "multilabel hard": "hard, per label: predicted when a strict majority of the members predicts it at its own thresholds "
                       "(an exact half is not)",
    "multilabel soft": "soft, per label: mean sigmoid probability >= the threshold chosen on the mean validation probabilities",
}


# --------------------------------------------------------------------------------------------
# multi-label members: a vote per label


def _threshold_mode(threshold: str | float | None, first: Run) -> str | float:
    """The soft vote's ``train.threshold``: as given, else the way the first member chose its thresholds."""
    if threshold is not None:
        return threshold
    mode, recorded = first.record.threshold_mode, first.record.thresholds
    if mode == "fixed" and recorded:
        return float(recorded[0])
    return mode if mode in ("global", "per_class") else "global"


def _multilabel_vote(members: list[Run], vote: str, threshold: str | float | None, dev: torch.device,
                     console: Console) -> EnsembleResult:
    """The per-label vote of multi-label members (module docstring): members × images × classes probabilities on
    test; the soft vote's thresholds chosen on the members' mean validation probabilities."""
    first, wall0, seconds = members[0], time.perf_counter(), 0.0
    test_p, val_p, votes, rows = [], [], [], []
    ref: dict[str, tuple[list[int] | None, torch.Tensor | None]] = {"test": (None, None), "val": (None, None)}
    for m in members:
        if not m.record.thresholds:
            raise EnsembleError(f"{m.path}: a multi-label run without recorded thresholds (metrics.json 'thresholds')")
        x, y, idx = _same_task(m, first, *ref["test"])
        ref["test"] = (idx, y)
        probs, s, pre = member_probabilities(m, x, y, dev)
        seconds += s
        test_p.append(probs)
        votes.append(predicted(probs, m.record.thresholds))  # at the member's own validation-chosen thresholds
        own = multilabel_scores(probs, y, m.record.thresholds)["map"]
        rows.append(_member_row(m, x, pre, s, test_map=own, recorded_test_map=m.record.test_map, thresholds=m.record.thresholds))
        console.print(f"  member {m.path.name}: {m.config.model.backbone} at {x.shape[-1]}px, test mAP {own:.4f}")
        if vote == "soft":
            xv, yv, iv = _same_task(m, first, *ref["val"], split="val")
            ref["val"] = (iv, yv)
            val_p.append(member_probabilities(m, xv, yv, dev)[0])
    y = ref["test"][1]
    assert y is not None
    if vote == "soft":
        probs = torch.stack(test_p).mean(0)
        thresholds, mode = choose_thresholds(torch.stack(val_p).mean(0), ref["val"][1], _threshold_mode(threshold, first))
        loss = float(F.binary_cross_entropy(probs.double().clamp(1e-12, 1 - 1e-12), y.double()))
        chosen_on = "val: the mean of the members' validation probabilities"
    else:  # the share of members predicting a label, in float64: the strict-majority share compares exactly
        probs = torch.stack(votes).sum(0).double() / len(members)
        thresholds, mode, loss = [(len(members) // 2 + 1) / len(members)] * y.shape[1], "fixed", None
        chosen_on = "none: a strict majority of the members, each at its own validation-chosen thresholds"
    n, speed = len(y), len(y) / seconds if seconds > 0 else float("nan")
    scores = multilabel_scores(probs, y, thresholds)
    if vote == "soft":  # the mean probability is the ensemble's prediction: its per-class calibration, as a run's
        ev = MultilabelEvaluation(loss=loss, probs=probs.float(), targets=y.float(), n=n, seconds=seconds, images_per_s=speed,
                                  scores=scores, thresholds=thresholds)
        tested = multilabel_test_part(ev, mode)
    else:
        tested = multilabel_part(scores, thresholds, mode, loss, speed)
    m = _record(members, vote, rows, n, seconds, dev, wall0).add(tested)
    m.extra.update(vote=vote, tie_rule=TIE_RULES[f"multilabel {vote}"], members=rows, inference_seconds=seconds,
                   thresholds_chosen_on=chosen_on)
    return EnsembleResult(m, predicted(probs, thresholds), y, torch.stack(votes))


class EnsembleKind(Kind):
    """A hard or soft vote of finished runs, evaluated on their common test images."""

    name = "ensemble"
    # votes of finished runs, on their test images; multi-label members vote per label (the task is the members')
    uses = KindUses(data=False, model=False, members=True, folds=False, multilabel=True)

    def snapshot(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """Only what an ensemble is: its name, members, vote (the data, model and training are the members'); with
        ``data.task: multilabel`` also its ``train.threshold`` (how the soft vote's thresholds are chosen)."""
        d = cfg.to_dict()
        train: dict[str, Any] = {"accelerator": cfg.train.accelerator}
        if cfg.multilabel:
            train["threshold"] = cfg.train.threshold
        return {k: d[k] for k in ("name", "seed", "kind", "notes", "ensemble", "sweep")} | {"train": train}

    def run(self, cfg: ExperimentConfig, ctx: RunContext) -> RunMetrics:
        ens = cfg.ensemble
        ctx.begin()
        spec = {"name": cfg.name, "vote": ens.vote, "members": list(ens.members), "notes": cfg.notes}
        ctx.rundir.write_text("ensemble.yaml", yaml.safe_dump(spec, sort_keys=False))
        ctx.console.print(f"[bold]{cfg.name}[/]: {ens.vote} vote of {len(ens.members)} runs")
        threshold = cfg.train.threshold if cfg.multilabel else None
        result = evaluate_ensemble(ens.members, ens.vote, device=cfg.train.accelerator, console=ctx.console, threshold=threshold)
        m = result.record
        m.experiment = cfg.name
        m.notes = cfg.notes or f"{ens.vote} vote of " + ", ".join(Path(r).name for r in ens.members)
        metric = m.headline  # test_acc, or test_map of multi-label members
        ties = f", {m.extra['vote_ties']} tied votes" if "vote_ties" in m.extra else ""
        ctx.console.print(
            f"  [green]{cfg.name}[/]: {'test mAP' if m.task == 'multilabel' else 'test acc'} {getattr(m, metric):.4f} (members "
            + ", ".join(f"{r[metric]:.4f}" for r in m.extra["members"])
            + f"){ties}, inference {m.inference_images_per_s:.0f} img/s -> {ctx.rundir.path}"
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
