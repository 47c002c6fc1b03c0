"""Per-architecture facts in one table (fastai's ``model_meta``), read instead of ``isinstance`` tests.

Today one fact: whether ``forward_features`` is a plain sequence of named pieces (stem, stages, head
conv), which lets the feature cache cut a frozen network after any stage. A model can declare it
itself (a ``sequential_pieces()`` method, as transferlab's CNN does); for timm's classes the table
below says it. The entry is looked up along the class's MRO, so subclasses (e.g. a truncated
backbone) inherit it. ``transferlab.engine.features`` verifies on real inputs that the pieces run
in order give ``forward_features`` before trusting a cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from transferlab.registry import Registry

__all__ = ["ARCHS", "ArchMeta", "Pieces", "arch_meta", "sequential_pieces"]

Pieces = list[tuple[str, list[nn.Module]]]


@dataclass(frozen=True)
class ArchMeta:
    """What transferlab knows about one architecture family."""

    pieces: Callable[[nn.Module], Pieces] | None = None
    """``forward_features`` as (name, modules run in order); ``None``: not a plain sequence."""


ARCHS: Registry[ArchMeta] = Registry("architecture", "per-architecture facts, by qualified class name")


def _efficientnet(m: nn.Module) -> Pieces:
    return [
        ("stem", [m.conv_stem, m.bn1]),
        *[(f"blocks.{i}", [b]) for i, b in enumerate(m.blocks)],
        ("conv_head", [m.conv_head, m.bn2]),
    ]


def _resnet(m: nn.Module) -> Pieces:
    stem = [m.conv1, m.bn1, m.act1, m.maxpool]
    return [("stem", stem), *[(f"layer{i}", [getattr(m, f"layer{i}")]) for i in range(1, 5)]]


ARCHS.register("timm.models.efficientnet.EfficientNet", ArchMeta(pieces=_efficientnet))
ARCHS.register("timm.models.resnet.ResNet", ArchMeta(pieces=_resnet))


def arch_meta(backbone: nn.Module) -> ArchMeta:
    """The table entry of the closest class in ``backbone``'s MRO (an empty ``ArchMeta`` if none)."""
    for cls in type(backbone).__mro__:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in ARCHS:
            return ARCHS.get(name)
    return ArchMeta()


def sequential_pieces(backbone: nn.Module) -> Pieces | None:
    """``forward_features`` as named pieces, as the model declares it or the table says; ``None`` if unknown."""
    declared = getattr(backbone, "sequential_pieces", None)
    if callable(declared):
        return declared()
    meta = arch_meta(backbone)
    return meta.pieces(backbone) if meta.pieces else None
