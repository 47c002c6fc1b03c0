"""Multi-label targets (``data.task: multilabel``): multi-hot label matrices and their stratification.

A multi-label dataset's ``*_y`` are ``torch.float32`` N×K tensors of 0/1 (image i has class k when
``y[i, k] == 1``); a multiclass dataset's are int64 (N,) class indices. The shape tells them apart
(``is_multilabel``), so every selection works on either without a flag.

Stratification. A stratified subset of single-label data keeps every class's share; for multi-label
data no partition can keep every label *combination*'s share, so selections use **iterative
stratification** (Sechidis, Tsoumakas & Vlahavas, "On the stratification of multi-label data",
ECML PKDD 2011, Algorithm 1), which keeps every single label's share:

1. every part ``j`` wants ``sizes[j]`` images, and ``sizes[j] / N`` of the positives of each label;
2. take the label with the fewest images not yet placed (ties: at random); place each of those images
   (in random order) in the part that still wants the most positives of that label — ties broken by the
   part that still wants the most images, then at random — and update what every part still wants by
   the image's labels;
3. repeat until every labelled image is placed; images without a label fill the room left.

One change from the paper: a part that has its ``sizes[j]`` images takes no more, so the sizes are
exact (``data.train_subset: 500`` gives 500 images, the k folds differ by at most one image). Every
draw comes from ``numpy.random.default_rng(seed)``: the same labels and seed give the same parts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from transferlab.data.images import Problem

__all__ = [
    "class_counts",
    "is_multilabel",
    "iterative_folds",
    "iterative_split",
    "iterative_take",
    "label_problems",
    "label_set_name",
    "multi_hot",
]


def is_multilabel(y: torch.Tensor | np.ndarray) -> bool:
    """``y`` is an N×K multi-hot matrix (multi-label), not an (N,) vector of class indices."""
    return y.ndim == 2


def multi_hot(label_sets: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """The float32 N×K 0/1 matrix of the class indices of each image (an empty set is a row of zeros)."""
    y = torch.zeros(len(label_sets), num_classes, dtype=torch.float32)
    for i, labels in enumerate(label_sets):
        y[i, list(labels)] = 1.0
    return y


def class_counts(y: torch.Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """Images of each class: a bincount of class indices, or the column sums (positives) of a multi-hot matrix."""
    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if is_multilabel(y):
        return (y[:, :num_classes] > 0.5).sum(axis=0).astype(np.int64)
    return np.bincount(y.astype(np.int64), minlength=num_classes)[:num_classes]


def label_set_name(row: torch.Tensor | np.ndarray, names: Sequence[str], sep: str = ";") -> str:
    """The class names of one multi-hot row, joined by ``sep`` (``""``: no label)."""
    return sep.join(names[int(i)] for i in np.flatnonzero(np.asarray(row) > 0.5))


# --------------------------------------------------------------------------------------------
# iterative stratification (Sechidis et al. 2011), with exact part sizes


def _best_part(wanted: np.ndarray, room: np.ndarray, rng: np.random.Generator) -> int:
    """The part with room left that wants the most of this label, then the most images, then at random."""
    open_parts = np.flatnonzero(room > 0)
    keys = (rng.random(len(open_parts)), room[open_parts], wanted[open_parts])  # np.lexsort: the last key is primary
    return int(open_parts[np.lexsort(keys)[-1]])


def iterative_split(y: np.ndarray | torch.Tensor, sizes: Sequence[int], seed: int) -> np.ndarray:
    """The part (0..len(sizes)-1) of every row of the N×K 0/1 matrix ``y``; part j gets exactly ``sizes[j]`` rows.

    Iterative stratification (module docstring): every label's positives are shared between the parts in
    proportion to their sizes, as closely as the images' other labels allow.
    """
    labels = (y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)) > 0.5
    n = len(labels)
    size = np.asarray(sizes, dtype=np.int64)
    if size.sum() != n or (size < 0).any():
        raise ValueError(f"iterative_split: part sizes {list(sizes)} must be >= 0 and add up to the {n} images")
    rng = np.random.default_rng(seed)
    room = size.astype(np.float64)
    wanted = np.outer(size / max(n, 1), labels.sum(axis=0))  # parts × labels: positives each part still wants
    part = np.full(n, -1, dtype=np.int64)
    left = labels.copy()  # positives of images not placed yet
    while left.any():
        counts = left.sum(axis=0)
        present = np.flatnonzero(counts)
        rarest = present[counts[present] == counts[present].min()]
        label = int(rng.choice(rarest))
        rows = rng.permutation(np.flatnonzero(left[:, label]))
        for i in rows:
            j = _best_part(wanted[:, label], room, rng)
            part[i] = j
            room[j] -= 1
            wanted[j] -= labels[i]
        left[rows] = False
    unlabelled = np.flatnonzero(part < 0)  # images with no label fill the room left, at random
    part[unlabelled] = rng.permutation(np.repeat(np.arange(len(size)), room.astype(np.int64)))
    return part


def iterative_take(y: np.ndarray | torch.Tensor, n: int, seed: int) -> np.ndarray:
    """Positions (sorted) of ``n`` of the rows of ``y``, chosen by iterative stratification."""
    part = iterative_split(y, [n, len(y) - n], seed)
    return np.flatnonzero(part == 0)


def iterative_folds(y: np.ndarray | torch.Tensor, folds: int, seed: int) -> list[np.ndarray]:
    """The positions (sorted) of ``folds`` disjoint, covering, iteratively stratified folds (sizes differ by at most 1)."""
    n = len(y)
    sizes = [n // folds + (1 if f < n % folds else 0) for f in range(folds)]
    part = iterative_split(y, sizes, seed)
    return [np.flatnonzero(part == f) for f in range(folds)]


# --------------------------------------------------------------------------------------------
# check-data findings


def label_problems(splits: dict[str, tuple[Sequence[str], torch.Tensor]], names: Sequence[str], where: str) -> list[Problem]:
    """Findings of a multi-label dataset: every image with no label, and the classes that appear in no image of a split.

    ``splits``: split name -> (where each image is — its path, or ``train[i]`` — and its N×K targets). An image with
    no label is a negative for every class, which may be meant (a "nothing here" image) or a lost annotation: a
    warning. A class with no training image cannot be learned (an error); one missing from val or test cannot be
    measured there (a warning: its AP and threshold are left out).
    """
    problems = []
    for split, (places, y) in splits.items():
        if len(y) == 0:
            continue
        for i in np.flatnonzero((y > 0.5).sum(dim=1).numpy() == 0):
            problems.append(Problem(places[int(i)], f"has no label ({split} split): a negative for every class", "no_label", "warning"))
        absent = [names[c] for c in np.flatnonzero(class_counts(y, len(names)) == 0)]
        if absent:
            severity = "error" if split == "train" else "warning"
            why = "cannot be learned" if split == "train" else "cannot be measured there"
            problems.append(Problem(f"{where} ({split} split)", f"class(es) {absent} appear in no image of the {split} split ({why})",
                                    "absent_class", severity))
    return problems
