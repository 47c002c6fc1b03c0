"""Transfer strategies: which parameters train and which BatchNorm layers keep their statistics.

Each strategy is a named function ``(model, cfg) -> None`` that sets ``requires_grad`` on the
parameters and tells the model which BatchNorm modules are frozen (eval mode: running mean and
variance never update). The rule everywhere: a BatchNorm layer whose affine parameters are frozen
is frozen entirely — updating its running statistics would silently change a "frozen" network.

=================  ==============================================================================
``scratch``        everything trains (random init expected; identical to finetune otherwise)
``finetune``       everything trains, starting from the loaded weights
``linear_probe``   backbone frozen (BN in eval mode), only the head trains
``freeze_first``   the first N stages / children / parameter tensors frozen, the rest trains
``bn_only``        only BatchNorm affine parameters (and their running stats) and the head train
=================  ==============================================================================
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from transferlab.config import ConfigError, StrategyConfig
from transferlab.models.model import BN_TYPES, TransferModel

Strategy = Callable[[TransferModel, StrategyConfig], None]
STRATEGIES: dict[str, Strategy] = {}


def register_strategy(fn: Strategy) -> Strategy:
    STRATEGIES[fn.__name__] = fn
    return fn


# --------------------------------------------------------------------------------------------
# building blocks


def freeze(module: nn.Module) -> None:
    """Stop gradients for every parameter of ``module``."""
    module.requires_grad_(False)


def unfreeze(module: nn.Module) -> None:
    """Let every parameter of ``module`` train."""
    module.requires_grad_(True)


def sync_frozen_batchnorm(model: TransferModel) -> list[str]:
    """Put every BatchNorm whose affine parameters are all frozen into permanent eval mode.

    A BatchNorm without affine parameters counts as frozen when the module it sits in (its parent)
    has no trainable parameters. Returns the frozen names.
    """
    modules = dict(model.named_modules())
    frozen = []
    for name, m in modules.items():
        if not isinstance(m, BN_TYPES):
            continue
        params = list(m.parameters(recurse=False))
        if params:
            is_frozen = not any(p.requires_grad for p in params)
        else:
            parent = modules.get(name.rsplit(".", 1)[0] if "." in name else "", model)
            is_frozen = not any(p.requires_grad for p in parent.parameters())
        if is_frozen:
            frozen.append(name)
    model.set_frozen_bn(frozen)
    return frozen


def stage_groups(backbone: nn.Module) -> list[list[str]]:
    """Parameter names of the backbone grouped into stem + stages, in forward order.

    Uses timm's coarse ``group_matcher`` (the same grouping timm uses for layer-wise LR decay), so
    it works for any timm architecture: ResNet → [stem, layer1, …, layer4], EfficientNet →
    [stem, blocks.0, …, blocks.6, head conv].
    """
    from timm.models import group_parameters

    if not hasattr(backbone, "group_matcher"):
        raise ConfigError(f"{type(backbone).__name__} has no timm group_matcher; use freeze_first with children or params")
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


# --------------------------------------------------------------------------------------------
# strategies


@register_strategy
def scratch(model: TransferModel, cfg: StrategyConfig) -> None:
    """Train every parameter (use with ``weights: scratch``: a from-scratch baseline)."""
    unfreeze(model)
    sync_frozen_batchnorm(model)


@register_strategy
def finetune(model: TransferModel, cfg: StrategyConfig) -> None:
    """Train every parameter, starting from the loaded (e.g. ImageNet) weights."""
    unfreeze(model)
    sync_frozen_batchnorm(model)


@register_strategy
def linear_probe(model: TransferModel, cfg: StrategyConfig) -> None:
    """Freeze the whole backbone (BatchNorm in eval mode); only the head trains.

    The name follows the literature even when the head is an MLP: the backbone is a fixed
    feature extractor.
    """
    freeze(model.backbone)
    unfreeze(model.head)
    sync_frozen_batchnorm(model)


@register_strategy
def freeze_first(model: TransferModel, cfg: StrategyConfig) -> None:
    """Freeze the first part of the backbone; the rest and the head train.

    Exactly one of:
      * ``stages: N``   — the stem and the first N stages (timm coarse groups; 0 = stem only);
      * ``children: N`` — the first N direct children of the backbone (``named_children`` order,
        as in ``for child in list(model.children())[:N]`` notebooks);
      * ``params: N``   — the first N parameter tensors (``named_parameters`` order; the
        "layers from index N are trainable" form).
    """
    given = {k: v for k, v in (("stages", cfg.stages), ("children", cfg.children), ("params", cfg.params)) if v is not None}
    if len(given) != 1:
        raise ConfigError(f"freeze_first needs exactly one of strategy.stages / children / params, got {given or 'none'}")
    (kind, n), = given.items()
    if n < 0:
        raise ConfigError(f"strategy.{kind}={n} must be >= 0")
    unfreeze(model)
    backbone = model.backbone
    if kind == "stages":
        groups = stage_groups(backbone)
        if n + 1 > len(groups):
            raise ConfigError(
                f"strategy.stages={n} but {type(backbone).__name__} has only {len(groups) - 1} stages after its stem"
            )
        names = {p for g in groups[: n + 1] for p in g}
        for pname, p in backbone.named_parameters():
            if pname in names:
                p.requires_grad_(False)
    elif kind == "children":
        children = list(backbone.named_children())
        if n > len(children):
            raise ConfigError(
                f"strategy.children={n} but the backbone has only {len(children)} children: {', '.join(c for c, _ in children)}"
            )
        for _, child in children[:n]:
            freeze(child)
    else:
        params = list(backbone.parameters())
        if n > len(params):
            raise ConfigError(f"strategy.params={n} but the backbone has only {len(params)} parameter tensors")
        for p in params[:n]:
            p.requires_grad_(False)
    sync_frozen_batchnorm(model)


@register_strategy
def bn_only(model: TransferModel, cfg: StrategyConfig) -> None:
    """Train only BatchNorm affine parameters (their running stats update too) and the head."""
    freeze(model.backbone)
    for m in model.backbone.modules():
        if isinstance(m, BN_TYPES):
            unfreeze(m)
    unfreeze(model.head)
    sync_frozen_batchnorm(model)


def apply_strategy(model: TransferModel, cfg: StrategyConfig) -> None:
    """Apply the strategy named ``cfg.name`` to ``model``."""
    if cfg.name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {cfg.name!r}; available: {', '.join(STRATEGIES)}")
    STRATEGIES[cfg.name](model, cfg)
