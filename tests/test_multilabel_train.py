"""``kind: train`` on multi-label data (issue 24) end to end: metrics.json and predictions.json against scikit-learn,
thresholds chosen on validation with the tested weights, exact resume, and the strategies / recipes that ride along
(asymmetric loss, per-class thresholds, flip TTA, EMA, SWA, LP-FT on cached features, bitfit, lora, pos_weight)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, hamming_loss

import transferlab.engine.checkpointing as engine
from transferlab.config import ConfigError
from transferlab.data import TensorBatches, prepare_splits
from transferlab.engine.multilabel import choose_thresholds, evaluate_multilabel
from transferlab.kinds import run_experiment
from transferlab.rundir import load_run
from transferlab.rundir.predictions import load_test_predictions

QUIET = Console(quiet=True)
K = 4


@pytest.fixture
def ml_cfg(make_cfg):
    """A multi-label config on the synthetic dataset (1 to 3 of 4 squares per image)."""

    def _make(**overrides):
        data = {"task": "multilabel", "synthetic_classes": K, "synthetic_size": 160, **overrides.pop("data", {})}
        train = {"epochs": 3, "optimizer": "adamw", "lr": 0.003, **overrides.pop("train", {})}
        return make_cfg(data=data, train=train, **overrides)

    return _make


def test_a_multilabel_run_writes_the_multilabel_metrics_and_predictions(ml_cfg, tmp_path):
    cfg = ml_cfg()
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert m["task"] == "multilabel" and m["monitor"] == "val_map" and m["threshold_mode"] == "global"
    assert all(m[k] is None for k in ("test_acc", "test_top5", "per_class_acc", "confusion_matrix"))
    history = load_run(tmp_path / "run").history
    assert all("val_map" in r and "val_loss" in r and "val_acc" not in r for r in history)
    assert m["best_val"] == max(r["val_map"] for r in history) and len(m["thresholds"]) == K

    # the test metrics are scikit-learn's on the recorded predictions
    pred = load_test_predictions(tmp_path / "run")
    assert pred is not None and pred.multilabel and pred.thresholds == m["thresholds"] and pred.prob.shape == (m["n_test"], K)
    aps = [average_precision_score(pred.true[:, c], pred.prob[:, c]) for c in range(K)]
    assert m["per_class_ap"] == pytest.approx(aps, abs=1e-3) and m["test_map"] == pytest.approx(np.mean(aps), abs=1e-3)
    clear = np.abs(pred.prob - np.array(m["thresholds"])) > 1e-5  # prob is rounded to 5 decimals in the file
    assert np.array_equal(pred.pred[clear], (pred.prob >= np.array(m["thresholds"]))[clear].astype(int))
    assert m["test_f1"] == pytest.approx(f1_score(pred.true, pred.pred, average="macro", zero_division=0))
    assert m["test_exact_match"] == pytest.approx(accuracy_score(pred.true, pred.pred))
    assert m["test_hamming"] == pytest.approx(hamming_loss(pred.true, pred.pred))
    assert m["test_ece"] is not None and len(m["calibration"]["per_class_ece"]) == K

    # the thresholds are the ones the tested weights give on the validation split
    model = load_run(tmp_path / "run").load_model()
    splits = prepare_splits(cfg.data, cfg.seed)
    on_val = evaluate_multilabel(model, TensorBatches(splits.val_x, splits.val_y, 64, model.preprocess()), K)
    assert m["thresholds"] == pytest.approx(choose_thresholds(on_val.probs, on_val.targets, "global")[0])
    assert m["best_val"] == pytest.approx(on_val.map)  # the best checkpoint is the tested one


def _run_cut_and_resume(cfg, tmp_path, monkeypatch, die_at):
    full = run_experiment(cfg, tmp_path / "full", console=QUIET)
    real = engine.save_checkpoint

    def save_then_die(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if path.name == "last.safetensors" and args[1]["epoch"] == die_at:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", console=QUIET)
    monkeypatch.setattr(engine, "save_checkpoint", real)
    return full, run_experiment(cfg, tmp_path / "cut", resume=True, console=QUIET)


def test_an_interrupted_multilabel_run_resumes_bit_identically(ml_cfg, tmp_path, monkeypatch):
    cfg = ml_cfg(train={"mixup": {"alpha": 0.4, "cutmix_alpha": 1.0}, "checkpoint_every_steps": 2},
                 head={"type": "mlp", "hidden": 16, "dropout": 0.3}, data={"augment": ["flip"]})
    full, resumed = _run_cut_and_resume(cfg, tmp_path, monkeypatch, die_at=1)
    assert resumed["resumed_from"].endswith("last.safetensors")
    a, b = (load_file(str(tmp_path / d / "checkpoints" / "last.safetensors")) for d in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # weights, optimizer, RNG and mixup state
    ha, hb = (load_run(tmp_path / d).history for d in ("full", "cut"))
    assert [(r["train_loss"], r["train_acc"], r["val_map"]) for r in ha] == [(r["train_loss"], r["train_acc"], r["val_map"]) for r in hb]
    for key in ("test_map", "test_f1", "thresholds", "per_class_ap"):
        assert resumed[key] == full[key], key


VARIANTS = {
    "asymmetric, per-class thresholds, flip TTA, EMA": (
        {"train": {"loss": "asymmetric", "threshold": "per_class", "tta": "flip", "ema": {"decay": 0.9, "evaluate": "both"}}},
        lambda m, h: m["threshold_mode"] == "per_class" and "map" in m["ema"]["test_raw"] and all("val_map_raw" in r for r in h)),
    "swa, a fixed threshold": (
        {"train": {"epochs": 4, "swa": {"start": 0.5}, "threshold": 0.4}},
        lambda m, h: m["thresholds"] == [0.4] * K and m["threshold_mode"] == "fixed" and m["swa"]["models"] == 2
        and "val_map" in m["swa"] and "val_map_last_epoch" in m["swa"]),
    "lp_ft, the probe on cached features": (
        {"model": {"backbone": "test_efficientnet"}, "strategy": {"name": "lp_ft", "probe_epochs": 1}, "train": {"cache": "on"}},
        lambda m, h: m["lp_ft"]["probe_log"] == ["feature cache: cached at pooled"] and m["epochs_run"] == 3 and all("val_map" in r for r in h)),
    "bitfit, balanced pos_weight": (
        {"strategy": {"name": "bitfit"}, "train": {"class_weights": "balanced"}},
        lambda m, h: len(m["pos_weight"]) == K and "class_weights" not in m),
    "lora": (
        {"model": {"backbone": "test_efficientnet"}, "strategy": {"name": "lora", "rank": 2}},
        lambda m, h: m["trainable_params"] < m["total_params"]),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_multilabel_training_with_recipes_and_strategies(ml_cfg, tmp_path, name):
    if name == "lora":
        pytest.importorskip("peft")
    over, check = VARIANTS[name]
    m = run_experiment(ml_cfg(**over), tmp_path / "run", console=QUIET)
    history = load_run(tmp_path / "run").history
    assert m["task"] == "multilabel" and m["test_map"] is not None and 0 <= m["test_map"] <= 1
    assert check(m, history), m
    assert load_test_predictions(tmp_path / "run").thresholds == m["thresholds"]


def test_distillation_from_a_multilabel_teacher_and_a_teacher_of_the_other_task_is_refused(ml_cfg, make_cfg, tmp_path):
    run_experiment(ml_cfg(name="teacher", train={"epochs": 1}), tmp_path / "teacher", console=QUIET)
    m = run_experiment(ml_cfg(train={"epochs": 2, "distill": {"teacher": f"run:{tmp_path / 'teacher'}", "alpha": 0.5}}),
                       tmp_path / "student", console=QUIET)
    run_experiment(ml_cfg(train={"epochs": 2}), tmp_path / "plain", console=QUIET)
    assert m["distill"]["alpha"] == 0.5 and m["test_map"] is not None
    first = [load_run(tmp_path / d).history[0]["train_loss"] for d in ("student", "plain")]
    assert first[0] != first[1]  # the soft term is in the loss
    run_experiment(make_cfg(name="mc", train={"epochs": 1}), tmp_path / "mc", console=QUIET)
    with pytest.raises(ConfigError, match="data.task: multiclass, this run is data.task: multilabel"):
        ml_cfg(train={"distill": {"teacher": f"run:{tmp_path / 'mc'}"}})


DDP_STUDY = """
study: mlddp
defaults:
  data: {dataset: synthetic, synthetic_size: 256, val_fraction: 0.25, task: multilabel}
  model: {backbone: test_efficientnet, weights: scratch}
  train: {epochs: 2, batch_size: 32, lr: 0.01, progress: false, accelerator: cpu, precision: 32-true}
experiments:
  - {name: probe, strategy: {name: linear_probe}, train: {threshold: per_class}}
"""


def test_two_gloo_processes_gather_the_validation_and_test_probabilities_of_every_rank(tmp_path):
    # a frozen backbone without dropout: DDP's averaged gradient is the global batch's, so every number must agree, and
    # it can only if each rank's share of the validation (thresholds, val_map) and test (metrics) batches is gathered
    (tmp_path / "study.yaml").write_text(DDP_STUDY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = ["-m", "transferlab.cli", "run", str(tmp_path / "study.yaml"), "--runs-dir"]
    for cmd in ([sys.executable, *cli, str(tmp_path / "single")],
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
                 *cli, str(tmp_path / "ddp")]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    single, ddp = (json.loads((tmp_path / d / "mlddp" / "probe" / "metrics.json").read_text()) for d in ("single", "ddp"))
    assert ddp["world_size"] == 2 and single["world_size"] == 1 and ddp["n_test"] == single["n_test"]
    for key in ("thresholds", "per_class_ap"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-5), key
    for key in ("test_map", "test_f1", "test_hamming", "best_val"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-5), key
