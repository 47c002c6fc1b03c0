"""A small CNN for from-scratch baselines, registered with timm like any other architecture.

``transferlab_cnn`` is the seeds' "custom CNN": 3 blocks of [conv 3×3, BatchNorm, ReLU, max-pool,
dropout]. ``transferlab_cnn_deep`` has two convs per block (the common VGG-style variant), which
is what a from-scratch Fashion-MNIST or CIFAR baseline usually wants. ``transferlab_cnn_fast`` is
airbench's CIFAR-10 speedrun network (Keller Jordan, 2024) adapted to any input size: in each block the
first conv runs at the block's input resolution and is max-pooled *before* BatchNorm and GELU, so the
second conv already runs at half resolution — the same accuracy as the VGG-style block for about
half its FLOPs, which is what a short CPU budget wants (``studies/fashion_mnist_fast.yaml``).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import nn


class SmallCNN(nn.Module):
    """3 × [conv → BN → ReLU (× ``convs_per_block``) → max-pool → dropout] → global avg pool → fc.

    ``style="pool_first"`` builds airbench's block instead: conv → max-pool → BN → act → (conv → BN →
    act) × (``convs_per_block`` − 1); ``act`` is ``relu`` or ``gelu``, ``global_pool`` ``avg`` or ``max``.

    Implements timm's model interface (``forward_features``, ``forward_head``,
    ``reset_classifier``, ``num_features``, ``group_matcher``) so strategies treat it like a timm
    backbone: its "stem" is block 0 and its stages are blocks 1 and 2.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple[int, ...] = (32, 64, 128),
        convs_per_block: int = 1,
        block_dropout: float = 0.1,
        drop_rate: float = 0.0,
        style: str = "vgg",
        act: str = "relu",
        global_pool: str = "avg",
        **_: Any,
    ) -> None:
        super().__init__()
        if style not in ("vgg", "pool_first") or act not in _ACTS or global_pool not in ("avg", "max"):
            raise ValueError(f"SmallCNN: unknown style {style!r}, act {act!r} or global_pool {global_pool!r}")
        blocks: list[nn.Module] = []
        c_in = in_chans
        for width in widths:
            layers: list[nn.Module] = []
            for i in range(convs_per_block):
                conv = nn.Conv2d(c_in, width, 3, padding=1, bias=False)
                pool = [nn.MaxPool2d(2)] if style == "pool_first" and i == 0 else []
                layers += [conv, *pool, nn.BatchNorm2d(width), _ACTS[act]()]
                c_in = width
            if style == "vgg":
                layers.append(nn.MaxPool2d(2))
            if block_dropout > 0 or style == "vgg":  # keeps the VGG-style state-dict names of older runs
                layers.append(nn.Dropout(block_dropout))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.num_features = self.head_hidden_size = c_in
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = nn.AdaptiveAvgPool2d(1) if global_pool == "avg" else nn.AdaptiveMaxPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Linear(c_in, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^blocks\.0\.", "blocks": r"^blocks\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        return self.fc

    def sequential_pieces(self) -> list[tuple[str, list[nn.Module]]]:
        """``forward_features`` as named pieces run in order (what ``transferlab.models.archs`` reads)."""
        return [(f"blocks.{i}", [b]) for i, b in enumerate(self.blocks)]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_ACTS: dict[str, type[nn.Module]] = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}  # type: ignore[dict-item]

# No pretrained weights exist for these: the config only says how inputs are normalised.
_CFG = {
    "num_classes": 10,
    "input_size": (3, 32, 32),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "first_conv": "blocks.0.0",
    "classifier": "fc",
}


def _create(pretrained: bool, kwargs: dict[str, Any], **defaults: Any) -> SmallCNN:
    if pretrained:
        raise ValueError("transferlab's built-in CNNs have no pretrained weights; use weights: scratch or file:<path>")
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    model = SmallCNN(**{**defaults, **kwargs})
    model.pretrained_cfg = model.default_cfg = dict(_CFG)
    return model


@register_model
def transferlab_cnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """3 × [conv, BN, ReLU, max-pool, dropout], widths 32-64-128 (~94 k parameters)."""
    return _create(pretrained, kwargs, convs_per_block=1)


@register_model
def transferlab_cnn_deep(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """3 × [(conv, BN, ReLU) × 2, max-pool, dropout], widths 64-128-256 (~1.1 M parameters)."""
    return _create(pretrained, kwargs, convs_per_block=2, widths=(64, 128, 256))


@register_model
def transferlab_cnn_fast(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """airbench's network: 3 × [conv, max-pool, BN, GELU, conv, BN, GELU], widths 64-256-256, global max pool
    (~2.0 M parameters, about the FLOPs of ``transferlab_cnn_deep``'s first two blocks)."""
    return _create(pretrained, kwargs, convs_per_block=2, widths=(64, 256, 256), style="pool_first", act="gelu",
                   block_dropout=0.0, global_pool="max")
