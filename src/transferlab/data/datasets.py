"""The built-in array datasets: Fashion-MNIST and MNIST (IDX files), scikit-learn's digits, a synthetic toy task."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from transferlab.config import DataConfig
from transferlab.data.archives import refuse_download
from transferlab.data.sources import DATASETS, DatasetError, RawDataset, dataset_tasks, default_data_root, documented_size

# --------------------------------------------------------------------------------------------
# IDX files (MNIST family)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) as a numpy array, validating its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read IDX file ({e})") from None
    if len(data) < 4:
        raise DatasetError(f"{path}: file too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise DatasetError(f"{path}: header says {shape} ({expected} bytes) but {len(data) - offset} bytes follow")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _find_idx_dir(candidates: list[Path]) -> Path | None:
    for d in candidates:
        if all((d / n).exists() or (d / f"{n}.gz").exists() for n in _IDX_FILES.values()):
            return d
    return None


def _load_idx_dataset(directory: Path, class_names: list[str]) -> RawDataset:
    arrays = {}
    for key, name in _IDX_FILES.items():
        path = directory / name if (directory / name).exists() else directory / f"{name}.gz"
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise DatasetError(f"{directory}: {split} images and labels differ in count")
    return RawDataset(
        train_x=torch.from_numpy(arrays["train_x"].copy()).unsqueeze(1),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=torch.from_numpy(arrays["test_x"].copy()).unsqueeze(1),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        class_names=list(class_names),
        source=str(directory),
    )


def _idx_dataset(cfg: DataConfig, key: str, tv_name: str, class_names: list[str], system_dirs: list[Path], label: str, apt: str) -> RawDataset:
    """Find (or download with torchvision, checksummed) the four IDX files of an MNIST-style dataset."""
    roots = [Path(cfg.root)] if cfg.root else []
    roots.append(default_data_root() / key)
    candidates = [d for r in roots for d in (r, r / tv_name / "raw")] + system_dirs
    found = _find_idx_dir(candidates)
    if found is None:
        target = roots[0]
        refuse_download(tv_name)
        try:  # online users: torchvision's downloader (MD5-checked IDX files) into the first root
            import torchvision.datasets

            tv_cls = getattr(torchvision.datasets, tv_name)
            tv_cls(str(target), train=True, download=True)
            tv_cls(str(target), train=False, download=True)
        except Exception as e:  # noqa: BLE001 - any failure means: explain where to get it
            looked = ", ".join(str(c) for c in candidates)
            raise DatasetError(
                f"{label} not found (looked in: {looked}) and download failed ({type(e).__name__}: {e}). "
                f"{apt}put the four idx files (train-images-idx3-ubyte[.gz], ...) in a folder and set data.root to it."
            ) from None
        found = _find_idx_dir([target / tv_name / "raw"])
        if found is None:
            raise DatasetError(f"{label} download into {target} left no idx files")
    return _load_idx_dataset(found, class_names)


@DATASETS.register("fashion_mnist")
@documented_size(train=60_000, test=10_000, channels=1, side=28, classes=10)
def fashion_mnist(cfg: DataConfig) -> RawDataset:
    """Fashion-MNIST (Zalando), 60 000 train / 10 000 test, 28x28 grayscale, 10 classes.

    Looked up, in order: ``data.root`` (and its ``FashionMNIST/raw`` subfolder, torchvision's
    layout), ``$TRANSFERLAB_DATA/fashion_mnist``, the Debian package ``dataset-fashion-mnist``
    (``/usr/share/datasets/fashion-mnist``), then a torchvision download when online.
    """
    return _idx_dataset(
        cfg, "fashion_mnist", "FashionMNIST", FASHION_MNIST_CLASSES, [FASHION_MNIST_DEBIAN_DIR], "Fashion-MNIST",
        "Get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or ",
    )  # fmt: skip


MNIST_CLASSES = [str(i) for i in range(10)]


@DATASETS.register("mnist")
@documented_size(train=60_000, test=10_000, channels=1, side=28, classes=10)
def mnist(cfg: DataConfig) -> RawDataset:
    """MNIST handwritten digits, 60 000 train / 10 000 test, 28x28 grayscale, classes ``0``..``9``.

    Looked up: ``data.root`` (and its ``MNIST/raw`` subfolder), ``$TRANSFERLAB_DATA/mnist``, then a
    torchvision download (MD5-checked) when online.
    """
    return _idx_dataset(cfg, "mnist", "MNIST", MNIST_CLASSES, [], "MNIST", "Download it when online, or ")


@DATASETS.register("digits")
@documented_size(train=1_347, test=450, channels=1, side=8, classes=10)
def digits(cfg: DataConfig) -> RawDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1 797 images, 10 classes), scaled to 0..255.

    It has no official test split: a seeded stratified 25 % is held out as test (seed 0, fixed, so
    the test set does not change with the experiment seed).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    idx_train, idx_test = train_test_split(
        np.arange(len(images)), test_size=0.25, stratify=d.target, random_state=0
    )
    return RawDataset(
        train_x=torch.from_numpy(images[idx_train]),
        train_y=torch.from_numpy(d.target[idx_train].astype(np.int64)),
        test_x=torch.from_numpy(images[idx_test]),
        test_y=torch.from_numpy(d.target[idx_test].astype(np.int64)),
        class_names=[str(i) for i in range(10)],
        source="sklearn.datasets.load_digits",
    )


@DATASETS.register("synthetic")
@dataset_tasks("multiclass", "multilabel")
def synthetic(cfg: DataConfig) -> RawDataset:
    """A learnable toy task for tests: each class is a bright square at its own position plus noise.

    With ``data.task: multilabel`` every image has 1 to 3 classes (at most ``synthetic_classes``; how many and which
    drawn uniformly, seeded) and shows the squares of all of them: the sum of its classes' patterns plus noise.
    """
    g = torch.Generator().manual_seed(1234)
    n_cls, n, size = cfg.synthetic_classes, cfg.synthetic_size, 16
    multilabel = cfg.task == "multilabel"

    def make(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        if multilabel:
            how_many = torch.randint(1, min(3, n_cls) + 1, (count, 1), generator=g)
            rank = torch.rand(count, n_cls, generator=g).argsort(dim=1).argsort(dim=1)  # a random order of the classes
            y = (rank < how_many).float()  # the first how_many classes of that order
        else:
            y = torch.arange(count) % n_cls
        x = torch.randint(0, 60, (count, 3, size, size), generator=g, dtype=torch.uint8)
        for c in range(n_cls):
            r, col = divmod(c, 4)
            has = y[:, c] > 0 if multilabel else y == c
            x[has, :, 2 + 3 * r : 5 + 3 * r, 2 + 3 * col : 5 + 3 * col] = 230
        return x, y

    train_x, train_y = make(n)
    test_x, test_y = make(max(n // 2, n_cls))
    return RawDataset(train_x, train_y, test_x, test_y, [f"class_{c}" for c in range(n_cls)], "synthetic")
