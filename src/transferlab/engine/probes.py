"""Classifiers on frozen backbone features: an L-BFGS logistic probe, weighted k-NN, LogME.

``kind: logistic`` fits multinomial logistic regression on the backbone's pooled features with
torch's L-BFGS (full batch, strong-Wolfe line search), on the run's device (CPU or GPU). The L2
strength is chosen on the validation split from ``probe.l2`` — the protocol of the CLIP and DINOv2
linear-probe tables: features standardised with the training mean/std, loss = mean cross-entropy +
l2/2·‖W‖² (bias not penalised), strengths tried from strongest to weakest with warm starts; the
classifier trained on the training split with the best validation accuracy is kept, folded back
into an ordinary linear head, and saved as the run's checkpoint (``load_run(...).load_model()``).

``kind: knn`` classifies by the ``k`` most cosine-similar training features, each voting with weight
exp(similarity / temperature) (the weighted k-NN of DINO); ``k`` is chosen on the validation split.

Multi-label targets (N×K multi-hot float tensors, ``data.task: multilabel``) are handled by the same functions: the
logistic probe becomes one-vs-rest (K independent binary logistic regressions, fitted jointly since they share no
parameter: the sum over classes of the mean BCE + l2/2·‖W‖², i.e. scikit-learn's ``OneVsRestClassifier(
LogisticRegression(C=1/(l2·N)))``), the k-NN vote the similarity-weighted mean of the neighbours' label vectors (a
score per class), and both choose on the validation macro mAP instead of the accuracy (``ProbeTask``).

The ``logistic`` and ``knn`` experiment kinds (``transferlab.kinds``) run these on cached features;
``logme`` is the LogME transferability score used by ``transferlab rank``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.engine.multilabel import multilabel_scores

__all__ = [
    "ChosenOnVal",
    "KNNClassifier",
    "KNNResult",
    "LogisticResult",
    "ProbeTask",
    "fit_knn",
    "fit_logistic",
    "knn_topk",
    "logme",
    "vote_logits",
]


# --------------------------------------------------------------------------------------------
# the task: what a probe optimises and how it is scored on validation


@dataclass(frozen=True)
class ProbeTask:
    """Multiclass (int64 labels: softmax, accuracy) or multi-label (N×K 0/1 float targets: a sigmoid per class, macro
    mAP) — told apart by the targets' shape, as everywhere (``y.ndim == 2``)."""

    multilabel: bool

    @classmethod
    def of(cls, y: torch.Tensor) -> ProbeTask:
        return cls(y.ndim == 2)

    @property
    def metric(self) -> str:
        """The name of the score a probe is chosen by: ``acc`` or ``map`` (``val_acc`` / ``val_map`` in the sweep)."""
        return "map" if self.multilabel else "acc"

    def objective(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The data term the L-BFGS probe minimises: the mean over images of the per-image loss (multi-label: the BCE
        summed over classes, so each class is a binary logistic regression with the multiclass probe's l2 scale)."""
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / len(y)
        return F.cross_entropy(logits, y)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        """The loss the sweep reports, as the run's ``test_loss`` is defined: mean cross-entropy, or mean BCE over
        image-label pairs."""
        if self.multilabel:
            return float(F.binary_cross_entropy_with_logits(logits, y))
        return float(F.cross_entropy(logits, y))

    def score(self, probs: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy, or macro mAP over the classes with a positive (``engine.multilabel``, torchmetrics), of the
        class scores ``probs`` (multi-label: probabilities; for the accuracy only their argmax counts). NaN when no
        validation image has a label."""
        if self.multilabel:
            found = multilabel_scores(probs.cpu(), y.cpu(), [0.5] * y.shape[1])["map"]
            return float("nan") if found is None else float(found)
        return float((probs.argmax(1) == y).float().mean())

    def row(self, split: str, logits: torch.Tensor, y: torch.Tensor, probs: torch.Tensor | None = None) -> dict[str, float]:
        """``{<split>_loss, <split>_acc | <split>_map}`` of a sweep row (scored on ``probs`` when given: a vote's own
        probabilities, not their round trip through logits)."""
        if probs is None:
            probs = logits.sigmoid() if self.multilabel else logits  # the accuracy needs only the argmax
        return {f"{split}_loss": self.loss(logits, y), f"{split}_{self.metric}": self.score(probs, y)}


class ChosenOnVal:
    """What a probe chosen on validation reports: ``score`` of the ``monitor`` (``val_acc``, or ``val_map`` for
    multi-label targets); ``val_acc`` reads it for a multiclass probe."""

    score: float
    monitor: str

    @property
    def val_acc(self) -> float:
        """The validation accuracy of a multiclass probe (``score``)."""
        if self.monitor != "val_acc":
            raise AttributeError(f"a multi-label probe has no accuracy: its validation score is {self.monitor} (.score)")
        return self.score


# --------------------------------------------------------------------------------------------
# logistic regression by L-BFGS


@dataclass
class LogisticResult(ChosenOnVal):
    """The chosen classifier (on raw, unstandardised features) and the validation sweep."""

    weight: torch.Tensor
    """num_classes × D, applies to raw features (the standardisation is folded in)."""
    bias: torch.Tensor
    l2: float
    score: float
    """The chosen strength's validation score (``monitor``): accuracy, or macro mAP for multi-label targets."""
    sweep: list[dict[str, float]] = field(default_factory=list)
    """Per L2 strength: l2, train_loss, train_acc (train_map), val_loss, val_acc (val_map), iterations, seconds."""
    monitor: str = "val_acc"
    """``val_acc`` or (multi-label) ``val_map``."""


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))


def fit_logistic(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    l2_grid: list[float],
    max_iter: int = 1000,
    device: torch.device | str = "cpu",
) -> LogisticResult:
    """Logistic regression by L-BFGS; the L2 strength with the best validation score wins.

    Multinomial for int64 labels (chosen by accuracy); one-vs-rest for N×K multi-hot targets (chosen by macro mAP;
    ``ProbeTask``). Ties in the validation score go to the lower validation loss. Everything runs on ``device``.
    """
    device = torch.device(device)
    task = ProbeTask.of(train_y)
    xt = train_x.to(device, torch.float32).flatten(1)
    xv = val_x.to(device, torch.float32).flatten(1)
    yt, yv = train_y.to(device), val_y.to(device)
    mean, std = _standardise(xt)
    xt, xv = (xt - mean) / std, (xv - mean) / std
    w = torch.zeros(num_classes, xt.shape[1], device=device, requires_grad=True)
    b = torch.zeros(num_classes, device=device, requires_grad=True)
    best: tuple[float, float, torch.Tensor, torch.Tensor, float] | None = None
    sweep = []
    val_key = f"val_{task.metric}"
    for l2 in sorted(set(l2_grid), reverse=True):  # strongest first: each warm-starts the next
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                                tolerance_change=1e-10, line_search_fn="strong_wolfe")

        def closure(opt: torch.optim.LBFGS = opt, l2: float = l2) -> torch.Tensor:  # bound now, not at call time
            opt.zero_grad()
            loss = task.objective(xt @ w.T + b, yt) + 0.5 * l2 * (w * w).sum()
            loss.backward()
            return loss

        t0 = time.perf_counter()
        opt.step(closure)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            row = {"l2": float(l2), **task.row("train", xt @ w.T + b, yt), **task.row("val", xv @ w.T + b, yv),
                   "iterations": float(opt.state[w].get("n_iter", 0)), "seconds": seconds}
        sweep.append(row)
        if best is None or (row[val_key], -row["val_loss"]) > (best[0], -best[1]):
            best = (row[val_key], row["val_loss"], w.detach().clone(), b.detach().clone(), float(l2))
    assert best is not None
    score, _, wb, bb, l2 = best
    weight = wb / std  # fold the standardisation into the linear layer
    bias = bb - weight @ mean
    return LogisticResult(weight.cpu(), bias.cpu(), l2, score, sweep, val_key)


# --------------------------------------------------------------------------------------------
# weighted k-NN (cosine)


def knn_topk(train_x: torch.Tensor, query_x: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine similarities, indices) of the ``k`` nearest training rows of every query, in chunks."""
    t = F.normalize(train_x.flatten(1).float(), dim=1)
    sims, idxs = [], []
    for i in range(0, len(query_x), chunk):
        q = F.normalize(query_x[i : i + chunk].flatten(1).float().to(t.device), dim=1)
        s, j = (q @ t.T).topk(min(k, len(t)), dim=1)
        sims.append(s)
        idxs.append(j)
    return torch.cat(sims), torch.cat(idxs)


def _vote(sims: torch.Tensor, nbr_labels: torch.Tensor, k: int, num_classes: int, temperature: float) -> torch.Tensor:
    """Class probabilities from the first ``k`` neighbours, weighted by exp(similarity / temperature).

    Multi-label neighbours (``nbr_labels`` queries × neighbours × K) give the weighted mean of their label vectors: each
    class's score is the weighted share of neighbours that have it — the multiclass vote is the same mean of one-hot
    vectors."""
    s = sims[:, :k]
    weights = torch.exp((s - s[:, :1]) / temperature)  # shifted by the best similarity: no overflow, same ratios
    if nbr_labels.ndim == 3:  # summed in float64: a label all k neighbours have scores exactly 1 (a float32 sum is
        # sometimes 1 ulp off, which splits a real tie of the scores and moves the mAP)
        w = weights.double()
        return ((w.unsqueeze(2) * nbr_labels[:, :k].double()).sum(1) / w.sum(1, keepdim=True)).float()
    votes = torch.zeros(len(s), num_classes, device=s.device).scatter_add_(1, nbr_labels[:, :k], weights)
    return votes / votes.sum(1, keepdim=True)


def vote_logits(p: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Vote probabilities as logits: ``log p`` (softmax gives ``p`` back) or, multi-label, ``logit p`` (the sigmoid
    does), clamped so that a unanimous vote stays finite."""
    if multilabel:
        return torch.logit(p, eps=1e-7)
    return torch.log(p.clamp_min(1e-12))


@dataclass
class KNNResult(ChosenOnVal):
    k: int
    score: float
    """The chosen k's validation score (``monitor``): accuracy, or macro mAP for multi-label targets."""
    sweep: list[dict[str, float]] = field(default_factory=list)
    """Per k: k, val_acc (val_map), val_loss (negative log-likelihood of the vote distribution; multi-label: its BCE)."""
    monitor: str = "val_acc"


def fit_knn(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    k_grid: list[int],
    temperature: float = 0.07,
    device: torch.device | str = "cpu",
) -> KNNResult:
    """Choose ``k`` (cosine, weighted votes) on the validation split — by accuracy, or macro mAP for multi-label
    targets; ties go to the smaller k."""
    device = torch.device(device)
    task = ProbeTask.of(train_y)
    ks = sorted({min(k, len(train_x)) for k in k_grid})
    sims, idx = knn_topk(train_x.to(device), val_x.to(device), max(ks))
    labels = train_y.to(device)[idx]
    yv = val_y.to(device)
    sweep, best = [], None
    for k in ks:
        p = _vote(sims, labels, k, num_classes, temperature)
        row = {"k": float(k), **task.row("val", vote_logits(p, task.multilabel), yv, p)}
        sweep.append(row)
        if best is None or row[f"val_{task.metric}"] > best.score:
            best = KNNResult(k, row[f"val_{task.metric}"], monitor=f"val_{task.metric}")
    assert best is not None
    best.sweep = sweep
    return best


class KNNClassifier(nn.Module):
    """Weighted cosine k-NN as a module: features -> log class probabilities (usable with ``evaluate``); multi-label
    training targets (N×K) -> the logits of the per-class vote shares (``vote_logits``)."""

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, k: int, num_classes: int, temperature: float = 0.07) -> None:
        super().__init__()
        self.multilabel = ProbeTask.of(train_y).multilabel
        self.register_buffer("train_x", F.normalize(train_x.flatten(1).float(), dim=1), persistent=False)
        self.register_buffer("train_y", train_y.float() if self.multilabel else train_y.long(), persistent=False)
        self.k, self.num_classes, self.temperature = k, num_classes, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sims, idx = knn_topk(self.train_x, x, self.k)
        p = _vote(sims, self.train_y[idx], self.k, self.num_classes, self.temperature)
        return vote_logits(p, self.multilabel)


# --------------------------------------------------------------------------------------------
# LogME


def logme(features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """LogME (You et al., ICML 2021; the fixed-point form of arXiv:2110.10545): the mean over classes of the
    log marginal evidence per sample of a Bayesian linear regression from features to one-hot labels (multi-label:
    the mean over the multi-hot target columns, as the paper treats a target of several dimensions).

    Higher is better; values compare backbones on one task. Computed in float64 from one SVD. The
    evidence counts every feature dimension (zero singular values included), which equals the
    reference implementation whenever there are at least as many samples as dimensions.
    """
    f = torch.as_tensor(features).flatten(1).double().cpu()
    y = torch.as_tensor(labels).cpu()
    targets = y.double() if y.ndim == 2 else F.one_hot(y.long()).double()  # a column per class
    n, d = f.shape
    _, s, vh = torch.linalg.svd(f, full_matrices=False)
    u = f @ vh.T / s.clamp_min(1e-12)  # left singular vectors, without the N×N matrix
    keep = s > 1e-10 * s.max()
    u, sigma = u[:, keep], (s[keep] ** 2)
    k = len(sigma)
    evidences = []
    for c in range(targets.shape[1]):
        yc = targets[:, c]
        x2 = (u.T @ yc) ** 2
        res_x2 = float((yc * yc).sum() - x2.sum())  # the part of y outside the span of the features
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
            res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + res_x2
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        log_det = float(torch.log(alpha + beta * sigma).sum()) + (d - k) * math.log(alpha)
        evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - log_det / 2 - beta / 2 * res2
                    - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))
