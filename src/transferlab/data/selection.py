"""Which images an experiment uses: class subsets, stratified and seeded subsets, k per class.

Every choice is stratified and seeded, so the same seed gives the same indices (recorded in the run's
``selection.json``). Labels are class indices (multiclass: scikit-learn's stratified splits) or N×K
multi-hot rows (``data.task: multilabel``: iterative stratification, ``transferlab.data.multilabel``).
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import train_test_split

from transferlab.data.multilabel import is_multilabel, iterative_split, iterative_take
from transferlab.data.sources import DatasetError

__all__ = ["k_per_class", "select_classes", "stratified_split", "stratified_take", "task_labels"]


def stratified_take(labels: np.ndarray, amount: float | None, seed: int, what: str) -> np.ndarray:
    """Positions of a stratified subset: ``amount`` <= 1 is a fraction, > 1 a count; None = all."""
    idx = np.arange(len(labels))
    if amount is None or amount == len(labels) or amount == 1.0:
        return idx
    n = int(round(amount * len(labels))) if amount <= 1 else int(amount)
    if n > len(labels):
        raise DatasetError(f"{what}={amount:g} asks for {n} images but the split has only {len(labels)}")
    if is_multilabel(labels):  # an image counts for several classes: no "fewer images than classes" rule
        if n < 1:
            raise DatasetError(f"{what}={amount:g} of {len(labels)} images gives no image")
        return idx if n == len(labels) else iterative_take(labels, n, seed)
    n_classes = len(np.unique(labels))
    if n < n_classes:
        raise DatasetError(f"{what}={amount:g} gives {n} images, fewer than the {n_classes} classes")
    if n == len(labels):
        return idx
    if len(labels) - n < n_classes:  # sklearn cannot stratify a remainder smaller than the class count
        return np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))
    taken, _ = train_test_split(idx, train_size=n, stratify=labels, random_state=seed)
    return np.sort(taken)


def stratified_split(labels: np.ndarray, n_second: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (sorted) of the two parts of a stratified, seeded split whose second part has ``n_second`` images."""
    if is_multilabel(labels):
        part = iterative_split(labels, [len(labels) - n_second, n_second], seed)
        return np.flatnonzero(part == 0), np.flatnonzero(part == 1)
    first, second = train_test_split(np.arange(len(labels)), test_size=n_second, stratify=labels, random_state=seed)
    return np.sort(first), np.sort(second)


def task_labels(y: np.ndarray, relabel: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the images in the task, their task labels) after ``data.classes`` (``relabel``: ``select_classes``).

    Multiclass: the images of a chosen class, relabelled 0..k-1. Multi-label: the chosen columns, in the order of
    ``data.classes``, of the images that have at least one chosen class — an image whose labels are all left out
    leaves the task, as an image of a left-out class does in the multiclass case (it would otherwise become a
    negative for every class, which it is not known to be).
    """
    if relabel is None:
        return np.arange(len(y)), y
    if is_multilabel(y):
        chosen = np.argsort(relabel)[int((relabel < 0).sum()):]  # dataset column of task class 0, 1, ...
        sub = y[:, chosen]
        keep = np.flatnonzero(sub.sum(axis=1) > 0)
        return keep, sub[keep]
    new = relabel[y]
    keep = np.flatnonzero(new >= 0)
    return keep, new[keep]


def k_per_class(labels: np.ndarray, k: int, seed: int, names: list[str]) -> np.ndarray:
    """Positions of exactly ``k`` images of every class (seeded)."""
    if is_multilabel(labels):
        raise DatasetError(f"data.k_per_class={k} has no meaning with data.task: multilabel (an image has several classes); "
                           "use data.train_subset")
    rng = np.random.default_rng(seed)
    out = []
    for c in range(len(names)):
        pos = np.flatnonzero(labels == c)
        if len(pos) < k:
            raise DatasetError(f"data.k_per_class={k} but class {names[c]!r} has only {len(pos)} training images")
        out.append(rng.choice(pos, size=k, replace=False))
    return np.sort(np.concatenate(out))


def select_classes(spec: Sequence[int | str] | None, names: list[str]) -> tuple[np.ndarray | None, list[int] | None, list[str]]:
    """``data.classes`` -> (old label -> new label or -1, dataset index of each new class, new class names)."""
    if spec is None:
        return None, None, list(names)
    chosen: list[int] = []
    for i, c in enumerate(spec):
        if isinstance(c, bool) or not isinstance(c, (int, str)):
            raise DatasetError(f"data.classes[{i}]: {c!r} must be a class index or a class name")
        if isinstance(c, int):
            if not 0 <= c < len(names):
                raise DatasetError(f"data.classes[{i}]: class index {c} is out of range 0..{len(names) - 1}")
            idx = c
        else:
            c = unicodedata.normalize("NFC", c)  # class folder names are NFC too
            if c not in names:
                close = difflib.get_close_matches(c, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise DatasetError(f"data.classes[{i}]: no class named {c!r}{hint}; classes: {', '.join(names[:30])}")
            idx = names.index(c)
        if idx in chosen:
            raise DatasetError(f"data.classes[{i}]: class {names[idx]!r} is listed twice")
        chosen.append(idx)
    if len(chosen) < 2:
        raise DatasetError(f"data.classes={list(spec)} selects {len(chosen)} class; a task needs at least 2")
    relabel = np.full(len(names), -1, dtype=np.int64)
    relabel[chosen] = np.arange(len(chosen))
    return relabel, chosen, [names[i] for i in chosen]
