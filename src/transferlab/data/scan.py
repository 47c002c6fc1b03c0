"""What a dataset of image files holds (``FolderScan``), and the rules every file layout shares.

A scan is made by ``transferlab.data.folder`` (class folders), ``transferlab.data.lists`` (CSV and
JSON-lines lists) or ``transferlab.data.tiny_imagenet``; ``raw_from_scan`` turns it into a dataset and
``transferlab check-data`` lists its problems.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transferlab.data.images import Problem
from transferlab.data.multilabel import multi_hot

__all__ = ["SPLIT_FOLDERS", "FolderScan", "Label", "check_class_sets", "nfc", "sort_classes"]

SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
"""Split folder names (and ``split`` column values) and the split each one is."""

Label = int | tuple[int, ...]
"""An image's label in a scan: a class index, or the sorted class indices of a multi-label image (maybe none)."""


def nfc(name: str) -> str:
    """``name`` in Unicode normal form C (how class names are compared)."""
    return unicodedata.normalize("NFC", name)


@dataclass
class FolderScan:
    """What is in a dataset folder or list: per split the files and labels, the classes, the problems.

    ``multilabel``: every label is a tuple of class indices (``data.task: multilabel``), else one class index.
    """

    root: Path
    layout: str  # "classes", "splits", "csv", "jsonl", "tiny_imagenet"
    class_names: list[str] = field(default_factory=list)
    splits: dict[str, tuple[list[str], list[Label]]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    channels: int = 3
    size: tuple[int, int] | None = None
    multilabel: bool = False

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def n_images(self) -> int:
        return sum(len(p) for p, _ in self.splits.values())

    def label_name(self, label: Label, sep: str = ";") -> str:
        """The class name of a label, or the names of a multi-label image's classes joined by ``sep``."""
        if isinstance(label, tuple):
            return sep.join(self.class_names[c] for c in label)
        return self.class_names[label]

    def targets(self, labels: Sequence[Label]) -> torch.Tensor:
        """The labels as a dataset's targets: int64 class indices, or float32 N×K multi-hot rows."""
        if self.multilabel:
            return multi_hot(labels, len(self.class_names))  # type: ignore[arg-type] - tuples when multilabel
        return torch.tensor(list(labels), dtype=torch.int64)


def check_class_sets(per_split: dict[str, set[str]], where: dict[str, str], problems: list[Problem]) -> None:
    """Multiclass: every split has the classes of train (a ``class_mismatch`` error for each difference)."""
    if len(per_split) < 2:
        return
    union = set().union(*per_split.values())
    train = per_split.get("train", union)
    for split, names in per_split.items():
        if split == "train":
            continue  # every difference is reported from the other split's side
        missing, extra = sorted(train - names), sorted(names - train)
        if missing:
            problems.append(Problem(where[split], f"{split} split lacks class(es) {missing} that train has", "class_mismatch"))
        if extra:
            problems.append(Problem(where[split], f"{split} split has class(es) {extra} that train has not", "class_mismatch"))


def sort_classes(names: set[str]) -> list[str]:
    """Class names in their order: numerically when all are integers, else sorted as strings."""
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)  # 0, 1, 2, ..., 10 rather than 0, 1, 10, 2
    return sorted(names)
