"""The plan's cost probe (``engine.costs``) and the run agree on the feature-cache path (issue 25 §2).

``benchmarks/plan_accuracy.py`` found the plan assuming a cached backbone pass for runs whose cache was refused (dropout
inside the backbone, a strategy that unfreezes) and full steps for a run that cached a frozen prefix. The probe now
asks the engine's own decision; these tests check it against what real runs then did (``metrics.json``'s
``feature_cache``), not against a copy of the rule.
"""

from __future__ import annotations

import dataclasses

import pytest

from transferlab.engine.costs import measure_cost
from transferlab.kinds import run_experiment
from transferlab.models import build_model
from transferlab.strategies import apply_strategy


def _probe(cfg):
    model, _ = build_model(dataclasses.replace(cfg.model, weights="scratch"), cfg.head, cfg.data.synthetic_classes)
    apply_strategy(model, cfg.strategy)
    return measure_cost(model, cfg, 32, cfg.data.synthetic_classes, train=True, cached=True)


@pytest.mark.parametrize(
    ("backbone", "strategy"),
    [
        ("test_resnet", {"name": "linear_probe"}),  # a fixed frozen backbone: the run caches it
        ("transferlab_cnn_deep", {"name": "linear_probe"}),  # dropout inside the blocks: the prefix is random in training
        ("test_resnet", {"name": "linear_probe", "freeze_epochs": 1}),  # unfreezes after an epoch: no cache
        ("test_resnet", {"name": "finetune"}),  # nothing frozen
    ],
)
def test_probe_predicts_the_runs_cache_decision(make_cfg, tmp_path, backbone, strategy):
    cfg = make_cfg(model={"backbone": backbone, "weights": "scratch"}, strategy=strategy, data={"image_size": 32})
    cost = _probe(cfg)
    metrics = run_experiment(cfg, tmp_path / "run")
    used = (metrics.get("feature_cache") or {}).get("used", False)
    assert (cost.cached is not None) == used, (cost.cached, metrics.get("feature_cache"))
    if used:
        assert cost.cached.cut == metrics["feature_cache"]["cut"]
        # the part after the cut is cheaper to train than the whole model, and the pass is cheaper than a step per image
        assert cost.cached.suffix_step < cost.step


def test_cached_costs_only_when_asked(make_cfg):
    cfg = make_cfg(model={"backbone": "test_resnet", "weights": "scratch"}, strategy={"name": "linear_probe"}, data={"image_size": 32})
    model, _ = build_model(cfg.model, cfg.head, 4)
    apply_strategy(model, cfg.strategy)
    assert measure_cost(model, cfg, 32, 4, train=True).cached is None  # auto's probes do not pay for it
