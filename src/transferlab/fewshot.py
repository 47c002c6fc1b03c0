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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from transferlab.config import ConfigError, ExperimentConfig

__all__ = [
    "FewShotError",
    "FewShotResult",
    "episodic_finetune",
    "protonet_accuracy",
    "resolve_classes",
    "run_fewshot_experiment",
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
    from transferlab.data.augment import parse_augmentations
    from transferlab.training.optim import make_optimizer

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


def run_fewshot_experiment(
    cfg: ExperimentConfig,
    run_dir: Path,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    splits: Any = None,
    model: Any = None,
) -> dict[str, Any]:
    """Run a ``kind: fewshot`` experiment into ``run_dir`` (``metrics.json``: mean accuracy ± 95% CI).

    ``model`` (optional) is a ready ``TransferModel`` to use instead of building ``cfg.model`` — e.g. the
    backbone of an earlier run (``transferlab fewshot <run dir>``).
    """
    from transferlab.data.prepare import prepare_splits
    from transferlab.features import default_cache_dir, frozen_features
    from transferlab.models.model import build_model
    from transferlab.probes import _write_history, common_metrics, start_feature_run
    from transferlab.runs import _write_json
    from transferlab.strategies import apply_strategy, linear_probe
    from transferlab.training.checkpoint import save_checkpoint

    console = console or Console()
    fs = cfg.fewshot
    wall0 = time.perf_counter()
    fabric, done = start_feature_run(cfg, run_dir, resume, overwrite, console)
    if done is not None:
        return done
    device = fabric.device
    t0 = time.perf_counter()
    splits = splits if splits is not None else prepare_splits(cfg.data, cfg.seed)
    data_seconds = time.perf_counter() - t0
    _write_json(run_dir / "selection.json", splits.selection_record())
    names = splits.class_names
    eval_classes = resolve_classes(fs.classes, names, "fewshot.classes")
    eval_labels = getattr(splits, f"{fs.split}_y")
    episodes = sample_episodes(eval_labels, eval_classes, fs.ways, fs.shots, fs.queries, fs.episodes, cfg.seed, names, fs.split)

    report = None
    if model is None:
        model, report = build_model(cfg.model, cfg.head, splits.num_classes)
    model.to(device)
    finetune_rows: list[dict[str, float]] = []
    finetune_seconds = 0.0
    ft_classes: list[int] = []
    if fs.finetune_episodes:
        if fs.finetune_classes is not None:
            ft_classes = resolve_classes(fs.finetune_classes, names, "fewshot.finetune_classes")
        else:
            ft_classes = [c for c in range(len(names)) if c not in eval_classes] if fs.classes is not None else list(range(len(names)))
        overlap = sorted(set(ft_classes) & set(eval_classes))
        if overlap and fs.split == "train":
            raise ConfigError(f"experiment '{cfg.name}': fine-tuning and evaluation episodes both come from the train split of "
                              f"{', '.join(names[c] for c in overlap)}: use fewshot.split: test or disjoint classes")
        if not isinstance(splits.train_x, torch.Tensor):
            raise ConfigError(f"experiment '{cfg.name}': fewshot.finetune_episodes needs the images in memory (data.in_memory: true)")
        apply_strategy(model, cfg.strategy)
        t0 = time.perf_counter()
        finetune_rows = episodic_finetune(model, splits.train_x, splits.train_y, ft_classes, cfg, device, fabric.autocast, names)
        finetune_seconds = time.perf_counter() - t0
    linear_probe(model, cfg.strategy)  # evaluation: a frozen feature extractor
    model.eval()
    batch_kwargs = dict(preprocess=model.preprocess(), device=device, channels_last=cfg.model.channels_last, num_workers=cfg.data.num_workers)
    console.print(
        f"[bold]{cfg.name}[/] seed {cfg.seed}: {fs.ways}-way {fs.shots}-shot ProtoNet ({fs.distance}), {fs.episodes} episodes "
        f"of {fs.queries} queries per class from the {fs.split} split ({len(eval_classes)} classes) on {cfg.model.backbone} features"
        + (f", after {fs.finetune_episodes} fine-tuning episodes" if fs.finetune_episodes else "")
    )
    feats, pass_seconds = frozen_features(model, splits, fs.split, cfg, device, batch_kwargs, default_cache_dir(run_dir), fabric.autocast)
    t0 = time.perf_counter()
    x = feats.features.to(device)
    results = {d: FewShotResult.of(protonet_accuracy(x, episodes, fs.shots, d)) for d in ("euclidean", "cosine")}
    episode_seconds = time.perf_counter() - t0
    main = results[fs.distance]
    # per-class accuracy of the chosen distance: how often queries of each class were right, over all episodes
    per_class = _per_class_accuracy(x, episodes, fs.shots, fs.distance, eval_labels, len(names))

    if finetune_rows:
        _write_history(run_dir / "history.csv", finetune_rows)
        meta = {"config": cfg.to_dict(), "class_names": names, "epoch": 0, "kind": "best"}
        save_checkpoint(run_dir / "checkpoints" / "best.safetensors", model.state_dict(), meta)
    metrics = common_metrics(cfg, splits, report, device)
    desc = f"{fs.ways}-way {fs.shots}-shot ProtoNet ({fs.distance}), {fs.episodes} episodes, ± {100 * main.ci95:.2f} (95% CI)"
    trainable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head.")) if fs.finetune_episodes else 0
    metrics.update({
        "strategy": "protonet" + ("+finetune" if fs.finetune_episodes else ""),
        "n_train": len(splits.train_y) if fs.finetune_episodes else 0,
        "test_acc": main.mean,
        "test_acc_ci95": main.ci95,
        "test_top5": None,
        "test_loss": None,
        "per_class_acc": per_class,
        "confusion_matrix": None,
        "best_epoch": 1,
        "best_val": None,
        "monitor": None,
        "epochs_run": 1 if fs.finetune_episodes else 0,
        "stopped_early": False,
        "train_seconds": finetune_seconds,
        "data_seconds": data_seconds,
        "wall_seconds": time.perf_counter() - wall0,
        "inference_images_per_s": feats.meta.get("images_per_s") or float("nan"),
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": trainable,
        "notes": f"{cfg.notes}; {desc}" if cfg.notes else desc,
        "fewshot": {
            "ways": fs.ways, "shots": fs.shots, "queries": fs.queries, "episodes": fs.episodes, "split": fs.split,
            "distance": fs.distance, "classes": [names[c] for c in eval_classes],
            "finetune_episodes": fs.finetune_episodes, "finetune_classes": [names[c] for c in ft_classes],
            "results": {d: vars(r) for d, r in results.items()},
            "episode_seconds": episode_seconds,
        },
        "feature_cache": {"used": True, "reason": "episodes on frozen pooled features", "cut": "pooled", "sources": [feats.source],
                          "keys": [feats.key], "pass_seconds": pass_seconds, "head_seconds": finetune_seconds},
    })
    _write_json(run_dir / "metrics.json", metrics)
    console.print(
        f"  [green]{cfg.name}[/]: {fs.ways}-way {fs.shots}-shot accuracy {main.describe()} (95% CI, {fs.distance}); "
        f"{'cosine' if fs.distance == 'euclidean' else 'euclidean'} {results['cosine' if fs.distance == 'euclidean' else 'euclidean'].describe()}; "
        f"{fs.episodes} episodes in {episode_seconds:.2f}s -> {run_dir}"
    )
    return metrics


def _per_class_accuracy(x: torch.Tensor, episodes: torch.Tensor, shots: int, distance: str, labels: torch.Tensor, n_classes: int) -> list[float | None]:
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
    return [float(c / s) if s > 0 else None for c, s in zip(correct, seen)]
