"""Truncation: keep a backbone's stem and its first K stages (or everything up to a named module).

Seed report 000 cut a CIFAR-10 ResNet-50 down to ``conv1, bn1, relu, maxpool, layer1, layer2`` and put
a new fully connected layer on its 512 channels. ``truncate_backbone`` does that for any timm
backbone, declaratively::

    model: {backbone: resnet50, truncate: {stages: 2}}        # stem + layer1 + layer2 -> 512 features
    model: {backbone: resnet50, truncate: {after: layer2.2}}  # the seed's exact model (it deleted layer2[3])

How it works, for every architecture alike:

1. ``stages: K`` names a module: the one holding the K-th stage of timm's coarse ``group_matcher``
   (the grouping ``freeze_first: {stages: N}`` uses), e.g. ``layer2`` (ResNet), ``blocks.2``
   (EfficientNet), ``stages.1`` (ConvNeXt).
2. One ``forward_features`` pass on a dummy input, on a copy of the backbone with random weights
   (eval mode, no gradients, its own RNG; random so that e.g. zero-initialised residual branches
   cannot hide a bad cut), records the order modules are called in. Every module first called after the cut module returned, and every
   module holding parameters that the features never used (e.g. ConvNeXt's head norm, VGG's
   ``pre_logits``), is replaced by ``nn.Identity``: its parameters leave the model.
3. The truncated copy's ``forward_features`` must return exactly what the cut module returned in
   the untruncated copy (``torch.equal`` on the dummy input); then the same modules are replaced in
   the backbone itself. A cut inside a residual block (where an
   identity would skip part of the block) fails this check and is refused with the reason.
4. The model keeps its class (a subclass ``Truncated<Class>`` is swapped in), its parameter names,
   ``group_matcher``, ``pretrained_cfg`` and ``feature_info`` (entries past the cut removed), so
   strategies, strict weight loading and checkpoints work unchanged. ``num_features`` becomes the
   width at the cut; ``forward_head`` is global average pooling (plus the backbone's ``drop_rate``
   dropout): the new head sits directly on the cut.
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.config import ConfigError, TruncateConfig


@dataclass
class TruncationReport:
    """What a truncation kept and removed."""

    cut: str
    """Qualified name of the last module kept (the features are its output)."""
    num_features: int
    """Channels (or token width) of the features at the cut."""
    removed_modules: list[str] = field(default_factory=list)
    """Outermost modules replaced by ``nn.Identity``."""
    removed_keys: list[str] = field(default_factory=list)
    """State-dict keys (parameters and buffers) that left the model."""

    def describe(self) -> str:
        return (
            f"truncated after {self.cut!r} ({self.num_features} features); removed "
            f"{len(self.removed_keys)} tensors of {summarize_keys(self.removed_keys)}"
        )


def summarize_keys(keys: list[str], limit: int = 12) -> str:
    """``layer3.*, layer4.*`` for a long list of keys: the shortest module prefixes that cover them."""
    if not keys:
        return "nothing"
    tops: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        top = parts[0] if len(parts) < 3 or not parts[1].isdigit() else ".".join(parts[:2])
        tops[top] = tops.get(top, 0) + 1
    names = [f"{t}.*" if n > 1 or "." in t else t for t, n in tops.items()]
    return ", ".join(names[:limit]) + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def _param_kinds(names: list[str], matcher: Any) -> dict[str, str]:
    """For a timm dict ``group_matcher``: ``core`` (matched a stage pattern), ``appendix`` (merged
    into the previous group, timm's ``MATCH_PREV_GROUP``) or ``unmatched`` (neck/head) per parameter."""
    import re

    from timm.models._manipulate import MATCH_PREV_GROUP

    if not isinstance(matcher, dict):
        return {n: "core" for n in names}
    specs: list[tuple[re.Pattern[str], Any]] = []
    for mspec in matcher.values():
        if mspec is None:
            continue
        for sspec in mspec if isinstance(mspec, (tuple, list)) else [(mspec, None)]:
            specs.append((re.compile(sspec[0]), sspec[1]))
    out = {}
    for n in names:
        kind = "unmatched"
        for rx, suffix in specs:
            if rx.match(n):
                kind = "appendix" if suffix is not None and tuple(suffix) == tuple(MATCH_PREV_GROUP) else "core"
                break
        out[n] = kind
    return out


def stage_groups_labelled(backbone: nn.Module) -> list[tuple[str, list[str], bool]]:
    """timm's coarse parameter groups, stem first: (label, parameter names, is a stage).

    The label is ``stem`` for the first group, else the module holding the group's stage
    parameters (``layer2``, ``blocks.3``), else ``stage <i>``. Parameters timm appends to the last
    stage (EfficientNet's ``conv_head``, ViT's ``norm``) do not count towards its module. A group of
    only unmatched parameters (a neck or head norm, e.g. ConvNeXt's ``head.norm``) is no stage.
    """
    from timm.models import group_parameters

    if not hasattr(backbone, "group_matcher"):
        raise ConfigError(
            f"{type(backbone).__name__} has no timm group_matcher, so its stages are unknown; "
            "use model.truncate.after: <module name> (or freeze_first with children / params)"
        )
    matcher = backbone.group_matcher(coarse=True)
    groups = group_parameters(backbone, matcher)
    ordered = [groups[k] for k in sorted(groups)]
    kinds = _param_kinds([n for g in ordered for n in g], matcher)
    modules = dict(backbone.named_modules())
    out: list[tuple[str, list[str], bool]] = []
    for i, names in enumerate(ordered):
        core = [n for n in names if kinds[n] == "core"]
        path = os.path.commonprefix([n.split(".")[:-1] for n in (core or names)])
        while len(path) > 1:  # blocks.0.0 -> blocks.0 when blocks.0 holds nothing else with parameters
            parent = modules[".".join(path[:-1])]
            siblings = [m for name, m in parent.named_children() if name != path[-1]]
            if any(True for m in siblings for _ in m.parameters()):
                break
            path = path[:-1]
        label = "stem" if i == 0 else (".".join(path) or f"stage {i}")
        out.append((label, names, i > 0 and bool(core)))
    return out


def stage_modules(backbone: nn.Module) -> list[str]:
    """The module holding each stage after the stem, in order (``""`` when no single module does).

    ResNet: ``[layer1, layer2, layer3, layer4]``; EfficientNet: ``[blocks.0, …, blocks.6]``.
    """
    return [label if not label.startswith("stage ") else "" for label, _, is_stage in stage_groups_labelled(backbone) if is_stage]


def _cut_name(backbone: nn.Module, cfg: TruncateConfig) -> str:
    given = {k: v for k, v in (("stages", cfg.stages), ("after", cfg.after)) if v is not None}
    if len(given) != 1:
        raise ConfigError(f"model.truncate needs exactly one of stages / after, got {given or 'none'}")
    arch = type(backbone).__name__
    if cfg.after is not None:
        modules = dict(backbone.named_modules())
        if cfg.after not in modules or cfg.after == "":
            close = difflib.get_close_matches(cfg.after, [n for n in modules if n], n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"model.truncate.after={cfg.after!r}: {arch} has no module of that name{hint}")
        return cfg.after
    stages = stage_modules(backbone)
    k = cfg.stages
    assert k is not None
    if k < 1 or k > len(stages):
        raise ConfigError(
            f"model.truncate.stages={k}: {arch} has {len(stages)} stages after its stem "
            f"({', '.join(s or '?' for s in stages)}); use 1..{len(stages)}"
        )
    name = stages[k - 1]
    if not name:
        raise ConfigError(
            f"model.truncate.stages={k}: stage {k} of {arch} is not a single module; "
            f"use model.truncate.after with one of: {', '.join(s for s in stages if s)}"
        )
    return name


class _TruncatedMixin:
    """Methods of a truncated timm backbone: the features at the cut, pooled by global averaging."""

    truncated_after: str

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool of the cut's features (+ ``drop_rate`` dropout). There is no classifier."""
        fmt = getattr(self, "output_fmt", "NCHW")
        if x.ndim == 4:
            x = x.mean((1, 2)) if str(fmt) == "NHWC" else F.adaptive_avg_pool2d(x, 1).flatten(1)
        elif x.ndim == 3:  # tokens (B, N, C): average the patch tokens, as timm's global_pool='avg'
            x = x[:, int(getattr(self, "num_prefix_tokens", 0)) :].mean(1)
        drop = float(getattr(self, "drop_rate", 0.0) or 0.0)
        if drop:
            x = F.dropout(x, p=drop, training=self.training)  # type: ignore[attr-defined]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # type: ignore[attr-defined]


_CLASSES: dict[type, type] = {}


def _truncated_class(cls: type) -> type:
    if issubclass(cls, _TruncatedMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Truncated{cls.__name__}", (_TruncatedMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def is_truncated(backbone: nn.Module) -> bool:
    """True for a backbone that went through ``truncate_backbone``."""
    return isinstance(backbone, _TruncatedMixin)


def _dummy_input(backbone: nn.Module, input_size: tuple[int, int, int] | None) -> torch.Tensor:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    size = tuple(input_size or cfg.get("input_size") or (3, 224, 224))
    g = torch.Generator().manual_seed(0)  # never touch the global RNG (it seeds the new head's init)
    param = next(backbone.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    return torch.randn((1, *size), generator=g).to(dtype)


def _trace(backbone: nn.Module, cut: str, x: torch.Tensor) -> tuple[list[str], int, Any]:
    """Module names in call order during ``forward_features(x)``, the position where ``cut`` returned, its output."""
    names = {id(m): n for n, m in backbone.named_modules()}
    order: list[str] = []
    found: dict[str, Any] = {}

    def pre(mod: nn.Module, _inp: Any) -> None:
        order.append(names[id(mod)])

    def post(_mod: nn.Module, _inp: Any, out: Any) -> None:
        found.setdefault("exits", []).append(len(order))
        found.setdefault("out", out.detach().clone() if isinstance(out, torch.Tensor) else out)  # later in-place ops must not change it

    modules = dict(backbone.named_modules())
    handles = [m.register_forward_pre_hook(pre) for n, m in modules.items() if n]
    handles.append(modules[cut].register_forward_hook(post))
    try:
        with torch.no_grad():
            backbone.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    arch = type(backbone).__name__
    if "exits" not in found:
        raise ConfigError(f"model.truncate: {arch}.forward_features never calls {cut!r}, so there is nothing to cut after")
    if len(found["exits"]) > 1:
        raise ConfigError(f"model.truncate: {arch} calls {cut!r} {len(found['exits'])} times in forward_features; cut after another module")
    if not isinstance(found["out"], torch.Tensor):
        raise ConfigError(f"model.truncate: {cut!r} of {arch} returns {type(found['out']).__name__}, not a feature tensor")
    return order, found["exits"][0], found["out"]


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _randomized_copy(backbone: nn.Module) -> nn.Module:
    """A deep copy with every parameter redrawn (fixed local seed), in eval mode.

    The structural check must not depend on the weights: timm zero-initialises the last BatchNorm
    of residual blocks, which would make a cut inside a block look exact on a fresh model.
    """
    probe = copy.deepcopy(backbone).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in probe.named_parameters():
            if p.ndim > 1:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return probe


def _replace(model: nn.Module, names: list[str]) -> None:
    modules = dict(model.named_modules())
    for n in names:
        parent_name, _, child = n.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, nn.Identity())


def truncate_backbone(
    backbone: nn.Module, cfg: TruncateConfig, input_size: tuple[int, int, int] | None = None
) -> TruncationReport:
    """Truncate ``backbone`` in place after the module ``cfg`` names (module docstring).

    The cut is traced and verified on a copy with random weights (so the result does not depend on
    the backbone's weights), then applied to ``backbone``. ``input_size`` (C, H, W) is the dummy
    input (default: the backbone's pretrained ``input_size``). Raises ``ConfigError`` naming the
    architecture and the cut when the cut is impossible.
    """
    if is_truncated(backbone):
        raise ConfigError(f"{type(backbone).__name__} is already truncated (after {backbone.truncated_after!r})")  # type: ignore[attr-defined]
    cut = _cut_name(backbone, cfg)
    arch = type(backbone).__name__
    stage_hint = ", ".join(s for s in _safe_stages(backbone) if s) or "a module whose output is the whole chain so far"
    probe = _randomized_copy(backbone)
    x = _dummy_input(backbone, input_size)
    order, exit_pos, ref = _trace(probe, cut, x)

    keep = set(order[:exit_pos]) | {cut}
    for n in list(keep):
        keep.update(_ancestors(n))
    modules = dict(probe.named_modules())

    def has_tensors(m: nn.Module) -> bool:
        return any(True for _ in m.parameters()) or any(True for _ in m.buffers())

    after = set(order[exit_pos:])
    removed: list[str] = []
    for n, m in modules.items():  # outermost first: named_modules yields parents before children
        if n and n not in keep and (n in after or has_tensors(m)) and not any(a in removed for a in _ancestors(n)):
            removed.append(n)
    _replace(probe, removed)
    probe.__class__ = _truncated_class(type(probe))
    try:
        with torch.no_grad():
            out = probe.forward_features(x)
    except Exception as e:  # noqa: BLE001 - report why the cut does not work, whatever broke
        raise ConfigError(
            f"model.truncate: cutting {arch} after {cut!r} breaks its forward_features "
            f"({type(e).__name__}: {e}); cut after a whole stage or block instead, e.g. one of: {stage_hint}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape or not torch.equal(out, ref):
        raise ConfigError(
            f"model.truncate: cutting {arch} after {cut!r} does not give that module's output "
            f"(it sits inside a block whose other paths, e.g. a skip connection, would be cut); "
            f"cut after a whole stage or block instead, e.g. one of: {stage_hint}"
        )
    del probe

    keys_before = list(backbone.state_dict())
    _replace(backbone, removed)
    backbone.__class__ = _truncated_class(type(backbone))
    backbone.truncated_after = cut  # type: ignore[attr-defined]
    fmt = str(getattr(backbone, "output_fmt", "NCHW"))
    width = int(ref.shape[-1] if (ref.ndim == 3 or (ref.ndim == 4 and fmt == "NHWC")) else ref.shape[1])
    backbone.num_features = width  # type: ignore[assignment]
    if hasattr(backbone, "head_hidden_size"):
        backbone.head_hidden_size = width  # type: ignore[assignment]
    info = getattr(backbone, "feature_info", None)
    if isinstance(info, list):
        backbone.feature_info = [f for f in info if isinstance(f, dict) and f.get("module") in keep]  # type: ignore[assignment]
    kept = set(backbone.state_dict())
    return TruncationReport(cut=cut, num_features=width, removed_modules=removed, removed_keys=[k for k in keys_before if k not in kept])


def _safe_stages(backbone: nn.Module) -> list[str]:
    try:
        return stage_modules(backbone)
    except ConfigError:
        return []
