"""Image files: reading any image a user throws at us into uint8 pixels, or saying exactly why not.

Every problem names the file. The conversions are explicit, because the defaults of ``Image.convert``
get several cases wrong for training data:

* transparency (RGBA, LA, palette or RGB/L with a transparent colour) is composited on a white
  background — ``convert("RGB")`` would drop the alpha channel and show what is stored under
  transparent pixels, often black;
* 16-bit grayscale (``I;16`` PNG/TIFF) is scaled by 1/257 — ``convert("L")`` clips everything above
  255 to white;
* 1-bit images become 0/255, CMYK / YCbCr / LAB / HSV become RGB, and the EXIF orientation is applied;
* 32-bit float images (mode ``F``) are refused: their value range is not knowable from the file.

A dataset is 1-channel when every image is grayscale (``1``, ``L``, ``LA``, 16-bit) and 3-channel
(RGB) otherwise; grayscale images in an RGB dataset are repeated to three channels.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
"""File extensions (case-insensitive) read as images: torchvision's list plus ``.gif`` and ``.pbm``."""

BACKGROUND = 255
"""Transparent pixels are composited on this gray level (white)."""

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N"})
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def default_workers() -> int:
    """Threads used to read image files (PIL releases the GIL while decoding)."""
    return max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class Problem:
    """One problem found in a dataset. ``path`` is the file or folder concerned."""

    path: str
    message: str
    kind: str = "bad_image"
    """``bad_image``, ``empty_class``, ``no_classes``, ``class_mismatch``, ``duplicate``, ``ignored_file``,
    ``huge_image``, ``mixed_sizes``, ``missing_file``, ``annotation``, ``selection``."""
    severity: Literal["error", "warning", "info"] = "error"
    """``error`` stops training, ``warning`` may spoil it, ``info`` is what a run will do about it (e.g. mixed sizes)."""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind, "severity": self.severity, "message": self.message}


class ImageReadError(Exception):
    """An image file cannot be used. ``str()`` is the reason; the caller adds the path."""


@dataclass(frozen=True)
class ImageInfo:
    """What the header of an image file says (read without decoding the pixels)."""

    width: int
    height: int
    mode: str
    format: str
    huge: bool = False  # above PIL's decompression-bomb warning threshold (about 89 Mpx)


def _describe_open_error(path: Path, e: BaseException) -> str:
    if isinstance(e, PermissionError):
        return "cannot read the file: permission denied"
    if isinstance(e, Image.DecompressionBombError):
        return f"image too large to decode safely ({e})"
    if isinstance(e, UnidentifiedImageError):
        try:
            size = path.stat().st_size
            head = path.open("rb").read(12)
        except OSError:
            size, head = -1, b""
        if size == 0:
            return "empty file (0 bytes)"
        return f"not an image file that PIL can read (starts with {head!r}, {size} bytes)"
    if isinstance(e, FileNotFoundError):
        return "file not found" + (" (broken symbolic link)" if path.is_symlink() else "")
    if isinstance(e, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(e, (OSError, SyntaxError, ValueError)) and ("truncat" in str(e).lower() or "broken" in str(e).lower()):
        return f"truncated or corrupt image file ({type(e).__name__}: {e})"
    return f"cannot open image ({type(e).__name__}: {e})"


def probe_image(path: str | Path) -> ImageInfo:
    """Read an image file's header: size, mode and format. Raises ImageReadError with the reason."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            info = ImageInfo(img.width, img.height, img.mode, img.format or "?")
    except Exception as e:  # noqa: BLE001 - every failure becomes a message naming the file
        raise ImageReadError(_describe_open_error(path, e)) from None
    # PIL's own threshold for its DecompressionBombWarning (not caught here: warning filters are not thread-safe)
    huge = bool(Image.MAX_IMAGE_PIXELS) and info.width * info.height > Image.MAX_IMAGE_PIXELS
    if info.width <= 0 or info.height <= 0:
        raise ImageReadError(f"image has no pixels ({info.width}x{info.height})")
    if info.mode == "F":
        raise ImageReadError("32-bit float image (mode F): its value range is unknown; save it as an 8- or 16-bit image")
    return ImageInfo(info.width, info.height, info.mode, info.format, huge)


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_uint8_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert a decoded image to ``L`` (channels=1) or ``RGB`` (channels=3), correctly (module docstring)."""
    target = "L" if channels == 1 else "RGB"
    mode = img.mode
    if mode == "F":
        raise ImageReadError("32-bit float image (mode F): its value range is unknown; save it as an 8- or 16-bit image")
    if mode in SIXTEEN_BIT_MODES:  # 16-bit grayscale: scale 0..65535 -> 0..255 (convert("L") would clip)
        arr = np.asarray(img).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "1":
        img, mode = img.convert("L"), "L"
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (BACKGROUND, BACKGROUND, BACKGROUND, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == target else img.convert(target)


FITS = ("crop", "pad", "stretch")
"""``data.resize``: how an image reaches the square ``image_size`` (``fit_geometry``)."""


def fit_geometry(h: int, w: int, size: int, fit: str = "stretch", crop_pct: float = 1.0) -> tuple[int, int, int, int]:
    """(resized height, width, top, left) of an h×w image brought to size×size by ``fit``.

    ``crop`` (timm's eval transform): the shorter side goes to ``floor(size / crop_pct)`` and a centered
    size×size window is kept (top/left >= 0: where it starts). ``pad`` (letterbox): the longer side goes
    to ``size`` and the image is centered on a black square (top/left >= 0: where it lands). ``stretch``:
    both sides go to ``size``. A square image at ``crop_pct: 1`` is resized the same by all three.
    """
    if fit == "stretch" or (h == w and (fit == "pad" or crop_pct == 1.0)):
        return size, size, 0, 0
    if fit == "crop":
        short = math.floor(size / crop_pct)
        rh, rw = (short, max(short, int(short * w / h))) if h <= w else (max(short, int(short * h / w)), short)
        return rh, rw, int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    if fit == "pad":
        scale = size / max(h, w)
        rh, rw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
        return rh, rw, (size - rh) // 2, (size - rw) // 2
    raise ValueError(f"data.resize: {fit!r} is not one of {', '.join(map(repr, FITS))}")


def load_image(path: str | Path, channels: int, size: int | None = None, fit: str = "stretch", crop_pct: float = 1.0) -> np.ndarray:
    """Decode one image file to a uint8 array (H, W, channels), brought to size×size by ``fit`` when given
    (``data.resize``: ``fit_geometry``; a square file is resized the same by every fit at ``crop_pct: 1``).

    Raises ImageReadError (the reason, without the path) for anything that cannot be used: an empty,
    truncated or corrupt file, a non-image, an unreadable file, a decompression bomb.
    """
    path = Path(path)
    try:
        img = Image.open(path)
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(_describe_open_error(path, e)) from None
    try:
        with img:
            if size is not None and img.format == "JPEG":
                img.draft("L" if channels == 1 else "RGB", (size, size))  # DCT scaling: fast for big JPEGs
            try:
                img.load()
            except Exception as e:  # noqa: BLE001 - truncated data, broken chunks, decoder errors
                raise ImageReadError(f"truncated or corrupt image data ({type(e).__name__}: {e})") from None
            img = ImageOps.exif_transpose(img)
            img = to_uint8_mode(img, channels)
            if size is not None and img.size != (size, size):
                img = _fit_pil(img, size, fit, crop_pct)
            arr = np.asarray(img, dtype=np.uint8)
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(f"cannot decode image ({type(e).__name__}: {e})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _fit_pil(img: Image.Image, size: int, fit: str, crop_pct: float) -> Image.Image:
    """``fit_geometry`` on a PIL image: resize, then center crop (``crop``) or paste on black (``pad``)."""
    rh, rw, top, left = fit_geometry(img.height, img.width, size, fit, crop_pct)
    if img.size != (rw, rh):
        img = img.resize((rw, rh), Image.Resampling.BILINEAR)
    if (rh, rw) == (size, size):
        return img
    if fit == "crop":
        return img.crop((left, top, left + size, top + size))
    canvas = Image.new(img.mode, (size, size), 0)  # letterbox: black borders
    canvas.paste(img, (left, top))
    return canvas


# --------------------------------------------------------------------------------------------
# many files


@dataclass
class FileImages:
    """A list of image files standing in for an uint8 N×C×H×W tensor until they are decoded.

    ``channels`` is the dataset's output channel count; ``size`` the (height, width) every file has
    when that is known (``None``: mixed or not yet known). Indexing with an index array gives the
    subset, like a tensor.
    """

    paths: list[str]
    channels: int
    size: tuple[int, int] | None = None
    root: str = ""
    resize: int | None = None
    """Square side the images are resized to when decoded (``data.image_size``); ``None`` keeps ``size``."""
    fit: str = "stretch"
    """How ``resize`` is reached (``data.resize``: ``fit_geometry``)."""
    crop_pct: float = 1.0
    """``fit: crop``: share of the shorter side kept (``data.crop_pct``)."""

    def load(self, i: int) -> np.ndarray:
        """File ``i`` decoded as these images are: uint8 (H, W, channels), resized by ``fit`` (``load_image``)."""
        return load_image(self.paths[i], self.channels, self.resize, self.fit, self.crop_pct)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: torch.Tensor | np.ndarray | Sequence[int]) -> FileImages:
        idx = idx.tolist() if hasattr(idx, "tolist") else list(idx)
        return dataclasses.replace(self, paths=[self.paths[i] for i in idx])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, C, H, W) as decoded — H and W are 0 when the files differ in size and no resize is set."""
        if self.resize:
            return (len(self.paths), self.channels, self.resize, self.resize)
        h, w = self.size if self.size else (0, 0)
        return (len(self.paths), self.channels, h, w)

    def decoded_bytes(self) -> int:
        """Memory the decoded uint8 images take (64×64 assumed for mixed sizes without a resize)."""
        _, c, h, w = self.shape
        return len(self) * c * (h or 64) * (w or 64)


def map_files(fn: Callable[[str], object], paths: Sequence[str], workers: int | None = None) -> list[object]:
    """``[fn(p) for p in paths]`` on a thread pool; exceptions are returned in place of results."""

    def safe(p: str) -> object:
        try:
            return fn(p)
        except Exception as e:  # noqa: BLE001 - collected, reported together by the caller
            return e

    workers = workers or default_workers()
    if workers <= 1 or len(paths) < 64:
        return [safe(p) for p in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(safe, paths, chunksize=64))


def decode_files(files: FileImages, workers: int | None = None) -> tuple[torch.Tensor, list[tuple[int, Problem]]]:
    """Decode every file into one uint8 N×C×H×W tensor (``files.resize`` square, or the files' common size).

    Returns the tensor and the (position, problem) of every file that could not be decoded; their
    slots in the tensor are zeros and must be dropped or reported by the caller.
    """
    size = files.resize
    if size is None:
        if files.size is None:
            raise ValueError("decode_files needs files.resize when the files differ in size")
        h, w = files.size
    else:
        h = w = size
    out = torch.zeros((len(files), files.channels, h, w), dtype=torch.uint8)
    view = out.numpy()

    def one(i: int) -> None:
        arr = files.load(i)
        if arr.shape[:2] != (h, w):
            raise ImageReadError(f"image is {arr.shape[1]}x{arr.shape[0]}, the others {w}x{h}; set data.image_size")
        view[i] = arr.transpose(2, 0, 1)

    results = map_files(one, range(len(files)), workers)  # type: ignore[arg-type]
    bad = []
    for i, r in enumerate(results):
        if isinstance(r, ImageReadError):
            bad.append((i, Problem(files.paths[i], str(r))))
        elif isinstance(r, Exception):
            bad.append((i, Problem(files.paths[i], f"cannot decode image ({type(r).__name__}: {r})")))
    return out, bad


@dataclass
class ScanResult:
    """Header scan of many files: per-file info, the problems, the dataset's channels and common size."""

    infos: list[ImageInfo | None]
    problems: list[Problem] = field(default_factory=list)

    @property
    def channels(self) -> int:
        modes = {i.mode for i in self.infos if i is not None}
        return 1 if modes and modes <= GRAY_MODES else 3

    @property
    def size(self) -> tuple[int, int] | None:
        sizes = {(i.height, i.width) for i in self.infos if i is not None}
        return next(iter(sizes)) if len(sizes) == 1 else None


def scan_headers(paths: Sequence[str], workers: int | None = None) -> ScanResult:
    """Read every file's header (in parallel); unreadable files become problems naming the file."""
    results = map_files(probe_image, paths, workers)
    infos: list[ImageInfo | None] = []
    problems = []
    for p, r in zip(paths, results, strict=True):
        if isinstance(r, ImageInfo):
            infos.append(r)
            if r.huge:
                problems.append(
                    Problem(p, f"huge image ({r.width}x{r.height} = {r.width * r.height / 1e6:.0f} Mpx): slow to decode", "huge_image", "warning")
                )
        else:
            infos.append(None)
            problems.append(Problem(p, str(r) if isinstance(r, ImageReadError) else f"{type(r).__name__}: {r}"))
    return ScanResult(infos, problems)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def format_problems(problems: Sequence[Problem], limit: int = 50) -> str:
    lines = [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
