"""Sweeps in study files: grids over any dotted key, seeds per experiment, strict keys, run folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import transferlab
from report_fixtures import tiny_study_dir
from transferlab.cli import main
from transferlab.config import ConfigError, SweepPoint, config_from_yaml_text, parse_study, run_name

BASE = {
    "study": "s",
    "defaults": {"data": {"dataset": "synthetic"}, "train": {"epochs": 1, "progress": False}},
    "experiments": [{"name": "base"}],
}


def _study(**changes) -> dict:
    raw = json.loads(json.dumps(BASE))
    raw.update(changes)
    return raw


def test_grid_over_two_keys_names_each_point_and_records_its_values():
    study = parse_study(_study(experiments=[{"name": "d", "head": {"type": "mlp"}, "sweep": {"head.dropout": [0.1, 0.3], "train.lr": [0.01, 1e-3]}}]))
    got = [(c.name, c.head.dropout, c.train.lr, c.head.type) for c in study.experiments]
    assert got == [
        ("d@head.dropout=0.1,train.lr=0.01", 0.1, 0.01, "mlp"),
        ("d@head.dropout=0.1,train.lr=0.001", 0.1, 0.001, "mlp"),
        ("d@head.dropout=0.3,train.lr=0.01", 0.3, 0.01, "mlp"),
        ("d@head.dropout=0.3,train.lr=0.001", 0.3, 0.001, "mlp"),
    ]
    assert study.experiments[1].sweep == SweepPoint(group="d", values={"head.dropout": 0.1, "train.lr": 0.001})


def test_study_level_sweep_applies_to_every_experiment_and_combines_with_theirs():
    raw = _study(
        sweep={"train.lr": [0.1, 0.01]},
        experiments=[{"name": "a"}, {"name": "f", "strategy": {"name": "freeze_first"}, "sweep": {"strategy.stages": [1, 2]}}],
    )
    names = [c.name for c in parse_study(raw).experiments]
    assert names == [
        "a@train.lr=0.1", "a@train.lr=0.01",
        "f@train.lr=0.1,strategy.stages=1", "f@train.lr=0.1,strategy.stages=2",
        "f@train.lr=0.01,strategy.stages=1", "f@train.lr=0.01,strategy.stages=2",
    ]  # fmt: skip
    stages = [c.strategy.stages for c in parse_study(raw).experiments if c.name.startswith("f@")]
    assert stages == [1, 2, 1, 2]


def test_seed_sweep_and_study_seeds():
    raw = _study(seeds=[0, 1], experiments=[{"name": "a"}, {"name": "b", "sweep": {"seed": [3, 4, 5]}}, {"name": "c", "sweep": {"seed": [7]}}])
    study = parse_study(raw)
    assert [(c.name, c.seed) for c in study.experiments] == [("a", 0), ("a", 1), ("b", 3), ("b", 4), ("b", 5), ("c", 7)]
    assert all(c.sweep is None for c in study.experiments)  # seeds repeat an experiment, they are not sweep points
    assert run_name(study.experiments[2], 3) == "b.seed3"


def test_sweep_values_replace_the_key_and_other_values_stay():
    raw = _study(
        defaults={"data": {"dataset": "synthetic", "augment": ["flip", "crop"]}, "strategy": {"name": "freeze_first", "stages": 2}},
        experiments=[
            {"name": "s", "sweep": {"strategy": [{"name": "finetune"}, {"name": "freeze_first", "children": 1}], "data.augment": [[], ["flip"]]}}
        ],
    )
    exps = parse_study(raw).experiments
    assert [c.name for c in exps] == [
        "s@strategy=name-finetune,data.augment=none", "s@strategy=name-finetune,data.augment=flip",
        "s@strategy=name-freeze_first+children-1,data.augment=none", "s@strategy=name-freeze_first+children-1,data.augment=flip",
    ]  # fmt: skip
    assert exps[0].strategy.stages is None and exps[0].data.augment == []  # replaced, not merged with the defaults
    assert exps[2].strategy.children == 1 and exps[2].strategy.stages is None and exps[3].data.augment == ["flip"]
    assert exps[0].data.dataset == "synthetic"


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"head.dropot": [0.1]}, r"experiments\[0\]\.sweep: unknown key 'head\.dropot' \(did you mean 'head\.dropout'\?\)"),
        ({"dropout": [0.1]}, r"unknown key 'dropout' \(did you mean 'head\.dropout'\?\)"),
        ({"train.lr.x": [1]}, r"unknown key 'train\.lr\.x'"),
        ({"head.dropout": []}, r"sweep\.head\.dropout: expected a non-empty list of values, got \[\]"),
        ({"head.dropout": 0.1}, r"sweep\.head\.dropout: expected a non-empty list"),
        ({"head.dropout": [0.1, 0.1]}, r"a value is listed twice"),
        ({"name": ["x"]}, r"'name' cannot be swept"),
        ({"seed": [0, "1"]}, r"seeds must be integers"),
        ({"head.dropout": ["high"]}, r"sweep point head\.dropout='high'\)\.head\.dropout: expected a number, got 'high'"),
        ({"head.dropout": [0.2, 1.5]}, r"sweep point head\.dropout=1\.5\).*head\.dropout=1\.5 must be in \[0, 1\)"),
        ({"strategy.name": ["fine_tune"]}, r"unknown strategy\.name 'fine_tune' \(did you mean 'finetune'\?\)"),
        ([0.1], r"sweep: expected a mapping of dotted keys"),
    ],
)
def test_bad_sweeps_are_rejected_naming_file_key_and_value(sweep, message):
    with pytest.raises(ConfigError, match=message):
        parse_study(_study(experiments=[{"name": "x", "sweep": sweep}]), "study.yaml")


def test_sweep_in_defaults_or_clashing_names_is_an_error():
    with pytest.raises(ConfigError, match=r"'defaults\.sweep': put 'sweep' at the top level"):
        parse_study(_study(defaults={"sweep": {"train.lr": [1]}}))
    with pytest.raises(ConfigError, match=r"top-level key 'sweeps' \(did you mean 'sweep'\?\)"):
        parse_study(_study(sweeps={"train.lr": [1]}))
    with pytest.raises(ConfigError, match="is repeated"):
        parse_study(_study(experiments=[{"name": "x@train.lr=1"}, {"name": "x", "sweep": {"train.lr": [1.0, 2.0]}}]))


def test_resolved_config_keeps_the_sweep_point():
    cfg = parse_study(_study(experiments=[{"name": "d", "sweep": {"head.dropout": [0.25]}}])).experiments[0]
    back = config_from_yaml_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
    assert back == cfg and back.sweep.values == {"head.dropout": 0.25}


def test_seed004_dropout_sweep_study_file():
    path = Path(__file__).resolve().parents[1] / "studies" / "seed004_dropout_sweep.yaml"
    study = transferlab.load_study(path)
    sweep = [c for c in study.experiments if c.sweep]
    assert [c.head.dropout for c in sweep] == [0.1, 0.2, 0.3, 0.4]
    assert {(c.model.backbone, c.model.weights, c.strategy.name, c.head.type, c.data.dataset) for c in study.experiments} == {
        ("resnet18", "scratch", "scratch", "linear", "cifar10")
    }
    assert all(c.sweep.group == "resnet18_dropout" for c in sweep)
    (final,) = [c for c in study.experiments if not c.sweep]
    assert final.head.dropout == 0.3 and final.train.epochs == 50


def test_sweep_runs_get_their_own_folders_and_only_selects_a_sweep(tmp_path_factory, tmp_path, capsys):
    study_dir = tiny_study_dir(tmp_path_factory.mktemp("report_study"))  # the shared study: seeds + a sweep
    for run in ("scratch.seed0", "scratch.seed1", "dropout@head.dropout=0.1", "dropout@head.dropout=0.3"):
        cfg = transferlab.load_run(study_dir / run).config
        assert (cfg.sweep is not None) == run.startswith("dropout")
    assert transferlab.load_run(study_dir / "dropout@head.dropout=0.3").config.head.dropout == 0.3
    rows = {r["experiment"]: r for r in transferlab.compare(study_dir, write=False)}
    assert rows["scratch"]["n_seeds"] == 2 and rows["dropout@head.dropout=0.1"]["n_seeds"] == 1

    raw = _study(
        defaults={"data": {"dataset": "synthetic", "synthetic_size": 48}, "train": {"epochs": 1, "progress": False, "accelerator": "cpu"}},
        experiments=[{"name": "a"}, {"name": "d", "sweep": {"head.dropout": [0.1, 0.2]}}],
    )
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--only", "d"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "runs" / "s").iterdir() if p.is_dir()) == ["d@head.dropout=0.1", "d@head.dropout=0.2"]
    report = (tmp_path / "runs" / "s" / "report.html").read_text()  # `run` writes the report, with the sweep plot
    assert 'id="sweeps"' in report and "d@head.dropout=0.2" in report
