"""Classifiers on frozen, cached backbone features: an L-BFGS logistic probe, weighted k-NN, LogME.

``kind: logistic`` fits multinomial logistic regression on the backbone's pooled features with
torch's L-BFGS (full batch, strong-Wolfe line search), on the run's device (CPU or GPU). The L2
strength is chosen on the validation split from ``probe.l2`` — the protocol of the CLIP and DINOv2
linear-probe tables: features standardised with the training mean/std, loss = mean cross-entropy +
l2/2·‖W‖² (bias not penalised), strengths tried from strongest to weakest with warm starts; the
classifier trained on the training split with the best validation accuracy is kept, folded back
into an ordinary linear head, and saved as the run's checkpoint (``load_run(...).load_model()``).

``kind: knn`` classifies by the ``k`` most cosine-similar training features, each voting with weight
exp(similarity / temperature) (the weighted k-NN of DINO); ``k`` is chosen on the validation split.

Both write an ordinary run directory (``metrics.json`` with test accuracy, per-class accuracy,
confusion matrix; ``history.csv`` with the validation score of every L2 strength / k), so
``transferlab compare`` lists them beside trained runs. ``logme`` is the LogME transferability score
used by ``transferlab rank``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from transferlab.config import ExperimentConfig

__all__ = [
    "KNNClassifier",
    "KNNResult",
    "LogisticResult",
    "fit_knn",
    "fit_logistic",
    "knn_topk",
    "logme",
    "run_feature_experiment",
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

        def closure() -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------
# run directories for kind: logistic / knn (and the dispatch for fewshot)


def start_feature_run(cfg: ExperimentConfig, run_dir: Path, resume: bool, overwrite: bool, console: Console) -> tuple[Any, dict | None]:
    """Open the run directory the way a training run does: (fabric, finished metrics to return or None)."""
    from transferlab.runs import METRICS_FILE, RunError, make_fabric

    import yaml

    metrics_path = run_dir / METRICS_FILE
    if run_dir.exists() and any(run_dir.iterdir()):
        if resume and metrics_path.exists() and json.loads(metrics_path.read_text()).get("status") == "ok":
            console.print(f"[dim]{cfg.name}: already finished in {run_dir}, skipped[/]")
            return None, json.loads(metrics_path.read_text())
        if not resume and not overwrite:
            raise RunError(f"run directory {run_dir} already exists: pass --resume to continue it or --overwrite to replace it")
        shutil.rmtree(run_dir)  # nothing of an unfinished probe is worth keeping: it is recomputed
    fabric = make_fabric(cfg)
    if fabric.world_size > 1:
        raise RunError(f"experiment '{cfg.name}': kind: {cfg.kind} runs in a single process (launched with world size {fabric.world_size})")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    fabric.seed_everything(cfg.seed, verbose=False)
    return fabric, None


def common_metrics(cfg: ExperimentConfig, splits: Any, weights_report: Any, device: torch.device) -> dict[str, Any]:
    """The metrics.json keys every run has (``compare`` and reports read them)."""
    from transferlab.runs import code_version, run_identity

    return {
        "status": "ok",
        "kind": cfg.kind,
        **run_identity(cfg, splits),
        "weights_source": weights_report.describe() if weights_report else "random init",
        "device": str(device),
        "resumed_from": None,
        "notes": cfg.notes,
        "code_version": code_version(),
        "world_size": 1,
    }


def _write_history(path: Path, rows: list[dict[str, float]]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def run_feature_experiment(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    splits: Any = None,
) -> dict[str, Any]:
    """Run a ``kind: logistic | knn | fewshot`` experiment into ``run_dir``; returns its metrics."""
    console = console or Console()
    run_dir = Path(run_dir)
    if cfg.kind == "fewshot":
        from transferlab.fewshot import run_fewshot_experiment

        return run_fewshot_experiment(cfg, run_dir, resume, overwrite, console, splits)
    if cfg.kind not in ("logistic", "knn"):
        raise ValueError(f"experiment '{cfg.name}': kind {cfg.kind!r} is not a feature experiment")
    from transferlab.data.prepare import prepare_splits
    from transferlab.evaluation import evaluate
    from transferlab.features import CachedSuffix, CutPoint, FeatureBatches, default_cache_dir, frozen_features, state_hash
    from transferlab.models.model import build_model
    from transferlab.runs import _write_json
    from transferlab.strategies import linear_probe
    from transferlab.training.checkpoint import save_checkpoint

    wall0 = time.perf_counter()
    fabric, done = start_feature_run(cfg, run_dir, resume, overwrite, console)
    if done is not None:
        return done
    t0 = time.perf_counter()
    splits = splits if splits is not None else prepare_splits(cfg.data, cfg.seed)
    data_seconds = time.perf_counter() - t0
    _write_json(run_dir / "selection.json", splits.selection_record())
    model, report = build_model(cfg.model, cfg.head, splits.num_classes)
    linear_probe(model, cfg.strategy)  # the backbone is a fixed feature extractor (BatchNorm in eval mode)
    model.to(fabric.device).eval()
    device = fabric.device
    batch_kwargs = dict(preprocess=model.preprocess(), device=device, channels_last=cfg.model.channels_last, num_workers=cfg.data.num_workers)
    console.print(
        f"[bold]{cfg.name}[/] seed {cfg.seed}: {cfg.kind} on frozen {cfg.model.backbone} ({cfg.model.weights}) features, "
        f"{len(splits.train_y)}/{len(splits.val_y)}/{len(splits.test_y)} train/val/test images on {device}"
    )
    weights = state_hash(model.backbone)
    sets, pass_seconds = {}, 0.0
    for split in ("train", "val", "test"):
        sets[split], s = frozen_features(model, splits, split, cfg, device, batch_kwargs, default_cache_dir(run_dir), fabric.autocast, weights=weights)
        pass_seconds += s
    ftrain, fval, ftest = sets["train"], sets["val"], sets["test"]
    t0 = time.perf_counter()
    if cfg.kind == "logistic":
        res = fit_logistic(ftrain.features, ftrain.labels, fval.features, fval.labels, splits.num_classes, cfg.probe.l2, cfg.probe.max_iter, device)
        linear = model.head[-1]
        with torch.no_grad():
            linear.weight.copy_(res.weight.to(linear.weight))
            linear.bias.copy_(res.bias.to(linear.bias))
        classifier: nn.Module = CachedSuffix(model, CutPoint("pooled"))
        chosen: dict[str, Any] = {"l2": res.l2, "val_acc": res.val_acc}
        sweep = res.sweep
        trainable = sum(p.numel() for p in model.head.parameters())
    else:
        res_k = fit_knn(ftrain.features, ftrain.labels, fval.features, fval.labels, splits.num_classes, cfg.probe.k, cfg.probe.temperature, device)
        classifier = KNNClassifier(ftrain.features.to(device), ftrain.labels, res_k.k, splits.num_classes, cfg.probe.temperature).to(device)
        chosen = {"k": res_k.k, "val_acc": res_k.val_acc, "temperature": cfg.probe.temperature}
        sweep = res_k.sweep
        trainable = 0
    fit_seconds = time.perf_counter() - t0
    test_batches = FeatureBatches([ftest.features], ftest.labels, cfg.train.eval_batch_size, device)
    test = evaluate(classifier, test_batches, splits.num_classes, device)
    history = [{"step": float(i + 1), **row} for i, row in enumerate(sweep)]
    _write_history(run_dir / "history.csv", history)
    meta = {"config": cfg.to_dict(), "class_names": splits.class_names, "epoch": 0, "kind": "best", "probe": chosen}
    if cfg.kind == "logistic":  # a plain TransferModel checkpoint: load_run(...).load_model() works
        save_checkpoint(run_dir / "checkpoints" / "best.safetensors", model.state_dict(), meta)
    test_ips = ftest.meta.get("images_per_s")
    metrics = common_metrics(cfg, splits, report, device)
    metrics.update({
        "strategy": cfg.kind,
        "test_acc": test["acc"],
        "test_top5": test.get("top5"),
        "test_loss": test["loss"],
        "per_class_acc": test["per_class_acc"],
        "confusion_matrix": test["confusion_matrix"],
        "best_epoch": 1,
        "best_val": chosen["val_acc"],
        "monitor": "val_acc",
        "epochs_run": 1,
        "stopped_early": False,
        "train_seconds": fit_seconds,
        "data_seconds": data_seconds,
        "wall_seconds": time.perf_counter() - wall0,
        # the backbone's forward pass over the test images (when this run computed it) plus the classifier
        "inference_images_per_s": (1 / (1 / test_ips + 1 / test["images_per_s"])) if test_ips else test["images_per_s"],
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": trainable,
        "probe": {**chosen, "sweep": sweep},
        "feature_cache": {
            "used": True,
            "reason": "probe on frozen pooled features",
            "cut": "pooled",
            "sources": [sets[s].source for s in ("train", "val", "test")],
            "keys": [sets[s].key for s in ("train", "val", "test")],
            "pass_seconds": pass_seconds,
            "head_seconds": fit_seconds,
        },
    })
    _write_json(run_dir / "metrics.json", metrics)
    what = f"l2 {chosen['l2']:g}" if cfg.kind == "logistic" else f"k {chosen['k']}"
    console.print(
        f"  [green]{cfg.name}[/]: test acc {metrics['test_acc']:.4f} ({what} chosen on val, val acc {chosen['val_acc']:.4f}), "
        f"features {pass_seconds:.1f}s, fit {fit_seconds:.1f}s -> {run_dir}"
    )
    return metrics
