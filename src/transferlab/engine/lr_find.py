"""The learning-rate finder (fastai's ``lr_find``, Lightning's ``Tuner.lr_find``): an exponential lr sweep.

``lr_find`` trains a *deep copy* of the model with a fresh optimizer over the run's real parameter
groups (``strategies.optimizer_param_groups``: per-stage groups and ``lr_ratio`` included) on the
real training batches and loss, raising the lr geometrically from ``start`` to ``end`` one step at
a time. It stops when the loss diverges: non-finite, or the smoothed loss above ``diverge`` × its
best. The original model is never touched (nothing to restore), and the global RNG state is put
back afterwards, so a run with ``train.lr: find`` that found x trains exactly as one with ``lr: x``.
It runs before training, on the model as training would start it — never on a trained model.

The losses are smoothed as fastai's ``Recorder`` does (an EMA with beta = 0.98, bias-corrected), and a
rule picks the suggestion from the smoothed curve, after dropping the first 10% and the last 5 points
(fastai's trim) and every non-finite point:

* ``valley`` (the default, fastai's): the longest strictly descending run of the loss (longest decreasing
  subsequence), and the lr about two thirds of the way down it — bold, but inside the descent;
* ``steepest``: the lr where d(loss)/d(log lr) is most negative.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.config import ConfigError, ExperimentConfig, choice_message, register_check
from transferlab.config.schema import LrFindConfig
from transferlab.engine.mixup import make_mixup
from transferlab.engine.optim import make_optimizer
from transferlab.files import write_bytes, write_csv, write_json
from transferlab.registry import Registry
from transferlab.strategies import optimizer_param_groups

__all__ = ["LR_RULES", "LrFindResult", "lr_find", "lr_find_png", "resolved", "save_lr_find", "smooth", "steepest", "suggest", "valley"]

SMOOTH_BETA = 0.98
"""fastai's loss smoothing: an exponential moving average with this beta, bias-corrected."""

LR_RULES: Registry[Callable[[np.ndarray, np.ndarray], int]] = Registry("lr-finder rule", "train.lr_find.rule: how the lr is picked")


@LR_RULES.register("valley")
def valley(lrs: np.ndarray, losses: np.ndarray) -> int:
    """fastai's ``valley``: index ~2/3 down the longest strictly decreasing subsequence of ``losses``."""
    n = len(losses)
    lds = [1] * n  # longest decreasing subsequence ending at i
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
        if lds[max_end] < lds[i]:
            max_end, max_start = i, i - lds[i]
    sections = (max_end - max_start) / 3
    return min(max_start + int(sections) + int(sections / 2), n - 1)


@LR_RULES.register("steepest")
def steepest(lrs: np.ndarray, losses: np.ndarray) -> int:
    """Index of the most negative slope of ``losses`` against log lr (fastai's ``steep``)."""
    grads = np.diff(losses) / np.diff(np.log(lrs))
    return int(np.argmin(grads))


def smooth(losses: list[float], beta: float = SMOOTH_BETA) -> list[float]:
    """fastai's smoothed loss: EMA with ``beta``, divided by 1 - beta^(i+1); a non-finite loss stays non-finite."""
    out, avg, k = [], 0.0, 0
    for loss in losses:
        if not math.isfinite(loss):
            out.append(float("nan"))
            continue
        k += 1
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**k))
    return out


def suggest(lrs: list[float], smoothed: list[float], rule: str = "valley") -> float:
    """The lr the registered ``rule`` picks from the smoothed curve (fastai's trim; NaN / inf points ignored)."""
    n = len(lrs)
    lo, hi = (n // 10, n - 5) if n >= 20 else (0, n)  # fastai: drop the first 10% and the last 5 points
    pts = [(lr, s) for lr, s in zip(lrs[lo:hi], smoothed[lo:hi], strict=True) if math.isfinite(s) and lr > 0]
    if len(pts) < 3:
        raise ValueError(f"the LR finder has only {len(pts)} finite points to suggest from; lower train.lr_find.start or raise steps")
    x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    return float(x[LR_RULES.get(rule)(x, y)])


@dataclass
class LrFindResult:
    """The sweep: lr and loss per step (raw and smoothed), why it stopped, and the suggested lr."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    rule: str
    stopped: str
    """``end`` (the sweep reached ``end``) or ``diverged`` (the loss exploded) — the last points show it."""
    settings: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, float]]:
        points = zip(self.lrs, self.losses, self.smoothed, strict=True)
        return [{"step": i + 1, "lr": lr, "loss": loss, "smoothed": s} for i, (lr, loss, s) in enumerate(points)]

    def record(self) -> dict[str, Any]:
        """What ``lr_find.json`` and ``metrics.json`` (``lr_find``) keep: the suggestion, the rule, the sweep's extent."""
        return {"suggestion": self.suggestion, "rule": self.rule, "stopped": self.stopped, "steps_run": len(self.lrs), **self.settings}


@contextlib.contextmanager
def _private_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed every generator for the sweep and put the caller's states back afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def lr_find(
    model: torch.nn.Module,
    train: Any,
    cfg: ExperimentConfig,
    criterion: torch.nn.Module,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> LrFindResult:
    """Sweep the lr on a copy of ``model`` over the training batches ``train`` (``cfg.train.lr_find`` says how).

    ``model`` is what ``fit`` would train (strategy applied); ``criterion`` the run's loss. Deterministic
    for ``cfg.seed``; the model, its gradients and the global RNG states are as they were afterwards.
    """
    lf = cfg.train.lr_find
    probe = copy.deepcopy(model).to(device)  # the sweep trains this copy; the original is never touched
    unit = replace(cfg, train=replace(cfg.train, lr=1.0))  # group lrs = their multipliers of train.lr
    groups = optimizer_param_groups(probe, unit)
    if isinstance(groups[0], dict):
        mults = [g["lr"] for g in groups]
    else:
        groups, mults = [{"params": groups}], [1.0]
    optimizer = make_optimizer(groups, replace(cfg.train, lr=lf.start))
    mix = make_mixup(cfg.train.mixup, getattr(probe, "num_classes", 0), cfg.seed)
    lrs, losses, best, stopped = [], [], math.inf, "end"
    ratio = (lf.end / lf.start) ** (1 / (lf.steps - 1))
    with _private_rng(cfg.seed, device):
        probe.train()
        epoch = 0
        while len(lrs) < lf.steps and stopped == "end":
            train.set_epoch(epoch)
            for x, y in train:
                lr = lf.start * ratio ** len(lrs)
                for g, m in zip(optimizer.param_groups, mults, strict=True):
                    g["lr"] = lr * m
                x, target, _ = mix(x, y) if mix is not None else (x, y, y)
                with autocast():
                    loss = criterion(probe(x), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.train.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(probe.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                lrs.append(lr)
                losses.append(float(loss.detach()))  # one host sync per step: the stop decision needs it
                s = smooth(losses)[-1]
                best = min(best, s) if math.isfinite(s) else best
                if not math.isfinite(s) or s > lf.diverge * best:
                    stopped = "diverged"
                    break
                if len(lrs) >= lf.steps:
                    break
            epoch += 1
    smoothed = smooth(losses)
    settings = {"start": lf.start, "end": lf.end, "steps": lf.steps, "diverge": lf.diverge, "group_multipliers": mults}
    return LrFindResult(lrs, losses, smoothed, suggest(lrs, smoothed, lf.rule), lf.rule, stopped, settings)


def save_lr_find(result: LrFindResult, folder: str | Path, title: str = "") -> dict[str, str]:
    """Write ``lr_find.csv`` (step, lr, loss, smoothed), ``lr_find.json`` (the record) and ``lr_find.png`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "lr_find.csv", result.rows())
    write_json(folder / "lr_find.json", result.record())
    write_bytes(folder / "lr_find.png", lr_find_png(result, title))
    return {k: str(folder / f"lr_find.{k}") for k in ("csv", "json", "png")}


def lr_find_png(result: LrFindResult, title: str = "") -> bytes:
    """The loss (raw, faint; smoothed) against the lr on a log axis, the suggestion marked."""
    import io

    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed")
    ax.axvline(result.suggestion, color="C3", ls="--", label=f"{result.rule}: {result.suggestion:.2e}")
    finite = [s for s in result.smoothed if math.isfinite(s)]
    if finite:  # the divergence at the end would squash the curve
        lo, hi = min(finite), min(max(finite), 4 * min(finite) + 1e-12)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-12), hi + 0.1 * (hi - lo + 1e-12))
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="training loss", title=title or "LR finder")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


@register_check
def check_lr_find(cfg: ExperimentConfig) -> None:
    """``train.lr_find.rule`` is a registered rule."""
    rule = cfg.train.lr_find.rule
    if rule not in LR_RULES.names():
        raise cfg.error(choice_message("train.lr_find.rule", rule, LR_RULES.names()))


def resolved(cfg: ExperimentConfig, lr: float) -> ExperimentConfig:
    """``cfg`` with ``train.lr: find`` resolved to ``lr`` (also recorded as ``train.lr_find.found``)."""
    if not lr > 0:
        raise ConfigError(f"experiment '{cfg.name}': the LR finder found lr={lr!r}")  # programming error guard
    lf: LrFindConfig = replace(cfg.train.lr_find, found=float(lr))
    return replace(cfg, train=replace(cfg.train, lr=float(lr), lr_find=lf))
