"""The shape of the house (issue 26): what each layer declares instead of what others test for.

- kinds declare what they use (``Kind.uses``) and nothing outside ``kinds/`` tests a kind's name;
- ``TrainKind.run`` stays a short sequence; ``RunMetrics`` is built from parts;
- the run folder sits low: ``Run.load_model`` / ``Run.export`` are supplied by the layers above;
- datasets declare their documented size (what ``plan`` assumes before the data is here).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import transferlab
from transferlab.config import ConfigError, ExperimentConfig, from_dict
from transferlab.config.kinds import KindUses, kind_uses
from transferlab.data.sources import DATASETS, dataset_size
from transferlab.kinds import KINDS, Kind
from transferlab.kinds.train import TrainKind
from transferlab.results.compare import experiment_row
from transferlab.rundir import RUN_ACTIONS, ExperimentRuns, Run, RunMetrics

SRC = Path(transferlab.__file__).resolve().parent


def _kind_name_tests(path: Path) -> list[str]:
    """``<x>.kind == "..."`` / ``!=`` / ``in (...)`` comparisons of an experiment's kind in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "kind":
            owner = node.left.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if name in ("cfg", "config", "c") and any(isinstance(c, (ast.Constant, ast.Tuple, ast.List, ast.Set)) for c in node.comparators):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return found


def test_nothing_outside_the_kinds_tests_a_kind_by_name():
    tests = [hit for p in sorted(SRC.rglob("*.py")) if "kinds" not in p.relative_to(SRC).parts for hit in _kind_name_tests(p)]
    assert tests == [], f"ask cfg.uses (transferlab.config.kinds.KindUses) instead: {tests}"


def test_every_registered_kind_declares_what_it_uses():
    for name, kind in KINDS.items():
        assert isinstance(kind.uses, KindUses), name
        assert kind_uses(name) is kind.uses
    assert kind_uses("train").training and not kind_uses("ensemble").data and kind_uses("ensemble").members


def test_a_new_kind_gets_the_generic_rules_from_its_declaration(monkeypatch):
    class Votes(Kind):
        name = "votes_for_test"
        uses = KindUses(model=False, data=False, members=True, folds=False)

    monkeypatch.setitem(KINDS._entries, Votes.name, Votes())  # registered for this test only
    cfg = from_dict(ExperimentConfig, {"name": "v", "kind": Votes.name, "train": {"lr": "find"}, "ensemble": {"members": ["a", "b"]}})
    assert cfg.uses is Votes.uses
    with pytest.raises(ConfigError, match="train.lr.*applies to kind: train only"):
        cfg.validate()  # it does not train, so train.lr: find is refused without the check knowing its name
    one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.01), ensemble=dataclasses.replace(cfg.ensemble, members=["a"]))
    with pytest.raises(ConfigError, match="ensemble.members.*at least 2"):
        one.validate()  # it has members, so it needs two


def test_the_train_kind_run_is_a_short_sequence():
    lines = inspect.getsource(TrainKind.run).splitlines()
    assert len(lines) <= 40, f"TrainKind.run has {len(lines)} lines: move a phase into a function"


def test_run_metrics_are_built_from_parts_and_refuse_unknown_fields():
    m = RunMetrics().add({"test_acc": 0.5, "extra": {"a": 1}}, {"train_seconds": 2.0, "extra": {"b": 2}})
    assert m.test_acc == 0.5 and m.train_seconds == 2.0 and m.extra == {"a": 1, "b": 2}
    with pytest.raises(ValueError, match="not RunMetrics fields: \\['test_accuracy'\\]"):
        RunMetrics().add({"test_accuracy": 0.5})


def test_the_run_folder_gets_its_model_and_export_from_the_layers_above():
    # rundir imports neither models nor export (tests/test_layers.py); importing transferlab supplies both
    assert RUN_ACTIONS.load_model is transferlab.models.load_run_model
    assert RUN_ACTIONS.export is transferlab.results.export.export_run


def test_known_datasets_declare_their_documented_size():
    for name in ("fashion_mnist", "mnist", "cifar10", "cifar100", "cifar100_coarse", "tiny_imagenet"):
        size = dataset_size(name)
        assert size is not None and size.train > size.test > 0 and size.classes >= 10, name
    assert dataset_size("folder") is None and "folder" in DATASETS  # a user's own folder: unknown until it is read


def test_compare_takes_a_finished_run_that_left_a_figure_unset(tmp_path):
    record = RunMetrics(status="ok", kind="train", experiment="e", seed=0, test_acc=0.5, inference_images_per_s=None)
    row = experiment_row(ExperimentRuns("e", [Run(tmp_path, None, record)]))
    assert row["test_acc"] == 0.5 and row["inference_images_per_s"] != row["inference_images_per_s"]  # NaN: not measured
