"""Batches on the training device, on either data path, with one contract (``set_epoch``, ``len``, iterate).

* in memory (``TensorBatches``): uint8 images already decoded and resized are batched, augmented and
  normalised on the training device — no per-image work per epoch;
* PIL (``LoaderBatches``): a torch ``DataLoader`` over ``ImageDataset``, which decodes each image with
  PIL and applies the same augmentations as torchvision ``transforms.v2`` transforms, in workers.

Both shuffle and augment from generators seeded by (seed, epoch), so epoch *e* of a resumed run sees
exactly the batches it would have seen without the interruption, whatever the number of workers.
Targets pass through unchanged: int64 class indices, or float32 N×K multi-hot rows (``data.task: multilabel``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from transferlab.data.augment import parse_augmentations, pil_pipeline
from transferlab.data.images import FileImages, ImageReadError
from transferlab.data.normalize import Preprocess
from transferlab.data.prepare import ImageSplits
from transferlab.data.resize import Images
from transferlab.data.sampler import epoch_order
from transferlab.data.sources import DatasetError

__all__ = ["Batches", "ImageDataset", "LoaderBatches", "Preprocess", "TensorBatches", "default_num_workers", "make_batches"]


class Batches(Protocol):
    """What the loop, evaluation and the feature cache iterate: (images, labels) batches on the device, in an order
    seeded by the epoch (``set_epoch``). ``TensorBatches`` and ``LoaderBatches`` are the two data paths; the engine
    wraps them (a rank's slice under DDP, cached features) without knowing which."""

    def set_epoch(self, epoch: int) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


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
        sampler: str = "random",
    ) -> None:
        self.x, self.y = x.to(device), y.to(device)
        self.labels = y.cpu()  # what the sampler reads: no device-to-host copy per epoch
        self.batch_size, self.preprocess, self.device = batch_size, preprocess, torch.device(device)
        self.shuffle, self.augment, self.seed, self.channels_last = shuffle, parse_augmentations(augment), seed, channels_last
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = epoch_order(self.labels, self.shuffle, self.sampler, g).to(self.device)
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
                arr = self.images.load(i)
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

    def __init__(self, labels: torch.Tensor, shuffle: bool, seed: int, sampler: str = "random") -> None:
        self.labels, self.n, self.shuffle, self.seed, self.sampler, self.epoch = labels.cpu(), len(labels), shuffle, seed, sampler, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = epoch_order(self.labels, self.shuffle, self.sampler, g)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        return iter(zip(order.tolist(), seeds.tolist(), strict=True))


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
        sampler: str = "random",
    ) -> None:
        self.dataset = ImageDataset(x, y, augment)
        self.sampler = _EpochSampler(y, shuffle, seed, sampler)
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
    sampler: str = "random",
) -> TensorBatches | LoaderBatches:
    """Batches of ``split`` (``train``/``val``/``test``) on the path ``splits.in_memory`` chose; ``sampler``
    (``data.sampler``) orders a shuffled split."""
    x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
    # data.normalize: dataset / none hold for every batch of the run, whichever model asked (the model carries it too)
    preprocess = splits.normalization.apply(preprocess)
    common = dict(preprocess=preprocess, device=device, shuffle=shuffle, augment=augment, seed=seed, channels_last=channels_last,
                  sampler=sampler)
    if splits.in_memory and isinstance(x, torch.Tensor):
        return TensorBatches(x, y, batch_size, **common)  # type: ignore[arg-type]
    return LoaderBatches(x, y, batch_size, num_workers=num_workers, **common)  # type: ignore[arg-type]
