"""The run-directory contract across versions: what runs write now is a superset of what version 1 wrote.

tests/fixtures/runs_v1 holds run folders written by the previous version (one per kind). The same
study, run now, must write every file and every ``metrics.json`` key those folders have, and
``compare.csv`` must keep every column the previous version wrote.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from rich.console import Console

import transferlab
from transferlab.rundir import SCHEMA_VERSION, RunMetrics

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "runs_v1"
V1_COMPARE_COLUMNS = [  # the columns version 1's compare.csv had (src/transferlab/compare.py at eb2381b)
    "experiment", "strategy", "backbone", "weights", "test_acc", "n_seeds", "train_seconds", "inference_images_per_s",
    "trainable_params", "data", "status", "test_acc_std", "inference_images_per_s_std", "train_seconds_std", "total_params",
]  # fmt: skip


@pytest.fixture(scope="module")
def new_study(tmp_path_factory) -> Path:
    """The fixture's study file, run with the current version."""
    tmp = tmp_path_factory.mktemp("schema")
    study = yaml.safe_load((FIXTURE / "v1_study.yaml").read_text())
    path = tmp / "v1_study.yaml"
    path.write_text(yaml.safe_dump(study))
    result = transferlab.run_study(path, runs_dir=tmp / "runs", console=Console(quiet=True))
    assert list(result.failed) == ["broken"], result.failed  # the fixture's deliberately broken experiment
    return result.runs_dir


def _run_dirs(study_dir: Path) -> dict[str, Path]:
    return {p.parent.name: p.parent for p in study_dir.glob("*/metrics.json")}


def test_every_run_folder_of_version_1_is_written_again(new_study):
    old, new = _run_dirs(FIXTURE / "v1_study"), _run_dirs(new_study)
    assert set(old) == set(new)


def test_metrics_keys_and_files_are_a_superset_of_version_1(new_study):
    old, new = _run_dirs(FIXTURE / "v1_study"), _run_dirs(new_study)
    for name, old_dir in old.items():
        old_m = json.loads((old_dir / "metrics.json").read_text())
        new_m = json.loads((new[name] / "metrics.json").read_text())
        assert set(old_m) <= set(new_m), f"{name}: metrics.json lost {sorted(set(old_m) - set(new_m))}"
        assert new_m["schema_version"] == SCHEMA_VERSION and new_m["kind"] == RunMetrics.from_dict(old_m).kind
        old_files = {str(p.relative_to(old_dir)) for p in old_dir.rglob("*") if p.is_file()}
        new_files = {str(p.relative_to(new[name])) for p in new[name].rglob("*") if p.is_file()}
        assert old_files <= new_files, f"{name}: no longer writes {sorted(old_files - new_files)}"


def test_compare_csv_keeps_the_columns_of_version_1(new_study, tmp_path):
    transferlab.compare(new_study, console=Console(quiet=True))
    with open(new_study / "compare.csv", newline="") as f:
        columns = next(csv.reader(f))
    assert set(V1_COMPARE_COLUMNS) <= set(columns), sorted(set(V1_COMPARE_COLUMNS) - set(columns))
    assert "kind" in columns


def test_version_1_metrics_read_with_their_kind(tmp_path):
    study = tmp_path / "v1_study"
    shutil.copytree(FIXTURE / "v1_study", study)
    kinds = {e.name: e.runs[0].record.kind for e in transferlab.rundir.read_study(study).experiments}
    assert kinds == {"cnn": "train", "cnn_mlp": "train", "logistic": "logistic", "knn": "knn", "fewshot": "fewshot",
                     "broken": "train", "vote": "ensemble"}
    for e in transferlab.rundir.read_study(study).experiments:
        assert all(r.record.schema_version == 1 for r in e.runs)
