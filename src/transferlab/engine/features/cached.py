"""Frozen-prefix feature caching: run the frozen part of a network once, train the rest on its output.

When a strategy freezes a prefix of the network (``linear_probe``; ``freeze_first`` up to a stage
cut), every epoch of the plain loop recomputes the same prefix output. ``cached_training`` finds the
deepest point where the network can be cut, checks that the part before it is really a fixed
function during training, computes its output once for the training and validation images, and hands
the training loop a model that runs only the part after the cut, on batches of cached features.

``cuts`` finds and checks the cut (the deepest usable one wins; when none is left the run says why
caching is off); ``store`` keeps the feature sets. Because the cut is checked on the model as the
strategy left it, the cached loop trains the part after the cut on the same inputs as the plain loop
(the same per-epoch shuffling; the head's own dropout still applies). With ``data.augment`` the
images differ every epoch: ``train.cache_views: K`` caches K augmented views of every training image
(epoch *e* uses view *e* mod K); without it caching is off, and the run says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from rich.console import Console
from torch import nn

from transferlab.data.augment import parse_augmentations
from transferlab.data.batches import make_batches
from transferlab.data.sampler import epoch_order
from transferlab.engine.features.cuts import CutCheck, CutPoint, check_cut, check_pieces, cut_points, prefix_parameters
from transferlab.engine.features.store import STORE, FeatureCache, FeatureCacheError, FeatureSet, cache_key, images_hash, state_hash, tensor_bytes
from transferlab.engine.precision import resolve_precision
from transferlab.files import file_lock, write_text
from transferlab.models.model import TransferModel

__all__ = [
    "MAX_BYTES",
    "MIN_FLOPS_SHARE",
    "CachedSuffix",
    "CachedTraining",
    "FeatureBatches",
    "cached_training",
    "default_cache_dir",
    "extract_features",
    "extraction_batch_size",
    "frozen_features",
    "setting_rules_out",
]

MAX_BYTES = int(float(os.environ.get("TRANSFERLAB_FEATURE_CACHE_MAX_GB", "32")) * 1024**3)
"""Feature sets of one run above this size (``$TRANSFERLAB_FEATURE_CACHE_MAX_GB``, default 32) are not cached."""
MIN_FLOPS_SHARE = 0.25
"""``train.cache: auto`` uses a stage cut only when the prefix holds at least this share of the forward FLOPs."""


# --------------------------------------------------------------------------------------------
# extraction


def extract_features(
    model: TransferModel,
    cut: CutPoint,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    mode: str = "eval",
    autocast: Any = contextlib.nullcontext,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (prefix output, labels) per batch, under ``torch.inference_mode``, with the model in ``mode``.

    The model's train/eval mode is restored when the generator finishes.
    """
    was_training = model.training
    model.train(mode == "train")
    try:
        for x, y in batches:
            with torch.inference_mode(), autocast():  # per batch: grad mode is never left changed across a yield
                out = cut.prefix(model, x)
            yield out, y
    finally:
        model.train(was_training)


def _feature_set(
    store: FeatureCache,
    parts: dict[str, Any],
    model: TransferModel,
    check: CutCheck,
    batches: Any,
    n: int,
    mode: str,
    autocast: Any,
    directory: Path | None,
    device: torch.device,
    labels: torch.Tensor,
    shared: bool = False,
) -> tuple[FeatureSet, float]:
    """Get a feature set from the store, or compute it; returns (set, seconds spent computing).

    ``shared``: other processes of the study use ``directory`` too (parallel workers): the set is computed under a
    file lock and written to disk, so the others memory-map it instead of computing it again."""
    key = cache_key(parts)
    shared = shared and directory is not None
    # Workers of one study (local processes, Ray, Slurm) share the disk store: one computes a set under its lock and
    # writes it to disk; the others wait for the lock and memory-map the file instead of computing it again.
    with file_lock(directory / f".{key}.lock") if shared else contextlib.nullcontext():
        found = store.get(key, directory)
        if found is not None:
            if not torch.equal(found.labels, labels.cpu()):
                raise FeatureCacheError(f"feature cache {key} ({found.storage}): its labels differ from the split's (corrupt cache file?)")
            return found, 0.0
        t0 = time.perf_counter()
        fs = store.compute(key, {"parts": parts}, n, check.shape, check.dtype, extract_features(model, check.cut, batches, mode, autocast),
                           directory, to_disk=True if shared else None, labels=(tuple(labels.shape[1:]), labels.dtype))  # multi-label: N×K
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    fs.meta["seconds"], fs.meta["images_per_s"] = seconds, n / seconds if seconds > 0 else None
    if fs.path is not None:  # streamed to disk: record the timing in its JSON sidecar too
        write_text(fs.path.with_suffix(".json"), json.dumps(fs.meta, indent=2, sort_keys=True))
    return fs, seconds



# --------------------------------------------------------------------------------------------
# cached batches and the suffix model


class FeatureBatches:
    """(features, labels) batches from cached sets, with the training loop's contract.

    Same order as ``TensorBatches`` / ``LoaderBatches`` for the same seed and epoch (a generator seeded
    with ``seed * 100_003 + epoch``); epoch *e* reads view *e* mod K of K cached augmented views.
    """

    def __init__(
        self,
        views: list[torch.Tensor],
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        device_max_bytes: int = 2 * 1024**3,
        sampler: str = "random",
    ) -> None:
        if not views or any(len(v) != len(labels) for v in views):
            raise ValueError("FeatureBatches needs at least one view, each with one row per label")
        self.device = torch.device(device)
        on_device = self.device.type != "cpu" and sum(v.numel() * v.element_size() for v in views) <= device_max_bytes
        self.views = [v.to(self.device) for v in views] if on_device else views
        self.labels, self.cpu_labels = labels.to(self.device), labels.cpu()
        self.batch_size, self.shuffle, self.seed, self.channels_last = batch_size, shuffle, seed, channels_last
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.labels)
        order = epoch_order(self.cpu_labels, self.shuffle, self.sampler, g)  # data.sampler, as the image batches
        x = self.views[self.epoch % len(self.views)]
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            xb = x[idx.to(x.device)].to(self.device, non_blocking=True)
            if self.channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.labels[idx.to(self.labels.device)]


class CachedSuffix(nn.Module):
    """The part of a ``TransferModel`` after a cut, fed cached features; everything else is delegated.

    ``parameters()``, ``state_dict()`` and ``load_state_dict()`` are those of the whole model, so the
    optimizer, the checkpoints and a resume are exactly those of the plain loop. Each forward checks
    that the prefix is still frozen (e.g. a later unfreezing step would make the cache wrong).
    """

    def __init__(self, model: TransferModel, cut: CutPoint, prefix_params: list[tuple[str, nn.Parameter]] | None = None) -> None:
        super().__init__()
        self.model = model
        self.cut = cut
        self._prefix_params = prefix_params or []

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for name, p in self._prefix_params:
            if p.requires_grad:
                raise FeatureCacheError(
                    f"parameter {name} before the cached cut ({self.cut.name}) became trainable during training; "
                    "cached features would be stale — set train.cache: off for this experiment"
                )
        return self.cut.suffix(self.model, features)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)



# --------------------------------------------------------------------------------------------
# the run's entry point


@dataclass
class CachedTraining:
    """What ``cached_training`` decided and built; ``apply`` gives the loop its model and batches."""

    used: bool
    reason: str
    cut: str | None = None
    model: nn.Module | None = None
    train: FeatureBatches | None = None
    val: FeatureBatches | None = None
    record: dict[str, Any] = field(default_factory=dict)

    def apply(self, model: nn.Module, train: Any, val: Any) -> tuple[nn.Module, Any, Any]:
        """(model, train, val) for ``fit``: the suffix model and cached batches, or the originals."""
        if not self.used:
            return model, train, val
        return self.model, self.train, self.val  # type: ignore[return-value]

    def summary(self, head_seconds: float | None = None) -> dict[str, Any]:
        """The ``feature_cache`` entry of ``metrics.json``."""
        out = {"used": self.used, "reason": self.reason, **self.record}
        if head_seconds is not None:
            out["head_seconds"] = head_seconds
        return out


def _transform_parts(model: TransferModel, channels_last: bool) -> dict[str, Any]:
    pre = model.preprocess()
    return {"mean": list(pre.mean), "std": list(pre.std), "in_chans": pre.in_chans, "channels_last": channels_last}


def split_parts(
    model: TransferModel, check: CutCheck, splits: Any, split: str, cfg: Any, device: torch.device, weights: str,
    mode: str, augment: list[Any] | None = None, view: int = 0,
) -> dict[str, Any]:
    """Everything a split's feature set depends on (the input of ``cache_key``)."""
    x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
    parts = {
        "backbone": cfg.model.backbone,
        "arch": f"{type(model.backbone).__module__}.{type(model.backbone).__qualname__}",
        "versions": {"timm": timm.__version__, "torch": torch.__version__.split("+")[0]},
        "weights": weights,
        "cut": check.cut.name,
        "mode": mode,
        "split": split,
        "selection": {"source": splits.source, "indices": hashlib.sha256(json.dumps(splits.indices.get(split, [])).encode()).hexdigest()},
        "images": images_hash(x),
        "labels": hashlib.sha256(tensor_bytes(y)).hexdigest(),
        "transform": _transform_parts(model, cfg.model.channels_last),
        "precision": cfg.train.precision,
        "device": device.type,
    }
    if augment:
        parts["augment"] = {"spec": [a.spec() for a in parse_augmentations(augment)], "seed": cfg.seed, "view": view}
    return parts


def plan_cut(model: TransferModel, sample: torch.Tensor, autocast: Any, required: bool, tried: list[tuple[str, str]]) -> CutCheck | None:
    """The deepest usable cut (``check_cut``) worth caching; (cut, reason) of rejected cuts go into ``tried``."""
    if all(p.requires_grad for p in model.backbone.parameters()):
        tried.append(("", "the strategy trains the whole backbone: there is no frozen part to cache"))
        return None
    pieces_problem = check_pieces(model, sample)
    for cut in cut_points(model):
        if cut.pieces is not None and pieces_problem:
            tried.append((cut.name, pieces_problem))
            break
        check = check_cut(model, cut, sample, autocast)
        if not check.ok:
            tried.append((cut.name, check.reason))
            continue
        if not required and check.flops_share is not None and check.flops_share < MIN_FLOPS_SHARE:
            tried.append((cut.name, f"the frozen prefix holds only {100 * check.flops_share:.0f}% of the forward FLOPs"))
            return None  # shallower cuts hold even less
        return check
    return None


def cached_training(
    model: TransferModel,
    splits: Any,
    cfg: Any,
    fabric: Any,
    batch_kwargs: dict[str, Any],
    cache_dir: Path | None,
    console: Console | None = None,
    store: FeatureCache | None = None,
    shared: bool = False,
) -> CachedTraining:
    """Decide whether this run trains on cached features (module docstring); compute or reuse them.

    ``batch_kwargs`` are the run's ``make_batches`` arguments (preprocess, device, channels_last,
    num_workers). Returns ``CachedTraining`` with ``used=False`` and the reason when caching is off;
    with ``train.cache: on`` that is an error instead. ``shared``: ``cache_dir`` is shared with other workers
    of the study (``_feature_set``).
    """
    console = console or Console(quiet=True)
    tried: list[tuple[str, str]] = []
    reason = setting_rules_out(cfg, fabric)
    if reason:
        return _cache_off(cfg, model, reason, tried, console)
    sample = next(iter(make_batches(splits, "train", 4, shuffle=False, **{**batch_kwargs, "num_workers": 0})))[0][:4]
    check = plan_cut(model, sample, fabric.autocast, cfg.train.cache == "on", tried)
    if check is None:
        why = tried[-1][1] if tried else "no cut point"
        reason = why if len(tried) <= 1 else f"{why} (cuts tried, deepest first: {', '.join(c for c, _ in tried)})"
    n_views = int(cfg.train.cache_views) if cfg.data.augment else 1
    if check is not None and not reason:
        reason = _too_large(check, len(splits.train_y) * n_views + len(splits.val_y))
    if reason or check is None:
        return _cache_off(cfg, model, reason, tried, console)

    t0 = time.perf_counter()
    train_sets, val_set, pass_seconds = _train_val_sets(model, check, splits, cfg, fabric, batch_kwargs, cache_dir, store or STORE, n_views,
                                                         shared)
    wall = time.perf_counter() - t0
    channels_last, tc, device = bool(batch_kwargs.get("channels_last", False)), cfg.train, fabric.device
    train = FeatureBatches(
        [f.features for f in train_sets], splits.train_y, tc.batch_size, device, shuffle=True, seed=cfg.seed, channels_last=channels_last,
        sampler=cfg.data.sampler,
    )
    val = FeatureBatches([val_set.features], splits.val_y, tc.eval_batch_size, device, channels_last=channels_last)
    suffix = CachedSuffix(model, check.cut, prefix_parameters(model, check.cut, sample))
    record = _record(check, n_views, [*train_sets, val_set], pass_seconds, wall, tried)
    sources = record["sources"]
    how = "computed" if all(s == "computed" for s in sources) else "reused (" + ", ".join(sorted(set(sources))) + ")"
    console.print(
        f"  feature cache: {check.cut.name} features {tuple(check.shape)} of {len(splits.train_y)}"
        f"{f' × {n_views} views' if n_views > 1 else ''} train + {len(splits.val_y)} val images {how} in {wall:.1f}s "
        f"({record['bytes'] / 1e6:.0f} MB, {'/'.join(record['storage'])}); training the part after the cut on them"
    )
    return CachedTraining(True, f"cached at {check.cut.name}", check.cut.name, suffix, train, val, record)


def setting_rules_out(cfg: Any, fabric: Any) -> str | None:
    """Why the run's settings alone rule caching out (before any cut is looked at), or None."""
    tc = cfg.train
    if tc.cache == "off":
        return "train.cache: off"
    if tc.tta != "none":
        return f"train.tta: {tc.tta} evaluates on transformed images, which a feature cache does not hold"
    if tc.mixup is not None:
        return "train.mixup mixes (and CutMix pastes) images, which a feature cache does not hold"
    if getattr(tc, "progressive_resize", None) is not None:
        return "train.progressive_resize trains on resized images, whose features a feature cache does not hold"
    if getattr(tc, "distill", None) is not None:
        return "train.distill: the teacher sees the training images, which a feature cache does not hold"
    if fabric.world_size > 1:
        return f"distributed run (world size {fabric.world_size}): every rank would repeat the pass; caching is single-process only"
    for key in ("unfreeze", "freeze_epochs"):  # a schedule that unfreezes mid-run would make any cache stale
        if getattr(cfg.strategy, key, None) is not None:
            return f"strategy.{key} changes what is frozen during training"
    if cfg.data.augment and tc.cache_views < 1:
        return (
            "data.augment is set, so the training images change every epoch; set train.cache_views: K to cache "
            "K augmented views per image (epoch e uses view e mod K)"
        )
    return None


def _too_large(check: CutCheck, items: int) -> str | None:
    item_bytes = int(np.prod(check.shape, dtype=np.int64)) * torch.empty((), dtype=check.dtype).element_size()
    total = item_bytes * items
    if total <= MAX_BYTES:
        return None
    return f"cut {check.cut.name} gives {total / 1e9:.1f} GB of features, above $TRANSFERLAB_FEATURE_CACHE_MAX_GB ({MAX_BYTES / 1e9:.0f} GB)"


def _cache_off(cfg: Any, model: TransferModel, reason: str, tried: list[tuple[str, str]], console: Console) -> CachedTraining:
    """Caching is off: an error with ``train.cache: on``; otherwise say why (when something is frozen)."""
    if cfg.train.cache == "on":
        raise FeatureCacheError(f"experiment '{cfg.name}': train.cache: on, but features cannot be cached: {reason}")
    if cfg.train.cache != "off" and any(not p.requires_grad for p in model.backbone.parameters()):
        console.print(f"  feature cache off: {reason}")  # (nothing frozen: nothing to say in the log)
    return CachedTraining(False, reason, record={"rejected_cuts": [f"{c}: {r}" if c else r for c, r in tried]} if tried else {})


def _train_val_sets(
    model: TransferModel, check: CutCheck, splits: Any, cfg: Any, fabric: Any, batch_kwargs: dict[str, Any],
    cache_dir: Path | None, store: FeatureCache, n_views: int, shared: bool = False,
) -> tuple[list[FeatureSet], FeatureSet, float]:
    """The cached training views and validation set (computed or reused), and the seconds the passes took."""
    device, augment = fabric.device, list(cfg.data.augment or [])
    weights = state_hash(model.backbone)
    train_mode = "eval" if check.mode_free else "train"
    ebs = extraction_batch_size(cfg, device)
    seconds = 0.0
    train_sets: list[FeatureSet] = []
    for v in range(n_views):
        src = make_batches(splits, "train", ebs, shuffle=False, augment=augment or None, seed=cfg.seed, **batch_kwargs)
        src.set_epoch(v)
        parts = split_parts(model, check, splits, "train", cfg, device, weights, train_mode, augment, v)
        fs, s = _feature_set(store, parts, model, check, src, len(splits.train_y), train_mode, fabric.autocast, cache_dir, device,
                             splits.train_y, shared)
        train_sets.append(fs)
        seconds += s
    val_src = make_batches(splits, "val", ebs, **batch_kwargs)
    val_parts = split_parts(model, check, splits, "val", cfg, device, weights, "eval")
    val_set, s = _feature_set(store, val_parts, model, check, val_src, len(splits.val_y), "eval", fabric.autocast, cache_dir, device,
                              splits.val_y, shared)
    return train_sets, val_set, seconds + s


def _record(check: CutCheck, n_views: int, sets: list[FeatureSet], pass_seconds: float, wall: float, tried: list[tuple[str, str]]) -> dict[str, Any]:
    """The ``feature_cache`` entry of ``metrics.json`` (with ``used`` and ``reason`` added by ``summary``)."""
    return {
        "cut": check.cut.name,
        "views": n_views,
        "train_mode": "eval" if check.mode_free else "train",
        "feature_shape": list(check.shape),
        "feature_dtype": str(check.dtype).replace("torch.", ""),
        "bytes": sum(f.nbytes for f in sets),
        "storage": sorted({f.storage for f in sets}),
        "sources": [f.source for f in sets],
        "keys": [f.key for f in sets],
        "pass_seconds": pass_seconds,
        "cache_seconds": wall,
        "prefix_flops_share": check.flops_share,
        "rejected_cuts": [f"{c}: {r}" for c, r in tried],
    }


def extraction_batch_size(cfg: Any, device: torch.device) -> int:
    """Batch size of the feature pass, per device and precision: ``train.eval_batch_size``, on the CPU at most 64 in
    fp32 (small batches stay in cache: EfficientNet-Lite0 at 64 px runs about 1.8x faster with 64 than with 512)
    and at most 128 under bf16 autocast (half the bytes per activation, so twice the images fit the same cache;
    ``benchmarks/feature_pass.py`` measures the pass). On a GPU the evaluation batch itself (raise it there)."""
    bs = int(cfg.train.eval_batch_size)
    if torch.device(device).type != "cpu":
        return bs
    bf16 = resolve_precision(cfg.train.precision, "cpu").startswith("bf16")
    return min(bs, 128 if bf16 else 64)


def default_cache_dir(run_dir: Path) -> Path:
    """Where a run's feature sets spill: ``$TRANSFERLAB_FEATURE_CACHE_DIR`` or ``<study dir>/.feature_cache``."""
    env = os.environ.get("TRANSFERLAB_FEATURE_CACHE_DIR")
    return Path(env) if env else Path(run_dir).parent / ".feature_cache"


def frozen_features(
    model: TransferModel,
    splits: Any,
    split: str,
    cfg: Any,
    device: torch.device,
    batch_kwargs: dict[str, Any],
    cache_dir: Path | None,
    autocast: Any = contextlib.nullcontext,
    store: FeatureCache | None = None,
    weights: str | None = None,
    shared: bool = False,
) -> tuple[FeatureSet, float]:
    """The backbone's pooled eval-mode features of one split (probes, k-NN, few-shot, ranking), cached.

    The key is the one ``cached_training`` uses for a mode-independent pooled cut, so a linear probe
    trained by the loop and a ``logistic`` / ``knn`` probe on the same backbone share one pass.
    Returns (feature set, seconds spent computing it — 0 on a cache hit).
    """
    n = len(getattr(splits, f"{split}_y"))
    src = make_batches(splits, split, extraction_batch_size(cfg, device), **batch_kwargs)
    sample = next(iter(make_batches(splits, split, 2, **{**batch_kwargs, "num_workers": 0})))[0][:2]
    cut = CutPoint("pooled")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast():
            out = cut.prefix(model, sample)
    finally:
        model.train(was_training)
    check = CutCheck(cut, True, shape=tuple(out.shape[1:]), dtype=out.dtype)
    weights = weights or state_hash(model.backbone)
    parts = split_parts(model, check, splits, split, cfg, device, weights, "eval")
    return _feature_set(store or STORE, parts, model, check, src, n, "eval", autocast, cache_dir, device, getattr(splits, f"{split}_y"),
                        shared)
