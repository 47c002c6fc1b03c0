"""The CLI and the Python API end to end on small studies; the demo study (slow) on real data."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import transferlab
from transferlab.cli import demo_study_path, main

STUDY = {
    "study": "tiny",
    "defaults": {
        "data": {"dataset": "synthetic", "synthetic_size": 96, "val_fraction": 0.25},
        "model": {"backbone": "transferlab_cnn"},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.01, "progress": False},
    },
    "experiments": [
        {"name": "scratch", "strategy": {"name": "scratch"}},
        {"name": "probe", "strategy": {"name": "linear_probe"}, "head": {"type": "mlp", "hidden": 16}},
    ],
}


def _write(tmp_path: Path, study: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_cli_run_then_compare(tmp_path, capsys):
    path = _write(tmp_path, STUDY)
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "scratch" in out and "probe" in out and "test acc" in out
    study_dir = tmp_path / "runs" / "tiny"
    assert (study_dir / "study.yaml").read_text() == path.read_text()

    assert main(["compare", str(study_dir)]) == 0
    rows = list(csv.DictReader(open(study_dir / "compare.csv")))
    assert [r["experiment"] for r in rows] == ["scratch", "probe"]
    for r, name in zip(rows, ["scratch", "probe"], strict=True):
        metrics = json.loads((study_dir / name / "metrics.json").read_text())
        assert float(r["test_acc"]) == pytest.approx(metrics["test_acc"])  # the table shows the run's own numbers
        assert int(r["trainable_params"]) == metrics["trainable_params"]
    assert int(rows[1]["trainable_params"]) < int(rows[0]["trainable_params"])
    md = (study_dir / "compare.md").read_text()
    assert "| scratch | scratch | transferlab_cnn |" in md


def test_cli_resume_skips_finished_runs(tmp_path, capsys):
    path = _write(tmp_path, STUDY)
    runs = str(tmp_path / "runs")
    assert main(["run", str(path), "--runs-dir", runs, "--only", "scratch"]) == 0
    assert not (tmp_path / "runs" / "tiny" / "probe").exists()
    assert main(["run", str(path), "--runs-dir", runs]) == 1  # scratch exists: refused, probe still runs
    out = capsys.readouterr().out
    assert "already exists" in out and (tmp_path / "runs" / "tiny" / "probe" / "metrics.json").exists()
    assert main(["run", str(path), "--runs-dir", runs, "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out


def test_unknown_key_fails_with_its_name_and_suggestion(tmp_path, capsys):
    bad = json.loads(json.dumps(STUDY))
    bad["experiments"][0]["train"] = {"epoch": 3}
    assert main(["run", str(_write(tmp_path, bad)), "--runs-dir", str(tmp_path / "runs")]) == 2
    out = capsys.readouterr().out
    assert "experiments[0].train.epoch" in out and "did you mean 'epochs'" in out
    assert not (tmp_path / "runs").exists()  # nothing started


def test_failing_experiment_is_recorded_and_others_finish(tmp_path, capsys):
    study = json.loads(json.dumps(STUDY))
    study["experiments"].insert(0, {"name": "broken", "model": {"backbone": "resnet18", "weights": "file:/nonexistent.safetensors"}})
    assert main(["run", str(_write(tmp_path, study)), "--runs-dir", str(tmp_path / "runs")]) == 1
    out = capsys.readouterr().out
    assert "1 experiment(s) failed" in out and "nonexistent.safetensors" in out
    broken = json.loads((tmp_path / "runs" / "tiny" / "broken" / "metrics.json").read_text())
    assert broken["status"] == "failed" and "nonexistent.safetensors" in broken["error"]
    rows = transferlab.compare(tmp_path / "runs" / "tiny", write=False)
    assert {r["experiment"]: r["status"] for r in rows}["probe"] == "ok"
    assert "failed" in {r["experiment"]: r["status"] for r in rows}["broken"]


def test_python_api_with_seeds_reports_mean_and_std(tmp_path):
    study = json.loads(json.dumps(STUDY))
    study["seeds"] = [0, 1]
    study["experiments"] = study["experiments"][:1]
    result = transferlab.run_study(transferlab.parse_study(study), runs_dir=tmp_path / "runs")
    assert result.ok and result.finished == ["scratch.seed0", "scratch.seed1"]
    (row,) = transferlab.compare(result.runs_dir, write=False)
    accs = [json.loads((result.runs_dir / f"scratch.seed{s}" / "metrics.json").read_text())["test_acc"] for s in (0, 1)]
    assert row["n_seeds"] == 2 and row["test_acc"] == pytest.approx(sum(accs) / 2)
    assert row["test_acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    run = transferlab.load_run(result.runs_dir / "scratch.seed1")
    assert run.config.seed == 1 and run.metrics["status"] == "ok"


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "transferlab.cli", "list"], capture_output=True, text=True, check=True).stdout
    assert "linear_probe" in out and "fashion_mnist" in out


def test_demo_study_is_valid_and_compares_the_four_required_setups():
    study = transferlab.load_study(demo_study_path())
    assert study.name == "fashion_mnist_demo"
    kinds = {(c.model.backbone, c.model.weights, c.strategy.name) for c in study.experiments}
    assert ("transferlab_cnn", "scratch", "scratch") in kinds
    for strategy in ("linear_probe", "freeze_first", "finetune"):
        assert ("tf_efficientnet_lite0", "embedded", strategy) in kinds
    assert all(c.data.dataset == "fashion_mnist" for c in study.experiments)


@pytest.mark.slow
def test_demo_study_end_to_end(tmp_path, capsys):
    """README command 1, minus the install: all four experiments with real Fashion-MNIST numbers."""
    assert main(["demo", "--runs-dir", str(tmp_path / "runs")]) == 0
    rows = transferlab.compare(tmp_path / "runs" / "fashion_mnist_demo", write=False)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    acc = {r["experiment"]: r["test_acc"] for r in rows}
    assert acc["cnn_scratch"] > 0.85 and acc["lite0_linear_probe"] > 0.80 and acc["lite0_finetune"] > 0.88


def test_list_prints_every_registry_and_every_entry(capsys):
    from transferlab.cli import main
    from transferlab.registry import REGISTRIES

    assert main(["list", "--verbose"]) == 0
    out = capsys.readouterr().out
    for what, registry in REGISTRIES.items():
        if what == "command":
            continue
        assert what in out, what
        for name, doc in registry.describe():
            assert name in out and doc.split("``")[0][:20] in out, (what, name)
