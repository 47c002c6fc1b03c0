"""Tiny ImageNet (Stanford CS231n): 200 classes, 500 training and 50 validation 64x64 images each.

The official ``tiny-imagenet-200`` layout::

    tiny-imagenet-200/wnids.txt                  the 200 WordNet ids, one a line (class order)
    tiny-imagenet-200/words.txt                  "<wnid>\\t<names>" for all of WordNet (class names)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG
    tiny-imagenet-200/val/images/*.JPEG + val/val_annotations.txt ("<file>\\t<wnid>\\t<box>")
    tiny-imagenet-200/test/images/*.JPEG         unlabelled: not used

The labelled ``val`` split is the test split (its test labels are not public); the validation split
is carved from ``train`` as for every dataset. Some images are grayscale JPEGs: all are read as RGB.
"""

from __future__ import annotations

import os
from pathlib import Path

from transferlab.config import DataConfig
from transferlab.data.archives import DownloadRefused, download_archive, safe_extract
from transferlab.data.folder import FolderScan, raw_from_scan
from transferlab.data.images import Problem, is_image_file
from transferlab.data.sources import DATASETS, DatasetError, RawDataset, default_data_root, documented_size

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
FOLDER = "tiny-imagenet-200"


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None


def class_names_from_words(words_file: Path, wnids: list[str]) -> list[str]:
    """Readable class names: the first synonym in words.txt (``n01443537`` -> ``goldfish``), unique."""
    words = {}
    for line in _read_lines(words_file):
        wnid, _, names = line.partition("\t")
        words[wnid.strip()] = names.strip()
    missing = [w for w in wnids if w not in words]
    if missing:
        raise DatasetError(f"{words_file}: no names for {len(missing)} wnid(s) of wnids.txt, e.g. {missing[:3]}")
    first = [words[w].split(",")[0].strip() or w for w in wnids]
    return [f"{name} ({w})" if first.count(name) > 1 else name for name, w in zip(first, wnids, strict=True)]


def scan_tiny_imagenet(d: Path) -> FolderScan:
    """Files and labels of a ``tiny-imagenet-200`` folder; every structural problem is collected."""
    problems: list[Problem] = []
    wnids = [w.strip() for w in _read_lines(d / "wnids.txt") if w.strip()]
    if len(set(wnids)) != len(wnids):
        raise DatasetError(f"{d / 'wnids.txt'}: repeated wnids")
    names = class_names_from_words(d / "words.txt", wnids)
    index = {w: i for i, w in enumerate(wnids)}

    train_files, train_labels = [], []
    train_dir = d / "train"
    extra = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and e.name not in index) if train_dir.is_dir() else []
    if extra:
        problems.append(Problem(str(train_dir), f"class folder(s) {extra[:5]} are not in wnids.txt", "class_mismatch"))
    for w in wnids:
        img_dir = train_dir / w / "images"
        files = sorted(str(img_dir / n) for n in os.listdir(img_dir) if is_image_file(n)) if img_dir.is_dir() else []
        if not files:
            problems.append(Problem(str(img_dir), f"class {w} ({names[index[w]]}) has no training images", "empty_class"))
        train_files += files
        train_labels += [index[w]] * len(files)

    val_files, val_labels = [], []
    ann = d / "val" / "val_annotations.txt"
    listed = set()
    for line_no, line in enumerate(_read_lines(ann), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            problems.append(Problem(f"{ann}:{line_no}", f"expected '<file>\\t<wnid>\\t...', found {line!r}", "annotation"))
            continue
        name, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in index:
            problems.append(Problem(f"{ann}:{line_no}", f"wnid {wnid!r} is not in wnids.txt", "annotation"))
            continue
        path = d / "val" / "images" / name
        listed.add(name)
        if not path.is_file():
            problems.append(Problem(str(path), f"file not found (listed in {ann} line {line_no})", "bad_image"))
            continue
        val_files.append(str(path))
        val_labels.append(index[wnid])
    img_dir = d / "val" / "images"
    unlisted = sorted(n for n in os.listdir(img_dir) if is_image_file(n) and n not in listed) if img_dir.is_dir() else []
    for n in unlisted:
        problems.append(Problem(str(img_dir / n), f"not in {ann.name}: ignored", "ignored_file", "warning"))
    order = sorted(range(len(val_files)), key=lambda i: val_files[i])
    splits = {"train": (train_files, train_labels), "test": ([val_files[i] for i in order], [val_labels[i] for i in order])}
    return FolderScan(d, "tiny_imagenet", names, splits, problems, channels=3, size=(64, 64))


def locate(cfg: DataConfig) -> Path:
    roots = ([Path(cfg.root)] if cfg.root else []) + [default_data_root() / "tiny_imagenet"]
    for r in roots:
        for d in (r, r / FOLDER):
            if (d / "wnids.txt").is_file() and (d / "train").is_dir():
                return d
    target = roots[0]
    try:
        archive = download_archive(URL, MD5, target, "tiny-imagenet-200.zip")
    except DownloadRefused as e:
        raise DownloadRefused(f"tiny_imagenet: not found (looked in: {', '.join(str(r) for r in roots)}); {e}") from None
    except DatasetError as e:
        looked = ", ".join(str(r) for r in roots)
        raise DatasetError(
            f"tiny_imagenet: '{FOLDER}' not found (looked in: {looked}) and {e}. Download {URL}, unzip it, "
            "and set data.root to the folder that holds tiny-imagenet-200/."
        ) from None
    safe_extract(archive, target)
    if not (target / FOLDER / "wnids.txt").is_file():
        raise DatasetError(f"{archive}: extracted, but {target / FOLDER / 'wnids.txt'} is missing")
    return target / FOLDER


@DATASETS.register("tiny_imagenet")
@documented_size(train=100_000, test=10_000, channels=3, side=64, classes=200)
def tiny_imagenet(cfg: DataConfig) -> RawDataset:
    """Tiny ImageNet 200: 100 000 train / 10 000 test (the official val), 64x64 RGB, 200 classes.

    Looked up in ``data.root`` (``tiny-imagenet-200`` itself or its parent), then
    ``$TRANSFERLAB_DATA/tiny_imagenet``; otherwise the official zip is downloaded there (MD5-checked)
    and extracted safely. At 64 px the decoded images (1.4 GB) fit the in-memory path.
    """
    d = locate(cfg)
    return raw_from_scan(scan_tiny_imagenet(d), cfg, source=str(d))
