"""Cut analysis: where a network can be cut so that the part before the cut is a fixed function.

Cut points, deepest first:

* ``pooled``   — the backbone's pooled features (``forward_head(pre_logits=True)``); only the head trains;
* ``features`` — the backbone's unpooled ``forward_features`` output; its pooling (and
  ``model.drop_rate`` dropout, which timm applies inside the pooling head) runs live;
* ``after:<piece>`` — stage cuts for architectures whose ``forward_features`` is a plain sequence of
  pieces (``transferlab.models.archs``): stem + the first stages.

A cut is usable only when the part before it (the modules a forward pass actually calls, found with
hooks) has no trainable parameter, no BatchNorm in training mode, and gives the same output twice in
training mode under different random seeds (no active dropout / drop-path). The check is made on the
model as the strategy left it, and nothing is updated while checking.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from transferlab.models.archs import Pieces, sequential_pieces
from transferlab.models.model import TransferModel

__all__ = ["CutCheck", "CutPoint", "check_cut", "check_pieces", "cut_points", "prefix_parameters"]


def _run_pieces(pieces: Pieces, x: torch.Tensor) -> torch.Tensor:
    for _, modules in pieces:
        for m in modules:
            x = m(x)
    return x


@dataclass(frozen=True)
class CutPoint:
    """Where the network is cut: the frozen prefix before it is cached, the suffix after it trains.

    ``name`` is ``pooled``, ``features`` or ``after:<piece>``; ``pieces`` is the number of sequential
    pieces (``sequential_pieces``) in the prefix of a stage cut.
    """

    name: str
    pieces: int | None = None

    def prefix(self, model: TransferModel, x: torch.Tensor) -> torch.Tensor:
        """Input images -> what is cached."""
        if self.name == "pooled":
            return model.forward_head(model.forward_features(x), pre_logits=True)
        if self.name == "features":
            return model.forward_features(x)
        seq = sequential_pieces(model.backbone)
        assert seq is not None and self.pieces is not None
        return _run_pieces(seq[: self.pieces], x)

    def suffix(self, model: TransferModel, f: torch.Tensor) -> torch.Tensor:
        """Cached features -> logits (the part that trains)."""
        if self.name == "pooled":
            return model.head(f)
        if self.name == "features":
            return model.forward_head(f)
        seq = sequential_pieces(model.backbone)
        assert seq is not None and self.pieces is not None
        return model.forward_head(_run_pieces(seq[self.pieces :], f))


def cut_points(model: TransferModel) -> list[CutPoint]:
    """Candidate cuts, deepest first: pooled (unless the head takes the feature map, e.g. ``conv``), features,
    then every stage cut (stem + N stages)."""
    cuts = [CutPoint("pooled")] if getattr(model, "head_input", "pooled") == "pooled" else []
    cuts.append(CutPoint("features"))
    seq = sequential_pieces(model.backbone)
    if seq:
        cuts += [CutPoint(f"after:{seq[k - 1][0]}", k) for k in range(len(seq) - 1, 0, -1)]
    return cuts


def _called_modules(model: nn.Module, fn: Callable[[], Any]) -> list[str]:
    """Qualified names of the modules that ``fn()`` calls (forward pre-hooks), in call order."""
    called: list[str] = []
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: called.append(name)))
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(called))


def _params_of(model: TransferModel, cut: CutPoint, called: list[str]) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) used by the prefix: those of the modules it calls, plus — for the pooled and
    features cuts — the backbone's own direct parameters (e.g. a ViT's position embedding)."""
    modules = dict(model.named_modules())
    names = list(called)
    if cut.pieces is None and "backbone" not in names:
        names.append("backbone")
    return [(f"{n}.{pn}" if n else pn, p) for n in names for pn, p in modules[n].named_parameters(recurse=False)]


def _is_stochastic(m: nn.Module) -> bool:
    p = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "drop_prob", None)
    return m.training and isinstance(p, (int, float)) and p > 0


@dataclass
class CutCheck:
    """The verdict on one cut point: usable or not (and why), and what the cache will hold."""

    cut: CutPoint
    ok: bool
    reason: str = ""
    mode_free: bool = True
    """Training-mode and eval-mode prefix outputs agree, so one (eval-mode) cache serves both."""
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    flops_share: float | None = None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def check_cut(model: TransferModel, cut: CutPoint, sample: torch.Tensor, autocast: Any = contextlib.nullcontext) -> CutCheck:
    """Is the part of ``model`` before ``cut`` a fixed function while the model trains?

    ``sample`` is a small batch of real, preprocessed images. The model's train/eval mode is restored.
    Nothing is updated: the prefix runs in training mode only once no BatchNorm in it can update.
    """
    was_training = model.training
    modules = dict(model.named_modules())
    try:
        model.eval()
        with torch.inference_mode(), autocast():
            called = _called_modules(model, lambda: cut.prefix(model, sample))
        if not called:
            return CutCheck(cut, False, "the prefix calls no module")
        trainable = [name for name, p in _params_of(model, cut, called) if p.requires_grad]
        if trainable:
            more = f" and {len(trainable) - 1} more" if len(trainable) > 1 else ""
            return CutCheck(cut, False, f"parameters before the cut train ({trainable[0]}{more})")
        model.train()
        bn_train = [
            n for n in called
            if (isinstance(modules[n], nn.modules.batchnorm._BatchNorm) and modules[n].training)
            or (isinstance(modules[n], nn.modules.instancenorm._InstanceNorm) and modules[n].training and modules[n].track_running_stats)
        ]
        if bn_train:
            return CutCheck(cut, False, f"BatchNorm before the cut is in training mode ({', '.join(bn_train[:3])})")
        devices = [sample.device] if sample.device.type == "cuda" else []
        outs = []
        with torch.inference_mode(), autocast():
            for seed in (1, 2):
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    outs.append(cut.prefix(model, sample))
        if not _close(outs[0], outs[1]):
            random_modules = [n for n in called if _is_stochastic(modules[n])]
            which = f" ({', '.join(random_modules[:3])})" if random_modules else " (functional dropout, e.g. model.drop_rate > 0)"
            return CutCheck(cut, False, f"the prefix is random in training mode: active dropout / drop-path{which}")
        model.eval()
        with torch.inference_mode(), autocast():
            eval_out = cut.prefix(model, sample)
            flops_share = _flops_share(model, cut, sample)
        mode_free = _close(outs[0], eval_out)
        return CutCheck(cut, True, "", mode_free, tuple(eval_out.shape[1:]), eval_out.dtype, flops_share)
    finally:
        model.train(was_training)


def _flops_share(model: TransferModel, cut: CutPoint, sample: torch.Tensor) -> float | None:
    """FLOPs of the prefix / FLOPs of the whole forward pass (torch's FlopCounterMode), on ``sample``."""
    try:
        with FlopCounterMode(display=False) as fc:
            cut.prefix(model, sample)
        prefix = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            model(sample)
        total = fc.get_total_flops()
    except Exception:  # noqa: BLE001 - an op the counter cannot handle: no estimate, not an error
        return None
    return prefix / total if total else None


def check_pieces(model: TransferModel, sample: torch.Tensor) -> str | None:
    """Why the stage cuts cannot be trusted for this model (pieces ≠ ``forward_features``), or None."""
    seq = sequential_pieces(model.backbone)
    if seq is None:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ok = _close(_run_pieces(seq, sample), model.forward_features(sample))
    finally:
        model.train(was_training)
    return None if ok else f"{type(model.backbone).__name__}.forward_features is not the sequence of its stages"



def prefix_parameters(model: TransferModel, cut: CutPoint, sample: torch.Tensor) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every module the prefix calls."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            called = _called_modules(model, lambda: cut.prefix(model, sample))
    finally:
        model.train(was_training)
    return _params_of(model, cut, called)
