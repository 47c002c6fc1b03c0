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

    def check(self, cfg: ExperimentConfig) -> None:
        if cfg.head.type != "linear":
            raise cfg.error(f"head.type={cfg.head.type!r} must be linear for kind: logistic (it fits a linear head)")


KINDS.register("logistic", LogisticKind())
