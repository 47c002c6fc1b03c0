"""``kind: logistic`` — logistic regression (L-BFGS) on the frozen backbone's pooled features.

Multinomial for one label per image; one-vs-rest (a binary logistic regression per class) for ``data.task:
multilabel``. The L2 strength is chosen on the validation split from ``probe.l2`` (``transferlab.engine.probes``) —
by accuracy, or by macro mAP for multi-label data, whose thresholds (``train.threshold``) are then chosen on the
validation probabilities of the chosen classifier. The classifier is folded into an ordinary linear head and saved
as the run's ``best`` checkpoint, so ``load_run(...).load_model()`` gives a usable model.
"""

from __future__ import annotations

import time

import torch

from transferlab.config import ExperimentConfig
from transferlab.config.kinds import KindUses
from transferlab.engine.costs import Cost, Estimate, Part, feature_pass, fmt_seconds
from transferlab.engine.evaluation import evaluate
from transferlab.engine.features import CachedSuffix, CutPoint, FeatureBatches
from transferlab.engine.features.store import FeatureSet
from transferlab.engine.multilabel import evaluate_at_val_thresholds
from transferlab.engine.probes import fit_logistic
from transferlab.files import save_checkpoint
from transferlab.kinds.base import KINDS, Kind, RunContext
from transferlab.kinds.common import probe_inputs, probe_metrics
from transferlab.rundir import RunMetrics

__all__ = ["LogisticKind"]

LBFGS_ITERATIONS_PER_FIT = 25
"""Iterations an L-BFGS fit of the sweep makes, for the estimate: each strength warm-starts from the previous one, so
the fits stop long before ``probe.max_iter``; the runs recorded so far made 15-30 on average (RESULTS §12b's
``lite0_logistic_50``: 449 over 15 strengths; ``auto``'s probes on Lite0-2 and the test backbones: 15-26)."""


class LogisticKind(Kind):
    """L-BFGS logistic probe on frozen pooled features (one-vs-rest for multi-label data); L2 chosen on val."""

    name = "logistic"
    uses = KindUses(features=True, multilabel=True)

    def run(self, cfg: ExperimentConfig, ctx: RunContext) -> RunMetrics:
        inp = probe_inputs(cfg, ctx)
        tr, va, te = (inp.features[s] for s in ("train", "val", "test"))
        device, k = inp.fabric.device, inp.splits.num_classes
        t0 = time.perf_counter()
        res = fit_logistic(tr.features, tr.labels, va.features, va.labels, k, cfg.probe.l2, cfg.probe.max_iter, device)
        linear = inp.model.head[-1]
        with torch.no_grad():
            linear.weight.copy_(res.weight.to(linear.weight))
            linear.bias.copy_(res.bias.to(linear.bias))
        fit_seconds = time.perf_counter() - t0
        suffix = CachedSuffix(inp.model, CutPoint("pooled"))

        def batches(fs: FeatureSet) -> FeatureBatches:
            return FeatureBatches([fs.features], fs.labels, cfg.train.eval_batch_size, device)

        chosen = {"l2": res.l2, res.monitor: res.score}
        if cfg.multilabel:
            test, chosen["threshold_mode"] = evaluate_at_val_thresholds(suffix, batches(va), batches(te), k, device, cfg.train.threshold)
        else:
            test = evaluate(suffix, batches(te), k, device)
        ctx.rundir.write_rows("history.csv", [{"step": float(i + 1), **row} for i, row in enumerate(res.sweep)])
        meta = {"config": cfg.to_dict(), "class_names": inp.splits.class_names, "epoch": 0, "kind": "best", "probe": chosen}
        save_checkpoint(ctx.rundir.checkpoints / "best.safetensors", inp.model.state_dict(), meta)  # a plain TransferModel checkpoint
        trainable = sum(p.numel() for p in inp.model.head.parameters())
        m = probe_metrics(cfg, inp, test, chosen, res.sweep, fit_seconds, trainable)
        score = "mAP" if m.headline == "test_map" else "acc"
        ctx.console.print(
            f"  [green]{cfg.name}[/]: test {score} {getattr(m, m.headline):.4f} (l2 {res.l2:g} chosen on val, val {score} "
            f"{res.score:.4f}), features {inp.pass_seconds:.1f}s, fit {fit_seconds:.1f}s -> {ctx.rundir.path}"
        )
        return m

    def estimate(self, cfg: ExperimentConfig, n_train: int, n_val: int, n_test: int, cost: Cost | None) -> float:
        """Seconds of ``explain``'s estimate."""
        return self.explain(cfg, n_train, n_val, n_test, cost).seconds

    def explain(self, cfg: ExperimentConfig, n_train: int, n_val: int, n_test: int, cost: Cost | None) -> Estimate:
        """The pooled-feature pass over the three splits (shared with the other runs of its cache group, which read it
        from the feature store), then the L2 sweep: one L-BFGS fit per ``probe.l2`` strength of about
        ``LBFGS_ITERATIONS_PER_FIT`` iterations (at most ``probe.max_iter``), each timed on ``n_train`` rows by the probe
        (``cost.lbfgs``). The test pass through the linear head is a matrix product: not counted."""
        if cost is None:
            return Estimate()
        parts = feature_pass(cost.forward, {"train": n_train, "val": n_val, "test": n_test}, self.shares_backbone_pass(cfg))
        if cost.lbfgs is not None:
            fits, iterations, one = len(set(cfg.probe.l2)), min(cfg.probe.max_iter, LBFGS_ITERATIONS_PER_FIT), cost.lbfgs.iteration(n_train)
            seconds = fits * iterations * one
            parts.append(Part(f"L2 sweep: {fits} fits × ~{iterations} L-BFGS iterations at {1000 * one:.1f} ms ({fmt_seconds(seconds)})",
                              seconds))
        return Estimate(tuple(parts))

    def check(self, cfg: ExperimentConfig) -> None:
        if cfg.head.type != "linear":
            raise cfg.error(f"head.type={cfg.head.type!r} must be linear for kind: logistic (it fits a linear head)")


KINDS.register("logistic", LogisticKind())
