"""Tests for transferlab.config: strict parsing of study files, defaults, seeds, validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from transferlab.config import (
    ConfigError,
    ExperimentConfig,
    config_from_yaml_text,
    from_dict,
    load_study,
    parse_study,
    run_name,
)


def study(**extra: Any) -> dict[str, Any]:
    """A minimal valid study mapping; keyword arguments replace or add top-level keys."""
    raw: dict[str, Any] = {"study": "s", "experiments": [{"name": "a"}]}
    raw.update(extra)
    return raw


def parse_error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_study(raw, "my_study.yaml")
    message = str(info.value)
    assert message.startswith("my_study.yaml: "), message
    return message


def write_study(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# unknown keys


def test_unknown_top_level_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = write_study(tmp_path, "study: s\nexperiment:\n  - name: a\n")
    with pytest.raises(ConfigError) as info:
        load_study(path)
    message = str(info.value)
    assert str(path) in message
    assert "unknown top-level key 'experiment'" in message
    assert "did you mean 'experiments'?" in message


def test_unknown_key_inside_experiment(tmp_path: Path) -> None:
    path = write_study(tmp_path, "study: s\nexperiments:\n  - name: a\n  - name: b\n    trian: {epochs: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_study(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "unknown key 'experiments[1].trian'" in message
    assert "did you mean 'train'?" in message
    assert "valid keys here: name, seed, data, model, head, strategy, train, notes" in message


def test_unknown_nested_key_names_full_path() -> None:
    message = parse_error(study(experiments=[{"name": "a", "train": {"epoch": 3}}]))
    assert "unknown key 'experiments[0].train.epoch'" in message
    assert "did you mean 'epochs'?" in message

    message = parse_error(study(experiments=[{"name": "a", "train": {"learning_rate": 0.1}}]))
    assert "unknown key 'experiments[0].train.learning_rate'" in message
    valid = message.split("valid keys here: ")[1].split(", ")
    assert "lr" in valid and "epochs" in valid

    message = parse_error(study(experiments=[{"name": "a", "train": {"early_stopping": {"patiance": 2}}}]))
    assert "unknown key 'experiments[0].train.early_stopping.patiance'" in message
    assert "did you mean 'patience'?" in message


def test_unknown_key_in_defaults_is_reported_under_defaults() -> None:
    message = parse_error(study(defaults={"train": {"epoch": 3}}))
    assert "unknown key 'defaults.train.epoch'" in message
    assert "did you mean 'epochs'?" in message
    assert "experiments[" not in message

    message = parse_error(study(defaults={"dat": {"dataset": "digits"}}))
    assert "unknown key 'defaults.dat'" in message
    assert "did you mean 'data'?" in message


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    message = parse_error(study(experiments=[{"name": "a", "zzzzzz": 1}]))
    assert "unknown key 'experiments[0].zzzzzz'" in message
    assert "did you mean" not in message


# --------------------------------------------------------------------------------------------
# wrong types


@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [
        ({"train": {"epochs": "ten"}}, "train.epochs", "expected an integer, got 'ten'"),
        ({"train": {"epochs": 2.5}}, "train.epochs", "expected an integer, got 2.5"),
        ({"train": {"epochs": True}}, "train.epochs", "expected an integer, got True"),
        ({"train": {"lr": True}}, "train.lr", "expected a number, got True"),
        ({"train": {"lr": "fast"}}, "train.lr", "expected a number, got 'fast'"),
        ({"train": {"progress": "yes please"}}, "train.progress", "expected true/false, got 'yes please'"),
        ({"data": {"augment": "flip"}}, "data.augment", "expected a list, got 'flip'"),
        ({"data": {"augment": ["flip", 3]}}, "data.augment[1]", "expected a string, got 3"),
        ({"data": {"train_subset": "all"}}, "data.train_subset", "expected a number, got 'all'"),
        ({"train": 5}, "train", "expected a mapping of TrainConfig keys, got 5"),
    ],
)
def test_wrong_types_are_rejected_with_key_path(section: dict, value: str, expected: str) -> None:
    message = parse_error(study(experiments=[{"name": "a", **section}]))
    assert f"experiments[0].{value}: {expected}" in message


def test_literal_value_suggests_closest() -> None:
    message = parse_error(study(experiments=[{"name": "a", "train": {"optimizer": "adamm"}}]))
    assert "experiments[0].train.optimizer: 'adamm' is not one of 'sgd', 'adam', 'adamw', 'rmsprop'" in message
    assert "did you mean 'adam'?" in message

    message = parse_error(study(experiments=[{"name": "a", "train": {"early_stopping": {"monitor": "val_accuracy"}}}]))
    assert "experiments[0].train.early_stopping.monitor" in message
    assert "did you mean 'val_acc'?" in message


def test_optional_fields_accept_none_and_numbers() -> None:
    cfg = from_dict(ExperimentConfig, {"data": {"train_subset": None, "test_subset": 500}, "train": {"max_grad_norm": 1}})
    assert cfg.data.train_subset is None
    assert cfg.data.test_subset == 500.0 and isinstance(cfg.data.test_subset, float)
    assert cfg.train.max_grad_norm == 1.0 and isinstance(cfg.train.max_grad_norm, float)


def test_int_for_float_field_is_accepted_as_float(tmp_path: Path) -> None:
    path = write_study(tmp_path, "study: s\nexperiments:\n  - name: a\n    train: {lr: 1, weight_decay: 0}\n")
    cfg = load_study(path).experiments[0]
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.train.weight_decay == 0.0 and type(cfg.train.weight_decay) is float


def test_exponent_floats_without_dot_are_numbers(tmp_path: Path) -> None:
    # PyYAML's YAML 1.1 rules read `1e-3` as a string; study files must accept the usual spelling.
    path = write_study(tmp_path, "study: s\nexperiments:\n  - name: a\n    train: {lr: 1e-3, weight_decay: 5E-4}\n")
    cfg = load_study(path).experiments[0]
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.weight_decay == pytest.approx(5e-4)
    # ... while a real typo still fails
    path = write_study(tmp_path, "study: s\nexperiments:\n  - name: a\n    train: {lr: 1e-3x}\n")
    with pytest.raises(ConfigError, match=r"experiments\[0\]\.train\.lr: expected a number, got '1e-3x'"):
        load_study(path)


# --------------------------------------------------------------------------------------------
# value checks (validate)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train": {"lr": -0.1}}, "train.lr=-0.1 must be > 0 (or 'find': the LR finder)"),
        ({"train": {"lr": 0}}, "train.lr=0.0 must be > 0 (or 'find': the LR finder)"),
        ({"train": {"epochs": 0}}, "train.epochs=0 must be >= 1"),
        ({"train": {"batch_size": 0}}, "train.batch_size=0 must be >= 1"),
        ({"train": {"label_smoothing": 1.0}}, "train.label_smoothing=1.0 must be in [0, 1)"),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction=1.5 must be in (0, 1)"),
        ({"data": {"val_fraction": 0}}, "data.val_fraction=0.0 must be in (0, 1)"),
        ({"data": {"image_size": 4}}, "data.image_size=4 must be >= 8"),
        ({"data": {"train_subset": -5}}, "data.train_subset=-5.0 must be > 0 (fraction <= 1 or count > 1)"),
        ({"head": {"dropout": 1.0}}, "head.dropout=1.0 must be in [0, 1)"),
    ],
)
def test_validate_rejects_out_of_range_values(overrides: dict, expected: str) -> None:
    cfg = from_dict(ExperimentConfig, {"name": "exp1", **overrides})
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert str(info.value) == f"experiment 'exp1': {expected}"


def test_validate_accepts_defaults() -> None:
    ExperimentConfig().validate()  # must not raise
    from_dict(ExperimentConfig, {"data": {"val_fraction": 0.5, "image_size": 8}}).validate()


def test_unknown_strategy_suggests_closest() -> None:
    cfg = from_dict(ExperimentConfig, {"name": "e", "strategy": {"name": "fintune"}})
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    message = str(info.value)
    assert "unknown strategy.name 'fintune'" in message
    assert "did you mean 'finetune'?" in message
    assert "linear_probe" in message  # the valid names are listed


def test_parse_study_runs_validation_with_source() -> None:
    message = parse_error(study(experiments=[{"name": "a"}, {"name": "b", "train": {"lr": -1}}]))
    assert "experiment 'b': train.lr=-1.0 must be > 0" in message


# --------------------------------------------------------------------------------------------
# defaults, seeds, names


def test_defaults_deep_merge_keeps_other_default_keys() -> None:
    raw = study(
        defaults={
            "data": {"dataset": "digits", "augment": ["flip"]},
            "train": {"epochs": 7, "lr": 0.5, "batch_size": 16, "early_stopping": {"patience": 3}},
        },
        experiments=[
            {"name": "a", "train": {"lr": 0.1}},
            {"name": "b", "train": {"early_stopping": {"monitor": "val_loss"}}, "data": {"augment": []}},
        ],
    )
    a, b = parse_study(raw).experiments
    assert (a.train.lr, a.train.epochs, a.train.batch_size) == (0.1, 7, 16)
    assert a.train.early_stopping.patience == 3
    assert a.train.optimizer == "adamw"  # set nowhere: dataclass default
    assert a.data.dataset == "digits" and a.data.augment == ["flip"]
    assert (b.train.lr, b.train.epochs, b.train.batch_size) == (0.5, 7, 16)
    assert (b.train.early_stopping.monitor, b.train.early_stopping.patience) == ("val_loss", 3)
    assert b.data.dataset == "digits" and b.data.augment == []  # a list replaces, it does not merge
    assert raw["defaults"]["train"]["lr"] == 0.5  # the input mapping is not modified


def test_seeds_expand_every_experiment() -> None:
    parsed = parse_study(study(seeds=[0, 1, 2], experiments=[{"name": "a"}, {"name": "b", "seed": 9}]))
    assert [(c.name, c.seed) for c in parsed.experiments] == [
        ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2),
    ]  # fmt: skip
    first, second = parsed.experiments[0], parsed.experiments[1]
    assert first.train is not second.train  # independent copies
    assert [run_name(c, 3) for c in parsed.experiments] == ["a.seed0", "a.seed1", "a.seed2", "b.seed0", "b.seed1", "b.seed2"]


def test_without_seeds_each_experiment_keeps_its_own_seed() -> None:
    parsed = parse_study(study(defaults={"seed": 4}, experiments=[{"name": "a"}, {"name": "b", "seed": 9}]))
    assert [(c.name, c.seed) for c in parsed.experiments] == [("a", 4), ("b", 9)]
    assert [run_name(c, 1) for c in parsed.experiments] == ["a", "b"]


def test_run_name() -> None:
    cfg = ExperimentConfig(name="lite0", seed=1)
    assert run_name(cfg, 3) == "lite0.seed1"
    assert run_name(cfg, 2) == "lite0.seed1"
    assert run_name(cfg, 1) == "lite0"


@pytest.mark.parametrize("seeds", [[], "0,1", [0, "1"], 3])
def test_bad_seeds_rejected(seeds: Any) -> None:
    assert "'seeds' must be a non-empty list of integers" in parse_error(study(seeds=seeds))


def test_duplicate_experiment_names_rejected() -> None:
    message = parse_error(study(experiments=[{"name": "a"}, {"name": "b"}, {"name": "a", "train": {"lr": 0.1}}]))
    assert "experiments[2]: name 'a' is empty, repeated or contains '/'" in message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (["not", "a", "mapping"], "a study file must be a mapping"),
        ({"experiments": [{"name": "a"}]}, "'study' must be a non-empty name"),
        ({"study": "a/b", "experiments": [{"name": "a"}]}, "'study' must be a non-empty name without '/'"),
        ({"study": "s", "experiments": []}, "'experiments' must be a non-empty list"),
        ({"study": "s", "experiments": [{"train": {}}]}, "experiments[0] must be a mapping with a 'name'"),
        ({"study": "s", "experiments": [{"name": "x/y"}]}, "contains '/'"),
        ({"study": "s", "defaults": [1], "experiments": [{"name": "a"}]}, "'defaults' must be a mapping"),
    ],
)
def test_study_structure_errors(raw: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_study(raw, "f.yaml")
    assert str(info.value).startswith("f.yaml: ")
    assert expected in str(info.value)


# --------------------------------------------------------------------------------------------
# round trip and files


def test_round_trip_through_yaml() -> None:
    cfg = from_dict(
        ExperimentConfig,
        {
            "name": "rt",
            "seed": 3,
            "data": {"dataset": "digits", "image_size": 32, "train_subset": 0.5, "augment": ["flip", "crop"]},
            "model": {"backbone": "resnet18", "weights": "file:/tmp/w.pt", "channels_last": False},
            "head": {"type": "mlp", "hidden": 64, "dropout": 0.25},
            "strategy": {"name": "freeze_first", "stages": 2},
            "train": {"lr": 1e-5, "optimizer": "sgd", "max_grad_norm": 1.0, "early_stopping": {"patience": 2}},
            "notes": "subset: 50 %, 32 px",
        },
    )
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    back = config_from_yaml_text(text, "runs/x/config.yaml")
    assert back == cfg
    assert back.train.lr == 1e-5 and back.data.augment == ["flip", "crop"]
    assert config_from_yaml_text(yaml.safe_dump(ExperimentConfig().to_dict()), "c.yaml") == ExperimentConfig()


def test_config_from_yaml_text_names_source_on_error() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_yaml_text("name: x\ntrain: {epoch: 3}\n", "runs/s/x/config.yaml")
    assert str(info.value).startswith("runs/s/x/config.yaml: unknown key 'train.epoch'")


def test_load_study_from_file(tmp_path: Path) -> None:
    path = write_study(
        tmp_path,
        "study: demo\nseeds: [0, 1]\ndefaults:\n  train: {epochs: 2}\nexperiments:\n  - name: a\n    train: {lr: 0.01}\n",
    )
    parsed = load_study(path)
    assert parsed.name == "demo" and parsed.source == str(path)
    assert [(c.name, c.seed, c.train.epochs, c.train.lr) for c in parsed.experiments] == [
        ("a", 0, 2, 0.01),
        ("a", 1, 2, 0.01),
    ]


def test_invalid_yaml_names_file(tmp_path: Path) -> None:
    path = write_study(tmp_path, "study: s\nexperiments: [\n  - name: a\n")
    with pytest.raises(ConfigError) as info:
        load_study(path)
    assert str(info.value).startswith(f"{path}: not valid YAML")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_study(path)
    assert str(info.value) == f"study file not found: {path}"
    with pytest.raises(ConfigError, match="study file not found"):
        load_study(tmp_path)  # a directory is not a study file


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = write_study(tmp_path, "")
    with pytest.raises(ConfigError) as info:
        load_study(path)
    assert str(info.value).startswith(f"{path}: a study file must be a mapping")


def test_saved_config_errors_name_the_file():
    from transferlab.config import config_from_yaml_text

    with pytest.raises(ConfigError, match="runs/x/config.yaml: not valid YAML"):
        config_from_yaml_text("a: [", "runs/x/config.yaml")
    with pytest.raises(ConfigError, match="runs/x/config.yaml: expected a mapping"):
        config_from_yaml_text("", "runs/x/config.yaml")


def test_boolean_seeds_are_rejected():
    with pytest.raises(ConfigError, match="seeds"):
        parse_study({"study": "s", "seeds": [True], "experiments": [{"name": "a"}]})


def test_unknown_backbone_is_a_config_error_with_the_closest_names() -> None:
    """A typo in model.backbone stops at validation (plan, check-data, run), not when the run builds its model."""
    import transferlab.kinds  # noqa: F401 - registers the model layer's checks

    message = parse_error(study(experiments=[{"name": "a", "model": {"backbone": "resnet5", "weights": "scratch"}}]))
    assert "experiment 'a': model.backbone: unknown backbone 'resnet5'" in message
    assert "resnet50" in message  # the did-you-mean, from timm's own list
    parse_study(study(experiments=[{"name": "a", "model": {"backbone": "resnet18", "weights": "scratch"}}]), "ok.yaml")
