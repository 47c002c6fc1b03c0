"""The plan's cost probe (``engine.costs``) and the run agree on the feature-cache path (issue 25 §2).

``benchmarks/plan_accuracy.py`` found the plan assuming a cached backbone pass for runs whose cache was refused (dropout
inside the backbone, a strategy that unfreezes) and full steps for a run that cached a frozen prefix. The probe now
asks the engine's own decision; these tests check it against what real runs then did (``metrics.json``'s
``feature_cache``), not against a copy of the rule. The probe also times a step per phase of a trainability schedule
(checked against the trainable sets the run records), extrapolates large batches from two timed sizes, and times the
logistic probe's L-BFGS iteration; a stand-in for the timed step (the parameters it updates) keeps the clock out.
"""

from __future__ import annotations

import dataclasses

import pytest

from transferlab.engine import costs
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


# --------------------------------------------------------------------------------------------
# what the probe times: a step per phase of a trainability schedule, large batches from two sizes, the L-BFGS iteration


def _trainable_count(net, opt, x, y, precision, warmup):
    """A stand-in for the timed step: the number of parameters the step would update (no clock, no noise)."""
    return float(sum(p.numel() for g in opt.param_groups for p in g["params"] if p.requires_grad))


def _built(cfg, classes=4):
    model, _ = build_model(cfg.model, cfg.head, classes)
    apply_strategy(model, cfg.strategy)
    return model


def test_the_probe_times_each_phase_with_its_trainable_set_and_gives_the_model_back_frozen(make_cfg, monkeypatch):
    monkeypatch.setattr(costs, "_fastest_step", _trainable_count)
    cfg = make_cfg(strategy={"name": "linear_probe", "freeze_epochs": 1})
    model = _built(cfg)
    head = sum(p.numel() for p in model.head.parameters())
    cost = measure_cost(model, cfg, 32, 4, train=True)
    assert cost.step == head and cost.phase_steps == (sum(p.numel() for p in model.parameters()),)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == head  # the first epoch's set again
    gradual = make_cfg(strategy={"name": "linear_probe", "unfreeze": {"at_epochs": [1, 2], "stages_per_step": 1}}, train={"epochs": 3})
    cost = measure_cost(_built(gradual), gradual, 32, 4, train=True)
    assert len(cost.phase_steps) == 2 and cost.step < cost.phase_steps[0] < cost.phase_steps[1]
    assert measure_cost(_built(make_cfg()), make_cfg(), 32, 4, train=True).phase_steps == ()  # no schedule, one step


def test_the_probes_phases_train_what_the_run_trains(make_cfg, monkeypatch, tmp_path):
    cfg = make_cfg(strategy={"name": "linear_probe", "freeze_epochs": 1})
    metrics = run_experiment(cfg, tmp_path / "run")  # records the first epoch's trainable set
    monkeypatch.setattr(costs, "_fastest_step", _trainable_count)
    cost = measure_cost(_built(cfg), cfg, 32, 4, train=True)
    assert cost.step == metrics["trainable_params"] and cost.phase_steps == (metrics["total_params"],)


def test_a_batch_larger_than_the_probe_is_extrapolated_from_two_timed_sizes(make_cfg, monkeypatch):
    monkeypatch.setattr(costs, "_fastest_step", lambda net, opt, x, y, precision, warmup: 0.010 + 0.001 * len(x))
    cfg = make_cfg(model={"backbone": "test_resnet", "weights": "scratch"}, strategy={"name": "linear_probe"}, data={"image_size": 32},
                   train={"batch_size": 128})
    cost = measure_cost(_built(cfg), cfg, 32, 4, train=True, cached=True)
    assert cost.step == pytest.approx(0.010 + 0.128)  # a proportional scaling of the 32-image step would say 0.168
    assert cost.cached is not None and cost.cached.suffix_step == pytest.approx(0.138)


def test_kinds_on_pooled_features_get_the_logistic_iteration(make_cfg):
    cfg = make_cfg(kind="logistic")
    cost = measure_cost(_built(cfg), cfg, 32, 4, train=False)
    assert cost.step is None and cost.lbfgs is not None
    assert cost.lbfgs.fixed >= 0 and cost.lbfgs.per_row >= 0 and cost.lbfgs.iteration(1000) > 0
    assert measure_cost(_built(make_cfg()), make_cfg(), 32, 4, train=True).lbfgs is None  # the loop trains no L-BFGS
