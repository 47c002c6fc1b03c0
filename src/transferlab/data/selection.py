"""Which images an experiment uses: class subsets, stratified and seeded subsets, k per class.

Every choice is stratified and seeded, so the same seed gives the same indices (recorded in the run's
``selection.json``).
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import train_test_split

from transferlab.data.sources import DatasetError

__all__ = ["k_per_class", "select_classes", "stratified_take"]


def stratified_take(labels: np.ndarray, amount: float | None, seed: int, what: str) -> np.ndarray:
    """Positions of a stratified subset: ``amount`` <= 1 is a fraction, > 1 a count; None = all."""
    idx = np.arange(len(labels))
    if amount is None or amount == len(labels) or amount == 1.0:
        return idx
    n = int(round(amount * len(labels))) if amount <= 1 else int(amount)
    n_classes = len(np.unique(labels))
    if n > len(labels):
        raise DatasetError(f"{what}={amount:g} asks for {n} images but the split has only {len(labels)}")
    if n < n_classes:
        raise DatasetError(f"{what}={amount:g} gives {n} images, fewer than the {n_classes} classes")
    if n == len(labels):
        return idx
    if len(labels) - n < n_classes:  # sklearn cannot stratify a remainder smaller than the class count
        return np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))
    taken, _ = train_test_split(idx, train_size=n, stratify=labels, random_state=seed)
    return np.sort(taken)


def k_per_class(labels: np.ndarray, k: int, seed: int, names: list[str]) -> np.ndarray:
    """Positions of exactly ``k`` images of every class (seeded)."""
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
