"""CIFAR-10 and CIFAR-100 from torchvision's on-disk format, read without executing anything.

The official ``cifar-10-batches-py`` / ``cifar-100-python`` files are Python pickles. A pickle can
call any importable function while it loads, so they are read with ``NumpyOnlyUnpickler``, which
allows only the handful of globals a pickled numpy array needs (``_reconstruct``, ``ndarray``,
``dtype``, ``scalar`` and latin-1 ``_codecs.encode``); anything else — ``os.system``, ``eval``,
``subprocess.Popen`` — fails with a DatasetError naming the file, before it can run.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.config import DataConfig
from transferlab.data.archives import DownloadRefused, download_archive, safe_extract
from transferlab.data.sources import DATASETS, DatasetError, RawDataset, default_data_root, documented_size

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles written by Python 3 use it for bytes — latin-1 only."""
    if encoding.lower().replace("-", "") != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild dicts, lists, str, bytes, numbers and numpy arrays — nothing else."""

    ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.multiarray", "scalar"): scalar,
        ("numpy._core.multiarray", "scalar"): scalar,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': only numpy arrays, lists, dicts, strings and numbers are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def safe_unpickle(path: Path) -> Any:
    """Load a pickle file with ``NumpyOnlyUnpickler`` (latin-1 for Python 2 strings, as CIFAR needs)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, ValueError from a corrupt stream
        raise DatasetError(f"{path}: not a valid CIFAR pickle ({type(e).__name__}: {e})") from None


def _str_keys(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _read_batch(path: Path, label_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    entry = _str_keys(safe_unpickle(path), path)
    for key in ("data", label_key):
        if key not in entry:
            raise DatasetError(f"{path}: no '{key}' entry (has: {', '.join(sorted(entry))})")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {desc}")
    labels = np.asarray(entry[label_key])
    if labels.ndim != 1 or len(labels) != len(data) or labels.dtype.kind not in "iu":
        raise DatasetError(f"{path}: '{label_key}' must be {len(data)} integers, found {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetError(f"{path}: '{label_key}' has values outside 0..{n_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _names(path: Path, key: str, n: int) -> list[str]:
    meta = _str_keys(safe_unpickle(path), path)
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != n or not all(isinstance(x, (str, bytes)) for x in names):
        raise DatasetError(f"{path}: '{key}' must be a list of {n} class names")
    return [x.decode("latin1") if isinstance(x, bytes) else x for x in names]


CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=["train"],
        test=["test"],
        meta="meta",
    ),
}


def _find(kind: str, cfg: DataConfig) -> Path | None:
    spec = CIFAR[kind]
    roots = ([Path(cfg.root)] if cfg.root else []) + [default_data_root() / kind]
    for r in roots:
        for d in (r, r / spec["folder"]):
            if all((d / f).is_file() for f in spec["train"] + spec["test"] + [spec["meta"]]):
                return d
    return None


def locate(kind: str, cfg: DataConfig) -> Path:
    """The folder with the batch files: data.root (or its cifar-*-py subfolder), $TRANSFERLAB_DATA/<kind>, else download."""
    found = _find(kind, cfg)
    if found is not None:
        return found
    spec = CIFAR[kind]
    target = Path(cfg.root) if cfg.root else default_data_root() / kind
    looked = ", ".join(str(r) for r in ([Path(cfg.root)] if cfg.root else []) + [default_data_root() / kind])
    try:
        archive = download_archive(spec["url"], spec["md5"], target, spec["url"].rsplit("/", 1)[1])
    except DownloadRefused as e:
        raise DownloadRefused(f"{kind}: not found (looked in: {looked}); {e}") from None
    except DatasetError as e:
        raise DatasetError(
            f"{kind}: '{spec['folder']}' not found (looked in: {looked}) and {e}. Download {spec['url']} "
            f"and extract it into a folder, then set data.root to that folder."
        ) from None
    safe_extract(archive, target)
    found = _find(kind, cfg) or (target / spec["folder"] if (target / spec["folder"]).is_dir() else None)
    if found is None:
        raise DatasetError(f"{archive}: extracted, but {target / spec['folder']} has not all batch files")
    return found


def _load(kind: str, cfg: DataConfig, coarse: bool = False) -> RawDataset:
    d = locate(kind, cfg)
    spec = CIFAR[kind]
    if kind == "cifar10":
        label_key, names_key, n = "labels", "label_names", 10
    else:
        label_key, names_key, n = ("coarse_labels", "coarse_label_names", 20) if coarse else ("fine_labels", "fine_label_names", 100)
    names = _names(d / spec["meta"], names_key, n)
    splits = {}
    for split in ("train", "test"):
        parts = [_read_batch(d / f, label_key, n) for f in spec[split]]
        splits[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return RawDataset(
        train_x=torch.from_numpy(splits["train"][0]),
        train_y=torch.from_numpy(splits["train"][1]),
        test_x=torch.from_numpy(splits["test"][0]),
        test_y=torch.from_numpy(splits["test"][1]),
        class_names=names,
        source=str(d),
    )


@DATASETS.register("cifar10")
@documented_size(train=50_000, test=10_000, channels=3, side=32, classes=10)
def cifar10(cfg: DataConfig) -> RawDataset:
    """CIFAR-10: 50 000 train / 10 000 test, 32x32 RGB, 10 classes (``cifar-10-batches-py``).

    Looked up in ``data.root`` (the batch folder itself or its parent), then
    ``$TRANSFERLAB_DATA/cifar10``; otherwise the official archive is downloaded there (MD5-checked)
    and extracted safely.
    """
    return _load("cifar10", cfg)


@DATASETS.register("cifar100")
@documented_size(train=50_000, test=10_000, channels=3, side=32, classes=100)
def cifar100(cfg: DataConfig) -> RawDataset:
    """CIFAR-100 with its 100 fine labels: 50 000 train / 10 000 test, 32x32 RGB (``cifar-100-python``)."""
    return _load("cifar100", cfg)


@DATASETS.register("cifar100_coarse")
@documented_size(train=50_000, test=10_000, channels=3, side=32, classes=20)
def cifar100_coarse(cfg: DataConfig) -> RawDataset:
    """CIFAR-100 with its 20 coarse labels (superclasses); same files and lookup as ``cifar100``."""
    return _load("cifar100", cfg, coarse=True)
