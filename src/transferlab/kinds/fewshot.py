"""``kind: fewshot`` — N-way K-shot episodes classified by Prototypical Networks on the backbone's features.

The result is the mean episode accuracy ± its 95% confidence interval (``transferlab.engine.episodes``);
the same episodes give both distances (the other one is recorded beside the chosen one). Optionally
the backbone is first fine-tuned episodically on other classes (``fewshot.finetune_episodes``).
"""

from __future__ import annotations

import time

import torch
from lightning.fabric import Fabric

from transferlab.config import ConfigError, ExperimentConfig
from transferlab.config.kinds import KindUses
from transferlab.data.prepare import ImageSplits
from transferlab.engine.costs import Cost, Estimate, Part, feature_pass
from transferlab.engine.episodes import FewShotResult, episodic_finetune, per_class_accuracy, protonet_accuracy, resolve_classes, sample_episodes
from transferlab.engine.precision import guard_bf16_convs
from transferlab.files import save_checkpoint
from transferlab.kinds.base import KINDS, Kind, RunContext
from transferlab.kinds.common import base_metrics, prepare, split_features
from transferlab.models.model import TransferModel
from transferlab.rundir import RunMetrics
from transferlab.strategies import apply_strategy, linear_probe

__all__ = ["FewShotKind"]


class FewShotKind(Kind):
    """ProtoNet episodes on frozen pooled features (optionally after episodic fine-tuning)."""

    name = "fewshot"
    uses = KindUses(features=True, folds=False)  # episodes sample their own support and query sets

    def estimate(self, cfg: ExperimentConfig, n_train: int, n_val: int, n_test: int, cost: Cost | None) -> float:
        """Seconds of ``explain``'s estimate."""
        return self.explain(cfg, n_train, n_val, n_test, cost).seconds

    def explain(self, cfg: ExperimentConfig, n_train: int, n_val: int, n_test: int, cost: Cost | None) -> Estimate:
        """The pooled-feature pass over the split the episodes come from (``fewshot.split``; shared with the other runs of
        its cache group), the episodes themselves (distances between pooled vectors: 0.2 s for 600 in RESULTS §12b, not
        counted). ``fewshot.finetune_episodes`` trains the backbone first, which the probe does not time: said, not counted."""
        if cost is None:
            return Estimate()
        split = cfg.fewshot.split
        n = {"train": n_train, "val": n_val, "test": n_test}[split]
        # fine-tuned first, the backbone is this run's own: nothing to share
        parts = feature_pass(cost.forward, {split: n}, self.shares_backbone_pass(cfg) and not cfg.fewshot.finetune_episodes)
        if cfg.fewshot.finetune_episodes:
            parts.append(Part(f"{cfg.fewshot.finetune_episodes} fine-tuning episodes not estimated", 0.0))
        return Estimate(tuple(parts))

    def run(self, cfg: ExperimentConfig, ctx: RunContext) -> RunMetrics:
        fs = cfg.fewshot
        p = prepare(cfg, ctx, single_process=True)  # the strategy comes later: fine-tuning (if any), then a frozen extractor
        fabric, splits, model, report, data_seconds, wall0 = p.fabric, p.splits, p.model, p.weights, p.data_seconds, p.wall0
        device = fabric.device
        names = splits.class_names
        eval_classes = resolve_classes(fs.classes, names, "fewshot.classes")
        eval_labels = getattr(splits, f"{fs.split}_y")
        episodes = sample_episodes(eval_labels, eval_classes, fs.ways, fs.shots, fs.queries, fs.episodes, cfg.seed, names, fs.split)
        model.to(device)
        ft_classes, finetune_rows, finetune_seconds = _finetune(cfg, model, splits, eval_classes, fabric)
        linear_probe(model, cfg.strategy)  # evaluation: a frozen feature extractor
        model.eval()
        ctx.console.print(
            f"[bold]{cfg.name}[/] seed {cfg.seed}: {fs.ways}-way {fs.shots}-shot ProtoNet ({fs.distance}), {fs.episodes} episodes "
            f"of {fs.queries} queries per class from the {fs.split} split ({len(eval_classes)} classes) on {cfg.model.backbone} features"
            + (f", after {fs.finetune_episodes} fine-tuning episodes" if fs.finetune_episodes else "")
        )
        sets, pass_seconds = split_features(model, splits, (fs.split,), cfg, fabric, ctx)
        feats = sets[fs.split]
        t0 = time.perf_counter()
        x = feats.features.to(device)
        results = {d: FewShotResult.of(protonet_accuracy(x, episodes, fs.shots, d)) for d in ("euclidean", "cosine")}
        episode_seconds = time.perf_counter() - t0
        main = results[fs.distance]
        if finetune_rows:
            ctx.rundir.write_rows("history.csv", finetune_rows)
            meta = {"config": cfg.to_dict(), "class_names": names, "epoch": 0, "kind": "best"}
            save_checkpoint(ctx.rundir.checkpoints / "best.safetensors", model.state_dict(), meta)

        m = base_metrics(cfg, splits, report, device)
        desc = f"{fs.ways}-way {fs.shots}-shot ProtoNet ({fs.distance}), {fs.episodes} episodes, ± {100 * main.ci95:.2f} (95% CI)"
        m.strategy = "protonet" + ("+finetune" if fs.finetune_episodes else "")
        m.n_train = len(splits.train_y) if fs.finetune_episodes else 0
        m.test_acc = main.mean
        # per-class accuracy of the chosen distance: how often queries of each class were right, over all episodes
        m.per_class_acc = per_class_accuracy(x, episodes, fs.shots, fs.distance, eval_labels, len(names))
        m.best_epoch, m.epochs_run, m.stopped_early = 1, 1 if fs.finetune_episodes else 0, False
        m.train_seconds, m.data_seconds, m.wall_seconds = finetune_seconds, data_seconds, time.perf_counter() - wall0
        m.inference_images_per_s = feats.meta.get("images_per_s") or float("nan")
        m.total_params = sum(p.numel() for p in model.parameters())
        m.trainable_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head.")) if fs.finetune_episodes else 0
        m.notes = f"{cfg.notes}; {desc}" if cfg.notes else desc
        m.feature_cache = {"used": True, "reason": "episodes on frozen pooled features", "cut": "pooled", "sources": [feats.source],
                           "keys": [feats.key], "pass_seconds": pass_seconds, "head_seconds": finetune_seconds}
        m.extra["test_acc_ci95"] = main.ci95
        m.extra["fewshot"] = {
            "ways": fs.ways, "shots": fs.shots, "queries": fs.queries, "episodes": fs.episodes, "split": fs.split,
            "distance": fs.distance, "classes": [names[c] for c in eval_classes],
            "finetune_episodes": fs.finetune_episodes, "finetune_classes": [names[c] for c in ft_classes],
            "results": {d: vars(r) for d, r in results.items()},
            "episode_seconds": episode_seconds,
        }
        other = "cosine" if fs.distance == "euclidean" else "euclidean"
        ctx.console.print(
            f"  [green]{cfg.name}[/]: {fs.ways}-way {fs.shots}-shot accuracy {main.describe()} (95% CI, {fs.distance}); "
            f"{other} {results[other].describe()}; {fs.episodes} episodes in {episode_seconds:.2f}s -> {ctx.rundir.path}"
        )
        return m


def _finetune(
    cfg: ExperimentConfig, model: TransferModel, splits: ImageSplits, eval_classes: list[int], fabric: Fabric
) -> tuple[list[int], list[dict[str, float]], float]:
    """Episodic ProtoNet fine-tuning of the backbone when asked: (its classes, per-episode rows, seconds)."""
    fs, names = cfg.fewshot, splits.class_names
    if not fs.finetune_episodes:
        return [], [], 0.0
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
    # fine-tuning trains: the bf16 guard of the train kind applies (a strided conv on a 1x1 input gets NaN gradients)
    guard_bf16_convs(model, model.preprocess()(splits.train_x[:2].to(fabric.device)), cfg.train.precision, fabric.device)
    t0 = time.perf_counter()
    rows = episodic_finetune(model, splits.train_x, splits.train_y, ft_classes, cfg, fabric.device, fabric.autocast, names)
    return ft_classes, rows, time.perf_counter() - t0


KINDS.register("fewshot", FewShotKind())
