"""Your own images: an ImageFolder-style tree, optionally split into train/val/test, or a CSV / JSON-lines list.

Layouts of ``data.root`` (``dataset: folder``)::

    root/<class>/<image>                      one pool; a fixed stratified data.test_fraction is the test split
    root/train/<class>/<image>                + root/test/<class>/...: the given splits
        (+ val/ or valid/ or validation/)     val/ with test/: the validation split; val/ without test/: the
                                              test split (as for ImageNet and Tiny ImageNet)
    root = labels.csv                         columns path,label[,split]; paths relative to the CSV's folder
    root = labels.csv or labels.jsonl         data.task: multilabel: path,labels (cat;dog), one 0/1 column per
                                              class, or JSON lines (transferlab.data.lists has every form)

Images are found recursively inside each class folder (any depth), by extension
(``IMAGE_EXTENSIONS``, case-insensitive). Class names are the folder names (Unicode-normalised to
NFC, spaces and non-ASCII characters are fine), sorted, as torchvision's ImageFolder does. Hidden
files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are skipped; any other file that is not an
image is reported by ``transferlab check-data``.

Structural problems — a root with no class folders, an empty class folder, splits with different
class sets, a CSV row pointing at a missing file — are all collected and reported together.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from transferlab.config import DataConfig
from transferlab.data.images import FileImages, Problem, ScanResult, format_problems, is_image_file, map_files, scan_headers
from transferlab.data.lists import is_list_file, scan_list
from transferlab.data.multilabel import class_counts, is_multilabel, iterative_split
from transferlab.data.scan import SPLIT_FOLDERS, FolderScan, check_class_sets, nfc, sort_classes
from transferlab.data.sources import DATASETS, DatasetError, RawDataset, dataset_tasks


def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in ("__MACOSX", "Thumbs.db", "desktop.ini")


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or below it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _refused_link(link: str, root_real: str, visited: set[str]) -> str | None:
    """Why the folder link ``link`` inside a class folder is not followed, or ``None`` to follow it.

    Followed: a link to a folder outside the dataset (a dataset assembled from links to another disk), once.
    Not followed: a link back into the dataset folder (``y/loop -> ..``: a loop, or the same images counted again
    under another class), to a folder that contains the dataset (a loop), or to a folder already scanned.
    """
    target = os.path.realpath(link)
    if _inside(target, root_real):
        return f"it points back into the dataset folder ({target}): a loop, or the same images counted twice"
    if _inside(root_real, target):
        return f"it points to {target}, which contains the dataset folder: a loop"
    if any(_inside(target, v) or _inside(v, target) for v in visited):
        return f"it points to {target}, which is scanned already through another link: a loop, or the same images counted twice"
    return None


def _class_files(class_dir: Path, problems: list[Problem], root_real: str = "", visited: set[str] | None = None) -> list[str]:
    """Image files under ``class_dir`` (recursive, sorted, depth first); other visible files become warnings.

    Folder links are followed as ``_refused_link`` says; a link not followed is a ``symlink`` warning (check-data
    lists it, a run records it), so a loop can neither hang the scan nor multiply the images.
    """
    visited = visited if visited is not None else set()
    root_real = root_real or os.path.realpath(class_dir)
    images, others = [], []
    stack = [str(class_dir)]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            problems.append(Problem(folder, f"cannot list folder ({e.strerror or e}): ignored", "ignored_file", "warning"))
            continue
        subdirs = []
        for entry in entries:
            if not _visible(entry.name):
                continue
            if entry.is_dir():  # follows a link
                if entry.is_symlink():
                    why = _refused_link(entry.path, root_real, visited)
                    if why is not None:
                        problems.append(Problem(entry.path, f"symbolic link not followed: {why}", "symlink", "warning"))
                        continue
                    visited.add(os.path.realpath(entry.path))
                subdirs.append(entry.path)
            else:
                (images if is_image_file(entry.name) else others).append(entry.path)
        stack.extend(reversed(subdirs))
    for other in others:
        problems.append(Problem(other, "not an image file (by its extension): ignored", "ignored_file", "warning"))
    return images


def _scan_split_dir(
    split_dir: Path, problems: list[Problem], root_real: str = "", visited: set[str] | None = None,
) -> dict[str, tuple[str, list[str]]]:
    """class name (NFC) -> (folder name, image files) for one split folder."""
    visited = visited if visited is not None else set()
    root_real = root_real or os.path.realpath(split_dir)
    try:
        entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
    except OSError as e:
        problems.append(Problem(str(split_dir), f"cannot list folder ({e.strerror or e})", "no_classes"))
        return {}
    classes: dict[str, tuple[str, list[str]]] = {}
    loose = []
    for entry in entries:
        if not _visible(entry.name):
            continue
        if entry.is_dir():
            if entry.is_symlink():  # a class folder that is a link to the split folder or above it would hold every class
                target = os.path.realpath(entry.path)
                if _inside(os.path.realpath(split_dir), target):
                    problems.append(Problem(entry.path, f"symbolic link not followed: it points to {target}, which contains it: a loop",
                                            "symlink", "warning"))
                    continue
                visited.add(target)
            name = nfc(entry.name)
            if name in classes:
                problems.append(
                    Problem(
                        entry.path,
                        f"class folders {classes[name][0]!r} and {entry.name!r} have the same name after Unicode normalisation",
                        "class_mismatch",
                    )
                )
                continue
            classes[name] = (entry.name, _class_files(Path(entry.path), problems, root_real, visited))
        else:
            loose.append(entry.path)
    loose_images = [p for p in loose if is_image_file(p)]
    if not classes:
        hint = f"; it has {len(loose_images)} images directly in it: put them into {split_dir}/<class>/" if loose_images else ""
        problems.append(Problem(str(split_dir), f"no class folders (expected {split_dir}/<class>/<image>){hint}", "no_classes"))
        return {}
    for p in loose:
        what = "image outside any class folder" if is_image_file(p) else "file outside any class folder"
        problems.append(Problem(p, f"{what}: ignored", "ignored_file", "warning"))
    for name, (folder, files) in classes.items():
        if not files:
            problems.append(Problem(str(split_dir / folder), f"class folder {name!r} has no images", "empty_class"))
    return classes


def scan_folder(root: str | Path, probe: bool = True, task: str = "multiclass", label_sep: str = ";") -> FolderScan:
    """Find every image of a dataset folder (or CSV / JSON-lines list) and every problem with its structure.

    With ``probe`` each file's header is read too (in parallel): unreadable files become
    ``bad_image`` problems, and the dataset's channel count and common size are set. ``task`` (``data.task``) and
    ``label_sep`` say how a list is read (``transferlab.data.lists``); class folders are multiclass only.
    """
    root = Path(root)
    if is_list_file(root):
        scan = scan_list(root, task, label_sep)
    elif not root.is_dir():
        raise DatasetError(f"data.root {root} is not a folder or a .csv file (nor a .jsonl list)")
    elif task == "multilabel":
        raise DatasetError(f"data.root {root}: class folders give one label per image, but data.task is multilabel: list the "
                           "images and their labels in a CSV (path,labels) or JSON-lines file and set data.root to it")
    else:
        scan = _scan_tree(root)
    if probe:
        probe_scan(scan)
    return scan


def probe_scan(scan: FolderScan) -> None:
    """Read the header of every file of ``scan``; add problems; set channels and size."""
    paths = [p for files, _ in scan.splits.values() for p in files]
    result: ScanResult = scan_headers(paths)
    scan.problems.extend(result.problems)
    scan.channels, scan.size = result.channels, result.size
    examples: dict[tuple[int, int], str] = {}
    for path, info in zip(paths, result.infos, strict=True):
        if info is not None and len(examples) < 2:
            examples.setdefault((info.width, info.height), path)
    if scan.size is None and len(examples) > 1:
        (s1, p1), (s2, p2) = examples.items()
        scan.problems.append(
            Problem(
                str(scan.root),
                f"images differ in size (e.g. {p1} is {s1[0]}x{s1[1]}, {p2} is {s2[0]}x{s2[1]}): set data.image_size, "
                "or a run resizes them to its backbone's pretrained input size",
                "mixed_sizes",
                "info",  # not a problem since runs fall back to the backbone's size (transferlab.kinds.common)
            )
        )


def _scan_tree(root: Path) -> FolderScan:
    problems: list[Problem] = []
    subdirs = {e.name: e for e in os.scandir(root) if e.is_dir() and _visible(e.name)}
    split_dirs = {SPLIT_FOLDERS[n.lower()]: root / n for n in sorted(subdirs) if n.lower() in SPLIT_FOLDERS}
    split_dirs = {s: split_dirs[s] for s in ("train", "val", "test") if s in split_dirs}
    layout = "splits" if "train" in split_dirs and len(split_dirs) == len(subdirs) else "classes"
    if layout == "classes":
        split_dirs = {"train": root}
    root_real, visited = os.path.realpath(root), set()
    per_split = {split: _scan_split_dir(d, problems, root_real, visited) for split, d in split_dirs.items()}
    check_class_sets({s: set(c) for s, c in per_split.items() if c}, {s: str(d) for s, d in split_dirs.items()}, problems)
    names = sort_classes(set(per_split.get("train", {})))
    index = {n: i for i, n in enumerate(names)}
    splits = {}
    for split, classes in per_split.items():
        files, labels = [], []
        for name in names:
            if name in classes:
                files += classes[name][1]
                labels += [index[name]] * len(classes[name][1])
        splits[split] = (files, labels)
    return FolderScan(root, layout, names, splits, problems)


# --------------------------------------------------------------------------------------------
# identical files: one rule for check-data and for runs


def file_digest(path: str) -> str:
    """A content hash of a file (BLAKE2b, 128 bits)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def duplicate_problems(items: list[tuple[str, str, str, str]]) -> list[Problem]:
    """items: (digest, where, split, class name) -> one problem per group of identical items.

    Identical images under different classes are an error (one of the labels is wrong: ``transferlab check-data``
    and a run refuse them alike); identical images across splits (test leakage) or within a class are warnings.
    """
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for digest, where, split, cls in items:
        groups.setdefault(digest, []).append((where, split, cls))
    problems = []
    for members in groups.values():
        if len(members) < 2:
            continue
        classes = sorted({c for _, _, c in members})
        splits = sorted({s for _, s, _ in members})
        where = ", ".join(m[0] for m in members[:5]) + (f" (+{len(members) - 5} more)" if len(members) > 5 else "")
        if len(classes) > 1:
            problems.append(Problem(members[0][0], f"identical images under different classes {classes}: {where}", "duplicate", "error"))
        elif len(splits) > 1:
            problems.append(Problem(members[0][0], f"identical images in splits {splits} (test leakage): {where}", "duplicate", "warning"))
        else:
            problems.append(Problem(members[0][0], f"{len(members)} identical images: {where}", "duplicate", "warning"))
    return problems


def scan_duplicates(scan: FolderScan, exclude: set[str] | frozenset[str] = frozenset(), workers: int | None = None) -> list[Problem]:
    """Identical files of ``scan`` (``duplicate_problems``), leaving out the paths in ``exclude`` (bad images).

    Only files whose size another file shares are read and hashed: identical files have equal sizes, so the
    result is the same as hashing everything, at the cost of one ``stat`` per file for most datasets.
    """
    entries = [(path, split, scan.label_name(label)) for split, (paths, labels) in scan.splits.items()
               for path, label in zip(paths, labels, strict=True) if path not in exclude]
    sizes = map_files(os.path.getsize, [e[0] for e in entries], workers)
    by_size: dict[int, int] = {}
    for size in sizes:
        if isinstance(size, int):
            by_size[size] = by_size.get(size, 0) + 1
    shared = [e for e, size in zip(entries, sizes, strict=True) if isinstance(size, int) and by_size[size] > 1]
    digests = map_files(file_digest, [e[0] for e in shared], workers)
    return duplicate_problems([(d, path, split, cls) for (path, split, cls), d in zip(shared, digests, strict=True) if isinstance(d, str)])


# --------------------------------------------------------------------------------------------
# from a scan to a RawDataset


def _carve_test(labels: np.ndarray, fraction: float, where: str, class_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (seed 0) stratified split of a single pool into train and test positions."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    too_few = [int(c) for c in np.flatnonzero(counts) if counts[c] < 2]
    if too_few:
        names = [repr(class_names[c]) if class_names and c < len(class_names) else f"#{c}" for c in too_few]
        listed = ", ".join(f"{n} has {int(counts[c])} image" for n, c in zip(names, too_few, strict=True))
        raise DatasetError(
            f"{where}: every class needs at least 2 images to hold out a test split (data.test_fraction); "
            f"class{'es' if len(too_few) > 1 else ''} {listed}: add images, remove the class folder, "
            f"or split the images yourself into {where}/train/ and {where}/test/"
        )
    n_test = max(int(round(fraction * len(labels))), int((counts > 0).sum()))
    if len(labels) - n_test < (counts > 0).sum():
        raise DatasetError(f"{where}: data.test_fraction={fraction} leaves too few training images for {int((counts > 0).sum())} classes")
    train, test = train_test_split(idx, test_size=n_test, stratify=labels, random_state=0)
    return np.sort(train), np.sort(test)


def _carve_test_multilabel(labels: np.ndarray, fraction: float, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (seed 0) iteratively stratified split of a multi-label pool into train and test positions."""
    n_test = int(round(fraction * len(labels)))
    if not 0 < n_test < len(labels):
        raise DatasetError(f"{where}: data.test_fraction={fraction} of {len(labels)} images leaves no test or no training image")
    part = iterative_split(labels, [len(labels) - n_test, n_test], seed=0)
    return np.flatnonzero(part == 0), np.flatnonzero(part == 1)


def _check_lost_classes(scan: FolderScan, labels: dict[str, torch.Tensor]) -> None:
    """A class whose every training image was a skipped bad image cannot be trained: an error naming it."""
    if "train" not in labels:
        return
    k = len(scan.class_names)
    had = class_counts(scan.targets(scan.splits["train"][1]), k) > 0
    lost = [scan.class_names[c] for c in np.flatnonzero(had & (class_counts(labels["train"], k) == 0))]
    if lost:
        raise DatasetError(f"{scan.root}: after skipping bad images, class(es) {lost} have no train images left")


def raw_from_scan(scan: FolderScan, cfg: DataConfig, source: str | None = None) -> RawDataset:
    """Turn a scan into a RawDataset of FileImages, or raise one DatasetError listing every problem.

    Bad images are dropped (and recorded in ``skipped``) when ``cfg.skip_bad_images``; structural
    errors always fail.
    """
    bad = [p for p in scan.errors if p.kind == "bad_image"]
    structural = [p for p in scan.errors if p.kind != "bad_image"]
    if structural or (bad and not cfg.skip_bad_images):
        listed = structural + ([] if cfg.skip_bad_images else bad)
        hint = " (set data.skip_bad_images: true to skip bad images and record them)" if bad and not cfg.skip_bad_images else ""
        raise DatasetError(
            f"{scan.root}: {len(listed)} problem(s){hint}; `transferlab check-data {scan.root}` lists everything:\n{format_problems(listed)}"
        )
    bad_paths = {p.path for p in bad}
    files: dict[str, FileImages] = {}
    labels: dict[str, torch.Tensor] = {}
    for split, (paths, ys) in scan.splits.items():
        keep = [i for i, p in enumerate(paths) if p not in bad_paths]
        files[split] = FileImages([paths[i] for i in keep], scan.channels, scan.size, str(scan.root))
        labels[split] = scan.targets([ys[i] for i in keep])
    _check_lost_classes(scan, labels)
    if "test" not in files and "val" in files:  # train/ + val/ only: val/ is the test split
        files["test"], labels["test"] = files.pop("val"), labels.pop("val")
    if "test" not in files:
        pool = labels["train"].numpy()
        train_pos, test_pos = (_carve_test_multilabel(pool, cfg.test_fraction, str(scan.root)) if is_multilabel(pool)
                               else _carve_test(pool, cfg.test_fraction, str(scan.root), scan.class_names))
        all_files, all_y = files["train"], labels["train"]
        files["train"], labels["train"] = all_files[train_pos], all_y[torch.from_numpy(train_pos)]
        files["test"], labels["test"] = all_files[test_pos], all_y[torch.from_numpy(test_pos)]
    return RawDataset(
        train_x=files["train"],
        train_y=labels["train"],
        test_x=files["test"],
        test_y=labels["test"],
        class_names=list(scan.class_names),
        source=source or str(scan.root),
        val_x=files.get("val"),
        val_y=labels.get("val"),
        skipped=bad,
        warnings=[p for p in scan.problems if p.severity in ("warning", "info")],
    )


@DATASETS.register("folder")
@dataset_tasks("multiclass", "multilabel")
def folder(cfg: DataConfig) -> RawDataset:
    """Images in ``data.root``: ``<class>/<image>`` folders, ``train``/``val``/``test`` subfolders, or a CSV.

    See the module docstring for the layouts. Every file's header is read once (in parallel) to find
    unreadable files, the channel count and whether the images share one size.
    """
    if not cfg.root:
        raise DatasetError("dataset 'folder' needs data.root: a folder of <class>/<image> folders, or a path,label CSV file")
    scan = scan_folder(cfg.root, task=cfg.task, label_sep=cfg.label_sep)
    # the rules of `transferlab check-data` (transferlab.data.check), so a folder it rejects is refused here with the
    # same message: identical images under different classes are an error, across splits a warning
    scan.problems += scan_duplicates(scan, {p.path for p in scan.problems if p.kind == "bad_image"})
    return raw_from_scan(scan, cfg)
