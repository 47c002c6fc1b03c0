"""The one model interface every strategy uses: a timm backbone plus a new head.

``TransferModel`` mirrors timm's interface (``forward_features``, ``forward_head``,
``reset_classifier``) so code written against timm models works on it unchanged. BatchNorm layers
marked frozen stay in eval mode whatever ``.train()`` is called with — after a resume, inside
Lightning, anywhere — because the model itself enforces it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from transferlab.config import HeadConfig, ModelConfig
from transferlab.data.normalize import Preprocess, to_channels
from transferlab.models.backbones import create_backbone
from transferlab.models.heads import build_head, pooled_width
from transferlab.models.weights import LoadReport, load_run_head

__all__ = ["BN_TYPES", "TransferModel", "build_model", "count_params"]

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


class TransferModel(nn.Module):
    """A backbone (timm model without classifier) and a head, with explicit frozen-BatchNorm handling."""

    def __init__(self, backbone: nn.Module, head: nn.Module, head_cfg: HeadConfig, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head_cfg = head_cfg
        self.num_classes = num_classes
        self.frozen_bn: set[str] = set()  # qualified names of BatchNorm modules kept in eval mode
        self.normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        """(mean, std) of the run's ``data.normalize`` when it is not the backbone's (``set_normalization``)."""

    @property
    def num_features(self) -> int:
        """Width of the pooled features (what ``forward_head(pre_logits=True)`` returns)."""
        return pooled_width(self.backbone)

    @property
    def head_input(self) -> str:
        """``pooled``: the head takes ``forward_head(features, pre_logits=True)``; ``spatial``: the feature map."""
        return getattr(self.head, "input_kind", "pooled")

    @property
    def pretrained_cfg(self) -> dict:
        return dict(getattr(self.backbone, "pretrained_cfg", {}) or {})

    def preprocess(self) -> Preprocess:
        """Input channels and normalisation: the run's (``set_normalization``), else the backbone's pretrained one.

        Everything that feeds the model (batches, feature-cache keys, outside images, export metadata)
        asks here, so a run trained with ``data.normalize: dataset`` is evaluated and exported alike.
        """
        cfg = self.pretrained_cfg
        in_chans = int(cfg.get("input_size", (3,))[0])
        if self.normalization is not None:
            mean, std = self.normalization
            return Preprocess(mean=to_channels(mean, in_chans), std=to_channels(std, in_chans), in_chans=in_chans)
        return Preprocess(mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))), std=tuple(cfg.get("std", (0.229, 0.224, 0.225))), in_chans=in_chans)

    def set_normalization(self, mean: Iterable[float], std: Iterable[float]) -> None:
        """Normalise inputs with this mean/std (0..1 scale, one per image channel) instead of the backbone's.

        A plain attribute, not a buffer: checkpoints stay the backbone's state dict; the run records the
        values (``selection.json``) and ``load_run(...).load_model()`` sets them again.
        """
        self.normalization = (tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled backbone features."""
        return self.backbone.forward_features(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Apply the head to the unpooled ``features``.

        ``pre_logits=True`` returns the backbone's pooled features (its own pooling) for every head
        kind. A ``pooled`` head (linear, mlp) is applied to those; a ``spatial`` head (conv) to the
        feature map itself (see ``head_input``).
        """
        if pre_logits or self.head_input == "pooled":
            pooled = self.backbone.forward_head(features, pre_logits=True)
            return pooled if pre_logits else self.head(pooled)
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, head_cfg: HeadConfig | None = None) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` classes."""
        self.head_cfg = head_cfg or self.head_cfg
        self.num_classes = num_classes
        self.head = build_head(self.head_cfg, self.backbone, num_classes)

    def reinit_head(self) -> None:
        """Re-initialise the head's parameters in place (same architecture); the backbone is untouched.

        Draws from torch's global RNG like a freshly built head. Optimizers holding the head's
        parameters keep working (the tensors are the same objects).
        """
        for m in self.head.modules():
            if m is not self.head and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def set_frozen_bn(self, names: Iterable[str]) -> None:
        """Keep these BatchNorm modules (qualified names) in eval mode: running stats never update."""
        modules = dict(self.named_modules())
        for n in names:
            if not isinstance(modules.get(n), BN_TYPES):
                raise ValueError(f"{n!r} is not a BatchNorm module of this model")
        self.frozen_bn = set(names)
        self.train(self.training)

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        if mode and self.frozen_bn:
            for name, module in self.named_modules():
                if name in self.frozen_bn:
                    module.eval()
        return self


def build_model(
    model_cfg: ModelConfig, head_cfg: HeadConfig, num_classes: int, image_size: int | None = None
) -> tuple[TransferModel, LoadReport | None]:
    """Create the backbone with its weights and attach a new head for ``num_classes`` classes.

    A fixed-input-size backbone (ViT, Swin, …) is built at ``image_size``, else at ``model_cfg.image_size``
    (filled from ``data.image_size`` when the config is read), else at its default size.
    """
    size = image_size if image_size is not None else model_cfg.image_size
    backbone, report = create_backbone(model_cfg.backbone, model_cfg.weights, model_cfg.drop_rate, truncate=model_cfg.truncate,
                                       image_size=size)
    model = TransferModel(backbone, build_head(head_cfg, backbone, num_classes), head_cfg, num_classes)
    if model_cfg.keep_head and model_cfg.weights.startswith("run:"):
        load_run_head(model, model_cfg.weights[len("run:") :], head_cfg, num_classes, report)
    if model_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, report


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
