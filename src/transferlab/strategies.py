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
``norm_only``      only normalisation layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm …) and the head
``bitfit``         only the backbone's bias terms (BitFit, Ben Zaken et al. 2022) and the head
``lora``           low-rank adapters (HF peft) on Linear / Conv2d layers; the base weights stay frozen
``vpt``            learnable prompt tokens in a ViT (visual prompt tuning, shallow or deep) and the head
``lp_ft``          the head alone first (``strategy.probe_epochs``, on cached features), then everything
=================  ==============================================================================

The new head always trains fully. ``lora`` and ``vpt`` add modules to the backbone
(``transferlab.models.adapters.add_strategy_modules``), and ``merge_adapters`` folds LoRA back into
plain layers for exports and predictions. A strategy whose frozen parameters never change (``lora``,
``vpt``, ``bitfit``, ``norm_only``, ``bn_only``, ``linear_probe``, without a trainability schedule)
writes adapter-only checkpoints: the trainable tensors and the buffers, the frozen ones left out and
fingerprinted (``engine.checkpointing.weights_scope``, ``models.weights.FrozenPart``); every reader
completes them from the base weights.

On top of any strategy, a *trainability schedule* (``strategy.unfreeze`` or fastai-style
``strategy.freeze_epochs``) unfreezes the frozen stages during training, top stage first, and
``train.lr_ratio`` gives every stage its own learning rate (``optimizer_param_groups``). The
trainable set is a pure function of the epoch (``apply_strategy_at_epoch``), which is what makes a
resumed run continue exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import timm
from timm.models import group_parameters
from torch import nn

from transferlab.config import ConfigError, ExperimentConfig, StrategyConfig, register_check, unfreeze_milestones
from transferlab.models.adapters import add_strategy_modules, lora_targets, require_peft
from transferlab.models.backbones import backbone_skeleton
from transferlab.models.model import BN_TYPES, TransferModel
from transferlab.models.prompts import check_prompts
from transferlab.models.truncate import stage_groups_labelled
from transferlab.registry import Registry, UnknownNameError

Strategy = Callable[[TransferModel, StrategyConfig], None]
STRATEGIES: Registry[Strategy] = Registry("strategy", "strategy.name: which parameters train")


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
    if not hasattr(backbone, "group_matcher"):
        raise ConfigError(f"{type(backbone).__name__} has no timm group_matcher; use freeze_first with children or params")
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


# --------------------------------------------------------------------------------------------
# strategies


@STRATEGIES.register()
def scratch(model: TransferModel, cfg: StrategyConfig) -> None:
    """Train every parameter (use with ``weights: scratch``: a from-scratch baseline)."""
    unfreeze(model)
    sync_frozen_batchnorm(model)


@STRATEGIES.register()
def finetune(model: TransferModel, cfg: StrategyConfig) -> None:
    """Train every parameter, starting from the loaded (e.g. ImageNet) weights."""
    unfreeze(model)
    sync_frozen_batchnorm(model)


@STRATEGIES.register()
def linear_probe(model: TransferModel, cfg: StrategyConfig) -> None:
    """Freeze the whole backbone (BatchNorm in eval mode); only the head trains.

    The name follows the literature even when the head is an MLP: the backbone is a fixed
    feature extractor.
    """
    freeze(model.backbone)
    unfreeze(model.head)
    sync_frozen_batchnorm(model)


@STRATEGIES.register()
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


@STRATEGIES.register()
def bn_only(model: TransferModel, cfg: StrategyConfig) -> None:
    """Train only BatchNorm affine parameters (their running stats update too) and the head."""
    freeze(model.backbone)
    for m in model.backbone.modules():
        if isinstance(m, BN_TYPES):
            unfreeze(m)
    unfreeze(model.head)
    sync_frozen_batchnorm(model)


def _norm_types() -> tuple[type, ...]:
    types: list[type] = [nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    for name in ("RmsNorm", "RmsNorm2d", "SimpleNorm", "SimpleNorm2d", "FrozenBatchNorm2d"):  # timm's own, not nn subclasses
        if (cls := getattr(timm.layers, name, None)) is not None:
            types.append(cls)
    return tuple(types)


NORM_TYPES = _norm_types()
"""Normalisation layers (``norm_only``): BatchNorm / InstanceNorm, LayerNorm (and timm's LayerNorm2d), GroupNorm, RMSNorm."""


def _only(model: TransferModel, params: list[nn.Parameter], what: str) -> None:
    """Freeze the backbone, then let ``params`` and the head train; ``what`` names them in the error when there are none."""
    if not params:
        raise ConfigError(f"strategy.name: {type(model.backbone).__name__} has no {what}; use linear_probe (head only) or another strategy")
    freeze(model.backbone)
    for p in params:
        p.requires_grad_(True)
    unfreeze(model.head)
    sync_frozen_batchnorm(model)


@STRATEGIES.register()
def norm_only(model: TransferModel, cfg: StrategyConfig) -> None:
    """Train only the affine parameters of the normalisation layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm …) and the head.

    ``bn_only``'s sibling for models without BatchNorm (ViT, Swin, ConvNeXt); BatchNorm layers that train
    update their running statistics too.
    """
    params = [p for m in model.backbone.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)]
    _only(model, params, "normalisation layer with affine parameters")


@STRATEGIES.register()
def bitfit(model: TransferModel, cfg: StrategyConfig) -> None:
    """Train only the backbone's bias terms (BitFit: every parameter named ``bias``, norm layers' included) and the head.

    A BatchNorm whose bias trains is not frozen, so its running statistics update as in ``bn_only``.
    """
    params = [p for name, p in model.backbone.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
    _only(model, params, "bias terms")


@STRATEGIES.register()
def lora(model: TransferModel, cfg: StrategyConfig) -> None:
    """Low-rank adapters (HF peft's LoRA) on Linear / Conv2d layers; only the adapters and the head train.

    Options: ``rank`` (8), ``alpha`` (16; the update is scaled by alpha / rank), ``dropout`` (0.0) and
    ``targets``: ``auto`` (the per-architecture table: attention and MLP projections of transformer blocks,
    the convolutions of CNN stages) or a list of layer-name patterns. Needs ``pip install 'transferlab[peft]'``.
    """
    add_strategy_modules(model, cfg)
    freeze(model.backbone)
    for name, p in model.backbone.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(True)
    unfreeze(model.head)
    sync_frozen_batchnorm(model)


@STRATEGIES.register()
def vpt(model: TransferModel, cfg: StrategyConfig) -> None:
    """Visual prompt tuning (Jia et al. 2022) for timm's VisionTransformer family: learnable prompt tokens and the head train.

    Options: ``prompts`` (10 tokens, inserted after the class / register tokens) and ``deep`` (false: prompts
    before the first block only; true: fresh prompts before every block). The backbone stays frozen.
    """
    add_strategy_modules(model, cfg)
    freeze(model.backbone)
    model.backbone.prompt_tokens.requires_grad_(True)  # type: ignore[union-attr]
    unfreeze(model.head)
    sync_frozen_batchnorm(model)


@STRATEGIES.register()
def lp_ft(model: TransferModel, cfg: StrategyConfig) -> None:
    """LP-FT (Kumar et al. 2022): the head first trains alone on cached features for ``probe_epochs`` epochs, then
    every parameter trains (``transferlab.kinds.phases``: both phases in one run). As a strategy: ``finetune``'s set."""
    unfreeze(model)
    sync_frozen_batchnorm(model)


def apply_strategy(model: TransferModel, cfg: StrategyConfig) -> None:
    """Apply the strategy named ``cfg.name`` to ``model``."""
    try:
        strategy = STRATEGIES.get(cfg.name)
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None
    strategy(model, cfg)


# --------------------------------------------------------------------------------------------
# trainability schedules (gradual unfreezing) and discriminative learning rates


def backbone_stages(model: TransferModel) -> list[tuple[str, list[nn.Parameter]]]:
    """The backbone's parameters per stage group, stem first: ``[("stem", [...]), ("layer1", [...]), ...]``.

    The groups are ``stage_groups`` (timm's coarse ``group_matcher``); a group is labelled with the
    module that holds it, or ``stage <i>`` when no single module does.
    """
    stage_groups(model.backbone)  # the error for a backbone without group_matcher
    params = dict(model.backbone.named_parameters())
    return [(label, [params[n] for n in names]) for label, names, _ in stage_groups_labelled(model.backbone)]


def has_schedule(cfg: StrategyConfig) -> bool:
    """True when the trainable set changes during training (``unfreeze`` or ``freeze_epochs``)."""
    return bool(unfreeze_milestones(cfg)[0])


def apply_strategy_at_epoch(model: TransferModel, cfg: StrategyConfig, epoch: int) -> list[str]:
    """Set the trainable parameters (and frozen BatchNorm) for ``epoch`` (0-based); returns the
    stage groups the schedule has unfrozen by then, topmost first.

    A pure function of the epoch: the strategy is applied afresh, then, for every milestone
    ``<= epoch``, the next ``stages_per_step`` stage groups that the strategy froze (even in part)
    become fully trainable, from the top of the backbone down (fastai / ULMFiT gradual
    unfreezing). BatchNorm layers of still-frozen stages stay in eval mode. A resumed run calls it
    for the epoch it resumes in and gets exactly the set the interrupted run had.
    """
    apply_strategy(model, cfg)
    milestones, per_step = unfreeze_milestones(cfg)
    steps = sum(epoch >= m for m in milestones)
    if steps == 0:
        return []
    frozen = [(label, ps) for label, ps in backbone_stages(model) if any(not p.requires_grad for p in ps)]
    n = len(frozen) if per_step is None else min(len(frozen), steps * per_step)
    chosen = frozen[len(frozen) - n :]
    for _, ps in chosen:
        for p in ps:
            p.requires_grad_(True)
    sync_frozen_batchnorm(model)
    return [label for label, _ in reversed(chosen)]


def _transfer_model(model: nn.Module) -> TransferModel:
    """The ``TransferModel`` itself, also when the loop trains a wrapper of it (``.model``, e.g. the feature cache's)."""
    if isinstance(model, TransferModel):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, TransferModel):
        return inner
    raise TypeError(f"expected a TransferModel (or a wrapper with .model), got {type(model).__name__}")


def trainability_for_epoch(model: nn.Module, cfg: ExperimentConfig, epoch: int, world_size: int = 1) -> str | None:
    """Called by the training loop at the start of every epoch: applies the schedule for ``epoch``.

    No-op (``None``) without a schedule. Returns a line for the log when stages unfroze at this epoch.
    """
    if not has_schedule(cfg.strategy):
        return None
    model = _transfer_model(model)
    if world_size > 1:
        raise ValueError(
            f"experiment '{cfg.name}': gradual unfreezing (strategy.unfreeze / freeze_epochs) is not supported with "
            f"{world_size} processes: DDP fixes the trainable parameters when it wraps the model"
        )
    now = apply_strategy_at_epoch(model, cfg.strategy, epoch)
    if epoch not in unfreeze_milestones(cfg.strategy)[0]:
        return None
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"  epoch {epoch + 1}: unfrozen so far: {', '.join(now) or 'nothing'}; {trainable:,}/{total:,} params trainable"


def _lr_multipliers(model: TransferModel, ratio: float | list[float], name: str) -> tuple[list[str], list[float]]:
    """Labels (stem … top stage, head) and the lr multiplier of each."""
    labels = [label for label, _ in backbone_stages(model)] + ["head"]
    if isinstance(ratio, list):
        if len(ratio) != len(labels):
            raise ConfigError(
                f"experiment '{name}': train.lr_ratio has {len(ratio)} values but {type(model.backbone).__name__} has "
                f"{len(labels)} parameter groups ({', '.join(labels)}); give one multiplier per group, stem first"
            )
        return labels, [float(r) for r in ratio]
    n = len(labels) - 1
    return labels, [float(ratio) ** (n - i) for i in range(n)] + [1.0]


def optimizer_param_groups(model: nn.Module, cfg: ExperimentConfig) -> list[nn.Parameter] | list[dict]:
    """What the optimizer is built over.

    Without a schedule and without ``train.lr_ratio``: the trainable parameters (one group). Otherwise
    one group per stage — head first, then the backbone from the top stage down to the stem — each
    with its learning rate (``train.lr`` times the ``lr_ratio`` multiplier) and every parameter that
    trains at *some* epoch of the schedule. Parameters still frozen have ``requires_grad=False`` and
    no gradient, so optimizers skip them and create their state when they start training; the groups
    never change, so a checkpoint's optimizer state always fits.
    """
    milestones, _ = unfreeze_milestones(cfg.strategy)
    ratio = cfg.train.lr_ratio
    if not milestones and ratio is None:
        return [p for p in model.parameters() if p.requires_grad]
    model = _transfer_model(model)
    if milestones:  # everything the last milestone makes trainable, then back to the first epoch's set
        apply_strategy_at_epoch(model, cfg.strategy, max(milestones))
        ever = {id(p) for p in model.parameters() if p.requires_grad}
        apply_strategy_at_epoch(model, cfg.strategy, 0)
    else:
        ever = {id(p) for p in model.parameters() if p.requires_grad}
    stages = backbone_stages(model) + [("head", list(model.head.parameters()))]
    if ratio is not None:
        _, mults = _lr_multipliers(model, ratio, cfg.name)
    else:
        mults = [1.0] * len(stages)
    groups = []
    for (label, ps), mult in reversed(list(zip(stages, mults, strict=True))):
        chosen = [p for p in ps if id(p) in ever]
        if chosen:
            groups.append({"params": chosen, "lr": cfg.train.lr * mult, "name": label})
    covered = {id(p) for g in groups for p in g["params"]}
    if covered != ever:
        raise RuntimeError(f"{len(ever - covered)} trainable parameters belong to no stage group")  # programming error
    return groups


@register_check
def check_strategy_name(cfg: ExperimentConfig) -> None:
    """``strategy.name`` is a registered strategy."""
    try:
        STRATEGIES.get(cfg.strategy.name, "strategy.name")
    except UnknownNameError as e:
        raise cfg.error(str(e)) from None


@register_check
def check_strategy_options(cfg: ExperimentConfig) -> None:
    """``lora`` / ``vpt`` / ``norm_only`` / ``bitfit`` fit the backbone, checked on its structure (no weights) before any data loads."""
    s = cfg.strategy
    if not cfg.uses.model or s.name not in ("lora", "vpt", "norm_only", "bitfit"):
        return
    if s.name == "lora":
        try:
            require_peft()
        except ConfigError as e:
            raise cfg.error(str(e)) from None
        for ok, key, value, why in ((s.alpha > 0, "strategy.alpha", s.alpha, "must be > 0"),
                                    (0 <= s.dropout < 1, "strategy.dropout", s.dropout, "must be in [0, 1)"),
                                    (s.rank >= 1, "strategy.rank", s.rank, "must be >= 1")):
            if not ok:
                raise cfg.error(f"{key}={value!r} {why}")
    if s.name == "vpt" and s.prompts < 1:
        raise cfg.error(f"strategy.prompts={s.prompts!r} must be >= 1")
    if not timm.is_model(cfg.model.backbone):
        return  # the backbone check names it
    skeleton = backbone_skeleton(cfg.model.backbone, cfg.model.image_size)
    arch = type(skeleton).__name__
    try:
        if s.name == "lora":
            lora_targets(skeleton, s.targets, s.rank)
        elif s.name == "vpt":
            check_prompts(skeleton)
        elif s.name == "norm_only" and not any(isinstance(m, NORM_TYPES) and any(True for _ in m.parameters(recurse=False))
                                               for m in skeleton.modules()):
            raise ConfigError(f"strategy.name: norm_only: {arch} has no normalisation layer with affine parameters; use linear_probe")
        elif s.name == "bitfit" and not any(n.rsplit(".", 1)[-1] == "bias" for n, _ in skeleton.named_parameters()):
            raise ConfigError(f"strategy.name: bitfit: {arch} has no bias terms; use linear_probe or norm_only")
    except ConfigError as e:
        raise cfg.error(f"{e} (model.backbone: {cfg.model.backbone})") from None
