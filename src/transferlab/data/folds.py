"""k-fold cross-validation (``data.folds``): stratified, seeded folds of the pooled labelled images.

A test split of 40 images (a 200-image folder at ``test_fraction: 0.2``) moves by several points with
the split; the mean over k folds, each image tested exactly once, is the number to quote. So the
folds cut the *pooled* labelled images — the dataset's train and test splits together — and fold k
is run k's test split; the other folds are its training pool (``train_subset``, ``k_per_class`` and
the validation hold-out then apply to that pool as usual). A dataset's own ``val`` split stays its
validation split. The partition depends only on the labels and the seed, so the k runs of one seed
share it (their test folds are disjoint and cover every image); another seed gives another partition
(repeated k-fold when ``seeds:`` is set too). Multi-label folds (``data.task: multilabel``) are cut by iterative
stratification (``transferlab.data.multilabel``): every label keeps its share in every fold.

A study expands ``data.folds: k`` into k runs with ``data.fold`` = 0..k-1 (``transferlab.config.study``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from transferlab.config import DataConfig, ExperimentConfig, register_check
from transferlab.data.archives import no_downloads
from transferlab.data.images import FileImages
from transferlab.data.multilabel import class_counts, is_multilabel, iterative_folds
from transferlab.data.selection import select_classes, task_labels
from transferlab.data.sources import DatasetError, RawDataset, load_dataset

__all__ = ["FoldsLimit", "check_folds", "fold_test_positions", "folds_limit", "pool_train_test"]


def fold_test_positions(labels: np.ndarray, folds: int, seed: int, names: list[str] | None = None) -> list[np.ndarray]:
    """The test positions of each of ``folds`` stratified, seeded folds of ``labels`` (sorted; disjoint, covering).

    ``labels``: class indices (scikit-learn's ``StratifiedKFold``) or an N×K multi-hot matrix (iterative
    stratification). Raises ``DatasetError`` naming ``data.folds`` when a class has fewer images than folds (a fold
    would miss it).
    """
    counts = class_counts(labels, int(labels.shape[1]) if is_multilabel(labels) else int(labels.max()) + 1)
    present = np.flatnonzero(counts)
    smallest = int(present[np.argmin(counts[present])])
    if counts[smallest] < folds:
        name = names[smallest] if names is not None else str(smallest)
        raise DatasetError(f"data.folds={folds} but class {name!r} has only {counts[smallest]} images: "
                           f"every fold needs one of each class (use at most {counts[smallest]} folds)")
    if is_multilabel(labels):
        return iterative_folds(labels, folds, seed)
    kfold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [np.sort(test) for _, test in kfold.split(np.zeros(len(labels)), labels)]


@dataclasses.dataclass(frozen=True)
class FoldsLimit:
    """The largest ``data.folds`` a data config allows: the image count of its smallest class (pooled train + test)."""

    largest: int
    smallest_class: str
    n_images: int


def folds_limit(cfg: DataConfig) -> FoldsLimit | None:
    """How many folds the data of ``cfg`` allows (after ``data.classes``), read without training or downloading.

    ``None`` when the data is not here or cannot be read: the run itself then says why.
    """
    try:
        with no_downloads():
            raw = load_dataset(dataclasses.replace(cfg, skip_bad_images=True))
        relabel, _, names = select_classes(cfg.classes, raw.class_names)
    except DatasetError:
        return None
    _, labels = task_labels(torch.cat([raw.train_y, raw.test_y]).numpy(), relabel)
    if len(labels) == 0:
        return None
    counts = class_counts(labels, len(names))
    present = np.flatnonzero(counts)
    smallest = int(present[np.argmin(counts[present])])
    return FoldsLimit(int(counts[smallest]), names[smallest] if smallest < len(names) else str(smallest), len(labels))


def _concat(a: torch.Tensor | FileImages, b: torch.Tensor | FileImages) -> torch.Tensor | FileImages:
    if isinstance(a, FileImages) and isinstance(b, FileImages):
        return dataclasses.replace(a, paths=a.paths + b.paths, size=a.size if a.size == b.size else None)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape[1:] == b.shape[1:]:
        return torch.cat([a, b])
    raise DatasetError("data.folds: the train and test images of this dataset differ in shape and cannot be pooled")


def pool_train_test(raw: RawDataset) -> RawDataset:
    """``raw`` with its train and test splits pooled: both are the concatenation (train first).

    Position ``i`` of the pool is train image ``i`` for ``i < len(raw.train_y)``, else test image
    ``i - len(raw.train_y)`` (what ``selection.json`` records as ``folds.pooled_train``).
    """
    x = _concat(raw.train_x, raw.test_x)
    y = torch.cat([raw.train_y, raw.test_y])
    return dataclasses.replace(raw, train_x=x, train_y=y, test_x=x, test_y=y)


@register_check
def check_folds(cfg: ExperimentConfig) -> None:
    """``data.folds`` >= 2, ``data.fold`` in range and only with ``folds``, kinds that test on the test split."""
    d = cfg.data
    if d.folds is None:
        if d.fold is not None:
            raise cfg.error(f"data.fold={d.fold} needs data.folds (how many folds there are)")
        return
    if isinstance(d.folds, bool) or d.folds < 2:
        raise cfg.error(f"data.folds={d.folds!r} must be >= 2 (or null: no cross-validation)")
    if d.fold is not None and not 0 <= d.fold < d.folds:
        raise cfg.error(f"data.fold={d.fold} must be in 0..{d.folds - 1} (data.folds={d.folds})")
    if not cfg.uses.folds:
        raise cfg.error(f"data.folds applies to kinds that test on a test split (train, logistic, knn), not kind: {cfg.kind}")
    if d.test_subset is not None:
        raise cfg.error(f"data.test_subset={d.test_subset!r} cannot be combined with data.folds (the folds are the test splits)")
