"""Small datasets written in the exact on-disk formats, for the dataset and bad-image tests.

* CIFAR: Python-2-style pickles as the official ``cifar-10-batches-py`` files are (byte strings as
  ``BINSTRING``, ``numpy.core.multiarray._reconstruct``), or Python 3 protocol-4 pickles;
* MNIST: IDX files;
* Tiny ImageNet: a real ``tiny-imagenet-200`` tree with JPEGs, wnids.txt, words.txt and
  val_annotations.txt;
* image folders and CSV lists with PNG/JPEG files.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes pickles the way Python 2's cPickle wrote the CIFAR files: str/bytes as BINSTRING."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_binstring(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_binstring
    dispatch[str] = save_binstring

    def save_global(self, obj: Any, name: str | None = None) -> None:
        name = name or obj.__qualname__
        module = pickle.whichmodule(obj, name)
        module = {"numpy._core.multiarray": "numpy.core.multiarray"}.get(module, module)
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        self.memoize(obj)


def py2_pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def dump(path: Path, obj: Any, style: str) -> None:
    path.write_bytes(py2_pickle(obj) if style == "py2" else pickle.dumps(obj, protocol=4))


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(directory: Path, per_batch: int = 6, n_test: int = 10, style: str = "py2") -> dict[str, np.ndarray]:
    """``directory`` becomes a ``cifar-10-batches-py`` folder; returns the rows and labels written."""
    directory.mkdir(parents=True, exist_ok=True)
    rows, labels = [], []
    for b in range(1, 6):
        data = cifar_rows(per_batch, b)
        y = [(b * 3 + i) % 10 for i in range(per_batch)]
        entry = {"batch_label": f"training batch {b} of 5", "labels": y, "data": data, "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)]}
        dump(directory / f"data_batch_{b}", entry if style != "py2" else {k.encode(): v for k, v in entry.items()}, style)
        rows.append(data)
        labels += y
    test = cifar_rows(n_test, 99)
    test_y = [i % 10 for i in range(n_test)]
    dump(directory / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_y, "data": test, "filenames": ["t.png"] * n_test}, style)
    dump(directory / "batches.meta", {"label_names": CIFAR10_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}, style)
    return {"train_x": np.concatenate(rows), "train_y": np.array(labels), "test_x": test, "test_y": np.array(test_y)}


def write_cifar100(directory: Path, n_train: int = 40, n_test: int = 20, style: str = "py2") -> dict[str, np.ndarray]:
    """``directory`` becomes a ``cifar-100-python`` folder (fine label f has coarse label f // 5)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        data = cifar_rows(n, seed)
        fine = [(i * 7) % 100 for i in range(n)]
        coarse = [f // 5 for f in fine]
        batch = {"filenames": [f"{i}.png" for i in range(n)], "batch_label": split, "fine_labels": fine, "coarse_labels": coarse, "data": data}
        dump(directory / split, batch, style)
        out[f"{split}_x"], out[f"{split}_fine"], out[f"{split}_coarse"] = data, np.array(fine), np.array(coarse)
    dump(directory / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]}, style)
    return out


def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">I", 0x00000800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_mnist(directory: Path, n_train: int = 40, n_test: int = 20) -> dict[str, np.ndarray]:
    """IDX files as torchvision's ``MNIST/raw`` holds them (uncompressed)."""
    import gzip

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, arr in arrays.items():
        with gzip.open(directory / f"{name}.gz", "wb") as f:
            f.write(idx_bytes(arr))
    return arrays


TINY_WORDS = {
    "n01443537": "goldfish, Carassius auratus",
    "n01629819": "European fire salamander, Salamandra salamandra",
    "n02123045": "tabby, tabby cat",
}


def write_tiny_imagenet(parent: Path, n_train: int = 6, n_val: int = 3) -> Path:
    """A real ``tiny-imagenet-200`` tree (3 classes) under ``parent``; image pixels encode the class."""
    d = parent / "tiny-imagenet-200"
    wnids = list(TINY_WORDS)
    (d / "test" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    words = {"n00001740": "entity", **TINY_WORDS, "n99999999": "unused class"}
    (d / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in words.items()))
    for c, w in enumerate(wnids):
        img_dir = d / "train" / w / "images"
        img_dir.mkdir(parents=True)
        boxes = []
        for i in range(n_train):
            colour = (40 + 80 * c, 200 - 60 * c, 30 + i)
            img = Image.new("RGB", (64, 64), colour)
            if c == 2 and i == 0:
                img = img.convert("L")  # Tiny ImageNet has some grayscale JPEGs
            img.save(img_dir / f"{w}_{i}.JPEG", quality=95)
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63\n")
        (d / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    (d / "val" / "images").mkdir(parents=True)
    lines = []
    for k in range(n_val * len(wnids)):
        c = (k * 2) % len(wnids)
        Image.new("RGB", (64, 64), (40 + 80 * c, 200 - 60 * c, 30)).save(d / "val" / "images" / f"val_{k}.JPEG", quality=95)
        lines.append(f"val_{k}.JPEG\t{wnids[c]}\t1\t2\t60\t61\n")
    (d / "val" / "val_annotations.txt").write_text("".join(lines))
    Image.new("RGB", (64, 64)).save(d / "test" / "images" / "test_0.JPEG")
    return d


def png(path: Path, size: tuple[int, int] = (12, 10), colour: Any = None, mode: str = "RGB", seed: int = 0) -> Path:
    """A valid PNG (random pixels unless ``colour`` is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if colour is None:
        arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3 if mode == "RGB" else 1), dtype=np.uint8)
        img = Image.fromarray(arr if mode == "RGB" else arr[:, :, 0], mode)
    else:
        img = Image.new(mode, size, colour)
    img.save(path)
    return path


def write_folder(root: Path, classes: list[str], per_class: int, size: tuple[int, int] = (12, 10), seed: int = 0, fmt: str = "png") -> list[Path]:
    """``root/<class>/<i>.<fmt>`` with random pixels; returns the files written."""
    files = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            path = root / name / f"{i}.{fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            arr = np.random.default_rng(seed * 1000 + c * 100 + i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(path)
            files.append(path)
    return files
