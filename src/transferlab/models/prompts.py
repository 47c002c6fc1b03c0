"""Visual prompt tuning (Jia et al. 2022, "Visual Prompt Tuning") for timm's VisionTransformer family.

``add_prompts(backbone, n, deep)`` turns a ViT backbone in place into a prompted one: ``n`` learnable
prompt tokens are inserted after the class (and register / distillation) tokens, before the patch
tokens, and go through the transformer with them.

* shallow (``deep: false``): one set of prompts, inserted before the first block;
* deep (``deep: true``): a fresh set in front of every block, replacing the previous block's outputs
  at those positions.

The prompts are dropped again after the final norm, so ``forward_head`` (class-token or average
pooling) sees the token layout it was built for. Like truncation, the backbone keeps its own class
(a subclass is swapped in, ``PromptedVisionTransformer``), so its state-dict keys, ``group_matcher``
and everything timm declares stay as they are; the prompts are one more parameter,
``prompt_tokens`` (blocks × n × width for deep, 1 × n × width for shallow), which the checkpoint
holds. Prompts are initialised uniformly in ±sqrt(6 / (patch area · 3 + width)), as in the paper.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from transferlab.config import ConfigError
from transferlab.models.archs import ARCHS, arch_meta

__all__ = ["add_prompts", "check_prompts", "has_prompts", "prompt_families"]


class _PromptedMixin:
    """``forward_features`` of a prompted ViT (module docstring)."""

    prompt_tokens: nn.Parameter
    prompts_deep: bool

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # type: ignore[attr-defined]
        x = self._pos_embed(x)  # type: ignore[attr-defined] - class / register tokens and position embeddings
        x = self.patch_drop(x)  # type: ignore[attr-defined]
        x = self.norm_pre(x)  # type: ignore[attr-defined]
        prefix, n = int(self.num_prefix_tokens), self.prompt_tokens.shape[1]  # type: ignore[attr-defined]
        for i, block in enumerate(self.blocks):  # type: ignore[attr-defined]
            if i == 0 or self.prompts_deep:
                prompts = self.prompt_tokens[i if self.prompts_deep else 0].expand(x.shape[0], -1, -1).to(x.dtype)
                rest = x[:, prefix + (n if i else 0) :]  # deep: the previous block's prompt outputs are replaced
                x = torch.cat([x[:, :prefix], prompts, rest], dim=1)
            x = block(x)
        x = self.norm(x)  # type: ignore[attr-defined]
        return torch.cat([x[:, :prefix], x[:, prefix + n :]], dim=1)


_CLASSES: dict[type, type] = {}


def _prompted_class(cls: type) -> type:
    if issubclass(cls, _PromptedMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Prompted{cls.__name__}", (_PromptedMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def prompt_families() -> list[str]:
    """The architectures (qualified class names) visual prompt tuning applies to."""
    return [name for name in ARCHS.names() if ARCHS.get(name).prompts]


def has_prompts(backbone: nn.Module) -> bool:
    """True for a backbone that went through ``add_prompts``."""
    return isinstance(backbone, _PromptedMixin)


def check_prompts(backbone: nn.Module, key: str = "strategy.name") -> None:
    """``ConfigError`` naming ``key`` unless visual prompt tuning applies to ``backbone`` (a timm ViT-family model)."""
    if not arch_meta(backbone).prompts or not hasattr(backbone, "blocks"):
        families = ", ".join(name.rsplit(".", 1)[-1] for name in prompt_families())
        raise ConfigError(f"{key}: vpt (visual prompt tuning) needs a timm VisionTransformer-family backbone ({families}: vit_*, deit_*); "
                          f"{type(backbone).__name__} is none")


def add_prompts(backbone: nn.Module, n: int, deep: bool, key: str = "strategy.name") -> nn.Parameter:
    """Give ViT ``backbone`` ``n`` learnable prompt tokens (per block when ``deep``), in place; returns them.

    Idempotent for the same ``n`` and ``deep`` (the existing prompts are returned, e.g. when a schedule
    re-applies the strategy). Raises ``ConfigError`` naming ``key`` for a backbone that is no ViT.
    """
    if has_prompts(backbone):
        p = backbone.prompt_tokens  # type: ignore[attr-defined]
        if p.shape[1] != n or backbone.prompts_deep != deep:  # type: ignore[attr-defined]
            raise ValueError(f"the backbone already has {p.shape[1]} {'deep' if backbone.prompts_deep else 'shallow'} prompts")  # type: ignore[attr-defined]
        return p
    check_prompts(backbone, key)
    if n < 1:
        raise ConfigError(f"strategy.prompts={n} must be >= 1")
    width = int(backbone.embed_dim)  # type: ignore[attr-defined]
    patch = backbone.patch_embed.patch_size  # type: ignore[attr-defined]
    area = int(patch[0] * patch[1]) if isinstance(patch, (tuple, list)) else int(patch) ** 2
    bound = math.sqrt(6.0 / float(3 * area + width))
    rows = len(backbone.blocks) if deep else 1  # type: ignore[attr-defined]
    param = next(backbone.parameters())
    prompts = nn.Parameter(torch.empty(rows, n, width, device=param.device, dtype=param.dtype).uniform_(-bound, bound))
    backbone.__class__ = _prompted_class(type(backbone))
    backbone.prompt_tokens = prompts  # type: ignore[attr-defined]
    backbone.prompts_deep = deep  # type: ignore[attr-defined]
    return prompts
