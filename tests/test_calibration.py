"""Calibration: ECE / NLL / Brier by their definitions, temperature scaling, the metrics of a run, compare's column."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import transferlab.kinds.train as train_kind
from transferlab.config import ConfigError
from transferlab.engine.calibration import ECE_BINS, ece_from_bins, fit_temperature
from transferlab.engine.evaluation import evaluate
from transferlab.kinds import run_experiment
from transferlab.results.compare import compare
from transferlab.rundir import RunMetrics

QUIET = Console(quiet=True)


def test_ece_nll_and_brier_of_a_hand_built_case_follow_their_definitions():
    probs = torch.tensor([[0.90, 0.05, 0.05], [0.80, 0.10, 0.10], [0.50, 0.30, 0.20], [0.40, 0.35, 0.25],
                          [0.34, 0.33, 0.33], [0.10, 0.85, 0.05]])
    y = torch.tensor([0, 1, 0, 2, 2, 1])
    # by hand from the bin definition: confidence c = max p falls in bin floor(15 c); ECE = sum_b |correct_b - conf_b| / n
    conf, pred = probs.max(1)
    bins: dict[int, list[tuple[float, float]]] = {}
    for c, p, t in zip(conf.tolist(), pred.tolist(), y.tolist(), strict=True):
        bins.setdefault(int(c * ECE_BINS), []).append((c, float(p == t)))
    expected = sum(abs(sum(k for _, k in b) - sum(c for c, _ in b)) for b in bins.values()) / len(y)
    out = evaluate(torch.nn.Identity(), [(probs.log(), y)], 3)  # log-probabilities as logits: softmax gives probs back
    cal = out.calibration
    assert cal.ece == pytest.approx(expected, abs=1e-6)
    assert ece_from_bins(cal.reliability) == pytest.approx(expected, abs=1e-6)
    assert cal.nll == pytest.approx(float(-probs[torch.arange(6), y].log().mean()), abs=1e-6)
    brier = float(((probs - F.one_hot(y, 3)) ** 2).sum(1).mean())
    assert cal.brier == pytest.approx(brier, abs=1e-6)
    assert sum(cal.reliability["count"]) == 6


def test_temperature_scaling_lowers_the_nll_of_an_over_confident_model():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (400,), generator=g)
    logits = torch.randn(400, 5, generator=g) + 1.5 * F.one_hot(y, 5)  # ~ 60-70% right ...
    hot = 8 * logits  # ... but far too sure of itself
    t = fit_temperature(hot, y)
    assert t > 1
    assert F.cross_entropy(hot / t, y) < F.cross_entropy(hot, y)
    scaled = evaluate(torch.nn.Identity(), [(hot, y)], 5, temperature=t)
    assert scaled.calibrated.ece < scaled.calibration.ece and scaled.calibrated.nll < scaled.calibration.nll
    assert scaled.temperature == t


def test_a_tiny_digits_run_records_calibration_and_fits_t_on_val_only(make_cfg, tmp_path, monkeypatch):
    seen = []

    def spy(logits, y, **kw):
        seen.append(len(y))
        return fit_temperature(logits, y, **kw)

    monkeypatch.setattr(train_kind, "fit_temperature", spy)
    cfg = make_cfg(data={"dataset": "digits", "image_size": 8, "val_fraction": 0.1, "train_subset": 300, "test_subset": 200},
                   train={"epochs": 1, "precision": "32-true", "calibrate": "temperature"})
    m = run_experiment(cfg, tmp_path / "study" / "t", console=QUIET)
    assert seen == [m["n_val"]]  # fitted on the validation split, never on test
    assert 0 <= m["test_ece"] <= 1 and 0 <= m["test_brier"] <= 2 and m["temperature"] > 0
    assert m["test_nll"] == pytest.approx(m["test_loss"])
    assert m["test_ece_calibrated"] is not None and m["calibration"]["calibrated"]["fitted_on"] == "val"
    assert sum(m["calibration"]["reliability"]["count"]) == m["n_test"]
    rows = compare(tmp_path / "study", console=QUIET)
    assert rows[0]["test_ece"] == m["test_ece"]
    md = (tmp_path / "study" / "compare.md").read_text()
    assert "| ECE |" in md and f"{m['test_ece']:.3f} → {m['test_ece_calibrated']:.3f}" in md


def test_old_metrics_without_calibration_read_and_show_a_dash(tmp_path):
    old = RunMetrics(experiment="old", kind="train", test_acc=0.5, inference_images_per_s=1.0, train_seconds=1.0).to_dict()
    for key in ("test_ece", "test_nll", "test_brier", "test_ece_calibrated", "temperature"):
        old.pop(key)
    (tmp_path / "s" / "old").mkdir(parents=True)
    (tmp_path / "s" / "old" / "metrics.json").write_text(json.dumps(old))
    assert RunMetrics.from_dict(old).test_ece is None
    compare(tmp_path / "s", console=QUIET)
    assert "| — |" in (tmp_path / "s" / "compare.md").read_text()


@pytest.mark.parametrize("kind", ["logistic", "knn"])
def test_temperature_scaling_with_a_probe_kind_is_an_error_naming_the_key(make_cfg, kind):
    with pytest.raises(ConfigError, match="train.calibrate"):
        make_cfg(kind=kind, train={"calibrate": "temperature"})
    with pytest.raises(ConfigError, match="train.calibrate"):
        make_cfg(train={"calibrate": "platt"})
