"""LoRA adapters (through HF ``peft``, the ``peft`` extra) on a backbone's Linear and Conv2d layers.

``lora_targets`` resolves ``strategy.targets`` to module names — ``auto`` from the per-architecture
table (``transferlab.models.archs``: attention and MLP projections of transformer blocks, the
convolutions of CNN stages), or a list of name patterns — and checks the rank against every layer.
``add_lora`` injects the adapters with peft's ``inject_adapter_in_model`` (the targeted layers become
``peft.tuners.lora`` layers: ``…qkv.base_layer.weight`` plus ``…qkv.lora_A.default.weight`` /
``lora_B``); ``merge_lora`` folds them back into plain layers with the original state-dict keys, which
is what exports, ``load_run`` and predictions use.

A pattern selects a module when it equals its name, is a suffix of it at a dot (``qkv`` selects
``blocks.0.attn.qkv``) or matches it as a glob (``layer4.*.conv2``); a pattern that selects a container
(``blocks.11``) selects the Linear / Conv2d layers inside it. Grouped (depthwise) convolutions take no
LoRA (peft cannot merge them) and are never selected.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.util

import torch
from torch import nn

from transferlab.config import ConfigError, StrategyConfig
from transferlab.models.archs import arch_meta
from transferlab.models.model import BN_TYPES, TransferModel
from transferlab.models.prompts import add_prompts, has_prompts
from transferlab.models.truncate import stage_groups_labelled

__all__ = ["PEFT_INSTALL", "add_lora", "add_strategy_modules", "adaptable_layers", "has_lora", "load_trainable_state", "lora_layers",
           "lora_targets", "max_rank", "merge_adapters", "merge_lora", "require_peft", "trainable_state_dict"]

PEFT_INSTALL = "pip install 'transferlab[peft]'"


def require_peft(key: str = "strategy.name") -> None:
    """Fail before any work when the ``peft`` extra is missing, naming the install command."""
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"{key}: lora needs HF peft, which is not installed: {PEFT_INSTALL}")


def adaptable_layers(backbone: nn.Module) -> dict[str, nn.Module]:
    """The backbone's layers LoRA can adapt: ``nn.Linear`` and ungrouped ``nn.Conv2d``, by qualified name."""
    return {
        name: m for name, m in backbone.named_modules()
        if name and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)) and not _is_lora_part(name)
    }


def _is_lora_part(name: str) -> bool:
    parts = name.split(".")
    return any(p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout", "base_layer") for p in parts)


def max_rank(layer: nn.Module) -> int:
    """The largest useful LoRA rank of ``layer``: min(fan-in, fan-out) of its weight matrix."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return min(layer.in_channels * kh * kw, layer.out_channels)
    return min(layer.in_features, layer.out_features)  # type: ignore[arg-type]


def _selects(pattern: str, name: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def _select(pattern: str, names: list[str], all_modules: list[str]) -> list[str]:
    """The adaptable ``names`` that ``pattern`` selects, directly or through a container it selects."""
    direct = [n for n in names if _selects(pattern, n)]
    containers = [m for m in all_modules if m not in names and _selects(pattern, m)]
    inside = [n for n in names if any(n.startswith(c + ".") for c in containers)]
    return sorted(set(direct) | set(inside), key=names.index)


def _short(names: list[str]) -> list[str]:
    """Distinct layer names with block indices folded: ``blocks.*.attn.qkv``."""
    out: list[str] = []
    for n in names:
        folded = ".".join("*" if p.isdigit() else p for p in n.split("."))
        if folded not in out:
            out.append(folded)
    return out


def _auto(backbone: nn.Module, layers: dict[str, nn.Module], rank: int) -> list[str]:
    names = list(layers)
    patterns = arch_meta(backbone).lora_targets
    if patterns is not None:
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    else:  # no table entry: the layers of timm's stages (not the stem, not the neck)
        try:
            groups = stage_groups_labelled(backbone)
        except ConfigError:
            groups = []
        in_stages = {p.rsplit(".", 1)[0] for _, params, is_stage in groups if is_stage for p in params}
        chosen = [n for n in names if n in in_stages]
    return [n for n in chosen if max_rank(layers[n]) >= rank]  # auto leaves out the layers narrower than the rank


def lora_targets(backbone: nn.Module, targets: str | list[str], rank: int) -> list[str]:
    """The module names LoRA adapts for ``strategy.targets`` / ``strategy.rank``; ``ConfigError`` naming the key otherwise."""
    arch = type(backbone).__name__
    if rank < 1:
        raise ConfigError(f"strategy.rank={rank} must be >= 1")
    layers = adaptable_layers(backbone)
    names = list(layers)
    if not names:
        raise ConfigError(f"strategy.name: lora found no Linear or ungrouped Conv2d layer in {arch} to adapt; use bitfit or norm_only")
    if targets == "auto":
        chosen = _auto(backbone, layers, rank)
        if not chosen:
            widest = max(names, key=lambda n: max_rank(layers[n]))
            raise ConfigError(
                f"strategy.targets=auto: no layer of {arch} takes rank {rank} (the widest, {widest}, allows up to "
                f"{max_rank(layers[widest])}); lower strategy.rank or list strategy.targets"
            )
        return chosen
    if isinstance(targets, str):
        raise ConfigError(f"strategy.targets={targets!r} must be 'auto' or a list of layer-name patterns")
    if not targets:
        raise ConfigError("strategy.targets=[] selects no layer; use 'auto' or list layer-name patterns")
    all_modules = [n for n, _ in backbone.named_modules() if n]
    chosen: list[str] = []
    for i, pattern in enumerate(targets):
        found = _select(pattern, names, all_modules)
        if not found:
            short = _short(names)
            leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
            close = difflib.get_close_matches(pattern, leaves + short, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            grouped = [n for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and _selects(pattern, n)]
            why = f"selects only grouped (depthwise) convolutions, which take no LoRA ({', '.join(grouped[:3])})" if grouped else \
                f"matches no Linear or Conv2d layer of {arch}"
            listed = ", ".join(short[:30]) + (", …" if len(short) > 30 else "")
            raise ConfigError(f"strategy.targets[{i}]={pattern!r} {why}{hint}; layers it could match: {listed}")
        chosen += [n for n in found if n not in chosen]
    too_narrow = [n for n in chosen if max_rank(layers[n]) < rank]
    if too_narrow:
        n = too_narrow[0]
        raise ConfigError(
            f"strategy.rank={rank} is larger than layer {n} of {arch} allows (up to {max_rank(layers[n])}: min of its fan-in and "
            f"fan-out){f' and {len(too_narrow) - 1} more' if len(too_narrow) > 1 else ''}; lower the rank or leave it out of strategy.targets"
        )
    return chosen


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers injected into ``module``, by qualified name."""
    if importlib.util.find_spec("peft") is None or not any(name.endswith(".lora_A") for name, _ in module.named_modules()):
        return {}  # no adapters: peft (slow to import) is not needed
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def has_lora(module: nn.Module) -> bool:
    """True when ``module`` holds LoRA adapters."""
    return bool(lora_layers(module))


def add_lora(backbone: nn.Module, names: list[str], rank: int, alpha: float, dropout: float) -> None:
    """Inject LoRA adapters (peft) into the ``names`` layers of ``backbone``, in place.

    lora_A is initialised like peft does (Kaiming-uniform, from torch's global RNG), lora_B at zero, so
    the adapted backbone computes exactly what it did before training.
    """
    require_peft()
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(names), bias="none")
    inject_adapter_in_model(config, backbone)
    if hasattr(backbone, "peft_config"):  # peft leaves its config on the module; nothing of ours reads it
        del backbone.peft_config


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter of ``module`` into its base layer and put the plain layer back, in place.

    Afterwards the state-dict keys are the original architecture's (``…qkv.weight``), so the module loads
    and exports like a fine-tuned one. Returns the number of layers merged.
    """
    layers = lora_layers(module)
    for name, layer in layers.items():
        layer.merge(safe_merge=True)
        base = layer.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, base)
    return len(layers)


# --------------------------------------------------------------------------------------------
# modules a strategy adds (LoRA adapters, prompts): rebuilding, merging, the small state


def add_strategy_modules(model: TransferModel, cfg: StrategyConfig) -> TransferModel:
    """Add the modules strategy ``cfg`` puts into the backbone (LoRA adapters, VPT prompts), without changing what trains.

    Idempotent. Call it on a freshly built model before loading a checkpoint of a ``lora`` / ``vpt`` run
    (its keys include the adapters / prompts); ``apply_strategy`` calls it itself. Other strategies add nothing.
    """
    if cfg.name == "lora" and not has_lora(model.backbone):
        add_lora(model.backbone, lora_targets(model.backbone, cfg.targets, cfg.rank), cfg.rank, cfg.alpha, cfg.dropout)
    elif cfg.name == "vpt" and not has_prompts(model.backbone):
        add_prompts(model.backbone, cfg.prompts, cfg.deep)
    return model


def merge_adapters(model: TransferModel) -> TransferModel:
    """Fold LoRA adapters into the layers they adapt, in place: the plain architecture with merged weights.

    What exports, ``load_run(...).load_model()`` and predictions of a ``lora`` run use: the state-dict keys
    are the backbone's own again and the outputs are the adapted model's (up to float rounding). VPT
    prompts are part of the computation and stay. A model without adapters is returned unchanged.
    """
    merge_lora(model.backbone)
    return model


def trainable_state_dict(model: TransferModel) -> dict[str, torch.Tensor]:
    """The part of ``model``'s state a strategy changes: trainable parameters and the tensors of BatchNorm layers not frozen.

    With the starting weights it reproduces the model (``load_trainable_state`` reads it back). The run's own
    checkpoints of ``lora``, ``vpt``, ``bitfit``, ``norm_only``, ``bn_only`` and ``linear_probe`` are adapter-only in the
    same sense, keeping every buffer too (``transferlab.models.weights.FrozenPart``).
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    live_bn = {n for n, m in model.named_modules() if isinstance(m, BN_TYPES) and n not in model.frozen_bn}
    return {k: v for k, v in model.state_dict().items() if k in trainable or k.rpartition(".")[0] in live_bn}


def load_trainable_state(model: TransferModel, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load a ``trainable_state_dict`` into ``model`` (built with the same starting weights and strategy applied), strictly."""
    expected = trainable_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ConfigError(f"{source} does not fit this model's trainable part: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                          f"shapes {shapes[:4]}")
    model.load_state_dict(state, strict=False)
