"""Bad input of every kind, in one place: each case must fail with a message that names the culprit.

Config, checkpoints, data and CLI mistakes a user actually makes. Each case is a small function
that triggers the error; the test asserts the exception type and the message (the key, file or
value must be named). The image-decoding cases (truncated JPEG, CMYK, 16-bit, …) are covered in
depth in tests/test_bad_images.py; a representative few are repeated here through the public API.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import save_file

from transferlab.cli import main
from transferlab.config import ConfigError, ExperimentConfig, StrategyConfig, from_dict, parse_study
from transferlab.data import DatasetError, prepare_splits
from transferlab.data.sources import load_dataset
from transferlab.files import CheckpointError, load_checkpoint, save_checkpoint
from transferlab.kinds import run_experiment
from transferlab.models import WeightsError, build_model, create_backbone
from transferlab.models.weights import load_model_weights
from transferlab.rundir import RunError, load_run
from transferlab.strategies import apply_strategy

QUIET = Console(quiet=True)
BASE = {"name": "e", "data": {"dataset": "synthetic", "synthetic_size": 64, "val_fraction": 0.25}, "train": {"epochs": 1, "progress": False}}


def study_with(**experiment) -> dict:
    return {"study": "s", "experiments": [{**BASE, **experiment}]}


def cfg_with(**section) -> ExperimentConfig:
    raw = json.loads(json.dumps(BASE))
    for k, v in section.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    cfg = from_dict(ExperimentConfig, raw)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "r"
    run_experiment(cfg_with(), run_dir, console=QUIET)
    return run_dir


def _png(path: Path, mode: str = "RGB", size=(12, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


# --------------------------------------------------------------------------------------------
# config


def c_unknown_key(tmp):
    parse_study(study_with(trian={"epochs": 1}))


def c_unknown_nested_key(tmp):
    parse_study(study_with(train={"learning_rate": 0.1}))


def c_unknown_top_level(tmp):
    parse_study({"study": "s", "experiment": []})


def c_wrong_type(tmp):
    parse_study(study_with(train={"epochs": "ten"}))


def c_wrong_bool(tmp):
    parse_study(study_with(train={"lr": True}))


def c_negative_lr(tmp):
    parse_study(study_with(train={"lr": -0.1}))


def c_zero_epochs(tmp):
    parse_study(study_with(train={"epochs": 0}))


def c_bad_literal(tmp):
    parse_study(study_with(train={"optimizer": "adamm"}))


def c_unknown_strategy(tmp):
    parse_study(study_with(strategy={"name": "fintune"}))


def c_val_fraction(tmp):
    parse_study(study_with(data={"val_fraction": 1.5}))


def c_duplicate_names(tmp):
    parse_study({"study": "s", "experiments": [{"name": "a"}, {"name": "a"}]})


def c_invalid_yaml(tmp):
    from transferlab.config import load_study

    p = tmp / "bad.yaml"
    p.write_text("study: [unclosed")
    load_study(p)


def c_unknown_backbone(tmp):
    build_model(cfg_with(model={"backbone": "resnet81"}).model, cfg_with().head, 4)


def c_unknown_weights(tmp):
    create_backbone("resnet18", "imagenett")


def c_freeze_beyond_model(tmp):
    model, _ = build_model(cfg_with().model, cfg_with().head, 4)
    apply_strategy(model, StrategyConfig(name="freeze_first", stages=7))


def c_freeze_children_beyond(tmp):
    model, _ = build_model(cfg_with().model, cfg_with().head, 4)
    apply_strategy(model, StrategyConfig(name="freeze_first", children=40))


def c_freeze_two_forms(tmp):
    model, _ = build_model(cfg_with().model, cfg_with().head, 4)
    apply_strategy(model, StrategyConfig(name="freeze_first", stages=1, params=3))


def c_k_per_class_too_large(tmp):
    prepare_splits(cfg_with(data={"k_per_class": 500}).data, 0)


def c_classes_not_in_dataset(tmp):
    prepare_splits(cfg_with(data={"classes": [0, 9]}).data, 0)


def c_class_name_not_in_dataset(tmp):
    prepare_splits(cfg_with(data={"classes": ["class_0", "klass_1"]}).data, 0)


def c_subset_too_large(tmp):
    prepare_splits(cfg_with(data={"train_subset": 10_000}).data, 0)


def c_unknown_dataset(tmp):
    load_dataset(cfg_with(data={"dataset": "fashion_mnst"}).data)


def c_unknown_augmentation(tmp):
    cfg_with(data={"augment": ["flipp"]})


# --------------------------------------------------------------------------------------------
# checkpoints and weights


def k_wrong_num_classes(tmp, run):
    model, _ = build_model(cfg_with().model, cfg_with().head, 7)
    load_model_weights(model, run / "checkpoints" / "best.safetensors")


def k_other_architecture(tmp, run):
    model, _ = build_model(cfg_with(model={"backbone": "transferlab_cnn_deep"}).model, cfg_with().head, 4)
    load_model_weights(model, run / "checkpoints" / "best.safetensors")


def k_other_architecture_file(tmp, run):
    p = tmp / "r18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(p))
    create_backbone("resnet34", f"file:{p}")


def k_missing_metadata(tmp, run):
    p = tmp / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(p))
    load_checkpoint(p)


def k_truncated(tmp, run):
    p = tmp / "cut.safetensors"
    save_checkpoint(p, {"w": torch.ones(4096)}, {"epoch": 0})
    p.write_bytes(p.read_bytes()[:-1000])
    load_checkpoint(p)


def k_not_a_checkpoint(tmp, run):
    p = tmp / "notes.safetensors"
    p.write_text("hello")
    load_checkpoint(p)


def k_different_class_order(tmp, run):
    from transferlab.kinds.ensemble import evaluate_ensemble

    other = tmp / "other"
    import shutil

    shutil.copytree(run, other)
    m = json.loads((other / "metrics.json").read_text())
    m["class_names"] = list(reversed(m["class_names"]))
    (other / "metrics.json").write_text(json.dumps(m))
    evaluate_ensemble([run, other])


def k_run_dir_missing(tmp, run):
    load_run(tmp / "no_such_run")


def k_run_dir_exists(tmp, run):
    run_experiment(cfg_with(), run, console=QUIET)


def k_pickle_weights(tmp, run):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    p = tmp / "evil.pth"
    torch.save({"w": Evil()}, p)
    create_backbone("transferlab_cnn", f"file:{p}")


# --------------------------------------------------------------------------------------------
# data


def d_empty_class_folder(tmp):
    root = tmp / "imgs"
    _png(root / "cat" / "a.png")
    (root / "dog").mkdir(parents=True)
    load_dataset(cfg_with(data={"dataset": "folder", "root": str(root)}).data)


def d_no_classes(tmp):
    (tmp / "empty_root").mkdir()
    load_dataset(cfg_with(data={"dataset": "folder", "root": str(tmp / "empty_root")}).data)


def d_truncated_png(tmp):
    root = tmp / "imgs2"
    for c in ("a", "b"):
        for i in range(3):
            _png(root / c / f"{i}.png")
    bad = root / "a" / "0.png"
    bad.write_bytes(bad.read_bytes()[:30])
    load_dataset(cfg_with(data={"dataset": "folder", "root": str(root)}).data)


def d_text_as_jpeg(tmp):
    root = tmp / "imgs3"
    for c in ("a", "b"):
        for i in range(3):
            _png(root / c / f"{i}.png")
    (root / "b" / "fake.jpg").write_text("not an image")
    load_dataset(cfg_with(data={"dataset": "folder", "root": str(root)}).data)


def d_zero_byte(tmp):
    root = tmp / "imgs4"
    for c in ("a", "b"):
        for i in range(3):
            _png(root / c / f"{i}.png")
    (root / "b" / "empty.png").write_bytes(b"")
    load_dataset(cfg_with(data={"dataset": "folder", "root": str(root)}).data)


def d_missing_root(tmp):
    load_dataset(cfg_with(data={"dataset": "folder", "root": str(tmp / "nowhere")}).data)


# --------------------------------------------------------------------------------------------
# CLI


def cli(argv):
    def run(tmp, capsys):
        code = main([a.replace("{tmp}", str(tmp)) for a in argv])
        out = capsys.readouterr().out
        raise SystemExit(f"exit {code}: {out}")

    return run


CASES = [
    # (id, function, exception, message regex)
    ("unknown key", c_unknown_key, ConfigError, r"unknown key 'experiments\[0\]\.trian'.*did you mean 'train'"),
    ("unknown nested key", c_unknown_nested_key, ConfigError, r"experiments\[0\]\.train\.learning_rate"),
    ("unknown top-level key", c_unknown_top_level, ConfigError, r"unknown top-level key 'experiment'.*did you mean 'experiments'"),
    ("wrong type", c_wrong_type, ConfigError, r"train\.epochs: expected an integer, got 'ten'"),
    ("bool for a number", c_wrong_bool, ConfigError, r"train\.lr: expected a number, got True"),
    ("negative lr", c_negative_lr, ConfigError, r"train\.lr=-0\.1 must be > 0"),
    ("zero epochs", c_zero_epochs, ConfigError, r"train\.epochs=0 must be >= 1"),
    ("bad choice", c_bad_literal, ConfigError, r"'adamm' is not one of .*did you mean 'adam'"),
    ("unknown strategy", c_unknown_strategy, ConfigError, r"unknown strategy\.name 'fintune'.*did you mean 'finetune'"),
    ("val fraction", c_val_fraction, ConfigError, r"data\.val_fraction=1\.5"),
    ("duplicate names", c_duplicate_names, ConfigError, r"name 'a' is empty, repeated"),
    ("invalid yaml", c_invalid_yaml, ConfigError, r"bad\.yaml: not valid YAML"),
    ("unknown backbone", c_unknown_backbone, WeightsError, r"unknown backbone 'resnet81'.*resnet18"),
    ("unknown weights", c_unknown_weights, WeightsError, r"unknown weights source 'imagenett'"),
    ("freeze stages beyond model", c_freeze_beyond_model, ConfigError, r"strategy\.stages=7 but .* has only 2 stages"),
    ("freeze children beyond model", c_freeze_children_beyond, ConfigError, r"strategy\.children=40 but the backbone has only 4 children"),
    ("freeze two forms", c_freeze_two_forms, ConfigError, r"exactly one of strategy\.stages / children / params"),
    ("k_per_class too large", c_k_per_class_too_large, DatasetError, r"data\.k_per_class=500 but class 'class_\d' has only \d+"),
    ("class index not in dataset", c_classes_not_in_dataset, DatasetError, r"data\.classes\[1\]: class index 9 is out of range 0\.\.3"),
    ("class name not in dataset", c_class_name_not_in_dataset, DatasetError, r"data\.classes\[1\]: no class named 'klass_1'.*class_1"),
    ("subset too large", c_subset_too_large, DatasetError, r"data\.train_subset=10000 asks for 10000 images"),
    ("unknown dataset", c_unknown_dataset, DatasetError, r"unknown dataset 'fashion_mnst'.*did you mean 'fashion_mnist'"),
    ("unknown augmentation", c_unknown_augmentation, ConfigError, r"flipp"),
    ("empty class folder", d_empty_class_folder, DatasetError, r"dog"),
    ("root with no classes", d_no_classes, DatasetError, r"empty_root"),
    ("truncated png", d_truncated_png, DatasetError, r"a/0\.png"),
    ("text file as jpeg", d_text_as_jpeg, DatasetError, r"fake\.jpg"),
    ("zero-byte file", d_zero_byte, DatasetError, r"empty\.png"),
    ("missing data root", d_missing_root, DatasetError, r"nowhere"),
]

CHECKPOINT_CASES = [
    ("wrong num_classes", k_wrong_num_classes, CheckpointError, r"best\.safetensors.*head\.\d\.weight: expected \(7, \d+\), found \(4, \d+\)"),
    ("other architecture", k_other_architecture, CheckpointError, r"best\.safetensors does not match .*missing keys"),
    ("other architecture file", k_other_architecture_file, WeightsError, r"r18\.safetensors does not match .*missing keys.*layer\d"),
    ("missing metadata", k_missing_metadata, CheckpointError, r"plain\.safetensors: safetensors file without transferlab metadata"),
    ("truncated checkpoint", k_truncated, CheckpointError, r"cut\.safetensors"),
    ("not a checkpoint", k_not_a_checkpoint, CheckpointError, r"notes\.safetensors"),
    ("different class order", k_different_class_order, RunError, r"other: class names differ from .*: expected \['class_0', .*found \['class_3'"),
    ("run dir missing", k_run_dir_missing, RunError, r"no_such_run is not a transferlab run directory"),
    ("run dir exists", k_run_dir_exists, RunError, r"already exists: pass --resume .* or --overwrite"),
    ("pickled weights", k_pickle_weights, WeightsError, r"cannot read weights file .*evil\.pth"),
]

CLI_CASES = [
    ("cli missing study", cli(["run", "{tmp}/nope.yaml"]), r"exit 2: .*study file not found: .*nope\.yaml"),
    ("cli missing study dir", cli(["compare", "{tmp}/no_runs"]), r"exit 2: .*no such study directory: .*no_runs"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_config_and_data(case, tmp_path):
    _, fn, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        fn(tmp_path)


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoints(case, tmp_path, finished_run):
    _, fn, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        fn(tmp_path, finished_run)


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input(case, tmp_path, capsys):
    _, fn, pattern = case
    with pytest.raises(SystemExit, match=pattern):
        fn(tmp_path, capsys)


def test_there_are_at_least_thirty_cases():
    assert len(CASES) + len(CHECKPOINT_CASES) + len(CLI_CASES) >= 30
