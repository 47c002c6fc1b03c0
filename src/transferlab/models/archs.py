"""Per-architecture facts in one table (fastai's ``model_meta``), read instead of ``isinstance`` tests.

An entry is looked up along the class's MRO, so subclasses (a truncated or prompted backbone, timm's
DeiT-distilled ViT) inherit it; an architecture without an entry gets the defaults. What the table
says, per family:

* ``pieces`` — ``forward_features`` as a plain sequence of named pieces (stem, stages, head conv), which
  lets the feature cache cut a frozen network after any stage. A model can declare it itself (a
  ``sequential_pieces()`` method, as transferlab's CNN does). ``transferlab.engine.features`` verifies
  on real inputs that the pieces run in order give ``forward_features`` before trusting a cut.
* ``lora_targets`` — the layers ``strategy: {name: lora, targets: auto}`` adapts: the attention and MLP
  projections of transformer blocks, the (ungrouped) convolutions of CNN stages. Glob patterns over
  module names; only ``nn.Linear`` / ungrouped ``nn.Conv2d`` layers they select count. Without an
  entry: every such layer of the stages of timm's ``group_matcher`` (not the stem, not the neck).
* ``prompts`` — the backbone is a token transformer with a class token, patch tokens and a
  ``blocks`` sequence in timm's ``VisionTransformer`` layout, so visual prompt tuning (``vpt``) applies.
* ``layout`` — how the stages' outputs hold their feature maps: ``nchw`` (CNNs), ``tokens`` (a ViT's N×T×D token
  sequence: prefix and prompt tokens first, then the patch grid row by row), ``nhwc`` (timm's Swin stages).
  ``feature_maps`` turns any of them into N×C×H×W maps, so activation maps and Grad-CAM work on every family.
* ``size_rule`` — for backbones built at a fixed input size (``fixed_input_size`` in timm's pretrained
  config: ViT, DeiT, Swin, …): what input sizes the architecture takes (patch grid, Swin windows), as a
  function of a backbone built at that size returning ``None`` (fine) or why not.

The stages themselves (``freeze_first``, ``truncate``, ``summary``, ``lr_ratio``) come from timm's coarse
``group_matcher``, which every family here declares: ResNet ``layer1..4``, VGG one group per conv,
EfficientNet / MobileNetV3 ``blocks.0..6``, RegNet ``s1..4``, ConvNeXt ``stages.0..3``, ViT / DeiT
``blocks.0..N``, Swin ``layers.0..3`` (``transferlab.models.truncate.stage_groups_labelled``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from transferlab.registry import Registry

__all__ = ["ARCHS", "ArchMeta", "Pieces", "arch_meta", "arch_name", "feature_maps", "sequential_pieces"]

Pieces = list[tuple[str, list[nn.Module]]]
SizeRule = Callable[[nn.Module, int], "str | None"]


@dataclass(frozen=True)
class ArchMeta:
    """What transferlab knows about one architecture family."""

    pieces: Callable[[nn.Module], Pieces] | None = None
    """``forward_features`` as (name, modules run in order); ``None``: not a plain sequence."""
    lora_targets: tuple[str, ...] | None = None
    """Glob patterns of the layers ``lora`` adapts with ``targets: auto``; ``None``: the stages' layers."""
    prompts: bool = False
    """Visual prompt tuning applies (timm ``VisionTransformer`` token layout)."""
    size_rule: SizeRule | None = None
    """For fixed-input-size backbones: ``rule(backbone built at size, size)`` -> ``None`` or why the size does not work."""
    layout: str = "nchw"
    """Layout of stage outputs: ``nchw``, ``tokens`` (N×T×D, patch grid last) or ``nhwc`` (``feature_maps``)."""


ARCHS: Registry[ArchMeta] = Registry("architecture", "per-architecture facts, by qualified class name")


# --------------------------------------------------------------------------------------------
# pieces (the feature cache's cut points)


def _efficientnet(m: nn.Module) -> Pieces:
    return [
        ("stem", [m.conv_stem, m.bn1]),
        *[(f"blocks.{i}", [b]) for i, b in enumerate(m.blocks)],
        ("conv_head", [m.conv_head, m.bn2]),
    ]


def _resnet(m: nn.Module) -> Pieces:
    stem = [m.conv1, m.bn1, m.act1, m.maxpool]
    return [("stem", stem), *[(f"layer{i}", [getattr(m, f"layer{i}")]) for i in range(1, 5)]]


# --------------------------------------------------------------------------------------------
# input sizes of fixed-size backbones


def _pair(v: object) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))  # type: ignore[index,call-overload]


def _patch_rule(m: nn.Module, size: int) -> str | None:
    """ViT-style: the patch size must divide the input (timm would silently drop the remainder)."""
    patch = _pair(m.patch_embed.patch_size)
    if size % patch[0] or size % patch[1]:
        return f"the patch size {patch[0]} does not divide {size}"
    return None


def _swin_rule(m: nn.Module, size: int) -> str | None:
    """Swin: patches divide the input, every patch merging halves the grid exactly, and every stage's
    window divides its token grid (timm shrinks a window to a grid no larger than it; otherwise it pads,
    and padded windows are not what the model was trained with)."""
    if why := _patch_rule(m, size):
        return why
    grid = size // _pair(m.patch_embed.patch_size)[0]
    for i, stage in enumerate(m.layers):
        if i and not isinstance(stage.downsample, nn.Identity):
            if grid % 2:
                return f"stage {i} halves an odd token grid ({grid}×{grid})"
            grid //= 2
        window = _pair(stage.blocks[0].window_size)[0] if len(stage.blocks) else 1
        if grid > window and grid % window:
            return f"the window {window} of stage {i} does not divide its {grid}×{grid} token grid"
    return None


_VIT = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2")
_SWIN = ("layers.*.blocks.*.attn.qkv", "layers.*.blocks.*.attn.proj", "layers.*.blocks.*.mlp.fc1", "layers.*.blocks.*.mlp.fc2")

ARCHS.register("timm.models.efficientnet.EfficientNet", ArchMeta(
    pieces=_efficientnet, lora_targets=("blocks.*.conv_pw", "blocks.*.conv_pwl", "blocks.*.conv")))
ARCHS.register("timm.models.mobilenetv3.MobileNetV3", ArchMeta(lora_targets=("blocks.*.conv_pw", "blocks.*.conv_pwl", "blocks.*.conv")))
ARCHS.register("timm.models.resnet.ResNet", ArchMeta(pieces=_resnet, lora_targets=("layer*.*.conv1", "layer*.*.conv2", "layer*.*.conv3")))
ARCHS.register("timm.models.vgg.VGG", ArchMeta(lora_targets=("features.*",)))
ARCHS.register("timm.models.regnet.RegNet", ArchMeta(lora_targets=("s*.b*.conv*.conv",)))
ARCHS.register("timm.models.convnext.ConvNeXt", ArchMeta(lora_targets=("stages.*.blocks.*.mlp.fc1", "stages.*.blocks.*.mlp.fc2")))
ARCHS.register("timm.models.vision_transformer.VisionTransformer",
               ArchMeta(lora_targets=_VIT, prompts=True, size_rule=_patch_rule, layout="tokens"))
ARCHS.register("timm.models.deit.VisionTransformerDistilled", ArchMeta(lora_targets=_VIT, prompts=True, size_rule=_patch_rule, layout="tokens"))
ARCHS.register("timm.models.swin_transformer.SwinTransformer", ArchMeta(lora_targets=_SWIN, size_rule=_swin_rule, layout="nhwc"))
ARCHS.register("timm.models.swin_transformer_v2.SwinTransformerV2", ArchMeta(lora_targets=_SWIN, size_rule=_swin_rule, layout="nhwc"))


def arch_name(cls: type) -> str:
    """The table key of a class: its qualified name (``timm.models.resnet.ResNet``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def arch_meta(backbone: nn.Module) -> ArchMeta:
    """The table entry of the closest class in ``backbone``'s MRO (an empty ``ArchMeta`` if none)."""
    for cls in type(backbone).__mro__:
        name = arch_name(cls)
        if name in ARCHS:
            return ARCHS.get(name)
    return ArchMeta()


def feature_maps(backbone: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t``, an output of one of ``backbone``'s stages (or of ``forward_features``), as N×C×H×W feature maps.

    A ViT's N×T×D tokens become D maps over its patch grid: the last ``grid_h · grid_w`` tokens are the patches, row
    by row (timm's ``PatchEmbed`` flattens them so); what comes before them — the class / register tokens, and prompt
    tokens of ``vpt`` — has no place in the grid and is left out. A Swin stage's N×H×W×C output is permuted. Anything
    else (a CNN's maps, an output that is not the backbone's token sequence) is returned unchanged: the caller's own
    check says what it is not.
    """
    layout = arch_meta(backbone).layout
    if layout == "tokens" and t.dim() == 3:
        grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
        if grid is not None and t.shape[1] >= int(grid[0]) * int(grid[1]):
            gh, gw = int(grid[0]), int(grid[1])
            return t[:, t.shape[1] - gh * gw :].transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw)
    if layout == "nhwc" and t.dim() == 4:
        return t.permute(0, 3, 1, 2)
    return t


def sequential_pieces(backbone: nn.Module) -> Pieces | None:
    """``forward_features`` as named pieces, as the model declares it or the table says; ``None`` if unknown."""
    declared = getattr(backbone, "sequential_pieces", None)
    if callable(declared):
        return declared()
    meta = arch_meta(backbone)
    return meta.pieces(backbone) if meta.pieces else None
