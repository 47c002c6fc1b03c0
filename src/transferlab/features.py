"""Frozen-prefix feature caching: run the frozen part of a network once, train the rest on its output.

When a strategy freezes a prefix of the network (``linear_probe``; ``freeze_first`` up to a stage
cut), every epoch of the plain loop recomputes the same prefix output. ``cached_training`` finds the
deepest point where the network can be cut, checks that the part before it is really a fixed
function during training, computes its output once for the training and validation images, and hands
the training loop a model that runs only the part after the cut, on batches of cached features.

Cut points, deepest first:

* ``pooled``   — the backbone's pooled features (``forward_head(pre_logits=True)``); only the head trains;
* ``features`` — the backbone's unpooled ``forward_features`` output; its pooling (and
  ``model.drop_rate`` dropout, which timm applies inside the pooling head) runs live;
* ``after:<piece>`` — stage cuts for architectures whose ``forward_features`` is a plain sequence of
  pieces (timm ``EfficientNet`` / ``ResNet`` families, transferlab's CNN): stem + the first stages.

A cut is used only when the part before it (the modules a forward pass actually calls, found with
hooks) has no trainable parameter, no BatchNorm in training mode, and gives the same output twice in
training mode under different random seeds (no active dropout / drop-path). Otherwise the next
shallower cut is tried, and when none is left the run says why caching is off. Because the check is
made on the model as the strategy left it, the cached loop trains the head on the same inputs as the
plain loop (the same per-epoch shuffling; the head's own dropout still applies). With
``data.augment`` the images differ every epoch: ``train.cache_views: K`` caches K augmented views of
every training image (epoch *e* uses view *e* mod K); without it caching is off, and the run says so.

The cache key hashes everything the features depend on: the backbone and its weights (a hash of the
state dict), the cut point and mode, the split's images and labels (so the dataset selection), the
input transform (normalisation, channels, image size, augmentation, seed and view), the precision
and the device type. Feature sets live in a process-wide in-memory store shared by the experiments
of a study (five heads on one backbone cost one pass); sets larger than the memory budget are
written to ``<runs>/<study>/.feature_cache/<key>.safetensors`` (+ ``.json``) and memory-mapped, and
sets evicted from memory are spilled there too. Nothing is ever pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from transferlab.models.model import TransferModel

__all__ = [
    "CACHE_FORMAT",
    "CachedSuffix",
    "CachedTraining",
    "CutPoint",
    "FeatureBatches",
    "FeatureCache",
    "FeatureCacheError",
    "FeatureSet",
    "STORE",
    "cache_key",
    "cached_training",
    "check_cut",
    "cut_points",
    "extract_features",
    "images_hash",
    "state_hash",
]

CACHE_FORMAT = "transferlab-features-v1"
MEMORY_BYTES = int(float(os.environ.get("TRANSFERLAB_FEATURE_CACHE_GB", "2")) * 1024**3)
"""In-memory budget of the process-wide feature store (``$TRANSFERLAB_FEATURE_CACHE_GB``, default 2);
larger sets go to disk, memory-mapped, and least recently used ones are spilled there."""
MAX_BYTES = int(float(os.environ.get("TRANSFERLAB_FEATURE_CACHE_MAX_GB", "32")) * 1024**3)
"""Feature sets of one run above this size (``$TRANSFERLAB_FEATURE_CACHE_MAX_GB``, default 32) are not cached."""
MIN_FLOPS_SHARE = 0.25
"""``train.cache: auto`` uses a stage cut only when the prefix holds at least this share of the forward FLOPs."""

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
_NP = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


class FeatureCacheError(RuntimeError):
    """Caching was required (``train.cache: on``) but is impossible, or a cache file is unusable."""


# --------------------------------------------------------------------------------------------
# cut points


def sequential_pieces(backbone: nn.Module) -> list[tuple[str, list[nn.Module]]] | None:
    """``forward_features`` as a list of (name, modules run in order), for the architectures known to be
    a plain sequence (timm EfficientNet / ResNet families, transferlab's CNN); ``None`` otherwise.

    ``check_pieces`` verifies on real inputs that running the pieces in order gives ``forward_features``.
    """
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    from transferlab.models.small_cnn import SmallCNN

    if isinstance(backbone, EfficientNet):
        return [
            ("stem", [backbone.conv_stem, backbone.bn1]),
            *[(f"blocks.{i}", [b]) for i, b in enumerate(backbone.blocks)],
            ("conv_head", [backbone.conv_head, backbone.bn2]),
        ]
    if isinstance(backbone, ResNet):
        stem = [backbone.conv1, backbone.bn1, backbone.act1, backbone.maxpool]
        return [("stem", stem), *[(f"layer{i}", [getattr(backbone, f"layer{i}")]) for i in range(1, 5)]]
    if isinstance(backbone, SmallCNN):
        return [(f"blocks.{i}", [b]) for i, b in enumerate(backbone.blocks)]
    return None


def _run_pieces(pieces: list[tuple[str, list[nn.Module]]], x: torch.Tensor) -> torch.Tensor:
    for _, modules in pieces:
        for m in modules:
            x = m(x)
    return x


@dataclass(frozen=True)
class CutPoint:
    """Where the network is cut: the frozen prefix before it is cached, the suffix after it trains.

    ``name`` is ``pooled``, ``features`` or ``after:<piece>``; ``pieces`` is the number of sequential
    pieces (``sequential_pieces``) in the prefix of a stage cut.
    """

    name: str
    pieces: int | None = None

    def prefix(self, model: TransferModel, x: torch.Tensor) -> torch.Tensor:
        """Input images -> what is cached."""
        if self.name == "pooled":
            return model.forward_head(model.forward_features(x), pre_logits=True)
        if self.name == "features":
            return model.forward_features(x)
        seq = sequential_pieces(model.backbone)
        assert seq is not None and self.pieces is not None
        return _run_pieces(seq[: self.pieces], x)

    def suffix(self, model: TransferModel, f: torch.Tensor) -> torch.Tensor:
        """Cached features -> logits (the part that trains)."""
        if self.name == "pooled":
            return model.head(f)
        if self.name == "features":
            return model.forward_head(f)
        seq = sequential_pieces(model.backbone)
        assert seq is not None and self.pieces is not None
        return model.forward_head(_run_pieces(seq[self.pieces :], f))


def cut_points(model: TransferModel) -> list[CutPoint]:
    """Candidate cuts, deepest first: pooled (unless the head takes the feature map, e.g. ``conv``), features,
    then every stage cut (stem + N stages)."""
    cuts = [CutPoint("pooled")] if getattr(model, "head_input", "pooled") == "pooled" else []
    cuts.append(CutPoint("features"))
    seq = sequential_pieces(model.backbone)
    if seq:
        cuts += [CutPoint(f"after:{seq[k - 1][0]}", k) for k in range(len(seq) - 1, 0, -1)]
    return cuts


def _called_modules(model: nn.Module, fn: Callable[[], Any]) -> list[str]:
    """Qualified names of the modules that ``fn()`` calls (forward pre-hooks), in call order."""
    called: list[str] = []
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: called.append(name)))
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(called))


def _params_of(model: TransferModel, cut: CutPoint, called: list[str]) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) used by the prefix: those of the modules it calls, plus — for the pooled and
    features cuts — the backbone's own direct parameters (e.g. a ViT's position embedding)."""
    modules = dict(model.named_modules())
    names = list(called)
    if cut.pieces is None and "backbone" not in names:
        names.append("backbone")
    return [(f"{n}.{pn}" if n else pn, p) for n in names for pn, p in modules[n].named_parameters(recurse=False)]


def _is_stochastic(m: nn.Module) -> bool:
    p = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "drop_prob", None)
    return m.training and isinstance(p, (int, float)) and p > 0


@dataclass
class CutCheck:
    """The verdict on one cut point: usable or not (and why), and what the cache will hold."""

    cut: CutPoint
    ok: bool
    reason: str = ""
    mode_free: bool = True
    """Training-mode and eval-mode prefix outputs agree, so one (eval-mode) cache serves both."""
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    flops_share: float | None = None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def check_cut(model: TransferModel, cut: CutPoint, sample: torch.Tensor, autocast: Any = contextlib.nullcontext) -> CutCheck:
    """Is the part of ``model`` before ``cut`` a fixed function while the model trains?

    ``sample`` is a small batch of real, preprocessed images. The model's train/eval mode is restored.
    Nothing is updated: the prefix runs in training mode only once no BatchNorm in it can update.
    """
    was_training = model.training
    modules = dict(model.named_modules())
    try:
        model.eval()
        with torch.inference_mode(), autocast():
            called = _called_modules(model, lambda: cut.prefix(model, sample))
        if not called:
            return CutCheck(cut, False, "the prefix calls no module")
        trainable = [name for name, p in _params_of(model, cut, called) if p.requires_grad]
        if trainable:
            more = f" and {len(trainable) - 1} more" if len(trainable) > 1 else ""
            return CutCheck(cut, False, f"parameters before the cut train ({trainable[0]}{more})")
        model.train()
        bn_train = [
            n for n in called
            if (isinstance(modules[n], nn.modules.batchnorm._BatchNorm) and modules[n].training)
            or (isinstance(modules[n], nn.modules.instancenorm._InstanceNorm) and modules[n].training and modules[n].track_running_stats)
        ]
        if bn_train:
            return CutCheck(cut, False, f"BatchNorm before the cut is in training mode ({', '.join(bn_train[:3])})")
        devices = [sample.device] if sample.device.type == "cuda" else []
        outs = []
        with torch.inference_mode(), autocast():
            for seed in (1, 2):
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    outs.append(cut.prefix(model, sample))
        if not _close(outs[0], outs[1]):
            random_modules = [n for n in called if _is_stochastic(modules[n])]
            which = f" ({', '.join(random_modules[:3])})" if random_modules else " (functional dropout, e.g. model.drop_rate > 0)"
            return CutCheck(cut, False, f"the prefix is random in training mode: active dropout / drop-path{which}")
        model.eval()
        with torch.inference_mode(), autocast():
            eval_out = cut.prefix(model, sample)
            flops_share = _flops_share(model, cut, sample)
        mode_free = _close(outs[0], eval_out)
        return CutCheck(cut, True, "", mode_free, tuple(eval_out.shape[1:]), eval_out.dtype, flops_share)
    finally:
        model.train(was_training)


def _flops_share(model: TransferModel, cut: CutPoint, sample: torch.Tensor) -> float | None:
    """FLOPs of the prefix / FLOPs of the whole forward pass (torch's FlopCounterMode), on ``sample``."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as fc:
            cut.prefix(model, sample)
        prefix = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            model(sample)
        total = fc.get_total_flops()
    except Exception:  # noqa: BLE001 - an op the counter cannot handle: no estimate, not an error
        return None
    return prefix / total if total else None


def check_pieces(model: TransferModel, sample: torch.Tensor) -> str | None:
    """Why the stage cuts cannot be trusted for this model (pieces ≠ ``forward_features``), or None."""
    seq = sequential_pieces(model.backbone)
    if seq is None:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ok = _close(_run_pieces(seq, sample), model.forward_features(sample))
    finally:
        model.train(was_training)
    return None if ok else f"{type(model.backbone).__name__}.forward_features is not the sequence of its stages"


# --------------------------------------------------------------------------------------------
# cache keys


def state_hash(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes of every tensor)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def images_hash(x: Any) -> str:
    """sha256 of a split's images: the uint8 pixels, or for files on disk their paths, sizes, mtimes and resize."""
    h = hashlib.sha256()
    if isinstance(x, torch.Tensor):
        h.update(f"{x.dtype}|{tuple(x.shape)}|".encode())
        h.update(_tensor_bytes(x))
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
        return self.features.numel() * self.features.element_size() + self.labels.numel() * 8


def _header(tensors: dict[str, tuple[str, tuple[int, ...], int]], meta: dict[str, Any]) -> bytes:
    """A safetensors header for tensors given as name -> (dtype code, shape, nbytes), in this order."""
    header: dict[str, Any] = {"__metadata__": {"transferlab_features": json.dumps(meta, sort_keys=True)}}
    offset = 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the safetensors writer does
    return struct.pack("<Q", len(raw)) + raw


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise FeatureCacheError(f"{path}: not a safetensors file (header of {n} bytes)")
        return json.loads(f.read(n)), 8 + n


def _open_mmap(path: Path, key: str) -> FeatureSet:
    """Memory-map a cache file written by ``_write_streaming`` or ``_spill``; checks format, key and size."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:  # validates the header the way every reader does
            meta = json.loads((f.metadata() or {})["transferlab_features"])
        header, start = _read_header(path)
    except Exception as e:  # noqa: BLE001 - any corruption of the file means: recompute
        raise FeatureCacheError(f"{path}: unreadable feature cache file ({type(e).__name__}: {e})") from None
    if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
        raise FeatureCacheError(f"{path}: feature cache file for another key or format")
    with contextlib.suppress(OSError, ValueError):  # the sidecar also has the time the pass took
        side = json.loads(path.with_suffix(".json").read_text())
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


def _atomic_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    ) -> FeatureSet:
        """Fill a new set from ``batches`` of (features, labels), in memory or streamed into a file on disk."""
        nbytes = n * int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size() + 8 * n
        meta = {**meta, "format": CACHE_FORMAT, "key": key, "n": n, "shape": list(shape), "dtype": str(dtype)}
        to_disk = nbytes > self.memory_bytes and directory is not None
        if to_disk:
            assert directory is not None
            fs = self._write_streaming(key, meta, n, shape, dtype, batches, directory)
        else:
            feats = torch.empty((n, *shape), dtype=dtype)
            labels = torch.empty(n, dtype=torch.int64)
            _fill(feats, labels, batches)
            fs = FeatureSet(key, feats, labels, meta)
            self._remember(fs, directory)
        return fs

    def _write_streaming(self, key, meta, n, shape, dtype, batches, directory: Path) -> FeatureSet:  # noqa: ANN001
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
        item = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        if n * item > free:
            raise FeatureCacheError(f"feature cache needs {n * item / 1e9:.1f} GB in {directory}, only {free / 1e9:.1f} GB free")
        code = _DTYPES[dtype]
        header = _header({"features": (code, (n, *shape), n * item), "labels": ("I64", (n,), 8 * n)}, meta)
        tmp = directory / f".{key}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.truncate(len(header) + n * item + 8 * n)
            np_dtype = np.int16 if code == "BF16" else _NP[code]
            feats_np = np.memmap(tmp, dtype=np_dtype, mode="r+", offset=len(header), shape=(n, *shape))
            labels_np = np.memmap(tmp, dtype=np.int64, mode="r+", offset=len(header) + n * item, shape=(n,))
            feats = torch.from_numpy(feats_np)
            if code == "BF16":
                feats = feats.view(torch.bfloat16)
            _fill(feats, torch.from_numpy(labels_np), batches)
            feats_np.flush()
            labels_np.flush()
            del feats_np, labels_np, feats
            (directory / f"{key}.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            _atomic_replace(tmp, directory / f"{key}.safetensors")
        finally:
            tmp.unlink(missing_ok=True)
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
    from safetensors.torch import save_file

    path = directory / f"{fs.key}.safetensors"
    if path.is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{fs.key}.{os.getpid()}.tmp"
    try:
        save_file({"features": fs.features.contiguous(), "labels": fs.labels.contiguous()}, str(tmp),
                  metadata={"transferlab_features": json.dumps(fs.meta, sort_keys=True)})
        (directory / f"{fs.key}.json").write_text(json.dumps(fs.meta, indent=2, sort_keys=True))
        _atomic_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


STORE = FeatureCache()
"""The process-wide store: experiments of a study run in one process and share it."""


# --------------------------------------------------------------------------------------------
# extraction


def extract_features(
    model: TransferModel,
    cut: CutPoint,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    mode: str = "eval",
    autocast: Any = contextlib.nullcontext,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (prefix output, labels) per batch, under ``torch.inference_mode``, with the model in ``mode``.

    The model's train/eval mode is restored when the generator finishes.
    """
    was_training = model.training
    model.train(mode == "train")
    try:
        for x, y in batches:
            with torch.inference_mode(), autocast():  # per batch: grad mode is never left changed across a yield
                out = cut.prefix(model, x)
            yield out, y
    finally:
        model.train(was_training)


def _feature_set(
    store: FeatureCache,
    parts: dict[str, Any],
    model: TransferModel,
    check: CutCheck,
    batches: Any,
    n: int,
    mode: str,
    autocast: Any,
    directory: Path | None,
    device: torch.device,
    labels: torch.Tensor,
) -> tuple[FeatureSet, float]:
    """Get a feature set from the store, or compute it; returns (set, seconds spent computing)."""
    key = cache_key(parts)
    found = store.get(key, directory)
    if found is not None:
        if not torch.equal(found.labels, labels.cpu()):
            raise FeatureCacheError(f"feature cache {key} ({found.storage}): its labels differ from the split's (corrupt cache file?)")
        return found, 0.0
    t0 = time.perf_counter()
    fs = store.compute(key, {"parts": parts}, n, check.shape, check.dtype, extract_features(model, check.cut, batches, mode, autocast), directory)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    fs.meta["seconds"], fs.meta["images_per_s"] = seconds, n / seconds if seconds > 0 else None
    if fs.path is not None:  # streamed to disk: record the timing in its JSON sidecar too
        (fs.path.with_suffix(".json")).write_text(json.dumps(fs.meta, indent=2, sort_keys=True))
    return fs, seconds


# --------------------------------------------------------------------------------------------
# cached batches and the suffix model


class FeatureBatches:
    """(features, labels) batches from cached sets, with the training loop's contract.

    Same order as ``TensorBatches`` / ``LoaderBatches`` for the same seed and epoch (a generator seeded
    with ``seed * 100_003 + epoch``); epoch *e* reads view *e* mod K of K cached augmented views.
    """

    def __init__(
        self,
        views: list[torch.Tensor],
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        device_max_bytes: int = 2 * 1024**3,
    ) -> None:
        if not views or any(len(v) != len(labels) for v in views):
            raise ValueError("FeatureBatches needs at least one view, each with one row per label")
        self.device = torch.device(device)
        on_device = self.device.type != "cpu" and sum(v.numel() * v.element_size() for v in views) <= device_max_bytes
        self.views = [v.to(self.device) for v in views] if on_device else views
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle, self.seed, self.channels_last = batch_size, shuffle, seed, channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        x = self.views[self.epoch % len(self.views)]
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            xb = x[idx.to(x.device)].to(self.device, non_blocking=True)
            if self.channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.labels[idx.to(self.labels.device)]


class CachedSuffix(nn.Module):
    """The part of a ``TransferModel`` after a cut, fed cached features; everything else is delegated.

    ``parameters()``, ``state_dict()`` and ``load_state_dict()`` are those of the whole model, so the
    optimizer, the checkpoints and a resume are exactly those of the plain loop. Each forward checks
    that the prefix is still frozen (e.g. a later unfreezing step would make the cache wrong).
    """

    def __init__(self, model: TransferModel, cut: CutPoint, prefix_params: list[tuple[str, nn.Parameter]] | None = None) -> None:
        super().__init__()
        self.model = model
        self.cut = cut
        self._prefix_params = prefix_params or []

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for name, p in self._prefix_params:
            if p.requires_grad:
                raise FeatureCacheError(
                    f"parameter {name} before the cached cut ({self.cut.name}) became trainable during training; "
                    "cached features would be stale — set train.cache: off for this experiment"
                )
        return self.cut.suffix(self.model, features)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)


def prefix_parameters(model: TransferModel, cut: CutPoint, sample: torch.Tensor) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every module the prefix calls."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            called = _called_modules(model, lambda: cut.prefix(model, sample))
    finally:
        model.train(was_training)
    return _params_of(model, cut, called)


# --------------------------------------------------------------------------------------------
# the run's entry point


@dataclass
class CachedTraining:
    """What ``cached_training`` decided and built; ``apply`` gives the loop its model and batches."""

    used: bool
    reason: str
    cut: str | None = None
    model: nn.Module | None = None
    train: FeatureBatches | None = None
    val: FeatureBatches | None = None
    record: dict[str, Any] = field(default_factory=dict)

    def apply(self, model: nn.Module, train: Any, val: Any) -> tuple[nn.Module, Any, Any]:
        """(model, train, val) for ``fit``: the suffix model and cached batches, or the originals."""
        if not self.used:
            return model, train, val
        return self.model, self.train, self.val  # type: ignore[return-value]

    def summary(self, head_seconds: float | None = None) -> dict[str, Any]:
        """The ``feature_cache`` entry of ``metrics.json``."""
        out = {"used": self.used, "reason": self.reason, **self.record}
        if head_seconds is not None:
            out["head_seconds"] = head_seconds
        return out


def _transform_parts(model: TransferModel, channels_last: bool) -> dict[str, Any]:
    pre = model.preprocess()
    return {"mean": list(pre.mean), "std": list(pre.std), "in_chans": pre.in_chans, "channels_last": channels_last}


def split_parts(
    model: TransferModel, check: CutCheck, splits: Any, split: str, cfg: Any, device: torch.device, weights: str,
    mode: str, augment: list[Any] | None = None, view: int = 0,
) -> dict[str, Any]:
    """Everything a split's feature set depends on (the input of ``cache_key``)."""
    import timm

    from transferlab.data.augment import parse_augmentations

    x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
    parts = {
        "backbone": cfg.model.backbone,
        "arch": f"{type(model.backbone).__module__}.{type(model.backbone).__qualname__}",
        "versions": {"timm": timm.__version__, "torch": torch.__version__.split("+")[0]},
        "weights": weights,
        "cut": check.cut.name,
        "mode": mode,
        "split": split,
        "selection": {"source": splits.source, "indices": hashlib.sha256(json.dumps(splits.indices.get(split, [])).encode()).hexdigest()},
        "images": images_hash(x),
        "labels": hashlib.sha256(_tensor_bytes(y)).hexdigest(),
        "transform": _transform_parts(model, cfg.model.channels_last),
        "precision": cfg.train.precision,
        "device": device.type,
    }
    if augment:
        parts["augment"] = {"spec": [a.spec() for a in parse_augmentations(augment)], "seed": cfg.seed, "view": view}
    return parts


def plan_cut(model: TransferModel, sample: torch.Tensor, autocast: Any, required: bool, tried: list[tuple[str, str]]) -> CutCheck | None:
    """The deepest usable cut (``check_cut``) worth caching; (cut, reason) of rejected cuts go into ``tried``."""
    if all(p.requires_grad for p in model.backbone.parameters()):
        tried.append(("", "the strategy trains the whole backbone: there is no frozen part to cache"))
        return None
    pieces_problem = check_pieces(model, sample)
    for cut in cut_points(model):
        if cut.pieces is not None and pieces_problem:
            tried.append((cut.name, pieces_problem))
            break
        check = check_cut(model, cut, sample, autocast)
        if not check.ok:
            tried.append((cut.name, check.reason))
            continue
        if not required and check.flops_share is not None and check.flops_share < MIN_FLOPS_SHARE:
            tried.append((cut.name, f"the frozen prefix holds only {100 * check.flops_share:.0f}% of the forward FLOPs"))
            return None  # shallower cuts hold even less
        return check
    return None


def cached_training(
    model: TransferModel,
    splits: Any,
    cfg: Any,
    fabric: Any,
    batch_kwargs: dict[str, Any],
    cache_dir: Path | None,
    console: Console | None = None,
    store: FeatureCache | None = None,
) -> CachedTraining:
    """Decide whether this run trains on cached features (module docstring); compute or reuse them.

    ``batch_kwargs`` are the run's ``make_batches`` arguments (preprocess, device, channels_last,
    num_workers). Returns ``CachedTraining`` with ``used=False`` and the reason when caching is off;
    with ``train.cache: on`` that is an error instead.
    """
    from transferlab.data.prepare import make_batches

    console = console or Console(quiet=True)
    store = store or STORE
    tc = cfg.train
    mode_setting = getattr(tc, "cache", "auto")
    views = int(getattr(tc, "cache_views", 0) or 0)
    augment = list(cfg.data.augment or [])

    tried: list[tuple[str, str]] = []

    def off(reason: str) -> CachedTraining:
        if mode_setting == "on":
            raise FeatureCacheError(f"experiment '{cfg.name}': train.cache: on, but features cannot be cached: {reason}")
        if mode_setting != "off" and any(not p.requires_grad for p in model.backbone.parameters()):
            console.print(f"  feature cache off: {reason}")  # (nothing frozen: nothing to say in the log)
        return CachedTraining(False, reason, record={"rejected_cuts": [f"{c}: {r}" if c else r for c, r in tried]} if tried else {})

    if mode_setting == "off":
        return off("train.cache: off")
    if tc.tta != "none":
        return off(f"train.tta: {tc.tta} evaluates on transformed images, which a feature cache does not hold")
    if fabric.world_size > 1:
        return off(f"distributed run (world size {fabric.world_size}): every rank would repeat the pass; caching is single-process only")
    for key in ("unfreeze", "freeze_epochs"):  # a schedule that unfreezes mid-run would make any cache stale
        if getattr(cfg.strategy, key, None) is not None:
            return off(f"strategy.{key} changes what is frozen during training")
    if augment and views < 1:
        return off(
            "data.augment is set, so the training images change every epoch; set train.cache_views: K to cache "
            "K augmented views per image (epoch e uses view e mod K)"
        )
    device = fabric.device
    sample_batches = make_batches(splits, "train", 4, shuffle=False, **{**batch_kwargs, "num_workers": 0})
    sample = next(iter(sample_batches))[0][:4]
    check = plan_cut(model, sample, fabric.autocast, mode_setting == "on", tried)
    if check is None:
        why = tried[-1][1] if tried else "no cut point"
        return off(why if len(tried) <= 1 else f"{why} (cuts tried, deepest first: {', '.join(c for c, _ in tried)})")
    n_views = views if augment else 1
    item_bytes = int(np.prod(check.shape, dtype=np.int64)) * torch.empty((), dtype=check.dtype).element_size()
    total = item_bytes * (len(splits.train_y) * n_views + len(splits.val_y))
    if total > MAX_BYTES:
        return off(
            f"cut {check.cut.name} gives {total / 1e9:.1f} GB of features, above $TRANSFERLAB_FEATURE_CACHE_MAX_GB "
            f"({MAX_BYTES / 1e9:.0f} GB)"
        )

    weights = state_hash(model.backbone)
    train_mode = "eval" if check.mode_free else "train"
    ebs = extraction_batch_size(cfg, device)
    t0 = time.perf_counter()
    computed_seconds = 0.0
    train_sets: list[FeatureSet] = []
    for v in range(n_views):
        src = make_batches(splits, "train", ebs, shuffle=False, augment=augment or None, seed=cfg.seed, **batch_kwargs)
        src.set_epoch(v)
        parts = split_parts(model, check, splits, "train", cfg, device, weights, train_mode, augment, v)
        fs, s = _feature_set(store, parts, model, check, src, len(splits.train_y), train_mode, fabric.autocast, cache_dir, device, splits.train_y)
        train_sets.append(fs)
        computed_seconds += s
    val_src = make_batches(splits, "val", ebs, **batch_kwargs)
    val_parts = split_parts(model, check, splits, "val", cfg, device, weights, "eval")
    val_set, s = _feature_set(store, val_parts, model, check, val_src, len(splits.val_y), "eval", fabric.autocast, cache_dir, device, splits.val_y)
    computed_seconds += s
    wall = time.perf_counter() - t0

    channels_last = bool(batch_kwargs.get("channels_last", False))
    train = FeatureBatches([f.features for f in train_sets], splits.train_y, tc.batch_size, device, shuffle=True, seed=cfg.seed, channels_last=channels_last)
    val = FeatureBatches([val_set.features], splits.val_y, tc.eval_batch_size, device, channels_last=channels_last)
    suffix = CachedSuffix(model, check.cut, prefix_parameters(model, check.cut, sample))
    sources = [f.source for f in train_sets] + [val_set.source]
    record = {
        "cut": check.cut.name,
        "views": n_views,
        "train_mode": train_mode,
        "feature_shape": list(check.shape),
        "feature_dtype": str(check.dtype).replace("torch.", ""),
        "bytes": sum(f.nbytes for f in train_sets) + val_set.nbytes,
        "storage": sorted({f.storage for f in [*train_sets, val_set]}),
        "sources": sources,
        "keys": [f.key for f in [*train_sets, val_set]],
        "pass_seconds": computed_seconds,
        "cache_seconds": wall,
        "prefix_flops_share": check.flops_share,
        "rejected_cuts": [f"{c}: {r}" for c, r in tried],
    }
    how = "computed" if all(s == "computed" for s in sources) else "reused (" + ", ".join(sorted(set(sources))) + ")"
    console.print(
        f"  feature cache: {check.cut.name} features {tuple(check.shape)} of {len(splits.train_y)}"
        f"{f' × {n_views} views' if n_views > 1 else ''} train + {len(splits.val_y)} val images {how} in {wall:.1f}s "
        f"({record['bytes'] / 1e6:.0f} MB, {'/'.join(record['storage'])}); training the part after the cut on them"
    )
    return CachedTraining(True, f"cached at {check.cut.name}", check.cut.name, suffix, train, val, record)


def extraction_batch_size(cfg: Any, device: torch.device) -> int:
    """Batch size of the feature pass: ``train.eval_batch_size``, at most 64 on the CPU (where small batches
    stay in cache: EfficientNet-Lite0 at 64 px runs about 1.8x faster with 64 than with 512)."""
    bs = int(cfg.train.eval_batch_size)
    return min(bs, 64) if torch.device(device).type == "cpu" else bs


def default_cache_dir(run_dir: Path) -> Path:
    """Where a run's feature sets spill: ``$TRANSFERLAB_FEATURE_CACHE_DIR`` or ``<study dir>/.feature_cache``."""
    env = os.environ.get("TRANSFERLAB_FEATURE_CACHE_DIR")
    return Path(env) if env else Path(run_dir).parent / ".feature_cache"


def frozen_features(
    model: TransferModel,
    splits: Any,
    split: str,
    cfg: Any,
    device: torch.device,
    batch_kwargs: dict[str, Any],
    cache_dir: Path | None,
    autocast: Any = contextlib.nullcontext,
    store: FeatureCache | None = None,
    weights: str | None = None,
) -> tuple[FeatureSet, float]:
    """The backbone's pooled eval-mode features of one split (probes, k-NN, few-shot, ranking), cached.

    The key is the one ``cached_training`` uses for a mode-independent pooled cut, so a linear probe
    trained by the loop and a ``logistic`` / ``knn`` probe on the same backbone share one pass.
    Returns (feature set, seconds spent computing it — 0 on a cache hit).
    """
    from transferlab.data.prepare import make_batches

    n = len(getattr(splits, f"{split}_y"))
    src = make_batches(splits, split, extraction_batch_size(cfg, device), **batch_kwargs)
    sample = next(iter(make_batches(splits, split, 2, **{**batch_kwargs, "num_workers": 0})))[0][:2]
    cut = CutPoint("pooled")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast():
            out = cut.prefix(model, sample)
    finally:
        model.train(was_training)
    check = CutCheck(cut, True, shape=tuple(out.shape[1:]), dtype=out.dtype)
    weights = weights or state_hash(model.backbone)
    parts = split_parts(model, check, splits, split, cfg, device, weights, "eval")
    return _feature_set(store or STORE, parts, model, check, src, n, "eval", autocast, cache_dir, device, getattr(splits, f"{split}_y"))
