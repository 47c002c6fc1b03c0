"""Rank candidate backbones for a dataset before any fine-tuning (``transferlab rank``).

Every candidate's frozen pooled features of a small stratified subset are computed once; then cheap
transferability scores say which backbone will likely transfer best:

* ``logme``    — LogME (You et al., 2021): log marginal evidence of a Bayesian linear model from the
  training features to the labels (``transferlab.engine.probes.logme``);
* ``knn``      — validation accuracy of weighted cosine k-NN fitted on the training features (k chosen
  on val);
* ``logistic`` — validation accuracy of the L-BFGS logistic probe (L2 chosen on val; the slowest).

Higher is better for all three; each is registered in ``SCORES``. Candidates are sorted by the first
score asked for. On multi-label data (``data.task: multilabel``) the k-NN and logistic scores are the validation
macro mAP (one-vs-rest, ``transferlab.engine.probes``) and LogME is the mean evidence over the label columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from transferlab.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, ProbeConfig, TrainConfig
from transferlab.data.prepare import prepare_splits
from transferlab.engine.distributed import make_fabric
from transferlab.engine.features import frozen_features
from transferlab.engine.features.store import FeatureSet, state_hash
from transferlab.engine.probes import fit_knn, fit_logistic, logme
from transferlab.models.model import build_model
from transferlab.registry import Registry
from transferlab.strategies import linear_probe

__all__ = ["SCORES", "Candidate", "RankResult", "RankRow", "parse_candidates", "print_ranking", "rank_backbones"]

ScoreFn = Callable[[FeatureSet, FeatureSet, int, ProbeConfig, torch.device], tuple[float, dict[str, Any]]]
SCORES: Registry[ScoreFn] = Registry("score", "transferlab rank --scores: transferability scores")


@SCORES.register("logme")
def logme_score(tr: FeatureSet, va: FeatureSet, num_classes: int, probe: ProbeConfig, device: torch.device) -> tuple[float, dict[str, Any]]:
    """LogME evidence of the training features (no validation split needed)."""
    return logme(tr.features, tr.labels), {}


@SCORES.register("knn")
def knn_score(tr: FeatureSet, va: FeatureSet, num_classes: int, probe: ProbeConfig, device: torch.device) -> tuple[float, dict[str, Any]]:
    """Validation accuracy of weighted cosine k-NN (k chosen on val); multi-label: validation macro mAP."""
    res = fit_knn(tr.features, tr.labels, va.features, va.labels, num_classes, probe.k, probe.temperature, device)
    return res.score, {"knn_k": res.k}


@SCORES.register("logistic")
def logistic_score(tr: FeatureSet, va: FeatureSet, num_classes: int, probe: ProbeConfig, device: torch.device) -> tuple[float, dict[str, Any]]:
    """Validation accuracy of the L-BFGS logistic probe (L2 chosen on val; the slowest); multi-label: one-vs-rest,
    validation macro mAP."""
    res = fit_logistic(tr.features, tr.labels, va.features, va.labels, num_classes, probe.l2, probe.max_iter, device)
    return res.score, {"logistic_l2": res.l2}


@dataclass(frozen=True)
class Candidate:
    """A backbone and its weights source (``model.backbone`` / ``model.weights``)."""

    backbone: str
    weights: str

    def __str__(self) -> str:
        return f"{self.backbone}:{self.weights}"


def parse_candidates(spec: str | list[str], default_weights: str = "imagenet") -> list[Candidate]:
    """``"resnet18,tf_efficientnet_lite0:embedded"`` -> candidates; ``name:weights`` overrides ``default_weights``
    (``weights`` is anything ``model.weights`` accepts: scratch, imagenet, embedded, file:<path>)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if len(items) < 1:
        raise ConfigError("--backbones: give at least one backbone, e.g. resnet18,tf_efficientnet_lite0:embedded")
    out = []
    for item in items:
        name, _, weights = item.partition(":")
        cand = Candidate(name, weights or default_weights)
        if cand in out:
            raise ConfigError(f"--backbones: {cand} is listed twice")
        out.append(cand)
    return out


@dataclass
class RankRow:
    """One candidate's scores, best k, feature width and the time it took (features + scores)."""

    candidate: Candidate
    scores: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    feature_dim: int = 0
    feature_seconds: float = 0.0
    seconds: float = 0.0


@dataclass
class RankResult:
    """Candidates sorted best first by ``by``; sizes of the subsets used; total time."""

    rows: list[RankRow]
    by: str
    scores: list[str]
    n_train: int
    n_val: int
    seconds: float
    task: str = "multiclass"
    """``data.task``: the k-NN and logistic scores are accuracies (``multiclass``) or macro mAPs (``multilabel``)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "scores": self.scores,
            "task": self.task,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "seconds": self.seconds,
            "ranking": [
                {"rank": i + 1, "backbone": r.candidate.backbone, "weights": r.candidate.weights, "scores": r.scores,
                 "details": r.details, "feature_dim": r.feature_dim, "feature_seconds": r.feature_seconds, "seconds": r.seconds}
                for i, r in enumerate(self.rows)
            ],
        }


def rank_backbones(
    data: DataConfig,
    candidates: list[Candidate],
    scores: list[str] | tuple[str, ...] = ("logme", "knn"),
    seed: int = 0,
    accelerator: str = "auto",
    precision: str = "32-true",
    batch_size: int = 256,
    probe: ProbeConfig | None = None,
    console: Console | None = None,
) -> RankResult:
    """Score every candidate on ``data`` (its train/val selection) without fine-tuning; best first.

    The data is prepared once (seeded, stratified); each backbone's features are computed once, in
    memory, and shared by the scores.
    """
    console = console or Console(quiet=True)
    scores = list(scores)
    bad = [s for s in scores if s not in SCORES]
    if bad or not scores:
        raise ConfigError(f"unknown score(s) {', '.join(bad) or '(none given)'}; available: {', '.join(SCORES.names())}")
    score_fns = {s: SCORES.get(s) for s in scores}
    probe = probe or ProbeConfig()
    t_all = time.perf_counter()
    splits = prepare_splits(data, seed)
    rows = []
    for cand in candidates:
        t0 = time.perf_counter()
        cfg = ExperimentConfig(
            name=f"rank:{cand}", seed=seed, data=data, model=ModelConfig(backbone=cand.backbone, weights=cand.weights),
            train=TrainConfig(eval_batch_size=batch_size, accelerator=accelerator, precision=precision, progress=False),
        )
        fabric = make_fabric(cfg)
        model, _ = build_model(cfg.model, cfg.head, splits.num_classes)
        linear_probe(model, cfg.strategy)
        model.to(fabric.device).eval()
        device = fabric.device
        kw = dict(preprocess=model.preprocess(), device=device, channels_last=cfg.model.channels_last, num_workers=data.num_workers)
        weights = state_hash(model.backbone)
        tr, s1 = frozen_features(model, splits, "train", cfg, device, kw, None, fabric.autocast, weights=weights)
        va, s2 = frozen_features(model, splits, "val", cfg, device, kw, None, fabric.autocast, weights=weights)
        row = RankRow(cand, {}, feature_dim=int(tr.features[0].numel()), feature_seconds=s1 + s2)
        for score, fn in score_fns.items():
            row.scores[score], details = fn(tr, va, splits.num_classes, probe, device)
            row.details.update(details)
        row.seconds = time.perf_counter() - t0
        console.print(f"  {cand}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.scores.items()) + f" ({row.seconds:.1f}s)")
        rows.append(row)
    by = scores[0]
    rows.sort(key=lambda r: r.scores[by], reverse=True)
    return RankResult(rows, by, scores, len(splits.train_y), len(splits.val_y), time.perf_counter() - t_all, data.task)


def print_ranking(result: RankResult, console: Console, title: str = "") -> None:
    """The ranking as a table, best first, with each candidate's time and the total time."""
    val = "val mAP" if result.task == "multilabel" else "val acc"
    names = {"logme": "LogME", "knn": f"k-NN {val}", "logistic": f"logistic {val}"}
    table = Table(title=title or f"backbone ranking by {names[result.by]} ({result.n_train} train / {result.n_val} val images)")
    table.add_column("rank", justify="right")
    table.add_column("backbone")
    table.add_column("weights")
    for s in result.scores:
        table.add_column(names[s], justify="right")
    table.add_column("feature dim", justify="right")
    table.add_column("time (s)", justify="right")
    for i, r in enumerate(result.rows):
        cells = []
        for s in result.scores:
            v = r.scores[s]
            if s == "logme":
                cells.append(f"{v:.4f}")
            elif s == "knn":
                cells.append(f"{100 * v:.2f}% (k={r.details['knn_k']})")
            else:
                cells.append(f"{100 * v:.2f}% (l2={r.details['logistic_l2']:g})")
        table.add_row(str(i + 1), r.candidate.backbone, r.candidate.weights, *cells, str(r.feature_dim), f"{r.seconds:.1f}")
    console.print(table)
    console.print(f"ranked {len(result.rows)} backbones in {result.seconds:.1f}s (data preparation included)")
