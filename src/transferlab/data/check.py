"""``transferlab check-data``: scan a dataset before training and list every problem at once.

For image folders, CSV lists and Tiny ImageNet it reads the structure (class folders, splits,
annotation files), decodes every image once (in parallel), and hashes every file to find
duplicates. For array datasets (CIFAR, MNIST family, digits) it loads and validates the files and
finds duplicate images. For a study file it checks the data of every experiment, including its
selection (``classes``, ``train_subset``, ``k_per_class``, ``val_fraction`` …), without training.

Errors (training would fail or be wrong): unreadable, empty, truncated or non-image files; empty
class folders; a root without class folders; splits with different class sets; identical files
under different classes; impossible selections (``data.folds`` above the smallest class included).
Warnings: ignored non-image files, huge images,
duplicate files within a class or across splits. Multi-label data (``data.task: multilabel``): labels not in the
class list (``classes.txt``) are errors, a class in no training image an error, images with no label and classes
missing from a val or test split (the dataset's, or the validation split the selection holds out) warnings.
Information (not a problem): images of mixed sizes without ``data.image_size``, which a run resizes to its
backbone's pretrained input size.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from transferlab.config import ConfigError, DataConfig, load_study
from transferlab.data.folder import FolderScan, duplicate_problems, probe_scan, raw_from_scan, scan_duplicates, scan_folder
from transferlab.data.images import ImageReadError, Problem, load_image, map_files
from transferlab.data.lists import detect_task, is_list_file
from transferlab.data.multilabel import class_counts, is_multilabel, label_problems, label_set_name
from transferlab.data.prepare import prepare_splits
from transferlab.data.sources import DATASETS, DatasetError, RawDataset, load_dataset, supported_tasks
from transferlab.data.tiny_imagenet import locate as locate_tiny_imagenet
from transferlab.data.tiny_imagenet import scan_tiny_imagenet


@dataclass
class DataReport:
    """The result of checking one dataset: what was checked, its size, and every problem found."""

    target: str
    dataset: str
    problems: list[Problem] = field(default_factory=list)
    split_sizes: dict[str, int] = field(default_factory=dict)
    n_classes: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def infos(self) -> list[Problem]:
        """What a run will decide by itself (e.g. the size of images of mixed sizes), for information."""
        return [p for p in self.problems if p.severity == "info"]

    @property
    def ok(self) -> bool:
        """True when nothing would stop or spoil training (warnings are allowed)."""
        return not self.errors

    def format(self, limit: int = 200) -> str:
        sizes = ", ".join(f"{k} {v:,}" for k, v in self.split_sizes.items())
        head = f"{self.dataset} ({self.target}): {sum(self.split_sizes.values()):,} images, {self.n_classes} classes"
        head += f" ({sizes})" if sizes else ""
        if not self.problems:
            return head + "\n  ok: no problems found"
        lines = [head, f"  {len(self.errors)} error(s), {len(self.warnings)} warning(s)" + (f", {len(self.infos)} note(s):" if self.infos else ":")]
        ordered = self.errors + self.warnings + self.infos
        for p in ordered[:limit]:
            lines.append(f"  {p.severity:<7} {p.kind:<14} {p}")
        if len(ordered) > limit:
            lines.append(f"  ... and {len(ordered) - limit} more")
        return "\n".join(lines)


def check_scan(scan: FolderScan, decode: bool = True, workers: int | None = None) -> list[Problem]:
    """Problems of a scanned file dataset: the scan's own, plus full decoding and duplicate files."""
    problems = list(scan.problems)
    already_bad = {p.path for p in problems if p.kind == "bad_image"}
    entries = [
        (path, split, scan.label_name(label))
        for split, (paths, labels) in scan.splits.items()
        for path, label in zip(paths, labels, strict=True)
        if path not in already_bad
    ]
    if decode:
        results = map_files(lambda p: load_image(p, scan.channels), [e[0] for e in entries], workers)
        for (path, _, _), r in zip(entries, results, strict=True):
            if isinstance(r, Exception):
                problems.append(Problem(path, str(r) if isinstance(r, ImageReadError) else f"{type(r).__name__}: {r}"))
                already_bad.add(path)
    problems += scan_duplicates(scan, already_bad, workers)  # the same rule a run applies (transferlab.data.folder)
    return problems


def _array_duplicates(raw: RawDataset) -> list[Problem]:
    items = []
    for split, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        if not isinstance(x, torch.Tensor):
            return []
        arr = x.numpy().reshape(len(x), -1)
        for i in range(len(arr)):
            label = label_set_name(y[i], raw.class_names) if is_multilabel(y) else raw.class_names[int(y[i])]
            items.append((hashlib.blake2b(arr[i].tobytes(), digest_size=16).hexdigest(), f"{split}[{i}]", split, label))
    return duplicate_problems(items)


def _selection_problems(cfg: DataConfig, raw: RawDataset, seed: int) -> list[Problem]:
    """Run the selection (no decoding, no resizing) and turn a failure into a problem."""

    size = cfg.image_size if not isinstance(raw.train_x, torch.Tensor) else None
    dry = dataclasses.replace(cfg, in_memory=False, skip_bad_images=False, image_size=size)
    try:
        splits = prepare_splits(dry, seed, raw, default_size=64)  # mixed sizes: a run picks its backbone's size; nothing is decoded here
    except DatasetError as e:
        return [Problem(raw.source, str(e), "selection")]
    if not splits.multilabel or splits.val_from != "train":
        return []
    # the validation split this selection holds out (where thresholds are chosen) may lack a rare class; the dataset's
    # own splits were listed already
    absent = [splits.class_names[c] for c in np.flatnonzero(class_counts(splits.val_y, splits.num_classes) == 0)]
    if not absent:
        return []
    return [Problem(f"{raw.source} (val split)", f"class(es) {absent} appear in no image of the validation split held out by "
                    "the selection: their thresholds fall back to the global one", "absent_class", "warning")]


def check_config(cfg: DataConfig, seed: int = 0, decode: bool = True, workers: int | None = None) -> DataReport:
    """Check the data one experiment would use (every file, the structure, the selection)."""

    report = DataReport(target=str(cfg.root or "default location"), dataset=cfg.dataset)
    scan: FolderScan | None = None
    try:
        if cfg.dataset == "folder":
            if not cfg.root:
                raise DatasetError("dataset 'folder' needs data.root")
            scan = scan_folder(cfg.root, task=cfg.task, label_sep=cfg.label_sep)
        elif cfg.dataset == "tiny_imagenet":
            scan = scan_tiny_imagenet(locate_tiny_imagenet(cfg))
            probe_scan(scan)
            scan.channels, scan.size = 3, scan.size or (64, 64)
    except DatasetError as e:
        report.problems.append(Problem(str(cfg.root or cfg.dataset), str(e), "no_classes"))
        return report
    if scan is not None:
        report.target = str(scan.root)
        report.problems += check_scan(scan, decode, workers)
        if scan.multilabel:
            report.problems += label_problems({s: (p, scan.targets(y)) for s, (p, y) in scan.splits.items()}, scan.class_names, str(scan.root))
        report.split_sizes = {s: len(p) for s, (p, _) in scan.splits.items()}
        report.n_classes = len(scan.class_names)
        if any(p.severity == "error" and p.kind != "bad_image" for p in report.problems):
            return report  # the structure is broken: a selection cannot be tried
        try:
            raw = raw_from_scan(scan, dataclasses.replace(cfg, skip_bad_images=True))
        except DatasetError as e:  # e.g. a class with one image leaves nothing to hold out for a test split
            report.problems.append(Problem(str(scan.root), str(e).removeprefix(f"{scan.root}: "), "selection"))
            return report
    else:
        try:
            raw = load_dataset(cfg)
        except DatasetError as e:
            report.problems.append(Problem(str(cfg.root or cfg.dataset), str(e), "bad_image"))
            return report
        report.target = raw.source
        report.split_sizes = {"train": len(raw.train_y), "test": len(raw.test_y)}
        report.n_classes = len(raw.class_names)
        report.problems += _array_duplicates(raw)
        if is_multilabel(raw.train_y):
            splits = {s: ([f"{s}[{i}]" for i in range(len(y))], y) for s, y in (("train", raw.train_y), ("test", raw.test_y))}
            report.problems += label_problems(splits, raw.class_names, raw.source)
    report.problems += _selection_problems(cfg, raw, seed)
    return report


def check_path(target: str | Path, root: str | None = None, decode: bool = True, task: str | None = None,
               label_sep: str = ";") -> list[DataReport]:
    """Check a study file (every experiment's data), a folder, a CSV or JSON-lines list, or a registered dataset name.

    ``task`` (``data.task``) for a folder, list or dataset name: ``None`` reads a list as its header says
    (``transferlab.data.lists.detect_task``) and a dataset as the first task it declares. A study file says its own.
    """
    path = Path(target)
    if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
        try:
            study = load_study(path)
        except ConfigError as e:
            return [DataReport(str(path), "study", [Problem(str(path), str(e), "config")])]
        reports: list[DataReport] = []
        seen: dict[str, DataReport] = {}
        for exp in study.experiments:
            key = repr(dataclasses.asdict(exp.data))  # one report per distinct data config (not per seed)
            if key in seen:
                continue
            scan_key = repr((exp.data.dataset, exp.data.root, exp.data.task, exp.data.label_sep))
            if scan_key in seen:  # same files: only the selection differs
                first = seen[scan_key]
                rep = DataReport(first.target, f"{exp.data.dataset} [{exp.name}]", [], dict(first.split_sizes), first.n_classes)
                if first.ok:
                    try:
                        raw = load_dataset(dataclasses.replace(exp.data, skip_bad_images=True))
                        rep.problems += _selection_problems(exp.data, raw, exp.seed)
                    except DatasetError as e:
                        rep.problems.append(Problem(first.target, str(e), "selection"))
                else:
                    rep.problems.append(Problem(first.target, "see the report above", "selection", "warning"))
            else:
                rep = check_config(exp.data, exp.seed, decode)
                rep.dataset = f"{exp.data.dataset} [{exp.name}]"
                seen[scan_key] = rep
            seen[key] = rep
            reports.append(rep)
        return reports
    if path.exists():
        task = task or (detect_task(path) if is_list_file(path) else "multiclass")
        return [check_config(DataConfig(dataset="folder", root=str(path), task=task, label_sep=label_sep), decode=decode)]  # type: ignore[arg-type]
    if str(target) in DATASETS:
        task = task or supported_tasks(str(target))[0]
        return [check_config(DataConfig(dataset=str(target), root=root, task=task, label_sep=label_sep), decode=decode)]  # type: ignore[arg-type]
    raise DatasetError(f"check-data: {target} is not a study file, a folder, a CSV file or a dataset name ({', '.join(sorted(DATASETS))})")

