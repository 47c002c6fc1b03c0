"""Few-shot evaluation: N-way K-shot episodes classified by Prototypical Networks on cached features.

An episode draws ``ways`` classes from the chosen class subset (e.g. novel classes the backbone never
saw), then ``shots`` support and ``queries`` query images of each; every query is assigned to the
nearest class prototype (the mean support feature) — squared Euclidean distance (Snell et al., 2017)
or cosine similarity. The result is the mean episode accuracy ± the 95% confidence interval
(1.96 · std / √episodes) over ``episodes`` (600 by default) seeded episodes; the same episodes give
both distances. The backbone's pooled features of the split are computed once (``features``), so 600
episodes take well under a second.

Optionally the backbone is first fine-tuned episodically (``fewshot.finetune_episodes``): ProtoNet
episodes from the training split of other classes, cross-entropy over negative distances, what trains
following ``strategy`` and how following ``train.optimizer`` / ``lr`` / ``weight_decay``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from transferlab.config import ConfigError, ExperimentConfig
from transferlab.data.augment import parse_augmentations
from transferlab.engine.optim import make_optimizer

__all__ = [
    "FewShotError",
    "FewShotResult",
    "episodic_finetune",
    "protonet_accuracy",
    "resolve_classes",
    "per_class_accuracy",
    "sample_episodes",
]


class FewShotError(ValueError):
    """Episodes cannot be drawn as asked (too few classes or images). The message names the class and split."""


def resolve_classes(spec: list[int | str] | None, class_names: list[str], key: str) -> list[int]:
    """Task class indices of ``spec`` (names or indices); all classes when ``None``. Errors name ``key``."""
    if spec is None:
        return list(range(len(class_names)))
    out = []
    for i, c in enumerate(spec):
        if isinstance(c, bool) or not isinstance(c, (int, str)):
            raise ConfigError(f"{key}[{i}]: {c!r} must be a class index or a class name")
        if isinstance(c, int):
            if not 0 <= c < len(class_names):
                raise ConfigError(f"{key}[{i}]: class index {c} is out of range 0..{len(class_names) - 1}")
            idx = c
        elif c in class_names:
            idx = class_names.index(c)
        else:
            raise ConfigError(f"{key}[{i}]: no class named {c!r}; classes: {', '.join(class_names[:30])}")
        if idx in out:
            raise ConfigError(f"{key}[{i}]: class {class_names[idx]!r} is listed twice")
        out.append(idx)
    return out


def sample_episodes(
    labels: torch.Tensor,
    classes: list[int],
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    seed: int,
    class_names: list[str] | None = None,
    split: str = "test",
) -> torch.Tensor:
    """Indices (episodes × ways × (shots + queries)) into ``labels``: per episode ``ways`` distinct classes
    of ``classes``, and per class ``shots`` support then ``queries`` query images, all distinct. Seeded."""
    names = class_names or [str(c) for c in range(int(labels.max()) + 1)]
    if ways > len(classes):
        raise FewShotError(f"fewshot.ways={ways} but only {len(classes)} classes are available for episodes ({', '.join(names[c] for c in classes)})")
    need = shots + queries
    pools = []
    for c in classes:
        pos = torch.nonzero(labels.cpu() == c).flatten()
        if len(pos) < need:
            raise FewShotError(
                f"class {names[c]!r} has only {len(pos)} images in the {split} split, fewer than "
                f"fewshot.shots + fewshot.queries = {shots} + {queries} = {need}"
            )
        pools.append(pos)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(episodes, ways, need, dtype=torch.long)
    for e in range(episodes):
        for w, ci in enumerate(torch.randperm(len(classes), generator=g)[:ways].tolist()):
            pool = pools[ci]
            out[e, w] = pool[torch.randperm(len(pool), generator=g)[:need]]
    return out


def _prototype_logits(support: torch.Tensor, query: torch.Tensor, distance: str) -> torch.Tensor:
    """support: E×W×S×D, query: E×M×D -> logits E×M×W (negative squared distance, or cosine similarity)."""
    if distance == "cosine":
        protos = F.normalize(F.normalize(support, dim=-1).mean(2), dim=-1)
        return F.normalize(query, dim=-1) @ protos.transpose(1, 2)
    if distance == "euclidean":
        protos = support.mean(2)
        return -torch.cdist(query, protos).pow(2)
    raise ValueError(f"unknown distance {distance!r}; use euclidean or cosine")


def protonet_accuracy(features: torch.Tensor, episodes: torch.Tensor, shots: int, distance: str = "euclidean", chunk: int = 100) -> torch.Tensor:
    """Accuracy of every episode (a float tensor of length E) with Prototypical Networks on ``features``."""
    e, ways, need = episodes.shape
    queries = need - shots
    target = torch.arange(ways).repeat_interleave(queries).to(features.device)
    accs = []
    for i in range(0, e, chunk):
        idx = episodes[i : i + chunk].to(features.device)
        f = features[idx.flatten()].flatten(1).float().view(len(idx), ways, need, -1)
        support, query = f[:, :, :shots], f[:, :, shots:].reshape(len(idx), ways * queries, -1)
        pred = _prototype_logits(support, query, distance).argmax(-1)
        accs.append((pred == target).float().mean(1))
    return torch.cat(accs).cpu()


@dataclass
class FewShotResult:
    """Mean episode accuracy and its 95% confidence interval."""

    mean: float
    ci95: float
    std: float
    episodes: int

    @classmethod
    def of(cls, accs: torch.Tensor) -> FewShotResult:
        std = float(accs.std(unbiased=True)) if len(accs) > 1 else 0.0
        return cls(float(accs.mean()), 1.96 * std / math.sqrt(len(accs)), std, len(accs))

    def describe(self) -> str:
        return f"{100 * self.mean:.2f}% ± {100 * self.ci95:.2f}"


def episodic_finetune(
    model: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[int],
    cfg: ExperimentConfig,
    device: torch.device,
    autocast: Any,
    class_names: list[str],
) -> list[dict[str, float]]:
    """Fine-tune ``model``'s backbone with ProtoNet episodes drawn from ``images`` (uint8, one split).

    What trains is what ``strategy`` left trainable. Returns per-episode loss and accuracy rows.
    """
    fs = cfg.fewshot
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    if not params:
        raise ConfigError(f"experiment '{cfg.name}': fewshot.finetune_episodes={fs.finetune_episodes} but strategy "
                          f"{cfg.strategy.name!r} leaves no backbone parameter trainable")
    opt = make_optimizer(params, cfg.train)
    episodes = sample_episodes(labels, classes, fs.ways, fs.shots, fs.queries, fs.finetune_episodes, cfg.seed + 1, class_names, "train")
    augs = parse_augmentations(cfg.data.augment)
    pre = model.preprocess()
    g = torch.Generator().manual_seed(cfg.seed)
    target = torch.arange(fs.ways).repeat_interleave(fs.queries).to(device)
    rows = []
    model.train()
    for e in range(len(episodes)):
        idx = episodes[e].flatten()
        x = images[idx]
        for aug in augs:
            x = aug.apply_batch(x, g)
        x = pre(x.to(device))
        if cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            f = model.forward_head(model.forward_features(x), pre_logits=True).float().view(fs.ways, fs.shots + fs.queries, -1)
            logits = _prototype_logits(f[None, :, : fs.shots], f[None, :, fs.shots :].reshape(1, -1, f.shape[-1]), fs.distance)[0]
            loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            raise RuntimeError(f"experiment '{cfg.name}': few-shot fine-tuning loss became non-finite at episode {e + 1} (lr {cfg.train.lr:g})")
        rows.append({"episode": float(e + 1), "loss": float(loss.detach()), "acc": float((logits.detach().argmax(1) == target).float().mean())})
    model.eval()
    return rows


def per_class_accuracy(
    x: torch.Tensor, episodes: torch.Tensor, shots: int, distance: str, labels: torch.Tensor, n_classes: int
) -> list[float | None]:
    """How often the queries of each class were classified right, over all episodes (``None``: never a query)."""
    e, ways, need = episodes.shape
    queries = need - shots
    correct = torch.zeros(n_classes)
    seen = torch.zeros(n_classes)
    target = torch.arange(ways).repeat_interleave(queries)
    for i in range(0, e, 100):
        idx = episodes[i : i + 100]
        f = x[idx.flatten().to(x.device)].flatten(1).float().view(len(idx), ways, need, -1)
        pred = _prototype_logits(f[:, :, :shots], f[:, :, shots:].reshape(len(idx), ways * queries, -1), distance).argmax(-1).cpu()
        true_cls = labels.cpu()[idx[:, :, shots:].reshape(len(idx), -1)]
        ok = (pred == target).float()
        correct.index_add_(0, true_cls.flatten(), ok.flatten())
        seen.index_add_(0, true_cls.flatten(), torch.ones(ok.numel()))
    return [float(c / s) if s > 0 else None for c, s in zip(correct, seen, strict=True)]
