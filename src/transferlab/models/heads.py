"""Heads: the new classifier on top of a backbone, registered by name (``head.type``).

Each builder takes the head config, the backbone and the number of classes, so it can read the
width it sits on itself: the pooled feature width (``linear``, ``mlp``) or the feature-map channels
(``conv``). A head that wants the unpooled feature map says so with ``input_kind = "spatial"``;
``TransferModel`` then hands it ``forward_features`` output instead of the pooled vector.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from transferlab.config import HeadConfig, register_choices
from transferlab.registry import Registry, UnknownNameError

__all__ = ["HEADS", "ConvHead", "build_head", "pooled_width"]

HeadBuilder = Callable[[HeadConfig, nn.Module, int], nn.Module]
HEADS: Registry[HeadBuilder] = Registry("head", "head.type: the classifier on the backbone")


def pooled_width(backbone: nn.Module) -> int:
    """Width of a backbone's pooled features (what ``forward_head(pre_logits=True)`` returns)."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


@HEADS.register("linear")
def linear_head(cfg: HeadConfig, backbone: nn.Module, num_classes: int) -> nn.Module:
    """dropout → fc on the pooled features."""
    return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(pooled_width(backbone), num_classes))


@HEADS.register("mlp")
def mlp_head(cfg: HeadConfig, backbone: nn.Module, num_classes: int) -> nn.Module:
    """fc(hidden) → ReLU → dropout → fc on the pooled features."""
    width = pooled_width(backbone)
    return nn.Sequential(nn.Linear(width, cfg.hidden), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, num_classes))


class ConvHead(nn.Module):
    """Seed 002's head on the *unpooled* features: conv k×k (C filters, 'same' padding) → ReLU →
    global average pool → dropout → fc(hidden) → ReLU → fc(classes).

    ``input_kind = "spatial"`` tells ``TransferModel`` to give it the backbone's feature map
    (N×C×H×W) instead of the pooled vector the ``linear`` and ``mlp`` heads get.
    """

    input_kind = "spatial"

    def __init__(
        self, in_channels: int, num_classes: int, channels: int = 32, kernel_size: int = 3, hidden: int = 1024, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(channels, hidden)
        self.act1 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(
                f"the conv head needs N×C×H×W feature maps, got shape {tuple(x.shape)} "
                "(transformer tokens or NHWC features: use a linear or mlp head)"
            )
        x = self.drop(self.pool(self.act(self.conv(x))).flatten(1))
        return self.fc(self.act1(self.fc1(x)))


@HEADS.register("conv")
def conv_head(cfg: HeadConfig, backbone: nn.Module, num_classes: int) -> nn.Module:
    """conv → ReLU → global average pool → dropout → fc → ReLU → fc, on the unpooled feature map."""
    return ConvHead(int(backbone.num_features), num_classes, cfg.conv_channels, cfg.kernel_size, cfg.hidden, cfg.dropout)


def build_head(cfg: HeadConfig, backbone: nn.Module, num_classes: int) -> nn.Module:
    """A freshly initialised ``cfg.type`` head for ``num_classes`` classes on ``backbone``."""
    try:
        builder = HEADS.get(cfg.type, "head.type")
    except UnknownNameError as e:
        raise ValueError(str(e)) from None
    return builder(cfg, backbone, num_classes)


register_choices(HeadConfig, "type", HEADS.names)
