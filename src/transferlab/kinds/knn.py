"""``kind: knn`` — weighted cosine k-NN on the frozen backbone's pooled features (DINO's protocol).

``k`` is chosen on the validation split from ``probe.k``; each neighbour votes with weight
exp(similarity / ``probe.temperature``) (``transferlab.engine.probes``). Nothing is trained. For ``data.task:
multilabel`` the vote is the weighted mean of the neighbours' label vectors (a score per class), ``k`` is chosen by
the validation macro mAP and the thresholds (``train.threshold``) on the validation scores of the chosen ``k``.
"""

from __future__ import annotations

import time

from transferlab.config import ExperimentConfig
from transferlab.config.kinds import KindUses
from transferlab.engine.costs import Cost, Estimate, feature_pass
from transferlab.engine.evaluation import evaluate
from transferlab.engine.features import FeatureBatches
from transferlab.engine.features.store import FeatureSet
from transferlab.engine.multilabel import evaluate_at_val_thresholds
from transferlab.engine.probes import KNNClassifier, fit_knn
from transferlab.kinds.base import KINDS, Kind, RunContext
from transferlab.kinds.common import probe_inputs, probe_metrics
from transferlab.rundir import RunMetrics

__all__ = ["KNNKind"]


class KNNKind(Kind):
    """Weighted cosine k-NN on frozen pooled features (per-class vote shares for multi-label data); k chosen on val."""

    name = "knn"
    uses = KindUses(features=True, multilabel=True)

    def estimate(self, cfg: ExperimentConfig, n_train: int, n_val: int, n_test: int, cost: Cost | None) -> float:
        """Seconds of ``explain``'s estimate."""
        return self.explain(cfg, n_train, n_val, n_test, cost).seconds

    def explain(self, cfg: ExperimentConfig, n_train: int, n_val: int, n_test: int, cost: Cost | None) -> Estimate:
        """The pooled-feature pass over the three splits, shared with the other runs of its cache group (which read it from
        the feature store); choosing ``k`` and the test votes are similarity products over pooled vectors (milliseconds
        in RESULTS §12b), not counted."""
        if cost is None:
            return Estimate()
        return Estimate(tuple(feature_pass(cost.forward, {"train": n_train, "val": n_val, "test": n_test}, self.shares_backbone_pass(cfg))))

    def run(self, cfg: ExperimentConfig, ctx: RunContext) -> RunMetrics:
        inp = probe_inputs(cfg, ctx)
        tr, va, te = (inp.features[s] for s in ("train", "val", "test"))
        device, k = inp.fabric.device, inp.splits.num_classes
        t0 = time.perf_counter()
        res = fit_knn(tr.features, tr.labels, va.features, va.labels, k, cfg.probe.k, cfg.probe.temperature, device)
        classifier = KNNClassifier(tr.features.to(device), tr.labels, res.k, k, cfg.probe.temperature).to(device)
        fit_seconds = time.perf_counter() - t0

        def batches(fs: FeatureSet) -> FeatureBatches:
            return FeatureBatches([fs.features], fs.labels, cfg.train.eval_batch_size, device)

        chosen = {"k": res.k, res.monitor: res.score, "temperature": cfg.probe.temperature}
        if cfg.multilabel:
            test, chosen["threshold_mode"] = evaluate_at_val_thresholds(classifier, batches(va), batches(te), k, device, cfg.train.threshold)
        else:
            test = evaluate(classifier, batches(te), k, device)
        ctx.rundir.write_rows("history.csv", [{"step": float(i + 1), **row} for i, row in enumerate(res.sweep)])
        m = probe_metrics(cfg, inp, test, chosen, res.sweep, fit_seconds, trainable=0)
        score = "mAP" if m.headline == "test_map" else "acc"
        ctx.console.print(
            f"  [green]{cfg.name}[/]: test {score} {getattr(m, m.headline):.4f} (k {res.k} chosen on val, val {score} {res.score:.4f}), "
            f"features {inp.pass_seconds:.1f}s, fit {fit_seconds:.1f}s -> {ctx.rundir.path}"
        )
        return m


KINDS.register("knn", KNNKind())
