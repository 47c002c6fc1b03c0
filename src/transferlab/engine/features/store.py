"""The feature store: cached prefix outputs by key, in memory or memory-mapped from safetensors files.

The key hashes everything the features depend on: the backbone and its weights (a hash of the state
dict), the cut point and mode, the split's images and labels (so the dataset selection), the input
transform (normalisation, channels, image size, augmentation, seed and view), the precision and the
device type. Feature sets live in a process-wide in-memory store shared by the experiments of a
study (five heads on one backbone cost one pass); sets larger than the memory budget are streamed
to ``<runs>/<study>/.feature_cache/<key>.safetensors`` (+ ``.json``) and memory-mapped, and sets
evicted from memory are spilled there too. Every file is written atomically
(``transferlab.files.atomic_write``); nothing is ever pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from transferlab.files import atomic_write, read_json, safetensors_header, write_text

__all__ = [
    "CACHE_FORMAT",
    "CLASS_LABELS",
    "MEMORY_BYTES",
    "STORE",
    "FeatureCache",
    "FeatureCacheError",
    "FeatureSet",
    "LabelSpec",
    "cache_key",
    "images_hash",
    "state_hash",
    "tensor_bytes",
]

CACHE_FORMAT = "transferlab-features-v1"
MEMORY_BYTES = int(float(os.environ.get("TRANSFERLAB_FEATURE_CACHE_GB", "2")) * 1024**3)
"""In-memory budget of the process-wide feature store (``$TRANSFERLAB_FEATURE_CACHE_GB``, default 2);
larger sets go to disk, memory-mapped, and least recently used ones are spilled there."""

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
LabelSpec = tuple[tuple[int, ...], torch.dtype]
"""A set's labels per item: the shape after N and the dtype — ``((), int64)`` class indices, ``((K,), float32)`` multi-label."""
CLASS_LABELS: LabelSpec = ((), torch.int64)
_NP = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


class FeatureCacheError(RuntimeError):
    """Caching was required (``train.cache: on``) but is impossible, or a cache file is unusable."""


# --------------------------------------------------------------------------------------------
# cache keys


def state_hash(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes of every tensor)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def images_hash(x: Any) -> str:
    """sha256 of a split's images: the uint8 pixels, or for files on disk their paths, sizes, mtimes and resize."""
    h = hashlib.sha256()
    if isinstance(x, torch.Tensor):
        h.update(f"{x.dtype}|{tuple(x.shape)}|".encode())
        h.update(tensor_bytes(x))
        return h.hexdigest()
    h.update(f"files|{getattr(x, 'channels', '')}|{getattr(x, 'resize', '')}|{getattr(x, 'size', '')}|".encode())
    for p in x.paths:
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """The key of a feature set: sha256 of the canonical JSON of everything it depends on."""
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:40]



# --------------------------------------------------------------------------------------------
# the store


@dataclass
class FeatureSet:
    """Cached prefix outputs of one split (one augmented view), with their labels."""

    key: str
    features: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any]
    storage: str = "memory"
    """``memory`` or ``disk`` (memory-mapped safetensors file)."""
    source: str = "computed"
    """``computed`` (this call ran the prefix), ``memory`` or ``disk`` (a cache hit)."""
    path: Path | None = None

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size() + self.labels.numel() * self.labels.element_size()


def _metadata(meta: dict[str, Any]) -> dict[str, str]:
    return {"transferlab_features": json.dumps(meta, sort_keys=True)}


def _write_sidecar(path: Path, meta: dict[str, Any]) -> None:
    """``<key>.json`` beside the tensors: the metadata (and the pass timing) for people and for reuse."""
    write_text(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True))


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise FeatureCacheError(f"{path}: not a safetensors file (header of {n} bytes)")
        return json.loads(f.read(n)), 8 + n


def _open_mmap(path: Path, key: str) -> FeatureSet:
    """Memory-map a cache file written by ``_write_streaming`` or ``_spill``; checks format, key and size."""
    try:
        with safe_open(str(path), framework="pt") as f:  # validates the header the way every reader does
            meta = json.loads((f.metadata() or {})["transferlab_features"])
        header, start = _read_header(path)
    except Exception as e:  # noqa: BLE001 - any corruption of the file means: recompute
        raise FeatureCacheError(f"{path}: unreadable feature cache file ({type(e).__name__}: {e})") from None
    if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
        raise FeatureCacheError(f"{path}: feature cache file for another key or format")
    with contextlib.suppress(OSError, ValueError):  # the sidecar also has the time the pass took
        side = read_json(path.with_suffix(".json"))
        meta.update({k: side[k] for k in ("seconds", "images_per_s") if k in side})
    size = path.stat().st_size
    out = {}
    for name in ("features", "labels"):
        info = header[name]
        lo, hi = info["data_offsets"]
        if start + hi > size:
            raise FeatureCacheError(f"{path}: truncated feature cache file ({size} bytes, needs {start + hi})")
        if info["dtype"] == "BF16":
            arr = np.memmap(path, dtype=np.int16, mode="c", offset=start + lo, shape=tuple(info["shape"]))
            out[name] = torch.from_numpy(arr).view(torch.bfloat16)
        else:
            arr = np.memmap(path, dtype=_NP[info["dtype"]], mode="c", offset=start + lo, shape=tuple(info["shape"]))
            out[name] = torch.from_numpy(arr)
    return FeatureSet(key, out["features"], out["labels"], meta, storage="disk", source="disk", path=path)


class FeatureCache:
    """Process-wide feature sets by key: in memory up to ``memory_bytes`` (least recently used first out,
    spilled to its directory), larger sets on disk as memory-mapped safetensors files."""

    def __init__(self, memory_bytes: int = MEMORY_BYTES) -> None:
        self.memory_bytes = memory_bytes
        self._mem: OrderedDict[str, tuple[FeatureSet, Path | None]] = OrderedDict()

    @property
    def bytes_in_memory(self) -> int:
        return sum(fs.nbytes for fs, _ in self._mem.values())

    def clear(self) -> None:
        """Forget every in-memory set (files on disk stay)."""
        self._mem.clear()

    def get(self, key: str, directory: Path | None) -> FeatureSet | None:
        """The set stored under ``key`` (memory first, then ``directory``), or None. Corrupt files are removed."""
        if key in self._mem:
            self._mem.move_to_end(key)
            fs = self._mem[key][0]
            return FeatureSet(fs.key, fs.features, fs.labels, fs.meta, fs.storage, "memory", fs.path)
        if directory is not None and (path := directory / f"{key}.safetensors").is_file():
            try:
                return _open_mmap(path, key)
            except FeatureCacheError:
                path.unlink(missing_ok=True)  # recomputed and rewritten by the caller
        return None

    def compute(
        self,
        key: str,
        meta: dict[str, Any],
        n: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        directory: Path | None,
        to_disk: bool | None = None,
        labels: LabelSpec = CLASS_LABELS,
    ) -> FeatureSet:
        """Fill a new set from ``batches`` of (features, labels), in memory or streamed into a file on disk.

        ``to_disk``: ``None`` decides by size (sets above ``memory_bytes`` go to disk); ``True`` always writes the file
        (shared by other processes). ``labels``: the shape and dtype of one item's labels (``CLASS_LABELS``: a class
        index; multi-label: ``((K,), torch.float32)``, the multi-hot vector)."""
        label_bytes = _item_bytes(*labels)
        nbytes = n * _item_bytes(shape, dtype) + label_bytes * n
        meta = {**meta, "format": CACHE_FORMAT, "key": key, "n": n, "shape": list(shape), "dtype": str(dtype)}
        to_disk = (bool(to_disk) or nbytes > self.memory_bytes) and directory is not None
        if to_disk:
            assert directory is not None
            fs = self._write_streaming(key, meta, n, shape, dtype, batches, directory, labels)
        else:
            feats = torch.empty((n, *shape), dtype=dtype)
            label_t = torch.empty((n, *labels[0]), dtype=labels[1])
            _fill(feats, label_t, batches)
            fs = FeatureSet(key, feats, label_t, meta)
            self._remember(fs, directory)
        return fs

    def _write_streaming(self, key, meta, n, shape, dtype, batches, directory: Path, labels: LabelSpec = CLASS_LABELS) -> FeatureSet:  # noqa: ANN001
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
        item, label_item = _item_bytes(shape, dtype), _item_bytes(*labels)
        if n * item > free:
            raise FeatureCacheError(f"feature cache needs {n * item / 1e9:.1f} GB in {directory}, only {free / 1e9:.1f} GB free")
        code, label_code = _DTYPES[dtype], _DTYPES[labels[1]]
        header = safetensors_header({"features": (code, (n, *shape), n * item), "labels": (label_code, (n, *labels[0]), label_item * n)},
                                    _metadata(meta))

        def write(tmp: Path) -> None:  # streamed: the features never sit in memory whole
            with open(tmp, "wb") as f:
                f.write(header)
                f.truncate(len(header) + n * item + label_item * n)
            np_dtype = np.int16 if code == "BF16" else _NP[code]
            feats_np = np.memmap(tmp, dtype=np_dtype, mode="r+", offset=len(header), shape=(n, *shape))
            labels_np = np.memmap(tmp, dtype=_NP[label_code], mode="r+", offset=len(header) + n * item, shape=(n, *labels[0]))
            feats = torch.from_numpy(feats_np)
            _fill(feats.view(torch.bfloat16) if code == "BF16" else feats, torch.from_numpy(labels_np), batches)
            feats_np.flush()
            labels_np.flush()

        path = directory / f"{key}.safetensors"
        _write_sidecar(path, meta)
        atomic_write(path, write)
        fs = _open_mmap(directory / f"{key}.safetensors", key)
        fs.source = "computed"
        return fs

    def _remember(self, fs: FeatureSet, directory: Path | None) -> None:
        self._mem[fs.key] = (fs, directory)
        self._mem.move_to_end(fs.key)
        while self.bytes_in_memory > self.memory_bytes and len(self._mem) > 1:
            _, (old, old_dir) = self._mem.popitem(last=False)
            if old_dir is not None:
                _spill(old, old_dir)


def _item_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of one item of ``shape`` and ``dtype``."""
    return int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()


def _fill(feats: torch.Tensor, labels: torch.Tensor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    i = 0
    for f, y in batches:
        feats[i : i + len(f)] = f.to("cpu", feats.dtype)
        labels[i : i + len(y)] = y.to("cpu")
        i += len(f)
    if i != len(feats):
        raise FeatureCacheError(f"feature extraction produced {i} items, expected {len(feats)}")


def _spill(fs: FeatureSet, directory: Path) -> None:
    """Write an in-memory set to ``directory/<key>.safetensors`` (atomically), unless it is there already."""
    path = directory / f"{fs.key}.safetensors"
    if path.is_file():
        return
    tensors = {"features": fs.features.contiguous(), "labels": fs.labels.contiguous()}
    _write_sidecar(path, fs.meta)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=_metadata(fs.meta)))


STORE = FeatureCache()
"""The process-wide store: experiments of a study run in one process and share it."""
