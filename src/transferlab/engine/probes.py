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

__all__ = [
    "KNNClassifier",
    "KNNResult",
    "LogisticResult",
    "fit_knn",
    "fit_logistic",
    "knn_topk",
    "logme",
]


# --------------------------------------------------------------------------------------------
# logistic regression by L-BFGS


@dataclass
class LogisticResult:
    """The chosen classifier (on raw, unstandardised features) and the validation sweep."""

    weight: torch.Tensor
    """num_classes × D, applies to raw features (the standardisation is folded in)."""
    bias: torch.Tensor
    l2: float
    val_acc: float
    sweep: list[dict[str, float]] = field(default_factory=list)
    """Per L2 strength: l2, train_loss, train_acc, val_loss, val_acc, iterations, seconds."""


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
    """Multinomial logistic regression by L-BFGS; the L2 strength with the best val accuracy wins.

    Ties in validation accuracy go to the lower validation loss. Everything runs on ``device``.
    """
    device = torch.device(device)
    xt = train_x.to(device, torch.float32).flatten(1)
    xv = val_x.to(device, torch.float32).flatten(1)
    yt, yv = train_y.to(device), val_y.to(device)
    mean, std = _standardise(xt)
    xt, xv = (xt - mean) / std, (xv - mean) / std
    w = torch.zeros(num_classes, xt.shape[1], device=device, requires_grad=True)
    b = torch.zeros(num_classes, device=device, requires_grad=True)
    best: tuple[float, float, torch.Tensor, torch.Tensor, float] | None = None
    sweep = []
    for l2 in sorted(set(l2_grid), reverse=True):  # strongest first: each warm-starts the next
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                                tolerance_change=1e-10, line_search_fn="strong_wolfe")

        def closure(opt: torch.optim.LBFGS = opt, l2: float = l2) -> torch.Tensor:  # bound now, not at call time
            opt.zero_grad()
            loss = F.cross_entropy(xt @ w.T + b, yt) + 0.5 * l2 * (w * w).sum()
            loss.backward()
            return loss

        t0 = time.perf_counter()
        opt.step(closure)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            lt, lv = xt @ w.T + b, xv @ w.T + b
            row = {
                "l2": float(l2),
                "train_loss": float(F.cross_entropy(lt, yt)),
                "train_acc": float((lt.argmax(1) == yt).float().mean()),
                "val_loss": float(F.cross_entropy(lv, yv)),
                "val_acc": float((lv.argmax(1) == yv).float().mean()),
                "iterations": float(opt.state[w].get("n_iter", 0)),
                "seconds": seconds,
            }
        sweep.append(row)
        if best is None or (row["val_acc"], -row["val_loss"]) > (best[0], -best[1]):
            best = (row["val_acc"], row["val_loss"], w.detach().clone(), b.detach().clone(), float(l2))
    assert best is not None
    val_acc, _, wb, bb, l2 = best
    weight = wb / std  # fold the standardisation into the linear layer
    bias = bb - weight @ mean
    return LogisticResult(weight.cpu(), bias.cpu(), l2, val_acc, sweep)


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
    """Class probabilities from the first ``k`` neighbours, weighted by exp(similarity / temperature)."""
    s = sims[:, :k]
    weights = torch.exp((s - s[:, :1]) / temperature)  # shifted by the best similarity: no overflow, same ratios
    votes = torch.zeros(len(s), num_classes, device=s.device).scatter_add_(1, nbr_labels[:, :k], weights)
    return votes / votes.sum(1, keepdim=True)


@dataclass
class KNNResult:
    k: int
    val_acc: float
    sweep: list[dict[str, float]] = field(default_factory=list)
    """Per k: k, val_acc, val_loss (negative log-likelihood of the vote distribution)."""


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
    """Choose ``k`` (cosine, weighted votes) on the validation split; ties go to the smaller k."""
    device = torch.device(device)
    ks = sorted({min(k, len(train_x)) for k in k_grid})
    sims, idx = knn_topk(train_x.to(device), val_x.to(device), max(ks))
    labels = train_y.to(device)[idx]
    yv = val_y.to(device)
    sweep, best = [], None
    for k in ks:
        p = _vote(sims, labels, k, num_classes, temperature)
        row = {
            "k": float(k),
            "val_acc": float((p.argmax(1) == yv).float().mean()),
            "val_loss": float(F.nll_loss(torch.log(p.clamp_min(1e-12)), yv)),
        }
        sweep.append(row)
        if best is None or row["val_acc"] > best.val_acc:
            best = KNNResult(k, row["val_acc"])
    assert best is not None
    best.sweep = sweep
    return best


class KNNClassifier(nn.Module):
    """Weighted cosine k-NN as a module: features -> log class probabilities (usable with ``evaluate``)."""

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, k: int, num_classes: int, temperature: float = 0.07) -> None:
        super().__init__()
        self.register_buffer("train_x", F.normalize(train_x.flatten(1).float(), dim=1), persistent=False)
        self.register_buffer("train_y", train_y.long(), persistent=False)
        self.k, self.num_classes, self.temperature = k, num_classes, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sims, idx = knn_topk(self.train_x, x, self.k)
        p = _vote(sims, self.train_y[idx], self.k, self.num_classes, self.temperature)
        return torch.log(p.clamp_min(1e-12))


# --------------------------------------------------------------------------------------------
# LogME


def logme(features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """LogME (You et al., ICML 2021; the fixed-point form of arXiv:2110.10545): the mean over classes of the
    log marginal evidence per sample of a Bayesian linear regression from features to one-hot labels.

    Higher is better; values compare backbones on one task. Computed in float64 from one SVD. The
    evidence counts every feature dimension (zero singular values included), which equals the
    reference implementation whenever there are at least as many samples as dimensions.
    """
    f = torch.as_tensor(features).flatten(1).double().cpu()
    y = torch.as_tensor(labels).long().cpu()
    n, d = f.shape
    _, s, vh = torch.linalg.svd(f, full_matrices=False)
    u = f @ vh.T / s.clamp_min(1e-12)  # left singular vectors, without the N×N matrix
    keep = s > 1e-10 * s.max()
    u, sigma = u[:, keep], (s[keep] ** 2)
    k = len(sigma)
    evidences = []
    for c in range(int(y.max()) + 1):
        yc = (y == c).double()
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
