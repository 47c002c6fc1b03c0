"""k-fold cross-validation (``data.folds``): the folds, the study expansion, the runs and their aggregation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from data_fixtures import write_folder
from transferlab.config import ConfigError, DataConfig, parse_study
from transferlab.data import DatasetError, prepare_splits
from transferlab.data.folds import fold_test_positions
from transferlab.results.compare import collect
from transferlab.study import plan_study, run_study

QUIET = Console(quiet=True)


def test_fold_test_positions_are_disjoint_covering_and_stratified() -> None:
    labels = np.repeat([0, 1, 2], [10, 15, 5])
    folds = fold_test_positions(labels, 5, seed=3)
    together = np.concatenate(folds)
    assert len(together) == len(labels) and sorted(together.tolist()) == list(range(len(labels)))  # each image once
    for f in folds:
        assert np.bincount(labels[f], minlength=3).tolist() == [2, 3, 1]  # every class in every fold, in proportion
    again = fold_test_positions(labels, 5, seed=3)
    assert all((a == b).all() for a, b in zip(folds, again, strict=True))
    assert any((a != b).any() for a, b in zip(folds, fold_test_positions(labels, 5, seed=4), strict=True))


def test_more_folds_than_the_smallest_class_is_an_error_naming_the_key() -> None:
    with pytest.raises(DatasetError, match=r"data.folds=6 but class 'c' has only 5 images"):
        fold_test_positions(np.repeat([0, 1, 2], [10, 15, 5]), 6, seed=0, names=["a", "b", "c"])


def test_folds_of_a_folder_pool_train_and_test(tmp_path: Path) -> None:
    write_folder(tmp_path / "ds", ["a", "b"], 10, size=(12, 12))
    tests, trains = [], []
    for k in range(4):
        s = prepare_splits(DataConfig(dataset="folder", root=str(tmp_path / "ds"), val_count=2, folds=4, fold=k), 0)
        rec = s.selection_record()
        assert rec["folds"]["folds"] == 4 and rec["folds"]["fold"] == k and sum(rec["folds"]["fold_sizes"]) == 20
        assert not set(rec["test"]) & set(rec["train"]) and not set(rec["test"]) & set(rec["val"])
        tests.append(rec["test"])
        trains.append(rec["train"])
    assert sorted(sum(tests, [])) == list(range(20))  # the test folds cover the pooled images once


def _study(root: Path, **extra: object) -> dict:
    return {
        "study": "kfold",
        "defaults": {
            "data": {"dataset": "folder", "root": str(root), "val_count": 2, "folds": 5},
            "model": {"backbone": "transferlab_cnn"},
            "train": {"epochs": 1, "batch_size": 8, "progress": False, "accelerator": "cpu"},
        },
        "experiments": [{"name": "cnn"}],
        **extra,
    }


def test_study_expands_folds_like_seeds(tmp_path: Path) -> None:
    runs = plan_study(parse_study(_study(tmp_path)), tmp_path / "runs")
    assert [r.name for r in runs] == [f"cnn.fold{k}" for k in range(5)]
    assert [r.cfg.data.fold for r in runs] == list(range(5))
    both = plan_study(parse_study(_study(tmp_path, seeds=[0, 1])), tmp_path / "runs")
    assert [r.name for r in both][:6] == [f"cnn.seed0.fold{k}" for k in range(5)] + ["cnn.seed1.fold0"] and len(both) == 10


def test_bad_fold_settings_name_the_key(tmp_path: Path) -> None:
    raw = _study(tmp_path)
    raw["defaults"]["data"]["folds"] = 1
    with pytest.raises(ConfigError, match=r"data.folds=1 must be >= 2"):
        parse_study(raw)
    raw["defaults"]["data"] = {"dataset": "folder", "root": str(tmp_path), "fold": 2}
    with pytest.raises(ConfigError, match=r"data.fold=2 needs data.folds"):
        parse_study(raw)
    raw["defaults"]["data"] = {"dataset": "folder", "root": str(tmp_path), "folds": 3, "fold": 1}
    with pytest.raises(ConfigError, match=r"data.fold is set per run by data.folds"):
        parse_study(raw)
    raw["defaults"]["data"] = {"dataset": "folder", "root": str(tmp_path), "folds": 3, "flods": 1}
    with pytest.raises(ConfigError, match=r"did you mean 'folds'"):
        parse_study(raw)


def test_five_fold_study_runs_and_aggregates(tmp_path: Path) -> None:
    write_folder(tmp_path / "ds", ["a", "b"], 10, size=(12, 12))
    run_study(parse_study(_study(tmp_path / "ds")), tmp_path / "runs", console=QUIET)
    study_dir = tmp_path / "runs" / "kfold"
    tests = []
    for k in range(5):
        sel = json.loads((study_dir / f"cnn.fold{k}" / "selection.json").read_text())
        assert sel["folds"]["fold"] == k
        tests.append(sel["test"])
    assert sorted(sum(tests, [])) == list(range(20))  # every image was tested exactly once
    (row,) = collect(study_dir)
    assert row["experiment"] == "cnn" and row["n_seeds"] == 5 and "test_acc_std" in row
