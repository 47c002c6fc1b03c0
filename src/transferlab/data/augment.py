"""Augmentations by name, with the same meaning on both data paths.

In a study file, ``data.augment`` is a list whose items are a name, ``{name: value}`` (the main
parameter) or ``{name: {parameter: value, ...}}``::

    augment: [flip, {crop: {padding: 4}}, {rotate: 15}, {affine: {shear: 10, zoom: 0.1}}, erase]

Each augmentation is implemented twice:

* ``apply_batch`` — on a uint8 N×C×H×W batch on the training device, every image with its own random
  parameters, drawn from a seeded generator (the in-memory fast path);
* ``pil_transform`` — a torchvision ``transforms.v2`` transform on one PIL image (``erase``: on its
  uint8 tensor), for the PIL DataLoader path used for large image folders.

Both draw the parameters from the same distributions as torchvision's ``RandomHorizontalFlip``,
``RandomCrop``, ``RandomAffine``, ``RandomErasing`` and ``RandomResizedCrop``, and the geometry is
torchvision's (the batched affine matrix is checked against ``torchvision``'s own in the tests).

=================  ===============================================  =====================================
name               parameters (defaults)                            what
=================  ===============================================  =====================================
``flip``           ``p`` (0.5)                                      horizontal flip
``vflip``          ``p`` (0.5)                                      vertical flip
``crop``           ``padding`` (4), ``padding_mode`` (reflect),     pad, then a random crop back to size
                   ``fill`` (0)
``translate``      ``fraction`` (0.1), ``fill`` (0)                 random shift up to fraction × size
``rotate``         ``degrees`` (15), ``fill`` (0)                   random rotation in ±degrees
``affine``         ``degrees`` (0), ``translate`` (0), ``zoom``     rotation, shift, zoom in [1 − zoom,
                   (0), ``shear`` (0), ``fill`` (0)                 1 + zoom], x-shear in ±shear degrees
``erase``          ``p`` (0.5), ``scale`` ([0.02, 0.33]),           random erasing (a rectangle set to
                   ``ratio`` ([0.3, 3.3]), ``value`` (0)            ``value``)
``resized_crop``   ``scale`` ([0.08, 1.0]; ``{resized_crop: 0.5}``     random crop of scale × area, resized
                   means [0.5, 1.0]), ``ratio`` ([0.75, 1.333])      back to the image size
``randaugment``    ``num_ops`` (2), ``magnitude`` (9),              RandAugment: ``num_ops`` random ops at
                   ``num_magnitude_bins`` (31), ``fill`` (0)        one magnitude (torchvision's)
``trivialaugment`` ``num_magnitude_bins`` (31), ``fill`` (0)        TrivialAugmentWide: one op at a random
                                                                    magnitude
``autoaugment``    ``policy`` (imagenet; cifar10, svhn),            AutoAugment: a random sub-policy of
                   ``fill`` (0)                                     the learned policy
``augmix``         ``severity`` (3), ``mixture_width`` (3),         AugMix: a Dirichlet mix of augmented
                   ``chain_depth`` (-1: 1-3), ``alpha`` (1),        chains, blended with the image
                   ``fill`` (0)
=================  ===============================================  =====================================

The four automatic policies are torchvision's own ``transforms.v2`` classes on both paths — on the
PIL image there, on each uint8 image of the batch on the device here — drawing one policy sample
per image with torch's generator seeded per image from the batch generator (a per-image call: these
policies are chains of ops picked per image, which no single batched op expresses).

Augmentations run on uint8 pixels before normalisation, in the listed order; ``fill`` / ``value``
are pixel values (0..255).

(Over 500 lines on purpose: each augmentation's two implementations sit side by side in one class,
so that the batched and the PIL path cannot drift apart; splitting the table would separate them.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from transferlab.config import ExperimentConfig, register_check
from transferlab.registry import Registry, UnknownNameError, suggestion

AUGMENTATIONS: Registry[type[Augmentation]] = Registry("augmentation", "data.augment: training augmentations")
"""Augmentation name -> class (registered by each class's ``name``). The names ``data.augment`` accepts."""


class AugmentationError(ValueError):
    """An augmentation name or parameter is invalid; the message names it and the valid choices."""


def _u(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo


@dataclass(frozen=True)
class Augmentation:
    """Base class: a named augmentation with validated parameters."""

    name: ClassVar[str] = ""
    primary: ClassVar[str | None] = None  # the parameter set by the {name: value} short form
    tensor_stage: ClassVar[bool] = False  # PIL path: runs on the uint8 tensor, after ToImage

    def check(self) -> None:
        """Raise AugmentationError for out-of-range parameters."""

    def apply_batch(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pil_transform(self, size: tuple[int, int]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        return {self.name: dataclasses.asdict(self)}


def _prob(name: str, p: float) -> None:
    if not 0 <= p <= 1:
        raise AugmentationError(f"{name}: p={p} must be in [0, 1]")


def _range(name: str, key: str, r: Sequence[float], lo: float, hi: float | None = None) -> None:
    if len(r) != 2 or r[0] > r[1] or r[0] < lo or (hi is not None and r[1] > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise AugmentationError(f"{name}: {key}={list(r)} must be [low, high] with low <= high, within {bound}")


def _fill(name: str, fill: int) -> None:
    if not 0 <= fill <= 255:
        raise AugmentationError(f"{name}: fill/value={fill} must be a pixel value in 0..255")


# --------------------------------------------------------------------------------------------
# batched geometry


def inverse_affine_matrices(
    angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, scale: torch.Tensor, shear_x: torch.Tensor, shear_y: torch.Tensor
) -> torch.Tensor:
    """N×2×3 inverse affine matrices about the image centre, as ``torchvision.transforms.functional``'s
    ``_get_inverse_affine_matrix`` (angles in degrees, translation in pixels) — vectorised."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m = torch.stack([d, -b, torch.zeros_like(a), -c, a, torch.zeros_like(a)], 1) / scale.view(-1, 1)
    m[:, 2] = m[:, 0] * -tx + m[:, 1] * -ty
    m[:, 5] = m[:, 3] * -tx + m[:, 4] * -ty
    return m.view(-1, 2, 3)


def warp_batch(x: torch.Tensor, theta: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Apply per-image inverse affine matrices (pixel units, centre origin) to a uint8 batch.

    The sampling grid and the fill are torchvision's tensor ``affine`` (bilinear, ``align_corners=False``)
    for a batch with one matrix per image.
    """
    n, c, h, w = x.shape
    dev = x.device
    theta = theta.to(dev, torch.float32)
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w, device=dev)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h, device=dev)
    base = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w), torch.ones(h, w, device=dev)], -1)
    scale = torch.tensor([0.5 * w, 0.5 * h], device=dev)
    grid = (base.view(1, h * w, 3) @ theta.transpose(1, 2)) / scale  # N × HW × 2
    img = torch.cat([x.float(), torch.ones(n, 1, h, w, device=dev)], 1)
    out = F.grid_sample(img, grid.view(n, h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=False)
    out, mask = out[:, :c], out[:, c:]
    out = (out - fill) * mask + fill
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _affine(x: torch.Tensor, g: torch.Generator, degrees: float, translate: float, zoom: float, shear: float, fill: int) -> torch.Tensor:
    n, _, h, w = x.shape
    angle = _u(n, -degrees, degrees, g)
    tx = torch.round(_u(n, -translate * w, translate * w, g)) if translate else torch.zeros(n, dtype=torch.float64)
    ty = torch.round(_u(n, -translate * h, translate * h, g)) if translate else torch.zeros(n, dtype=torch.float64)
    scale = _u(n, 1 - zoom, 1 + zoom, g)
    shear_x = _u(n, -shear, shear, g)
    theta = inverse_affine_matrices(angle, tx, ty, scale, shear_x, torch.zeros(n, dtype=torch.float64))
    return warp_batch(x, theta, float(fill))


def _v2_affine(degrees: float, translate: float, zoom: float, shear: float, fill: int) -> Any:
    from torchvision.transforms import InterpolationMode, v2

    return v2.RandomAffine(
        degrees=degrees,
        translate=(translate, translate) if translate else None,
        scale=(1 - zoom, 1 + zoom) if zoom else None,
        shear=(-shear, shear) if shear else None,
        interpolation=InterpolationMode.BILINEAR,
        fill=fill,
    )


# --------------------------------------------------------------------------------------------
# the augmentations


@AUGMENTATIONS.register()
@dataclass(frozen=True)
class Flip(Augmentation):
    """Horizontal flip with probability ``p``."""

    name: ClassVar[str] = "flip"
    primary: ClassVar[str | None] = "p"
    p: float = 0.5

    def check(self) -> None:
        _prob(self.name, self.p)

    def apply_batch(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        flip = torch.rand(len(x), generator=g) < self.p
        return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)

    def pil_transform(self, size: tuple[int, int]) -> Any:
        from torchvision.transforms import v2

        return v2.RandomHorizontalFlip(self.p)


@AUGMENTATIONS.register()
@dataclass(frozen=True)
class VFlip(Flip):
    """Vertical flip with probability ``p``."""

    name: ClassVar[str] = "vflip"

    def apply_batch(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        flip = torch.rand(len(x), generator=g) < self.p
        return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-2), x)

    def pil_transform(self, size: tuple[int, int]) -> Any:
        from torchvision.transforms import v2

        return v2.RandomVerticalFlip(self.p)


_PAD_MODES = {"reflect": "reflect", "constant": "constant", "edge": "replicate"}


@AUGMENTATIONS.register()
@dataclass(frozen=True)
class Crop(Augmentation):
    """Pad by ``padding`` (reflect / constant / edge), then a random crop back to the image size."""

    name: ClassVar[str] = "crop"
    primary: ClassVar[str | None] = "padding"
    padding: int = 4
    padding_mode: str = "reflect"
    fill: int = 0

    def check(self) -> None:
        if self.padding < 1:
            raise AugmentationError(f"crop: padding={self.padding} must be >= 1")
        if self.padding_mode not in _PAD_MODES:
            raise AugmentationError(f"crop: padding_mode={self.padding_mode!r} must be one of {', '.join(_PAD_MODES)}")
        _fill(self.name, self.fill)

    def apply_batch(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        pad, (h, w) = self.padding, x.shape[-2:]
        if self.padding_mode == "reflect" and pad >= min(h, w):
            raise AugmentationError(f"crop: reflect padding {pad} needs images larger than {pad} px, got {h}x{w}")
        mode = _PAD_MODES[self.padding_mode]
        kw = {"value": float(self.fill)} if mode == "constant" else {}
        padded = F.pad(x.float(), (pad, pad, pad, pad), mode=mode, **kw).to(x.dtype)
        dy = torch.randint(0, 2 * pad + 1, (len(x),), generator=g)
        dx = torch.randint(0, 2 * pad + 1, (len(x),), generator=g)
        # gather per-image windows with one advanced-indexing op (no Python loop over images)
        rows = (dy.view(-1, 1) + torch.arange(h)).to(x.device)  # N×h
        cols = (dx.view(-1, 1) + torch.arange(w)).to(x.device)  # N×w
        n_idx = torch.arange(len(x), device=x.device).view(-1, 1, 1, 1)
        c_idx = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        return padded[n_idx, c_idx, rows.view(len(x), 1, h, 1), cols.view(len(x), 1, 1, w)]

    def pil_transform(self, size: tuple[int, int]) -> Any:
        from torchvision.transforms import v2

        return v2.RandomCrop(size, padding=self.padding, padding_mode=self.padding_mode, fill=self.fill)


@AUGMENTATIONS.register()
@dataclass(frozen=True)
class Translate(Augmentation):
    """A random shift of up to ``fraction`` × the size in each direction."""

    name: ClassVar[str] = "translate"
    primary: ClassVar[str | None] = "fraction"
    fraction: float = 0.1
    fill: int = 0

    def check(self) -> None:
        if not 0 < self.fraction < 1:
            raise AugmentationError(f"translate: fraction={self.fraction} must be in (0, 1)")
        _fill(self.name, self.fill)

    def apply_batch(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return _affine(x, g, 0.0, self.fraction, 0.0, 0.0, self.fill)

    def pil_transform(self, size: tuple[int, int]) -> Any:
        return _v2_affine(0.0, self.fraction, 0.0, 0.0, self.fill)


@AUGMENTATIONS.register()
@dataclass(frozen=True)
class Rotate(Augmentation):
    """A random rotation within ±``degrees``."""

    name: ClassVar[str] = "rotate"
    primary: ClassVar[str | None] = "degrees"
    degrees: float = 15.0
    fill: int = 0

    def check(self) -> None:
        if not 0 < self.degrees <= 180:
            raise AugmentationError(f"rotate: degrees={self.degrees} must be in (0, 180]")
        _fill(self.name, self.fill)

    def apply_batch(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return _affine(x, g, self.degrees, 0.0, 0.0, 0.0, self.fill)

    def pil_transform(self, size: tuple[int, int]) -> Any:
        return _v2_affine(self.degrees, 0.0, 0.0, 0.0, self.fill)


@AUGMENTATIONS.register()
@dataclass(frozen=True)
class Affine(Augmentation):
    """Rotation, shift, zoom in [1 − zoom, 1 + zoom] and x-shear, drawn per image."""

    name: ClassVar[str] = "affine"
    degrees: float = 0.0
    translate: float = 0.0
    zoom: float = 0.0
    shear: float = 0.0
    fill: int = 0

    def check(self) -> None:
        if not 0 <= self.degrees <= 180:
            raise AugmentationError(f"affine: degrees={self.degrees} must be in [0, 180]")
        if not 0 <= self.translate < 1:
            raise AugmentationError(f"affine: translate={self.translate} must be in [0, 1)")
        if not 0 <= self.zoom < 1:
            raise AugmentationError(f"affine: zoom={self.zoom} must be in [0, 1) (scale in [1 - zoom, 1 + zoom])")
        if not 0 <= self.shear < 90:
            raise AugmentationError(f"affine: shear={self.shear} must be in [0, 90) degrees")
        if not (self.degrees or self.translate or self.zoom or self.shear):
            raise AugmentationError("affine: set at least one of degrees, translate, zoom, shear")
        _fill(self.name, self.fill)

    def apply_batch(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return _affine(x, g, self.degrees, self.translate, self.zoom, self.shear, self.fill)

    def pil_transform(self, size: tuple[int, int]) -> Any:
        return _v2_affine(self.degrees, self.translate, self.zoom, self.shear, self.fill)


def _boxes(n: int, h: int, w: int, scale: Sequence[float], ratio: Sequence[float], g: torch.Generator, fit: str, tries: int = 10):
    """Vectorised torchvision box sampling (RandomErasing: ``fit='erase'``, RandomResizedCrop: ``fit='crop'``).

    Returns (ok, top, left, height, width) per image; ``ok`` is False when no try fitted.
    """
    area = h * w
    target = area * _u(n * tries, scale[0], scale[1], g).view(n, tries)
    log_r = _u(n * tries, math.log(ratio[0]), math.log(ratio[1]), g).view(n, tries)
    aspect = torch.exp(log_r)
    if fit == "erase":  # RandomErasing: h = sqrt(area * r), w = sqrt(area / r), must be strictly smaller
        bh, bw = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
        valid = (bh < h) & (bw < w)
    else:  # RandomResizedCrop: w = sqrt(area * r), h = sqrt(area / r), 0 < size <= image
        bw, bh = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
        valid = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
    first = torch.argmax(valid.int(), 1)
    ok = valid.any(1)
    pick = lambda t: t.gather(1, first.view(-1, 1)).view(-1)  # noqa: E731
    bh, bw = pick(bh), pick(bw)
    top = torch.floor(torch.rand(n, generator=g, dtype=torch.float64) * (h - bh + 1).clamp(min=1))
    left = torch.floor(torch.rand(n, generator=g, dtype=torch.float64) * (w - bw + 1).clamp(min=1))
    return ok, top, left, bh, bw


@AUGMENTATIONS.register()
@dataclass(frozen=True)
class Erase(Augmentation):
    """Random erasing: with probability ``p`` a rectangle of ``scale`` × the area set to ``value``."""

    name: ClassVar[str] = "erase"
    primary: ClassVar[str | None] = "p"
    tensor_stage: ClassVar[bool] = True
    p: float = 0.5
    scale: tuple[float, float] = (0.02, 0.33)
    ratio: tuple[float, float] = (0.3, 3.3)
    value: int = 0

    def check(self) -> None:
        _prob(self.name, self.p)
        _range(self.name, "scale", self.scale, 0.0, 1.0)
        _range(self.name, "ratio", self.ratio, 1e-6)
        _fill(self.name, self.value)

    def apply_batch(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        apply = torch.rand(n, generator=g) < self.p
        ok, top, left, bh, bw = _boxes(n, h, w, self.scale, self.ratio, g, "erase")
        on = (apply & ok).to(x.device).view(-1, 1, 1)
        r = torch.arange(h, device=x.device).view(1, -1, 1)
        c = torch.arange(w, device=x.device).view(1, 1, -1)
        top, left, bh, bw = (t.to(x.device).view(-1, 1, 1) for t in (top, left, bh, bw))
        mask = on & (r >= top) & (r < top + bh) & (c >= left) & (c < left + bw)
        return torch.where(mask.unsqueeze(1), torch.tensor(self.value, dtype=x.dtype, device=x.device), x)

    def pil_transform(self, size: tuple[int, int]) -> Any:
        from torchvision.transforms import v2

        return v2.RandomErasing(p=self.p, scale=tuple(self.scale), ratio=tuple(self.ratio), value=self.value)


@AUGMENTATIONS.register()
@dataclass(frozen=True)
class ResizedCrop(Augmentation):
    """A random crop of ``scale`` × the area and ``ratio`` aspect, resized back to the image size."""

    name: ClassVar[str] = "resized_crop"
    primary: ClassVar[str | None] = "scale"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)

    def check(self) -> None:
        _range(self.name, "scale", self.scale, 1e-6, 1.0)
        _range(self.name, "ratio", self.ratio, 1e-6)

    def apply_batch(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        ok, top, left, bh, bw = _boxes(n, h, w, self.scale, self.ratio, g, "crop")
        # torchvision's fallback when no try fits: the central crop clamped to the ratio range
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            fw, fh = w, round(w / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fh, fw = h, round(h * self.ratio[1])
        else:
            fw, fh = w, h
        bh = torch.where(ok, bh, torch.full_like(bh, fh))
        bw = torch.where(ok, bw, torch.full_like(bw, fw))
        top = torch.where(ok, top, torch.full_like(top, (h - fh) // 2))
        left = torch.where(ok, left, torch.full_like(left, (w - fw) // 2))
        # output pixel centre -> input coordinate, in grid_sample's normalised units (align_corners=False)
        dev = x.device
        ox = (torch.arange(w, device=dev, dtype=torch.float64) + 0.5) / w  # 0..1 across the output
        oy = (torch.arange(h, device=dev, dtype=torch.float64) + 0.5) / h
        gx = (2 * (left.to(dev).view(-1, 1) + ox * bw.to(dev).view(-1, 1)) / w - 1).float()  # N×w
        gy = (2 * (top.to(dev).view(-1, 1) + oy * bh.to(dev).view(-1, 1)) / h - 1).float()  # N×h
        grid = torch.stack([gx.view(n, 1, w).expand(n, h, w), gy.view(n, h, 1).expand(n, h, w)], -1)
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def pil_transform(self, size: tuple[int, int]) -> Any:
        from torchvision.transforms import InterpolationMode, v2

        return v2.RandomResizedCrop(size, scale=tuple(self.scale), ratio=tuple(self.ratio), interpolation=InterpolationMode.BILINEAR, antialias=True)


# --------------------------------------------------------------------------------------------
# automatic augmentation policies (torchvision's, one draw per image)


@dataclass(frozen=True)
class PolicyAugmentation(Augmentation):
    """Base of the automatic policies: a torchvision ``transforms.v2`` transform, sampled once per image."""

    def transform(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply_batch(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        tf, out, cuda = self.transform(), torch.empty_like(x), x.device.type == "cuda"
        seeds = torch.randint(0, 2**62, (len(x),), generator=g).tolist()
        # torchvision draws from torch's global generators (AugMix's mixing weights: the image's device):
        # seed them per image from g, and leave them as they were
        generators = [torch.default_generator]
        if cuda:
            generators.append(torch.cuda.default_generators[x.device.index if x.device.index is not None else torch.cuda.current_device()])
        threads = torch.get_num_threads()
        if not cuda:  # ops on one small image: waking a thread pool per op costs more than the op itself
            torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[x.device] if cuda else []):
                for i, seed in enumerate(seeds):
                    for gen in generators:
                        gen.manual_seed(seed)
                    out[i] = tf(x[i])
        finally:
            torch.set_num_threads(threads)
        return out

    def pil_transform(self, size: tuple[int, int]) -> Any:
        return self.transform()


def _int_at_least(name: str, key: str, value: int, low: int) -> None:
    if value < low:
        raise AugmentationError(f"{name}: {key}={value} must be >= {low}")


@AUGMENTATIONS.register()
@dataclass(frozen=True)
class RandAugment(PolicyAugmentation):
    """RandAugment (Cubuk et al., 2020): ``num_ops`` ops drawn uniformly per image, all at ``magnitude``."""

    name: ClassVar[str] = "randaugment"
    primary: ClassVar[str | None] = "magnitude"
    num_ops: int = 2
    magnitude: int = 9
    num_magnitude_bins: int = 31
    fill: int = 0

    def check(self) -> None:
        _int_at_least(self.name, "num_ops", self.num_ops, 1)
        _int_at_least(self.name, "num_magnitude_bins", self.num_magnitude_bins, 2)
        if not 0 <= self.magnitude < self.num_magnitude_bins:
            raise AugmentationError(f"randaugment: magnitude={self.magnitude} must be in 0..{self.num_magnitude_bins - 1} (num_magnitude_bins - 1)")
        _fill(self.name, self.fill)

    def transform(self) -> Any:
        from torchvision.transforms import v2

        return v2.RandAugment(self.num_ops, self.magnitude, self.num_magnitude_bins, fill=self.fill)


@AUGMENTATIONS.register()
@dataclass(frozen=True)
class TrivialAugment(PolicyAugmentation):
    """TrivialAugmentWide (Müller & Hutter, 2021): one op per image at a uniformly drawn magnitude."""

    name: ClassVar[str] = "trivialaugment"
    num_magnitude_bins: int = 31
    fill: int = 0

    def check(self) -> None:
        _int_at_least(self.name, "num_magnitude_bins", self.num_magnitude_bins, 2)
        _fill(self.name, self.fill)

    def transform(self) -> Any:
        from torchvision.transforms import v2

        return v2.TrivialAugmentWide(self.num_magnitude_bins, fill=self.fill)


_POLICIES = ("imagenet", "cifar10", "svhn")


@AUGMENTATIONS.register()
@dataclass(frozen=True)
class AutoAugment(PolicyAugmentation):
    """AutoAugment (Cubuk et al., 2019): a random sub-policy of a learned ``policy`` per image."""

    name: ClassVar[str] = "autoaugment"
    primary: ClassVar[str | None] = "policy"
    policy: str = "imagenet"
    fill: int = 0

    def check(self) -> None:
        if self.policy not in _POLICIES:
            hint = suggestion(self.policy, list(_POLICIES))
            raise AugmentationError(f"autoaugment: policy={self.policy!r} is not one of {', '.join(_POLICIES)}{hint}")
        _fill(self.name, self.fill)

    def transform(self) -> Any:
        from torchvision.transforms import v2

        return v2.AutoAugment(v2.AutoAugmentPolicy(self.policy), fill=self.fill)


@AUGMENTATIONS.register()
@dataclass(frozen=True)
class AugMix(PolicyAugmentation):
    """AugMix (Hendrycks et al., 2020): ``mixture_width`` chains of random ops, mixed and blended with the image."""

    name: ClassVar[str] = "augmix"
    primary: ClassVar[str | None] = "severity"
    severity: int = 3
    mixture_width: int = 3
    chain_depth: int = -1
    alpha: float = 1.0
    fill: int = 0

    def check(self) -> None:
        if not 1 <= self.severity <= 10:
            raise AugmentationError(f"augmix: severity={self.severity} must be in 1..10")
        _int_at_least(self.name, "mixture_width", self.mixture_width, 1)
        if self.chain_depth == 0 or self.chain_depth < -1:
            raise AugmentationError(f"augmix: chain_depth={self.chain_depth} must be >= 1, or -1 (a random depth of 1-3)")
        if self.alpha <= 0:
            raise AugmentationError(f"augmix: alpha={self.alpha} must be > 0")
        _fill(self.name, self.fill)

    def transform(self) -> Any:
        from torchvision.transforms import v2

        return v2.AugMix(self.severity, self.mixture_width, self.chain_depth, self.alpha, fill=self.fill)


# --------------------------------------------------------------------------------------------
# parsing


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool) or isinstance(value, bool):
        raise AugmentationError(f"{name}: {key}={value!r} must be a number")
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise AugmentationError(f"{name}: {key}={value!r} must be a list of two numbers [low, high]")
        return (float(value[0]), float(value[1]))
    if isinstance(default, str):
        if not isinstance(value, str):
            raise AugmentationError(f"{name}: {key}={value!r} must be a string")
        return value
    if isinstance(default, int):
        if not isinstance(value, int):
            raise AugmentationError(f"{name}: {key}={value!r} must be an integer")
        return value
    if not isinstance(value, (int, float)):
        raise AugmentationError(f"{name}: {key}={value!r} must be a number")
    return float(value)


def parse_augmentation(spec: Any) -> Augmentation:
    """One ``data.augment`` item -> an Augmentation (``"flip"``, ``{"rotate": 15}``, ``{"crop": {"padding": 2}}``)."""
    if isinstance(spec, Augmentation):
        return spec
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and len(spec) == 1:
        name, params = next(iter(spec.items()))
    else:
        raise AugmentationError(f"expected a name or a one-key mapping {{name: parameters}}, got {spec!r}")
    try:
        cls = AUGMENTATIONS.get(name)
    except UnknownNameError as e:
        raise AugmentationError(str(e)) from None
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    if params is None:
        params = {}
    if not isinstance(params, dict):
        if cls.primary is None:
            raise AugmentationError(f"{name}: give its parameters as a mapping, e.g. {{{name}: {{{', '.join(f'{k}: ...' for k in fields)}}}}}")
        params = {cls.primary: params}
    kwargs = {}
    for key, value in params.items():
        if key not in fields:
            raise AugmentationError(f"{name}: unknown parameter {key!r}{suggestion(key, list(fields))}; valid: {', '.join(fields)}")
        if key == cls.primary and isinstance(fields[key], tuple) and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value, fields[key][1]]  # {resized_crop: 0.5} = scale [0.5, 1.0]
        kwargs[key] = _coerce(name, key, value, fields[key])
    aug = cls(**kwargs)
    aug.check()
    return aug


def parse_augmentations(specs: Sequence[Any] | None) -> list[Augmentation]:
    """Parse a whole ``data.augment`` list; an error names the item's position."""
    out = []
    for i, spec in enumerate(specs or []):
        try:
            out.append(parse_augmentation(spec))
        except AugmentationError as e:
            raise AugmentationError(f"data.augment[{i}]: {e}") from None
    return out


def augment_batch(x: torch.Tensor, names: Sequence[Any], g: torch.Generator) -> torch.Tensor:
    """Apply the augmentations (names, specs or parsed) to a uint8 batch, per image, drawing from ``g``."""
    for aug in (parse_augmentation(n) for n in names):
        x = aug.apply_batch(x, g)
    return x


def pil_pipeline(augs: Sequence[Augmentation], size: tuple[int, int]) -> tuple[Any, Any]:
    """The PIL path's transforms: (on the PIL image, on the uint8 tensor after it), in the listed order.

    An image-stage augmentation listed after a tensor-stage one (``erase``) still runs on the tensor.
    """
    from torchvision.transforms import v2

    pil_stage, tensor_stage, seen_tensor = [], [], False
    for aug in augs:
        seen_tensor = seen_tensor or aug.tensor_stage
        (tensor_stage if seen_tensor else pil_stage).append(aug.pil_transform(size))
    return v2.Compose(pil_stage) if pil_stage else None, v2.Compose(tensor_stage) if tensor_stage else None


@register_check
def check_augmentations(cfg: ExperimentConfig) -> None:
    """``data.augment`` names registered augmentations with valid parameters."""
    try:
        parse_augmentations(cfg.data.augment)
    except AugmentationError as e:
        raise cfg.error(str(e)) from None
