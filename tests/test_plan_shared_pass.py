"""``transferlab plan`` counts a cache group's shared feature pass once and says what each estimate assumed (issue 25 §2).

RESULTS §12b: ``lite0_knn_50`` was estimated at 4.5× its measured time, because its features came from the feature store
(``lite0_logistic_50`` of the same cache group had computed them) while the plan charged the pass again. The probe is
replaced by made-up costs (``dryrun._probe``): what is checked is the plan's arithmetic and its words, not a clock.
"""

from __future__ import annotations

import pytest
from rich.console import Console

from transferlab.config import parse_study
from transferlab.engine.costs import Cost, LbfgsCost
from transferlab.study import dryrun
from transferlab.study.dryrun import dry_run, print_plan

DATA = {"dataset": "synthetic", "synthetic_classes": 4, "synthetic_size": 128, "val_fraction": 0.25}
STUDY = {
    "study": "shared",
    "defaults": {"data": DATA, "model": {"backbone": "transferlab_cnn", "weights": "scratch"},
                 "train": {"epochs": 2, "batch_size": 16, "progress": False, "accelerator": "cpu"}},
    "experiments": [
        {"name": "logistic", "kind": "logistic", "probe": {"l2": [0.1, 1.0]}},
        {"name": "knn", "kind": "knn"},
        {"name": "other_data", "kind": "knn", "data": {"synthetic_size": 64}},
        {"name": "fine_tune", "strategy": {"name": "linear_probe", "freeze_epochs": 1}},
    ],
}
FORWARD, BUILD = 0.001, 0.5
COST = Cost(0.01, FORWARD, phase_steps=(0.03,), lbfgs=LbfgsCost(0.002, 0.0))


def _plan(tmp_path, monkeypatch):
    monkeypatch.setattr(dryrun, "_probe", lambda cfg, data: (COST, BUILD))
    return dry_run(parse_study(STUDY), tmp_path / "runs", executor="sequential")


def test_the_second_run_of_a_cache_group_is_not_charged_the_pass(tmp_path, monkeypatch):
    report = _plan(tmp_path, monkeypatch)
    rows = {r.name: r for r in report.rows}
    logistic, knn, other = rows["logistic"], rows["knn"], rows["other_data"]
    assert logistic.cache_group and logistic.cache_group == knn.cache_group != other.cache_group
    images = logistic.data.n_train + logistic.data.n_val + logistic.data.n_test
    start = logistic.data.load_seconds + BUILD
    assert knn.estimate_s == pytest.approx(knn.data.load_seconds + BUILD)  # its features come from the store
    assert "train/val/test features shared with logistic" in knn.assumed
    assert logistic.estimate_s == pytest.approx(images * FORWARD + 2 * 25 * 0.002 + start)  # the pass, and the sweep
    assert "feature pass over" in logistic.assumed and "L2 sweep: 2 fits" in logistic.assumed
    other_images = other.data.n_train + other.data.n_val + other.data.n_test
    assert other.estimate_s == pytest.approx(other_images * FORWARD + other.data.load_seconds + BUILD)  # other images: its own pass


def test_the_plan_prints_what_each_estimate_assumed(tmp_path, monkeypatch):
    report = _plan(tmp_path, monkeypatch)
    assert "1 frozen epoch at" in {r.name: r for r in report.rows}["fine_tune"].assumed
    console = Console(record=True, width=250)
    print_plan(report, console)
    text = console.export_text()
    assert "fine_tune: 1 frozen epoch at" in text and "1 full epoch at" in text and "knn: train/val/test features shared with logistic" in text
    assert report.to_dict()["rows"][1]["assumed"].startswith("train/val/test features shared with logistic")


def test_a_distilled_run_pays_its_teachers_forward_on_every_training_image(tmp_path, monkeypatch):
    """RESULTS §14: a distilled transferlab_cnn_fast took 2x its scratch twin; the plan had counted the student only."""
    teacher_fwd, student_fwd = 0.004, FORWARD
    costs = {"transferlab_cnn": Cost(0.01, teacher_fwd), "transferlab_cnn_fast": Cost(0.01, student_fwd)}
    monkeypatch.setattr(dryrun, "_probe", lambda cfg, data: (costs[cfg.model.backbone], BUILD))
    study = {"study": "kd", "defaults": STUDY["defaults"], "experiments": [
        {"name": "teacher"},
        {"name": "scratch", "model": {"backbone": "transferlab_cnn_fast"}},
        {"name": "student", "model": {"backbone": "transferlab_cnn_fast"}, "train": {"distill": {"teacher": "run:teacher"}}},
    ]}
    rows = {r.name: r for r in dry_run(parse_study(study), tmp_path / "runs", executor="sequential").rows}
    student, scratch = rows["student"], rows["scratch"]
    assert student.estimate_s - scratch.estimate_s == pytest.approx(2 * student.data.n_train * teacher_fwd)
    assert "teacher teacher's forward on 2 × " in student.assumed
