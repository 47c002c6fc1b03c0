"""The LR finder: a sweep on a copy (the model untouched), deterministic, the rules, ``train.lr: find`` in a run, the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console

from transferlab.cli import main
from transferlab.config import ConfigError
from transferlab.data.batches import make_batches
from transferlab.data.prepare import prepare_splits
from transferlab.engine.losses import make_loss
from transferlab.engine.lr_find import lr_find, smooth, steepest, suggest, valley
from transferlab.kinds import run_experiment
from transferlab.kinds.common import batch_kwargs
from transferlab.models.model import build_model
from transferlab.results.report import build_report
from transferlab.strategies import apply_strategy, optimizer_param_groups

QUIET = Console(quiet=True)
FAST = {"precision": "32-true", "progress": False, "accelerator": "cpu"}


def _setup(cfg):
    torch.manual_seed(cfg.seed)
    splits = prepare_splits(cfg.data, cfg.seed)
    model, _ = build_model(cfg.model, cfg.head, splits.num_classes)
    apply_strategy(model, cfg.strategy)
    train = make_batches(splits, "train", cfg.train.batch_size, shuffle=True, augment=cfg.data.augment, seed=cfg.seed,
                         **batch_kwargs(model, cfg, torch.device("cpu")))
    return model, train, make_loss(cfg, splits.class_names, splits.train_y)


def test_sweep_leaves_the_model_and_the_rng_untouched_and_is_deterministic(make_cfg):
    cfg = make_cfg(train={**FAST, "lr": "find", "lr_find": {"steps": 12, "start": 1e-4, "end": 1.0}})
    model, train, loss = _setup(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    a = lr_find(model, train, cfg, loss, torch.device("cpu"))
    b = lr_find(model, train, cfg, loss, torch.device("cpu"))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical, BatchNorm buffers included
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert a.losses == b.losses and a.suggestion == b.suggestion
    assert len(a.lrs) == 12 and a.lrs[0] == pytest.approx(1e-4) and a.lrs[-1] == pytest.approx(1.0)
    assert a.lrs[0] <= a.suggestion <= a.lrs[-1]


def test_the_sweep_uses_the_strategys_groups_with_lr_ratio(make_cfg):
    cfg = make_cfg(train={**FAST, "lr": "find", "lr_ratio": 0.5, "lr_find": {"steps": 10}})
    model, train, loss = _setup(cfg)
    result = lr_find(model, train, cfg, loss, torch.device("cpu"))
    unit = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1.0))
    expected = [g["lr"] for g in optimizer_param_groups(model, unit)]
    assert result.settings["group_multipliers"] == expected and len(set(expected)) > 1  # head 1, stages 0.5, 0.25, ...


def test_a_diverging_sweep_stops_early(make_cfg):
    cfg = make_cfg(train={**FAST, "lr": "find", "optimizer": "sgd", "lr_find": {"steps": 60, "start": 1e-2, "end": 1e6}})
    model, train, loss = _setup(cfg)
    result = lr_find(model, train, cfg, loss, torch.device("cpu"))
    assert result.stopped == "diverged" and len(result.lrs) < 60
    last = result.smoothed[-1]
    assert not math.isfinite(last) or last > 4 * min(s for s in result.smoothed if math.isfinite(s))


def test_rules_on_a_hand_made_curve_and_nan_points_are_ignored():
    lrs = np.geomspace(1e-5, 1.0, 40)
    losses = np.concatenate([np.full(10, 2.0), np.linspace(2.0, 0.5, 20), np.linspace(0.6, 3.0, 10)])
    # steepest: the largest drop per log-lr step, as computed from the definition
    grads = np.diff(losses) / np.diff(np.log(lrs))
    assert steepest(lrs, losses) == int(np.argmin(grads))
    i = valley(lrs, losses)
    assert 10 <= i < 30  # inside the descent
    with_nan = list(losses)
    with_nan[35] = float("nan")  # in the trimmed tail region and beyond: must not break the suggestion
    with_nan[33] = float("inf")
    s = suggest(list(lrs), with_nan, "valley")
    assert math.isfinite(s) and lrs[10] <= s <= lrs[29]
    assert smooth([1.0, float("nan"), 1.0])[1] != smooth([1.0, float("nan"), 1.0])[1]  # NaN stays NaN (not averaged in)


@pytest.mark.parametrize(("train", "message"), [
    ({"lr_find": {"rule": "valey"}}, "did you mean 'valley'"),
    ({"lr_find": {"end": 1e-8}}, "train.lr_find.end"),
    ({"lr_find": {"steps": 3}}, "train.lr_find.steps"),
])
def test_bad_lr_find_settings_name_the_key(make_cfg, train, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(train=train)


@pytest.mark.parametrize("kind", ["logistic", "knn", "fewshot"])
def test_lr_find_with_a_probe_kind_is_an_error_naming_the_key(make_cfg, kind):
    with pytest.raises(ConfigError, match=r"train\.lr='find' applies to kind: train only"):
        make_cfg(kind=kind, train={"lr": "find"})


def test_lr_find_in_a_run_records_the_resolved_lr_and_resume_matches_it(make_cfg, tmp_path):
    cfg = make_cfg(train={**FAST, "epochs": 1, "lr": "find", "lr_find": {"steps": 15, "start": 1e-4, "end": 1.0}})
    run = tmp_path / "study" / "t"
    m = run_experiment(cfg, run, console=QUIET)
    found = m["lr_find"]["suggestion"]
    recorded = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert recorded["lr"] == found and recorded["lr_find"]["found"] == found
    assert json.loads((run / "checkpoints" / "last.json").read_text())["config"]["train"]["lr"] == found
    rows = list(csv.DictReader((run / "lr_find.csv").open()))
    assert len(rows) == 15 and (run / "lr_find.png").stat().st_size > 0
    assert run_experiment(cfg, run, resume=True, console=QUIET) == m  # lr: find matches the recorded number
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr_find=dataclasses.replace(cfg.train.lr_find, rule="steepest")))
    with pytest.raises(Exception, match="train.lr_find.rule"):
        run_experiment(changed, run, resume=True, console=QUIET)  # another rule is a real change
    html = build_report(tmp_path / "study").html_path.read_text()
    assert "LR finder curve of t" in html


def test_a_found_lr_trains_exactly_as_the_same_lr_set_by_hand(make_cfg, tmp_path):
    cfg = make_cfg(train={**FAST, "epochs": 1, "lr": "find", "lr_find": {"steps": 10}})
    found = run_experiment(cfg, tmp_path / "find", console=QUIET)
    by_hand = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=found["lr_find"]["suggestion"]))
    fixed = run_experiment(by_hand, tmp_path / "fixed", console=QUIET)
    assert found["test_loss"] == fixed["test_loss"]  # the sweep consumed no global randomness


def test_lr_find_cli_writes_the_curve_and_suggestion(tmp_path, capsys):
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "study": "s",
        "defaults": {"data": {"dataset": "synthetic", "synthetic_classes": 3, "synthetic_size": 96},
                     "train": {"batch_size": 32, **FAST, "lr_find": {"steps": 10}}},
        "experiments": [{"name": "cnn"}],
    }))
    assert main(["lr-find", str(study), "--experiment", "cnn", "--runs-dir", str(tmp_path / "runs"), "--rule", "steepest"]) == 0
    out = tmp_path / "runs" / "s" / "lr_find" / "cnn"
    record = json.loads((out / "lr_find.json").read_text())
    assert record["rule"] == "steepest" and record["suggestion"] > 0 and (out / "lr_find.png").is_file()
    assert "train.lr:" in capsys.readouterr().out
    assert main(["lr-find", str(study), "--experiment", "cn", "--runs-dir", str(tmp_path / "runs")]) != 0
    assert "did you mean 'cnn'" in capsys.readouterr().out
