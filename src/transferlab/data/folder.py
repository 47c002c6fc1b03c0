"""Your own images: an ImageFolder-style tree, optionally split into train/val/test, or a CSV list.

Layouts of ``data.root`` (``dataset: folder``)::

    root/<class>/<image>                      one pool; a fixed stratified data.test_fraction is the test split
    root/train/<class>/<image>                + root/test/<class>/...: the given splits
        (+ val/ or valid/ or validation/)     val/ with test/: the validation split; val/ without test/: the
                                              test split (as for ImageNet and Tiny ImageNet)
    root = labels.csv                         columns path,label[,split]; paths relative to the CSV's folder

Images are found recursively inside each class folder (any depth), by extension
(``IMAGE_EXTENSIONS``, case-insensitive). Class names are the folder names (Unicode-normalised to
NFC, spaces and non-ASCII characters are fine), sorted, as torchvision's ImageFolder does. Hidden
files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are skipped; any other file that is not an
image is reported by ``transferlab check-data``.

Structural problems — a root with no class folders, an empty class folder, splits with different
class sets, a CSV row pointing at a missing file — are all collected and reported together.
"""

from __future__ import annotations

import csv
import hashlib
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from transferlab.config import DataConfig
from transferlab.data.images import FileImages, Problem, ScanResult, format_problems, is_image_file, map_files, scan_headers
from transferlab.data.sources import DATASETS, DatasetError, RawDataset

SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


@dataclass
class FolderScan:
    """What is in a dataset folder or CSV: per split the files and labels, the classes, the problems."""

    root: Path
    layout: str  # "classes", "splits", "csv", "tiny_imagenet"
    class_names: list[str] = field(default_factory=list)
    splits: dict[str, tuple[list[str], list[int]]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    channels: int = 3
    size: tuple[int, int] | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def n_images(self) -> int:
        return sum(len(p) for p, _ in self.splits.values())


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


def _check_class_sets(per_split: dict[str, set[str]], where: dict[str, str], problems: list[Problem]) -> None:
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


def _sort_classes(names: set[str]) -> list[str]:
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)  # 0, 1, 2, ..., 10 rather than 0, 1, 10, 2
    return sorted(names)


def scan_folder(root: str | Path, probe: bool = True) -> FolderScan:
    """Find every image of a dataset folder (or CSV) and every problem with its structure.

    With ``probe`` each file's header is read too (in parallel): unreadable files become
    ``bad_image`` problems, and the dataset's channel count and common size are set.
    """
    root = Path(root)
    if root.suffix.lower() == ".csv" and root.is_file():
        scan = _scan_csv(root)
    elif not root.is_dir():
        raise DatasetError(f"data.root {root} is not a folder or a .csv file")
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
    _check_class_sets({s: set(c) for s, c in per_split.items() if c}, {s: str(d) for s, d in split_dirs.items()}, problems)
    names = _sort_classes(set(per_split.get("train", {})))
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


def _scan_csv(path: Path) -> FolderScan:
    problems: list[Problem] = []
    base = path.parent
    rows: list[tuple[int, str, str, str]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            if "path" not in header or "label" not in header:
                raise DatasetError(
                    f"{path}: the first line must be a header with columns 'path' and 'label' (and optionally 'split'); found {header}"
                )
            ip, il, isp = header.index("path"), header.index("label"), header.index("split") if "split" in header else None
            for line_no, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    problems.append(Problem(f"{path}:{line_no}", f"expected {len(header)} columns, found {len(row)}", "annotation"))
                    continue
                file, label = row[ip].strip(), nfc(row[il].strip())
                split = row[isp].strip().lower() if isp is not None else "train"
                if not file or not label:
                    problems.append(Problem(f"{path}:{line_no}", "empty path or label", "annotation"))
                    continue
                if (split or "train") not in SPLIT_FOLDERS:
                    problems.append(Problem(f"{path}:{line_no}", f"unknown split {split!r} (use train, val or test)", "annotation"))
                    continue
                rows.append((line_no, str(base / file), label, SPLIT_FOLDERS[split or "train"]))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 text file ({e})") from None
    except csv.Error as e:
        raise DatasetError(f"{path}: not a valid CSV file ({e})") from None
    seen: dict[str, tuple[int, str, str]] = {}
    kept = []
    for line_no, file, label, split in rows:
        if file in seen:
            first_line, first_label, first_split = seen[file]
            conflict = (first_label, first_split) != (label, split)
            problems.append(
                Problem(
                    f"{path}:{line_no}",
                    f"{file} is listed again (first on line {first_line})"
                    + (f" with another label or split ({first_label}/{first_split} vs {label}/{split})" if conflict else ""),
                    "duplicate",
                    "error" if conflict else "warning",
                )
            )
            continue
        seen[file] = (line_no, label, split)
        if not os.path.isfile(file):
            problems.append(Problem(file, f"file not found (listed in {path} line {line_no})", "bad_image"))
            continue
        kept.append((file, label, split))
    per_split: dict[str, set[str]] = {}
    for _, label, split in kept:
        per_split.setdefault(split, set()).add(label)
    if not kept:
        problems.append(Problem(str(path), "lists no usable images", "no_classes"))
    _check_class_sets(per_split, {s: f"{path} (split {s})" for s in per_split}, problems)
    names = _sort_classes(per_split.get("train", set()) or set().union(*per_split.values()) if per_split else set())
    index = {n: i for i, n in enumerate(names)}
    splits: dict[str, tuple[list[str], list[int]]] = {}
    for file, label, split in kept:
        if label in index:
            files, labels = splits.setdefault(split, ([], []))
            files.append(file)
            labels.append(index[label])
    if "train" not in splits and kept:
        problems.append(Problem(str(path), "has no training images (split column never says 'train')", "no_classes"))
    return FolderScan(path, "csv", names, splits, problems)


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
    entries = [(path, split, scan.class_names[label]) for split, (paths, labels) in scan.splits.items()
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
        labels[split] = torch.tensor([ys[i] for i in keep], dtype=torch.int64)
    for split, y in labels.items():
        present = set(y.tolist())
        lost = [scan.class_names[c] for c in range(len(scan.class_names)) if c not in present]
        if lost and split == "train":
            raise DatasetError(f"{scan.root}: after skipping bad images, class(es) {lost} have no {split} images left")
    if "test" not in files and "val" in files:  # train/ + val/ only: val/ is the test split
        files["test"], labels["test"] = files.pop("val"), labels.pop("val")
    if "test" not in files:
        train_pos, test_pos = _carve_test(labels["train"].numpy(), cfg.test_fraction, str(scan.root), scan.class_names)
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
def folder(cfg: DataConfig) -> RawDataset:
    """Images in ``data.root``: ``<class>/<image>`` folders, ``train``/``val``/``test`` subfolders, or a CSV.

    See the module docstring for the layouts. Every file's header is read once (in parallel) to find
    unreadable files, the channel count and whether the images share one size.
    """
    if not cfg.root:
        raise DatasetError("dataset 'folder' needs data.root: a folder of <class>/<image> folders, or a path,label CSV file")
    scan = scan_folder(cfg.root)
    # the rules of `transferlab check-data` (transferlab.data.check), so a folder it rejects is refused here with the
    # same message: identical images under different classes are an error, across splits a warning
    scan.problems += scan_duplicates(scan, {p.path for p in scan.problems if p.kind == "bad_image"})
    return raw_from_scan(scan, cfg)
