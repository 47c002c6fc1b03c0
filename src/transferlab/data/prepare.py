"""From a raw dataset to the three splits an experiment uses (``prepare_splits``).

In order:

1. ``data.classes`` keeps some classes and numbers them 0..k-1 in the order given;
2. ``data.train_subset`` (fraction or count, stratified) or ``data.k_per_class`` picks the pool of
   training images;
3. the validation split — ``data.val_count`` images or ``data.val_fraction`` of the pool, stratified —
   is held out of the pool (unless the dataset has its own ``val`` split);
4. ``data.test_subset`` (fraction or count, stratified) thins the test split;
5. the selected images are resized once (``data.image_size``, the way ``data.resize`` says), and image
   files are decoded into memory when they fit (``transferlab.data.resize``); bad files fail together
   or are skipped;
6. ``data.normalize: dataset`` measures the training split's mean/std (``transferlab.data.normalize``).

With ``data.folds`` the dataset's train and test splits are pooled first and fold ``data.fold`` of the
pool is the test split (``transferlab.data.folds``).

Multi-label data (``data.task: multilabel``, labels an N×K multi-hot matrix) goes through the same steps:
``data.classes`` keeps those columns and leaves out the images with none of them
(``transferlab.data.selection.task_labels``); the subsets, the validation hold-out and the folds are cut by
iterative stratification (``transferlab.data.multilabel``); ``data.k_per_class`` is refused; every class must
keep a training image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from transferlab.config import DataConfig
from transferlab.data.folds import fold_test_positions, pool_train_test
from transferlab.data.images import FileImages, Problem, format_problems
from transferlab.data.multilabel import class_counts, is_multilabel
from transferlab.data.normalize import Normalization, split_normalization
from transferlab.data.resize import Images, prepare_files, resize_uint8
from transferlab.data.selection import k_per_class, select_classes, stratified_split, stratified_take, task_labels
from transferlab.data.sources import DatasetError, RawDataset, load_dataset

__all__ = ["ImageSplits", "prepare_splits"]


@dataclass
class ImageSplits:
    """Train / val / test images with labels, class names, the chosen indices and what was skipped.

    ``*_x`` are uint8 N×C×H×W tensors, or ``FileImages`` when the images stay on disk for the PIL
    path. ``in_memory`` says which batches ``make_batches`` builds. ``*_y`` are int64 (N,) class indices, or
    float32 N×K multi-hot targets with ``data.task: multilabel`` (``multilabel``).
    """

    train_x: Images
    train_y: torch.Tensor
    val_x: Images
    val_y: torch.Tensor
    test_x: Images
    test_y: torch.Tensor
    class_names: list[str]
    source: str
    indices: dict[str, list[int]] = field(default_factory=dict)
    in_memory: bool = True
    class_map: list[int] | None = None
    """With ``data.classes``: the dataset's class index of each class of this task."""
    val_from: str = "train"
    """``train`` (held out of the training split) or ``dataset`` (the dataset's own val split)."""
    skipped: list[Problem] = field(default_factory=list)
    """Bad images left out (``data.skip_bad_images``)."""
    normalization: Normalization = field(default_factory=lambda: Normalization("backbone"))
    """``data.normalize`` resolved: the mean/std the model must use, or ``backbone`` (its own)."""
    folds: dict[str, Any] | None = None
    """With ``data.folds``: ``{folds, fold, seed, pooled_train, fold_sizes}`` (recorded in ``selection.json``)."""
    size_from: str = "config"
    """Where the image size came from: ``config`` (``data.image_size``), ``native`` or ``backbone`` (its
    pretrained input size, for files of mixed sizes without ``data.image_size``)."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def multilabel(self) -> bool:
        """The targets are N×K multi-hot rows (``data.task: multilabel``), not class indices."""
        return is_multilabel(self.train_y)

    @property
    def image_size(self) -> int:
        """Side of the images as batched."""
        return int(self.train_x.shape[-1])

    def selection_record(self) -> dict[str, Any]:
        """What ``selection.json`` records: source, indices, class mapping, skipped bad images."""
        record: dict[str, Any] = {"source": self.source, **self.indices, "val_from": self.val_from, "in_memory": self.in_memory}
        if self.class_map is not None:
            record["classes"] = {"dataset_index": self.class_map, "names": self.class_names}
        record["skipped_bad_images"] = [{"path": p.path, "reason": p.message} for p in self.skipped]
        record["skipped_bad_images_count"] = len(self.skipped)
        record["normalize"] = self.normalization.to_dict()
        record["image_size"] = {"value": self.image_size, "from": self.size_from}
        record["task"] = "multilabel" if self.multilabel else "multiclass"
        if self.multilabel:
            ys = {"train": self.train_y, "val": self.val_y, "test": self.test_y}
            record["multilabel"] = {
                "stratification": "iterative (Sechidis et al. 2011), exact sizes",
                "classes_filter": "data.classes keeps those columns and leaves out images with none of them",
                "positives": {s: class_counts(y, self.num_classes).tolist() for s, y in ys.items()},
                "no_label": {s: int((y.sum(dim=1) == 0).sum()) for s, y in ys.items()},
            }
        if self.folds is not None:
            record["folds"] = self.folds
        return record


Part = tuple[np.ndarray, np.ndarray]  # (dataset indices, task labels) of one split


def prepare_splits(cfg: DataConfig, seed: int, raw: RawDataset | None = None, default_size: int | None = None) -> ImageSplits:
    """Load ``cfg.dataset`` and return seeded, stratified train/val/test splits (module docstring).

    In-memory splits are decoded/resized once here; on the PIL path the selected files are kept as
    ``FileImages``. Bad image files fail with one DatasetError listing all of them, or are skipped and
    recorded when ``cfg.skip_bad_images``. ``default_size`` is the side image files of mixed sizes get
    without ``data.image_size`` (the kind passes its backbone's pretrained input size); without one they fail.
    """
    raw = raw if raw is not None else load_dataset(cfg)
    pooled_train = len(raw.train_y)
    if cfg.folds is not None:
        raw = pool_train_test(raw)
    relabel, class_map, names = select_classes(cfg.classes, raw.class_names)
    parts, val_from = select_parts(cfg, raw, seed, relabel, names)
    sources = {"train": raw.train_x, "val": raw.val_x if val_from == "dataset" else raw.train_x, "test": raw.test_x}
    xs: dict[str, Images] = {s: sources[s][torch.from_numpy(idx)] for s, (idx, _) in parts.items()}  # type: ignore[index]
    dtype = np.float32 if is_multilabel(raw.train_y) else np.int64  # multi-hot rows or class indices
    ys = {s: torch.from_numpy(lab.astype(dtype)) for s, (_, lab) in parts.items()}
    idxs = {s: idx for s, (idx, _) in parts.items()}
    skipped = list(raw.skipped)
    mixed = isinstance(raw.train_x, FileImages) and raw.train_x.size is None
    size_from = "config" if cfg.image_size else ("backbone" if mixed else "native")
    if isinstance(raw.train_x, FileImages):
        in_memory = _decode_or_check_files(cfg, raw, xs, ys, idxs, skipped, len(names), default_size)
    else:
        in_memory = cfg.in_memory is not False
        if cfg.image_size:
            xs = {s: resize_uint8(x, cfg.image_size, cfg.resize, cfg.crop_pct) for s, x in xs.items()}  # type: ignore[arg-type]
    folds = None
    if cfg.folds is not None:
        folds = {"folds": cfg.folds, "fold": cfg.fold or 0, "seed": seed, "pooled_train": pooled_train,
                 "fold_sizes": [len(f) for f in _fold_positions(cfg, raw, seed, relabel, names)]}
    return ImageSplits(
        train_x=xs["train"], train_y=ys["train"], val_x=xs["val"], val_y=ys["val"], test_x=xs["test"], test_y=ys["test"],
        class_names=names, source=raw.source, indices={s: idx.tolist() for s, idx in idxs.items()},
        in_memory=in_memory, class_map=class_map, val_from=val_from, skipped=skipped,
        normalization=split_normalization(cfg.normalize, xs["train"]), folds=folds, size_from=size_from,
    )


def _fold_positions(cfg: DataConfig, raw: RawDataset, seed: int, relabel: np.ndarray | None, names: list[str]) -> list[np.ndarray]:
    """The test positions (in the pooled dataset's task candidates) of every fold (``data.folds``)."""
    keep, labels = task_labels(raw.train_y.numpy(), relabel)
    return [keep[p] for p in fold_test_positions(labels, cfg.folds or 0, seed, names)]


def select_parts(cfg: DataConfig, raw: RawDataset, seed: int, relabel: np.ndarray | None, names: list[str]) -> tuple[dict[str, Part], str]:
    """Steps 1-4: (dataset indices and task labels per split, where val came from: ``train`` or ``dataset``)."""

    def candidates(y: torch.Tensor) -> Part:
        return task_labels(y.numpy(), relabel)

    tr_idx, tr_lab = candidates(raw.train_y)
    te_idx, te_lab = candidates(raw.test_y)
    if cfg.folds is not None:  # raw is pooled (prepare_splits): fold k is the test split, the other folds the training pool
        test_idx = _fold_positions(cfg, raw, seed, relabel, names)[cfg.fold or 0]
        in_test = np.isin(tr_idx, test_idx)
        te_idx, te_lab = tr_idx[in_test], tr_lab[in_test]
        tr_idx, tr_lab = tr_idx[~in_test], tr_lab[~in_test]
    if cfg.k_per_class is not None:
        pool = k_per_class(tr_lab, cfg.k_per_class, seed, names)
    else:
        pool = stratified_take(tr_lab, cfg.train_subset, seed, "data.train_subset")
    test_pos = stratified_take(te_lab, cfg.test_subset, seed, "data.test_subset")
    test = (te_idx[test_pos], te_lab[test_pos])
    if raw.val_x is not None and raw.val_y is not None:
        parts, val_from = {"train": (tr_idx[pool], tr_lab[pool]), "val": candidates(raw.val_y), "test": test}, "dataset"
    else:
        train_pos, val_pos = _hold_out_val(cfg, pool, tr_lab[pool], seed, len(names))
        parts, val_from = {"train": (tr_idx[train_pos], tr_lab[train_pos]), "val": (tr_idx[val_pos], tr_lab[val_pos]), "test": test}, "train"
    if is_multilabel(tr_lab):
        _check_training_classes(cfg, parts["train"][1], names)
    return parts, val_from


def _hold_out_val(cfg: DataConfig, pool: np.ndarray, labels: np.ndarray, seed: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: (train, val) positions of the training pool (``pool``: sorted positions, ``labels``: theirs), stratified."""
    n_val = cfg.val_count if cfg.val_count is not None else int(round(cfg.val_fraction * len(pool)))
    what = f"data.val_count={cfg.val_count}" if cfg.val_count is not None else f"data.val_fraction={cfg.val_fraction}"
    least = 1 if is_multilabel(labels) else n_classes  # an image counts for several classes when multi-label
    if n_val < least or len(pool) - n_val < least:
        raise DatasetError(f"{what} of {len(pool)} training images leaves too few images for {n_classes} classes in train or val")
    train_pos, val_pos = stratified_split(labels, n_val, seed)
    return pool[train_pos], pool[val_pos]


def _check_training_classes(cfg: DataConfig, labels: np.ndarray, names: list[str]) -> None:
    """Multi-label: every class keeps a training image (a class never seen in training cannot be learned)."""
    missing = [names[c] for c in np.flatnonzero(class_counts(labels, len(names)) == 0)]
    if missing:
        keys = ", ".join(f"data.{k}={getattr(cfg, k)}" for k in ("train_subset", "val_fraction", "val_count", "folds", "classes")
                         if getattr(cfg, k) is not None)
        raise DatasetError(f"class(es) {missing} have no image in the training split ({keys or 'the dataset'}): "
                           "a class never seen in training cannot be learned; select more images, or leave the class out (data.classes)")


def _decode_or_check_files(
    cfg: DataConfig, raw: RawDataset, xs: dict[str, Images], ys: dict[str, torch.Tensor], idxs: dict[str, np.ndarray],
    skipped: list[Problem], n_classes: int, default_size: int | None = None,
) -> bool:
    """Step 5 for image files: decode (or check) them; drop bad ones in place when skipping. Returns in_memory."""
    in_memory, bad = prepare_files(cfg, raw, xs, default_size)
    if bad and not cfg.skip_bad_images:
        problems = [p for s in bad for _, p in bad[s]]
        raise DatasetError(
            f"{raw.source}: {len(problems)} bad image(s) (set data.skip_bad_images: true to skip them and record "
            f"them in the run; `transferlab check-data` lists every problem):\n{format_problems(problems)}"
        )
    for split, found in bad.items():
        drop = {i for i, _ in found}
        keep = np.array([i for i in range(len(idxs[split])) if i not in drop], dtype=np.int64)
        xs[split] = xs[split][torch.from_numpy(keep)]
        ys[split], idxs[split] = ys[split][torch.from_numpy(keep)], idxs[split][keep]
        skipped += [p for _, p in found]
    if (class_counts(ys["train"], n_classes) == 0).any():
        raise DatasetError(f"{raw.source}: after skipping bad images a class has no training images left")
    return in_memory
