"""From a raw dataset to the three splits an experiment uses, and batches on the training device.

Selection is stratified and seeded, so the same seed gives the same indices; they are returned so the
run directory can record them. In order:

1. ``data.classes`` keeps some classes and numbers them 0..k-1 in the order given;
2. ``data.train_subset`` (fraction or count, stratified) or ``data.k_per_class`` picks the pool of
   training images;
3. the validation split — ``data.val_count`` images or ``data.val_fraction`` of the pool, stratified —
   is held out of the pool (unless the dataset has its own ``val`` split);
4. ``data.test_subset`` (fraction or count, stratified) thins the test split.

Two data paths, chosen by ``data.in_memory`` (``auto``: in memory when the decoded uint8 images of
the three splits take at most ``IN_MEMORY_MAX_BYTES``):

* in memory (``TensorBatches``): images are decoded and resized once into a uint8 tensor, then
  batched, augmented and normalised on the training device — no per-image work per epoch;
* PIL (``LoaderBatches``): a torch ``DataLoader`` over ``ImageDataset``, which decodes each image with
  PIL and applies the same augmentations as torchvision ``transforms.v2`` transforms, in workers.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from transferlab.config import DataConfig
from transferlab.data.augment import AUGMENTATIONS, augment_batch, parse_augmentations, pil_pipeline
from transferlab.data.datasets import DatasetError, RawDataset, load_dataset
from transferlab.data.images import FileImages, ImageReadError, Problem, decode_files, format_problems, load_image, map_files

__all__ = [
    "AUGMENTATIONS",
    "IN_MEMORY_MAX_BYTES",
    "ImageDataset",
    "ImageSplits",
    "LoaderBatches",
    "Preprocess",
    "TensorBatches",
    "augment_batch",
    "make_batches",
    "prepare_splits",
    "resize_uint8",
]

IN_MEMORY_MAX_BYTES = int(float(os.environ.get("TRANSFERLAB_IN_MEMORY_GB", "4")) * 1024**3)
"""``data.in_memory: auto`` decodes into memory up to this many bytes of uint8 pixels (all three
splits together; ``$TRANSFERLAB_IN_MEMORY_GB``, default 4), and uses the PIL path above it."""

Images = torch.Tensor | FileImages


@dataclass
class ImageSplits:
    """Train / val / test images with labels, class names, the chosen indices and what was skipped.

    ``*_x`` are uint8 N×C×H×W tensors, or ``FileImages`` when the images stay on disk for the PIL
    path. ``in_memory`` says which batches ``make_batches`` builds.
    """

    train_x: Images
    train_y: torch.Tensor
    val_x: Images
    val_y: torch.Tensor
    test_x: Images
    test_y: torch.Tensor
    class_names: list[str]
    source: str
    indices: dict[str, list[int]] = field(default_factory=dict)
    in_memory: bool = True
    class_map: list[int] | None = None
    """With ``data.classes``: the dataset's class index of each class of this task."""
    val_from: str = "train"
    """``train`` (held out of the training split) or ``dataset`` (the dataset's own val split)."""
    skipped: list[Problem] = field(default_factory=list)
    """Bad images left out (``data.skip_bad_images``)."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        """Side of the images as batched."""
        return int(self.train_x.shape[-1])

    def selection_record(self) -> dict[str, Any]:
        """What ``selection.json`` records: source, indices, class mapping, skipped bad images."""
        record: dict[str, Any] = {"source": self.source, **self.indices, "val_from": self.val_from, "in_memory": self.in_memory}
        if self.class_map is not None:
            record["classes"] = {"dataset_index": self.class_map, "names": self.class_names}
        record["skipped_bad_images"] = [{"path": p.path, "reason": p.message} for p in self.skipped]
        record["skipped_bad_images_count"] = len(self.skipped)
        return record


# --------------------------------------------------------------------------------------------
# selection


def _stratified_take(labels: np.ndarray, amount: float | None, seed: int, what: str) -> np.ndarray:
    """Positions of a stratified subset: ``amount`` <= 1 is a fraction, > 1 a count; None = all."""
    idx = np.arange(len(labels))
    if amount is None or amount == len(labels) or amount == 1.0:
        return idx
    n = int(round(amount * len(labels))) if amount <= 1 else int(amount)
    n_classes = len(np.unique(labels))
    if n > len(labels):
        raise DatasetError(f"{what}={amount:g} asks for {n} images but the split has only {len(labels)}")
    if n < n_classes:
        raise DatasetError(f"{what}={amount:g} gives {n} images, fewer than the {n_classes} classes")
    if n == len(labels):
        return idx
    if len(labels) - n < n_classes:  # sklearn cannot stratify a remainder smaller than the class count
        return np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))
    taken, _ = train_test_split(idx, train_size=n, stratify=labels, random_state=seed)
    return np.sort(taken)


def _k_per_class(labels: np.ndarray, k: int, seed: int, names: list[str]) -> np.ndarray:
    """Positions of exactly ``k`` images of every class (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(len(names)):
        pos = np.flatnonzero(labels == c)
        if len(pos) < k:
            raise DatasetError(f"data.k_per_class={k} but class {names[c]!r} has only {len(pos)} training images")
        out.append(rng.choice(pos, size=k, replace=False))
    return np.sort(np.concatenate(out))


def select_classes(spec: Sequence[int | str] | None, names: list[str]) -> tuple[np.ndarray | None, list[int] | None, list[str]]:
    """``data.classes`` -> (old label -> new label or -1, dataset index of each new class, new class names)."""
    if spec is None:
        return None, None, list(names)
    chosen: list[int] = []
    for i, c in enumerate(spec):
        if isinstance(c, bool) or not isinstance(c, (int, str)):
            raise DatasetError(f"data.classes[{i}]: {c!r} must be a class index or a class name")
        if isinstance(c, int):
            if not 0 <= c < len(names):
                raise DatasetError(f"data.classes[{i}]: class index {c} is out of range 0..{len(names) - 1}")
            idx = c
        else:
            c = unicodedata.normalize("NFC", c)  # class folder names are NFC too
            if c not in names:
                import difflib

                close = difflib.get_close_matches(c, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise DatasetError(f"data.classes[{i}]: no class named {c!r}{hint}; classes: {', '.join(names[:30])}")
            idx = names.index(c)
        if idx in chosen:
            raise DatasetError(f"data.classes[{i}]: class {names[idx]!r} is listed twice")
        chosen.append(idx)
    if len(chosen) < 2:
        raise DatasetError(f"data.classes={list(spec)} selects {len(chosen)} class; a task needs at least 2")
    relabel = np.full(len(names), -1, dtype=np.int64)
    relabel[chosen] = np.arange(len(chosen))
    return relabel, chosen, [names[i] for i in chosen]


def resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 N×C×H×W batch to size×size (bilinear, antialiased when shrinking), in chunks."""
    import torch.nn.functional as F

    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, len(x), 4096):  # chunks keep the float copy small
        chunk = x[i : i + 4096].float()
        chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + 4096] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _mixed_size_message(raw: RawDataset) -> str:
    for w in raw.warnings:
        if w.kind == "mixed_sizes":
            return w.message
    return "images differ in size: set data.image_size"


def prepare_splits(cfg: DataConfig, seed: int, raw: RawDataset | None = None) -> ImageSplits:
    """Load ``cfg.dataset`` and return seeded, stratified train/val/test splits (module docstring).

    In-memory splits are decoded/resized once here; on the PIL path the selected files are kept as
    ``FileImages``. Bad image files fail with one DatasetError listing all of them, or are skipped and
    recorded when ``cfg.skip_bad_images``.
    """
    raw = raw if raw is not None else load_dataset(cfg)
    relabel, class_map, names = select_classes(cfg.classes, raw.class_names)

    def candidates(y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        labels = y.numpy()
        if relabel is None:
            return np.arange(len(labels)), labels
        new = relabel[labels]
        keep = np.flatnonzero(new >= 0)
        return keep, new[keep]

    tr_idx, tr_lab = candidates(raw.train_y)
    if cfg.k_per_class is not None:
        pool = _k_per_class(tr_lab, cfg.k_per_class, seed, names)
    else:
        pool = _stratified_take(tr_lab, cfg.train_subset, seed, "data.train_subset")
    n_classes = len(names)
    if raw.val_x is not None and raw.val_y is not None:
        train_pos = pool
        va_idx, va_lab = candidates(raw.val_y)
        val_pos, val_source, val_from = np.arange(len(va_idx)), "val", "dataset"
    else:
        n_val = cfg.val_count if cfg.val_count is not None else int(round(cfg.val_fraction * len(pool)))
        what = f"data.val_count={cfg.val_count}" if cfg.val_count is not None else f"data.val_fraction={cfg.val_fraction}"
        if n_val < n_classes or len(pool) - n_val < n_classes:
            raise DatasetError(
                f"{what} of {len(pool)} training images leaves too few images for {n_classes} classes in train or val"
            )
        train_pos, val_pos = train_test_split(pool, test_size=n_val, stratify=tr_lab[pool], random_state=seed)
        train_pos, val_pos = np.sort(train_pos), np.sort(val_pos)
        va_idx, va_lab, val_source, val_from = tr_idx, tr_lab, "train", "train"
    te_idx, te_lab = candidates(raw.test_y)
    test_pos = _stratified_take(te_lab, cfg.test_subset, seed, "data.test_subset")

    sources = {"train": raw.train_x, "val": raw.val_x if val_source == "val" else raw.train_x, "test": raw.test_x}
    parts = {
        "train": (tr_idx[train_pos], tr_lab[train_pos]),
        "val": (va_idx[val_pos], va_lab[val_pos]),
        "test": (te_idx[test_pos], te_lab[test_pos]),
    }
    xs: dict[str, Images] = {s: sources[s][torch.from_numpy(idx)] for s, (idx, _) in parts.items()}  # type: ignore[index]
    ys = {s: torch.from_numpy(lab.astype(np.int64)) for s, (_, lab) in parts.items()}
    idxs = {s: idx for s, (idx, _) in parts.items()}
    skipped = list(raw.skipped)

    if isinstance(raw.train_x, FileImages):
        in_memory, bad = _prepare_files(cfg, raw, xs)
        if bad and not cfg.skip_bad_images:
            problems = [p for s in bad for _, p in bad[s]]
            raise DatasetError(
                f"{raw.source}: {len(problems)} bad image(s) (set data.skip_bad_images: true to skip them and record "
                f"them in the run; `transferlab check-data` lists every problem):\n{format_problems(problems)}"
            )
        for split, found in bad.items():
            drop = {i for i, _ in found}
            keep = np.array([i for i in range(len(idxs[split])) if i not in drop], dtype=np.int64)
            xs[split] = xs[split][torch.from_numpy(keep)]
            ys[split], idxs[split] = ys[split][torch.from_numpy(keep)], idxs[split][keep]
            skipped += [p for _, p in found]
        if (ys["train"].bincount(minlength=n_classes) == 0).any():
            raise DatasetError(f"{raw.source}: after skipping bad images a class has no training images left")
    else:
        in_memory = cfg.in_memory is not False
        if cfg.image_size:
            xs = {s: resize_uint8(x, cfg.image_size) for s, x in xs.items()}  # type: ignore[arg-type]

    return ImageSplits(
        train_x=xs["train"],
        train_y=ys["train"],
        val_x=xs["val"],
        val_y=ys["val"],
        test_x=xs["test"],
        test_y=ys["test"],
        class_names=names,
        source=raw.source,
        indices={s: idx.tolist() for s, idx in idxs.items()},
        in_memory=in_memory,
        class_map=class_map,
        val_from=val_from,
        skipped=skipped,
    )


def _prepare_files(cfg: DataConfig, raw: RawDataset, xs: dict[str, Images]) -> tuple[bool, dict[str, list[tuple[int, Problem]]]]:
    """Decode the selected files into tensors (in memory) or check them (PIL path + skip_bad_images).

    Replaces the entries of ``xs`` in place; returns (in_memory, bad files per split).
    """
    files = {s: x for s, x in xs.items() if isinstance(x, FileImages)}
    for s, f in files.items():
        if cfg.image_size is None and f.size is None:
            raise DatasetError(f"{raw.source}: {_mixed_size_message(raw)}")
        files[s] = FileImages(f.paths, f.channels, f.size, f.root, cfg.image_size)
        xs[s] = files[s]
    total = sum(f.decoded_bytes() for f in files.values())
    in_memory = cfg.in_memory if isinstance(cfg.in_memory, bool) else total <= IN_MEMORY_MAX_BYTES
    bad: dict[str, list[tuple[int, Problem]]] = {}
    if in_memory:
        for s, f in files.items():
            xs[s], found = decode_files(f)
            if found:
                bad[s] = found
    elif cfg.skip_bad_images:  # PIL path: decode every selected file once now, so the skipped list is complete
        for s, f in files.items():
            results = map_files(lambda p, f=f: load_image(p, f.channels, f.resize), f.paths)
            found = [(i, Problem(f.paths[i], str(r))) for i, r in enumerate(results) if isinstance(r, Exception)]
            if found:
                bad[s] = found
    return in_memory, bad


# --------------------------------------------------------------------------------------------
# batches on the device


@dataclass(frozen=True)
class Preprocess:
    """How the backbone wants its input: channels and normalisation (from its pretrained config)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int = 3

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 N×C×H×W -> normalised float N×in_chans×H×W (grayscale repeated to RGB if needed)."""
        if x.shape[1] != self.in_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            elif self.in_chans == 1:  # RGB -> luma for a grayscale model
                w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
                x = (x.float() * w).sum(1, keepdim=True)
            else:
                raise ValueError(f"cannot feed {x.shape[1]}-channel images to a {self.in_chans}-channel model")
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1) * 255
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1) * 255
        return (x.float() - mean) / std


class TensorBatches:
    """Iterate (images, labels) batches from in-memory uint8 tensors — the fast path.

    Shuffling and augmentation draw from a generator seeded with ``seed`` and the epoch, so epoch *e*
    of a resumed run sees exactly the batches it would have seen without the interruption.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        preprocess: Preprocess,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        augment: Sequence[Any] | None = None,
        seed: int = 0,
        channels_last: bool = True,
    ) -> None:
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.preprocess, self.device = batch_size, preprocess, torch.device(device)
        self.shuffle, self.augment, self.seed, self.channels_last = shuffle, parse_augmentations(augment), seed, channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.x), generator=g) if self.shuffle else torch.arange(len(self.x))
        order = order.to(self.device)
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            xb = self.x[idx]
            for aug in self.augment:
                xb = aug.apply_batch(xb, g)
            xb = self.preprocess(xb)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.y[idx]


class ImageDataset(torch.utils.data.Dataset):
    """The PIL path: one uint8 C×H×W image per item, decoded with PIL, augmented with transforms.v2.

    ``images`` is a uint8 N×C×H×W tensor (already resized) or ``FileImages`` (decoded and resized
    per item). An item key may be ``(index, seed)``: the augmentation then draws from a generator
    seeded with ``seed``, so the result does not depend on the worker or the process.
    """

    def __init__(self, images: Images, labels: torch.Tensor, augment: Sequence[Any] | None = None) -> None:
        self.images, self.labels = images, labels
        _, _, h, w = images.shape
        if not h or not w:
            raise DatasetError("ImageDataset needs images of one size: set data.image_size")
        self.pil_tf, self.tensor_tf = pil_pipeline(parse_augmentations(augment), (h, w))

    def __len__(self) -> int:
        return len(self.labels)

    def _pil(self, i: int) -> Any:
        from PIL import Image

        if isinstance(self.images, FileImages):
            try:
                arr = load_image(self.images.paths[i], self.images.channels, self.images.resize)
            except ImageReadError as e:
                raise DatasetError(
                    f"{self.images.paths[i]}: {e} (run `transferlab check-data` to find every bad image, "
                    "or set data.skip_bad_images: true)"
                ) from None
        else:
            arr = np.ascontiguousarray(self.images[i].permute(1, 2, 0).numpy())
        return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as a uint8 C×H×W tensor, augmented (drawing from torch's global generator)."""
        from torchvision.transforms.v2 import functional as TF

        img = self._pil(i)
        if self.pil_tf is not None:
            img = self.pil_tf(img)
        t = TF.pil_to_tensor(img)
        if self.tensor_tf is not None:
            t = self.tensor_tf(t)
        return t

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(key, tuple):
            i, seed = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                img = self.load(i)
        else:
            i, img = key, self.load(key)
        return img, self.labels[i]


class _EpochSampler(torch.utils.data.Sampler):
    """Yields (index, per-image seed); the order and the seeds depend only on (seed, epoch)."""

    def __init__(self, n: int, shuffle: bool, seed: int) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        return iter(zip(order.tolist(), seeds.tolist()))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the workers decode; the main process trains


def default_num_workers() -> int:
    """DataLoader workers for the PIL path: all cores but one, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class LoaderBatches:
    """The PIL path as batches: a DataLoader over ``ImageDataset``, normalised on the training device.

    Same contract as ``TensorBatches`` (``set_epoch``, ``len``, iterating normalised float batches
    and labels on ``device``), with seeded per-epoch shuffling and per-image augmentation seeds, so a
    run is reproducible whatever ``num_workers`` is.
    """

    def __init__(
        self,
        x: Images,
        y: torch.Tensor,
        batch_size: int,
        preprocess: Preprocess,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        augment: Sequence[Any] | None = None,
        seed: int = 0,
        channels_last: bool = True,
        num_workers: int | None = None,
    ) -> None:
        self.dataset = ImageDataset(x, y, augment)
        self.sampler = _EpochSampler(len(y), shuffle, seed)
        self.preprocess, self.device, self.channels_last = preprocess, torch.device(device), channels_last
        self.batch_size = batch_size
        workers = default_num_workers() if num_workers is None else num_workers
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            worker_init_fn=_worker_init if workers > 0 else None,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xb, yb in self.loader:
            xb = self.preprocess(xb.to(self.device, non_blocking=True))
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb.to(self.device, non_blocking=True)


def make_batches(
    splits: ImageSplits,
    split: str,
    batch_size: int,
    preprocess: Preprocess,
    device: torch.device | str = "cpu",
    shuffle: bool = False,
    augment: Sequence[Any] | None = None,
    seed: int = 0,
    channels_last: bool = True,
    num_workers: int | None = None,
) -> TensorBatches | LoaderBatches:
    """Batches of ``split`` (``train``/``val``/``test``) on the path ``splits.in_memory`` chose."""
    x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
    common = dict(preprocess=preprocess, device=device, shuffle=shuffle, augment=augment, seed=seed, channels_last=channels_last)
    if splits.in_memory and isinstance(x, torch.Tensor):
        return TensorBatches(x, y, batch_size, **common)  # type: ignore[arg-type]
    return LoaderBatches(x, y, batch_size, num_workers=num_workers, **common)  # type: ignore[arg-type]

