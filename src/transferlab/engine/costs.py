"""What one training step and one image of inference cost on this machine: the measurement behind ``transferlab plan``.

The probe runs the real model (random weights: the cost does not depend on them) on random images of the run's size,
with the run's own optimiser and parameter groups (``engine.optim``), loss and precision (``engine.precision``) — the
pieces the training loop uses — so what it times is what an epoch repeats. The first steps pay one-off costs
(allocation, oneDNN's kernel choice) and are not timed; the fastest of the timed steps counts, because other
processes' bursts only ever add time. Large batches are timed at ``PROBE_MAX_BATCH`` and ``PROBE_MIN_BATCH`` and
extrapolated along the line through both (``scale_to_batch``): a step has a part that does not grow with the batch
(the optimiser's update, autocast's weight casts, one dispatch per layer), which a proportional scaling multiplies.

A strategy whose trainable set changes during training (``strategy.freeze_epochs``, ``strategy.unfreeze``) has a
step per phase of its schedule (``Cost.phase_steps``). Kinds that classify pooled features get the seconds of one
L-BFGS iteration of the logistic probe (``Cost.lbfgs``). What a run costs is then the kind's arithmetic on these
(``Kind.estimate``), as an ``Estimate``: its parts, each saying what it assumed, and which of them is a feature pass
other runs of a cache group reuse (``count_shared_once``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.config import ExperimentConfig, unfreeze_milestones
from transferlab.engine.features.cached import CachedSuffix, plan_cut, setting_rules_out
from transferlab.engine.features.cuts import CutPoint
from transferlab.engine.optim import make_optimizer, param_groups
from transferlab.engine.precision import AUTO, auto_precision, autocast_for
from transferlab.engine.probes import fit_logistic
from transferlab.models.model import TransferModel
from transferlab.strategies import apply_strategy_at_epoch

__all__ = [
    "PROBE_MAX_BATCH", "PROBE_MIN_BATCH", "PROBE_STEPS", "PROBE_WARMUP", "CachedCost", "Cost", "Estimate", "LbfgsCost", "Part",
    "count_shared_once", "feature_pass", "fmt_seconds", "measure_cost", "scale_to_batch",
]

PROBE_WARMUP = 2
PROBE_STEPS = 3
"""Timed training steps per probe (after ``PROBE_WARMUP`` untimed ones); the fastest counts."""
ONE_PROCESS = SimpleNamespace(world_size=1)
"""What the feature cache's settings check reads of a Fabric: a plan is made for one process."""
PROBE_MAX_BATCH = 32
"""Probes run at min(batch, this): a 256-image batch of ResNet-152 at 224 px would take a minute here."""
PROBE_MIN_BATCH = 16
"""The second batch size timed when the run's batch is larger than ``PROBE_MAX_BATCH`` (``scale_to_batch``)."""
LBFGS_ROWS = (256, 2048)
"""Rows of the two synthetic logistic fits timed: an iteration's fixed part (Python, line search) and its part per row."""
LBFGS_PROBE_ITERATIONS = 10
"""Iterations of each timed fit (its seconds divided by the iterations it made give one iteration)."""


# --------------------------------------------------------------------------------------------
# what was measured


@dataclass(frozen=True)
class CachedCost:
    """The feature-cache path (``engine.features``) of a run whose frozen prefix would be cached: one pass of the prefix
    over the training and validation images, then every epoch on the cached features."""

    cut: str
    """The cut the run would cache at (``pooled``, ``features``, ``after:<piece>``) — the engine's own choice."""
    prefix_forward: float
    """Seconds per image of the prefix (the one pass)."""
    suffix_step: float
    """Seconds per training step at the run's batch size, on cached features."""
    suffix_forward: float
    """Seconds per image of evaluating the suffix on cached features (validation)."""


@dataclass(frozen=True)
class LbfgsCost:
    """One L-BFGS iteration of the logistic probe (``engine.probes.fit_logistic``) on the model's pooled features:
    ``fixed + per_row * rows`` seconds (two synthetic fits, ``LBFGS_ROWS``)."""

    fixed: float
    per_row: float

    def iteration(self, rows: int) -> float:
        return self.fixed + self.per_row * rows


@dataclass(frozen=True)
class Cost:
    """Measured seconds: one training step at the run's batch size (``None``: nothing trains) and one image of inference;
    ``cached``: the feature-cache path's costs when the run would train on cached features (else ``None``);
    ``phase_steps``: with a trainability schedule, the step after each of its milestones (``unfreeze_milestones``), in
    order (``step`` is the one before the first); ``lbfgs``: the logistic probe's iteration, for kinds on pooled features."""

    step: float | None
    forward: float
    cached: CachedCost | None = None
    phase_steps: tuple[float, ...] = ()
    lbfgs: LbfgsCost | None = None


# --------------------------------------------------------------------------------------------
# what a run is estimated to cost, and why


@dataclass(frozen=True)
class Part:
    """A piece of a run's estimate: seconds and what was assumed (``what``, e.g. ``1 frozen epoch at 0.8 s``).

    ``shared`` names the split of a pooled-feature pass that other runs of the same cache group reuse (the feature
    store's key is the backbone, its weights and the images, not the run); ``reused_from`` is set when the plan counted
    that pass for an earlier run of the group (``count_shared_once``) and this part costs nothing."""

    what: str
    seconds: float
    shared: str = ""
    reused_from: str = ""


@dataclass(frozen=True)
class Estimate:
    """A run's estimate (``Kind.explain``): its parts, in the order the run pays them."""

    parts: tuple[Part, ...] = ()

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.parts)

    def describe(self) -> str:
        """What the estimate assumed, for the plan: the feature pass (per split) in one phrase, then the other parts."""
        paid = [p for p in self.parts if p.shared and not p.reused_from]
        reused: dict[str, list[str]] = {}
        for p in self.parts:
            if p.reused_from:
                reused.setdefault(p.reused_from, []).append(p.shared)
        words = []
        if paid:
            words.append(f"feature pass over {' + '.join(p.what for p in paid)} images ({fmt_seconds(sum(p.seconds for p in paid))})")
        words += [f"{'/'.join(splits)} features shared with {run}" for run, splits in reused.items()]
        words += [p.what for p in self.parts if not p.shared and p.what]
        return "; ".join(words)


def feature_pass(per_image: float, images: dict[str, int], shared: bool, what: str = "feature pass") -> list[Part]:
    """The parts of a pass of the frozen prefix over the named splits (``{"train": 500, ...}``). ``shared`` (the pooled
    features of the feature store, which other runs of a cache group read): one part per split, so that runs whose
    passes overlap in part (a probe's train/val/test, a cached linear probe's train/val) share what they share;
    otherwise one part."""
    images = {split: n for split, n in images.items() if n}
    if shared:
        return [Part(f"{n} {split}", n * per_image, split) for split, n in images.items()]
    total = sum(images.values())
    if not total:
        return []
    splits = " + ".join(f"{n} {split}" for split, n in images.items())
    return [Part(f"{what} over {splits} images ({fmt_seconds(total * per_image)})", total * per_image)]


def count_shared_once(runs: Sequence[tuple[str, str, Estimate]]) -> list[Estimate]:
    """The estimates of ``runs`` — (run name, cache group, estimate), in the order the plan runs them — with every shared
    feature pass counted for the first run of its group that makes it, and as reused (0 s) for the later ones, which
    read it from the feature store. An empty group shares nothing."""
    paid: dict[tuple[str, str], str] = {}  # (group, split) -> the run that computes that pass
    out = []
    for name, group, est in runs:
        parts = []
        for p in est.parts:
            owner = paid.setdefault((group, p.shared), name) if group and p.shared else name
            parts.append(p if owner == name else replace(p, seconds=0.0, reused_from=owner))
        out.append(Estimate(tuple(parts)))
    return out


def fmt_seconds(s: float) -> str:
    """``0.81 s``, ``12.3 s``, ``4.1 min``: what the plan prints for a part."""
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def scale_to_batch(t_small: float, n_small: int, t_large: float, n_large: int, n: int) -> float:
    """Seconds at batch ``n`` from timings at two smaller batches: the line through both (a fixed part plus a part per
    image). When the timings do not fit that shape (noise: the smaller batch no cheaper per image, or the fixed part
    negative or larger than the whole), the proportional scaling of the larger timing, which is never below it."""
    proportional = t_large * n / n_large
    if n <= n_large or n_large <= n_small:
        return proportional
    per_image = (t_large - t_small) / (n_large - n_small)
    fixed = t_large - per_image * n_large
    if per_image <= 0 or not 0 <= fixed <= t_large:
        return proportional
    return fixed + per_image * n


# --------------------------------------------------------------------------------------------
# the probe


def measure_cost(model: TransferModel, cfg: ExperimentConfig, side: int, classes: int, train: bool, cached: bool = False) -> Cost:
    """Time ``model`` (its strategy applied) as run ``cfg`` would use it on ``side``-px images of ``classes`` classes, on
    the CPU in the run's precision; ``train``: also a training step (the kind trains), and one per phase of a trainability
    schedule; ``cached``: also the feature-cache path when the cache would take the run (the same decision the run makes:
    ``engine.features.plan_cut``). Kinds on pooled features (``cfg.uses.features``) also get the logistic probe's
    L-BFGS iteration. The model is left with its strategy's first-epoch trainable set."""
    batch = min(cfg.train.batch_size, PROBE_MAX_BATCH)
    x = torch.randn(batch, model.preprocess().in_chans, side, side)
    if cfg.model.channels_last:  # as the real batches come (data.batches): a layout conversion per layer would be timed otherwise
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))
    precision = cfg.train.precision if cfg.train.precision != AUTO else auto_precision("cpu")[0]  # as the run resolves it
    trains = train and any(p.requires_grad for p in model.parameters())
    step = _step_seconds(model, model, cfg, x, y, precision) if trains else None
    forward = _forward_seconds(model, x, precision)
    cached_cost = _cached_cost(model, cfg, x, y, precision) if trains and cached else None
    phases = _phase_steps(model, cfg, x, y, precision) if trains else ()
    lbfgs = _lbfgs_cost(model, x, classes, precision) if cfg.uses.features else None
    return Cost(step, forward, cached_cost, phases, lbfgs)


def _step_seconds(model: TransferModel, net: nn.Module, cfg: ExperimentConfig, x: torch.Tensor, y: torch.Tensor, precision: str,
                  epoch: int | None = None) -> float:
    """Seconds of one training step of ``net`` (the model, or its part after a cut) at the run's batch size, with the
    run's optimiser over ``model``'s parameter groups; ``epoch``: with the trainable set of that epoch of the strategy's
    schedule. Larger batches than ``x``'s: timed at two sizes and extrapolated (``scale_to_batch``)."""
    opt = make_optimizer(param_groups(model, cfg), cfg.train)  # a schedule's groups: built first, they reset epoch 0's set
    if epoch is not None:
        apply_strategy_at_epoch(model, cfg.strategy, epoch)
    model.train()
    large = _fastest_step(net, opt, x, y, precision, PROBE_WARMUP)
    if cfg.train.batch_size <= len(x):
        return large * cfg.train.batch_size / len(x)
    small = _fastest_step(net, opt, x[:PROBE_MIN_BATCH], y[:PROBE_MIN_BATCH], precision, 1)  # new shapes: one untimed step
    return scale_to_batch(small, PROBE_MIN_BATCH, large, len(x), cfg.train.batch_size)


def _fastest_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, precision: str, warmup: int) -> float:
    """The fastest of ``PROBE_STEPS`` timed training steps on ``(x, y)``, after ``warmup`` untimed ones."""
    times = []
    for _ in range(warmup + PROBE_STEPS):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast_for(precision, "cpu"):
            loss = F.cross_entropy(net(x).float(), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return min(times[warmup:])


def _phase_steps(model: TransferModel, cfg: ExperimentConfig, x: torch.Tensor, y: torch.Tensor, precision: str) -> tuple[float, ...]:
    """The training step after each milestone of the strategy's trainability schedule (none without one): the frozen part
    the first epochs skip in the backward pass trains from then on. The model goes back to its first-epoch set."""
    milestones, _ = unfreeze_milestones(cfg.strategy)
    if not milestones:
        return ()
    try:
        return tuple(_step_seconds(model, model, cfg, x, y, precision, epoch=m) for m in milestones)
    finally:
        apply_strategy_at_epoch(model, cfg.strategy, 0)


def _forward_seconds(net: Callable[[torch.Tensor], torch.Tensor] | nn.Module, x: torch.Tensor, precision: str,
                     model: nn.Module | None = None) -> float:
    """Seconds per image of ``net(x)`` in eval mode under inference mode (the fastest of two, after one untimed)."""
    (model or net).eval()  # type: ignore[union-attr]
    with torch.inference_mode(), autocast_for(precision, "cpu"):
        net(x)
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            net(x)
            best = min(best, (time.perf_counter() - t) / len(x))
    return best


def _cached_cost(model: TransferModel, cfg: ExperimentConfig, x: torch.Tensor, y: torch.Tensor, precision: str) -> CachedCost | None:
    """The feature-cache path's costs, when the run's settings and its model let the cache take it (else ``None``).

    The decision is the engine's (``setting_rules_out`` on the settings, ``plan_cut`` on the model: dropout in the
    prefix, BatchNorm that would update, a prefix too cheap to be worth it, ...); only the memory limit, which depends
    on the split sizes, is left to the run."""
    if setting_rules_out(cfg, ONE_PROCESS) is not None:  # the plan runs in one process; DDP runs cache nothing
        return None
    check = plan_cut(model, x[:4], lambda: autocast_for(precision, "cpu"), cfg.train.cache == "on", [])
    if check is None:
        return None
    prefix_forward = _forward_seconds(lambda t: check.cut.prefix(model, t), x, precision, model)
    with torch.inference_mode(), autocast_for(precision, "cpu"):
        features = check.cut.prefix(model, x)
    features = features.clone()  # out of inference mode: the suffix trains on it
    suffix = CachedSuffix(model, check.cut)
    suffix_step = _step_seconds(model, suffix, cfg, features, y, precision)
    suffix_forward = _forward_seconds(suffix, features, precision, model)
    return CachedCost(check.cut.name, prefix_forward, suffix_step, suffix_forward)


def _lbfgs_cost(model: TransferModel, x: torch.Tensor, classes: int, precision: str) -> LbfgsCost:
    """One iteration of ``fit_logistic`` on features of the model's pooled width, timed at the two sizes of
    ``LBFGS_ROWS`` with ``LBFGS_PROBE_ITERATIONS`` iterations each. The features are overlapping class clusters, so
    the fits do not converge before the iterations are spent (a converged fit would time nothing)."""
    model.eval()
    with torch.inference_mode(), autocast_for(precision, "cpu"):
        width = CutPoint("pooled").prefix(model, x[:2]).flatten(1).shape[1]
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, width, generator=g)
    seconds = []
    for rows in LBFGS_ROWS:
        y = torch.arange(rows) % classes
        feats = centres[y] + 3 * torch.randn(rows, width, generator=g)
        res = fit_logistic(feats, y, feats[:classes], y[:classes], classes, [1e-4], LBFGS_PROBE_ITERATIONS)
        row = res.sweep[0]
        seconds.append(row["seconds"] / max(1.0, row["iterations"]))
    (n0, n1), (t0, t1) = LBFGS_ROWS, seconds
    per_row = max(0.0, (t1 - t0) / (n1 - n0))
    return LbfgsCost(max(0.0, t1 - per_row * n1), per_row)
