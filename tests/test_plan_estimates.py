"""What ``transferlab plan`` estimates a run costs, from measured step times (issue 25 §2): the arithmetic and the decisions.

The misses of ``benchmarks/RESULTS.md`` §12b: ``strategy.freeze_epochs`` trains everything after its frozen epochs (the
estimate timed only the frozen phase), the logistic probe's L2 sweep was not counted, and a ``knn`` run whose features
another run of its cache group had computed was charged the whole pass again. The measured costs here are made up
(``Cost(...)``): these tests check how an estimate is composed from them and what it says it assumed, never a wall
time (machines are noisy; ``benchmarks/plan_accuracy.py`` measures the estimates against real runs).
"""

from __future__ import annotations

import math

import pytest

from transferlab.engine.costs import CachedCost, Cost, Estimate, LbfgsCost, Part, count_shared_once, feature_pass, scale_to_batch
from transferlab.kinds import KINDS
from transferlab.kinds.logistic import LBFGS_ITERATIONS_PER_FIT

N_TRAIN, N_VAL, N_TEST = 1000, 200, 500


def _explain(cfg, cost: Cost) -> Estimate:
    est = KINDS.get(cfg.kind).explain(cfg, N_TRAIN, N_VAL, N_TEST, cost)
    assert KINDS.get(cfg.kind).estimate(cfg, N_TRAIN, N_VAL, N_TEST, cost) == pytest.approx(est.seconds)  # one arithmetic
    return est


# --------------------------------------------------------------------------------------------
# trainability schedules: one step per phase


def test_freeze_epochs_costs_the_frozen_epochs_then_the_full_ones(make_cfg):
    cfg = make_cfg(strategy={"name": "linear_probe", "freeze_epochs": 1}, train={"epochs": 8, "batch_size": 64})
    frozen, full, forward = 0.02, 0.09, 0.001
    est = _explain(cfg, Cost(frozen, forward, phase_steps=(full,)))
    steps, val, test = math.ceil(N_TRAIN / 64), N_VAL * forward, N_TEST * forward
    assert est.seconds == pytest.approx(1 * (steps * frozen + val) + 7 * (steps * full + val) + test)
    text = est.describe()
    assert "1 frozen epoch at" in text and "7 full epochs at" in text and f"test pass over {N_TEST} images" in text


def test_gradual_unfreezing_costs_every_epoch_at_the_step_of_its_phase(make_cfg):
    strategy = {"name": "linear_probe", "unfreeze": {"at_epochs": [1, 3], "stages_per_step": 1}}
    cfg = make_cfg(strategy=strategy, train={"epochs": 5, "batch_size": 100})
    est = _explain(cfg, Cost(0.01, 0.0, phase_steps=(0.02, 0.05)))
    # epoch 0 frozen, epochs 1-2 after the first milestone, epochs 3-4 after the second
    assert est.seconds == pytest.approx(10 * (1 * 0.01 + 2 * 0.02 + 2 * 0.05))
    assert "1 frozen epoch" in est.describe() and "2 unfreeze-step-1 epochs" in est.describe()


def test_a_cost_measured_without_the_schedules_steps_keeps_one_step(make_cfg):
    cfg = make_cfg(strategy={"name": "linear_probe", "freeze_epochs": 1}, train={"epochs": 3, "batch_size": 100})
    # a Cost measured without the schedule's steps (``transferlab auto`` builds its own): every epoch at ``step``, as before
    assert _explain(cfg, Cost(0.01, 0.0)).seconds == pytest.approx(3 * 10 * 0.01)


def test_lp_ft_costs_one_backbone_pass_then_full_epochs(make_cfg):
    cfg = make_cfg(strategy={"name": "lp_ft", "probe_epochs": 2}, train={"epochs": 5, "batch_size": 100})
    est = _explain(cfg, Cost(0.1, 0.001))
    assert est.seconds == pytest.approx((N_TRAIN + N_VAL) * 0.001 + 3 * (10 * 0.1 + N_VAL * 0.001) + N_TEST * 0.001)
    assert "lp_ft: 2 epochs of the head on one backbone pass" in est.describe()


# --------------------------------------------------------------------------------------------
# the feature-cache path, and which passes a cache group shares


def test_a_cached_linear_probe_marks_its_pooled_pass_as_shared(make_cfg):
    cfg = make_cfg(strategy={"name": "linear_probe"}, train={"epochs": 5, "batch_size": 100})
    c = CachedCost("pooled", prefix_forward=0.002, suffix_step=0.001, suffix_forward=0.0001)
    est = _explain(cfg, Cost(0.05, 0.003, cached=c))
    assert est.seconds == pytest.approx((N_TRAIN + N_VAL) * 0.002 + 5 * (10 * 0.001 + N_VAL * 0.0001) + N_TEST * 0.003)
    assert {p.shared for p in est.parts if p.shared} == {"train", "val"}  # the test split is evaluated through the model


def test_a_stage_cut_and_an_augmented_cache_share_nothing(make_cfg):
    c = CachedCost("after:blocks.2", prefix_forward=0.002, suffix_step=0.03, suffix_forward=0.001)
    cfg = make_cfg(strategy={"name": "freeze_first", "stages": 1}, train={"epochs": 3, "batch_size": 100})
    est = _explain(cfg, Cost(0.05, 0.003, cached=c))
    assert est.seconds == pytest.approx((N_TRAIN + N_VAL) * 0.002 + 3 * (10 * 0.03 + N_VAL * 0.001) + N_TEST * 0.003)
    assert not any(p.shared for p in est.parts) and "prefix pass to after:blocks.2 over 1000 train + 200 val images" in est.describe()
    cfg = make_cfg(strategy={"name": "linear_probe"}, data={"augment": ["flip"]}, train={"epochs": 3, "batch_size": 100, "cache_views": 4})
    est = _explain(cfg, Cost(0.05, 0.003, cached=CachedCost("pooled", 0.002, 0.001, 0.0001)))
    assert not any(p.shared for p in est.parts) and "4000 train" in est.describe()


def test_the_logistic_sweep_is_counted_from_the_measured_iteration(make_cfg):
    cfg = make_cfg(kind="logistic", probe={"l2": [1e-3, 1e-2, 1e-1, 1e-2]}, train={"epochs": 1})
    lbfgs = LbfgsCost(fixed=0.002, per_row=1e-6)
    est = _explain(cfg, Cost(None, 0.001, lbfgs=lbfgs))
    sweep = 3 * LBFGS_ITERATIONS_PER_FIT * (0.002 + 1e-6 * N_TRAIN)  # three distinct strengths
    assert est.seconds == pytest.approx((N_TRAIN + N_VAL + N_TEST) * 0.001 + sweep)
    assert "L2 sweep: 3 fits" in est.describe()
    few = make_cfg(kind="logistic", probe={"l2": [1.0], "max_iter": 5}, train={"epochs": 1})
    assert _explain(few, Cost(None, 0.0, lbfgs=lbfgs)).seconds == pytest.approx(5 * (0.002 + 1e-6 * N_TRAIN))  # capped by max_iter
    assert _explain(cfg, Cost(None, 0.001)).seconds == pytest.approx((N_TRAIN + N_VAL + N_TEST) * 0.001)  # not measured: the pass


def test_knn_and_fewshot_cost_their_pass(make_cfg):
    knn = _explain(make_cfg(kind="knn", train={"epochs": 1}), Cost(None, 0.001))
    assert knn.seconds == pytest.approx((N_TRAIN + N_VAL + N_TEST) * 0.001)
    assert [p.shared for p in knn.parts] == ["train", "val", "test"]
    fewshot = make_cfg(kind="fewshot", fewshot={"split": "val", "ways": 2, "shots": 1, "queries": 1, "episodes": 4})
    est = _explain(fewshot, Cost(None, 0.001))
    assert est.seconds == pytest.approx(N_VAL * 0.001) and [p.shared for p in est.parts] == ["val"]


def test_count_shared_once_charges_the_first_run_of_a_group_for_each_split():
    probe = Estimate((*feature_pass(0.001, {"train": 500, "val": 100, "test": 2000}, shared=True), Part("L2 sweep", 1.0)))
    head = Estimate((*feature_pass(0.001, {"train": 500, "val": 100}, shared=True), Part("30 epochs on cached pooled features", 1.2),
                     Part("test pass over 2000 images", 2.0)))
    alone = Estimate(tuple(feature_pass(0.001, {"train": 500}, shared=True)))
    runs = [("logistic", "A", probe), ("knn", "A", Estimate(tuple(feature_pass(0.001, {"train": 500, "val": 100, "test": 2000}, True)))),
            ("mlp_head", "A", head), ("other_group", "B", probe), ("no_group", "", alone), ("no_group_2", "", alone)]
    logistic, knn, mlp, other, lone, lone2 = count_shared_once(runs)
    assert logistic.seconds == pytest.approx(2.6 + 1.0) and other.seconds == pytest.approx(2.6 + 1.0)  # each group pays once
    assert knn.seconds == 0.0 and "train/val/test features shared with logistic" in knn.describe()
    assert mlp.seconds == pytest.approx(1.2 + 2.0) and "train/val features shared with logistic" in mlp.describe()
    assert lone.seconds == lone2.seconds == pytest.approx(0.5)  # no group: nothing is shared
    assert "feature pass over 500 train + 100 val + 2000 test images" in logistic.describe()


def test_a_group_whose_first_run_passes_over_fewer_splits_leaves_the_rest_to_the_next():
    head = Estimate(tuple(feature_pass(0.001, {"train": 500, "val": 100}, shared=True)))
    probe = Estimate(tuple(feature_pass(0.001, {"train": 500, "val": 100, "test": 2000}, shared=True)))
    _, probe_after = count_shared_once([("mlp_head", "A", head), ("logistic", "A", probe)])
    assert probe_after.seconds == pytest.approx(2.0)  # only the test split is new
    assert "2000 test images" in probe_after.describe() and "train/val features shared with mlp_head" in probe_after.describe()


# --------------------------------------------------------------------------------------------
# batch-size extrapolation of the probe


def test_scale_to_batch_follows_the_line_through_two_timings():
    # 10 ms fixed + 1 ms per image, timed at 16 and 32 images
    assert scale_to_batch(0.026, 16, 0.042, 32, 128) == pytest.approx(0.010 + 0.128)
    assert scale_to_batch(0.026, 16, 0.042, 32, 32) == pytest.approx(0.042)  # no larger than timed: as timed
    assert scale_to_batch(0.026, 16, 0.042, 32, 8) == pytest.approx(0.042 * 8 / 32)


@pytest.mark.parametrize(("t_small", "t_large"), [(0.05, 0.04), (0.05, 0.05), (0.01, 0.042)])
def test_scale_to_batch_falls_back_to_proportional_when_the_timings_do_not_fit_a_line(t_small, t_large):
    # the smaller batch slower or as slow (noise), or a negative fixed part: proportional to the larger timing
    assert scale_to_batch(t_small, 16, t_large, 32, 128) == pytest.approx(t_large * 4)
