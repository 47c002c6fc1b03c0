"""From a raw dataset to the three splits an experiment uses, and batches on the training device.

Selection (subsets, validation split) is stratified and seeded, so the same seed gives the same
indices; they are returned so the run directory can record them. Resizing happens once here, not
per epoch: the notebooks this replaces resized every 32 px image to 224 px on the CPU, every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from transferlab.config import DataConfig
from transferlab.data.datasets import DatasetError, RawDataset, load_dataset


@dataclass
class ImageSplits:
    """Train / val / test images (uint8, N×C×H×W) with labels, class names and the chosen indices."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]
    source: str
    indices: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _stratified_take(labels: np.ndarray, amount: float | None, seed: int, what: str) -> np.ndarray:
    """Indices of a stratified subset: ``amount`` <= 1 is a fraction, > 1 a count; None = all."""
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


def resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 N×C×H×W batch to size×size (bilinear, antialiased when shrinking), in chunks."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, len(x), 4096):  # chunks keep the float copy small
        chunk = x[i : i + 4096].float()
        chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + 4096] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def prepare_splits(cfg: DataConfig, seed: int, raw: RawDataset | None = None) -> ImageSplits:
    """Load ``cfg.dataset`` and return seeded, stratified train/val/test splits resized once."""
    raw = raw if raw is not None else load_dataset(cfg)
    train_labels = raw.train_y.numpy()
    pool = _stratified_take(train_labels, cfg.train_subset, seed, "data.train_subset")
    n_val = int(round(cfg.val_fraction * len(pool)))
    n_classes = len(raw.class_names)
    if n_val < n_classes or len(pool) - n_val < n_classes:
        raise DatasetError(
            f"data.val_fraction={cfg.val_fraction} of {len(pool)} training images leaves too few images "
            f"for {n_classes} classes in train or val"
        )
    train_idx, val_idx = train_test_split(pool, test_size=n_val, stratify=train_labels[pool], random_state=seed)
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    test_idx = _stratified_take(raw.test_y.numpy(), cfg.test_subset, seed, "data.test_subset")

    def pick(x: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        sel = x[torch.from_numpy(idx)]
        return resize_uint8(sel, cfg.image_size) if cfg.image_size else sel

    return ImageSplits(
        train_x=pick(raw.train_x, train_idx),
        train_y=raw.train_y[torch.from_numpy(train_idx)],
        val_x=pick(raw.train_x, val_idx),
        val_y=raw.train_y[torch.from_numpy(val_idx)],
        test_x=pick(raw.test_x, test_idx),
        test_y=raw.test_y[torch.from_numpy(test_idx)],
        class_names=raw.class_names,
        source=raw.source,
        indices={"train": train_idx.tolist(), "val": val_idx.tolist(), "test": test_idx.tolist()},
    )


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


AUGMENTATIONS = ("flip", "crop")


def augment_batch(x: torch.Tensor, names: list[str], g: torch.Generator) -> torch.Tensor:
    """Apply the named augmentations to a uint8 batch, per image, drawing randomness from ``g``."""
    for name in names:
        if name == "flip":  # horizontal flip, p = 0.5 per image
            flip = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
        elif name == "crop":  # pad 4 (reflect) then a random crop back to the original size
            pad, (h, w) = 4, x.shape[-2:]
            padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect").to(x.dtype)
            dy = torch.randint(0, 2 * pad + 1, (len(x),), generator=g)
            dx = torch.randint(0, 2 * pad + 1, (len(x),), generator=g)
            # gather per-image windows with one advanced-indexing op (no Python loop over images)
            rows = (dy.view(-1, 1) + torch.arange(h)).to(x.device)  # N×h
            cols = (dx.view(-1, 1) + torch.arange(w)).to(x.device)  # N×w
            n_idx = torch.arange(len(x), device=x.device).view(-1, 1, 1, 1)
            c_idx = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
            x = padded[n_idx, c_idx, rows.view(len(x), 1, h, 1), cols.view(len(x), 1, 1, w)]
        else:
            raise ValueError(f"unknown augmentation {name!r}; available: {', '.join(AUGMENTATIONS)}")
    return x


class TensorBatches:
    """Iterate (images, labels) batches from in-memory uint8 tensors.

    Shuffling and augmentation draw from a generator seeded with ``seed + epoch``, so epoch *e* of
    a resumed run sees exactly the batches it would have seen without the interruption.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        preprocess: Preprocess,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        augment: list[str] | None = None,
        seed: int = 0,
        channels_last: bool = True,
    ) -> None:
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.preprocess, self.device = batch_size, preprocess, torch.device(device)
        self.shuffle, self.augment, self.seed, self.channels_last = shuffle, augment or [], seed, channels_last
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
            if self.augment:
                xb = augment_batch(xb, self.augment, g)
            xb = self.preprocess(xb)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.y[idx]
