"""Weights from an earlier run (``weights: run:<dir>``): cross-dataset / cross-label-set transfer,
bit-for-bit backbones, exactly named dropped keys, architecture errors, keep_head, study references
and the seed study files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

import transferlab
from transferlab.config import HeadConfig, ModelConfig, TruncateConfig, load_study, parse_study
from transferlab.data import TensorBatches, prepare_splits
from transferlab.kinds import run_experiment
from transferlab.models import WeightsError, build_model
from transferlab.rundir import RunError, load_run
from transferlab.study import run_study

QUIET = Console(quiet=True)
STUDIES = Path(__file__).resolve().parent.parent / "studies"


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A finished run: transferlab_cnn on the 4-class synthetic task, linear head."""
    from transferlab.config import ExperimentConfig, from_dict

    cfg = from_dict(
        ExperimentConfig,
        {
            "name": "source",
            "data": {"dataset": "synthetic", "synthetic_classes": 4, "synthetic_size": 128, "val_fraction": 0.25},
            "model": {"backbone": "transferlab_cnn"},
            "train": {"epochs": 2, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": "cpu"},
        },
    )
    path = tmp_path_factory.mktemp("src") / "source"
    run_experiment(cfg, path, console=QUIET)
    return path


def test_run_weights_reproduce_the_source_backbone_bit_for_bit(source_run, make_cfg):
    src = load_run(source_run).load_model()
    model, report = build_model(ModelConfig(backbone="transferlab_cnn", weights=f"run:{source_run}"), HeadConfig(type="mlp", hidden=8), 3)
    model.eval()
    a, b = src.backbone.state_dict(), model.backbone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    splits = prepare_splits(make_cfg().data, 0)
    x = TensorBatches(splits.test_x, splits.test_y, 64, model.preprocess()).__iter__().__next__()[0]
    with torch.no_grad():
        assert torch.equal(src.forward_features(x), model.forward_features(x))
        assert torch.equal(src.forward_head(src.forward_features(x), pre_logits=True), model.forward_head(model.forward_features(x), pre_logits=True))
    # the head is new (3 classes, mlp) and the dropped keys are named exactly
    assert report.dropped == ["head.1.bias", "head.1.weight"] and report.dropped_what == "head of the source run"
    assert report.loaded == len(a) and not report.truncated
    assert "dropped 2 (head of the source run): head.1.bias, head.1.weight" in report.describe()
    assert str(source_run) in report.describe() and "best.safetensors" in report.describe()


def test_transfer_to_a_new_label_set_then_any_strategy(source_run, make_cfg, tmp_path):
    cfg = make_cfg(model={"weights": f"run:{source_run}"}, data={"classes": [3, 1, 2]}, strategy={"name": "linear_probe"}, train={"epochs": 1})
    m = run_experiment(cfg, tmp_path / "target", console=QUIET)
    assert m["class_names"] == ["class_3", "class_1", "class_2"] and len(m["per_class_acc"]) == 3
    assert "head of the source run" in m["weights_source"] and "head.1.weight" in m["weights_source"]
    # linear probe: the transferred backbone is unchanged by training
    src, tgt = load_run(source_run).load_model(), load_run(tmp_path / "target").load_model()
    a, b = src.backbone.state_dict(), tgt.backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_of_another_architecture_says_expected_vs_found(source_run):
    with pytest.raises(WeightsError, match=r"expected backbone resnet18 \(model.backbone of this experiment\), found transferlab_cnn"):
        build_model(ModelConfig(backbone="resnet18", weights=f"run:{source_run}"), HeadConfig(), 4)


def test_truncated_target_leaves_out_and_reports_the_cut_part(source_run):
    model, report = build_model(
        ModelConfig(backbone="transferlab_cnn", weights=f"run:{source_run}", truncate=TruncateConfig(stages=1)), HeadConfig(), 4
    )
    assert sorted(report.truncated) == sorted(k for k in load_run(source_run).load_model().backbone.state_dict() if k.startswith("blocks.2."))
    assert "left out 6 tensors past the truncation (blocks.2.*)" in report.describe()
    src = load_run(source_run).load_model().backbone
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(x), src.blocks[1](src.blocks[0](x)))
    assert model.num_features == 64


def test_a_source_truncated_deeper_than_the_target_is_an_error(source_run, make_cfg, tmp_path):
    cut = make_cfg(name="cut", model={"truncate": {"stages": 1}}, train={"epochs": 1})
    run_experiment(cut, tmp_path / "cut", console=QUIET)
    with pytest.raises(WeightsError, match=r"missing keys \(6\): blocks.2.*source run's backbone was truncated.*stages.: 1"):
        build_model(ModelConfig(backbone="transferlab_cnn", weights=f"run:{tmp_path / 'cut'}"), HeadConfig(), 4)


def test_keep_head_continues_the_source_model_exactly(source_run):
    src = load_run(source_run).load_model()
    model, report = build_model(ModelConfig(backbone="transferlab_cnn", weights=f"run:{source_run}", keep_head=True), HeadConfig(), 4)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(src(x), model.eval()(x))
    assert report.head_loaded and not report.dropped and "kept the source run's head" in report.describe()
    with pytest.raises(WeightsError, match=r"linear head for 4 classes, this experiment a linear head for 3"):
        build_model(ModelConfig(backbone="transferlab_cnn", weights=f"run:{source_run}", keep_head=True), HeadConfig(), 3)


def test_missing_or_unfinished_source_runs_are_refused(source_run, tmp_path):
    with pytest.raises(WeightsError, match="nope.*does not exist"):
        build_model(ModelConfig(weights=f"run:{tmp_path / 'nope'}"), HeadConfig(), 4)
    copy = tmp_path / "copy"
    shutil.copytree(source_run, copy)
    (copy / "metrics.json").unlink()
    with pytest.raises(WeightsError, match="did not finish"):
        build_model(ModelConfig(weights=f"run:{copy}"), HeadConfig(), 4)


STUDY = {
    "study": "xfer",
    "defaults": {
        "data": {"dataset": "synthetic", "synthetic_size": 128, "val_fraction": 0.25},
        "model": {"backbone": "transferlab_cnn"},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": "cpu"},
    },
    "experiments": [
        {"name": "source", "data": {"classes": [0, 1]}},
        {
            "name": "target", "data": {"classes": [2, 3]}, "model": {"weights": "run:source", "truncate": {"stages": 1}},
            "strategy": {"name": "linear_probe"},
        },
    ],
}


def test_a_study_file_transfers_between_its_own_experiments(tmp_path):
    from transferlab.cli import main

    path = tmp_path / "xfer.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
    study_dir = tmp_path / "runs" / "xfer"
    target = load_run(study_dir / "target")
    assert target.config.model.weights == f"run:{study_dir / 'source'}"  # resolved, recorded in config.yaml
    assert target.metrics["class_names"] == ["class_2", "class_3"]
    assert "left out 6 tensors past the truncation" in target.metrics["weights_source"]
    # the target's backbone is the source's first two blocks, bit for bit (linear probe: frozen)
    src, tgt = load_run(study_dir / "source").load_model().backbone.state_dict(), target.load_model().backbone.state_dict()
    assert tgt.keys() <= src.keys() and all(torch.equal(src[k], tgt[k]) for k in tgt)


def test_a_failed_source_skips_its_dependents_with_the_reason(tmp_path):
    study = json.loads(json.dumps(STUDY))
    missing = tmp_path / "no_such_images"  # a config that validates; the run fails when it reads its data
    study["experiments"][0]["data"] = {"dataset": "folder", "root": str(missing)}
    result = run_study(parse_study(study), tmp_path / "runs", console=QUIET)
    assert set(result.failed) == {"source", "target"}
    assert result.outcomes["source"].status == "failed" and result.outcomes["target"].status == "skipped"
    assert "the source run did not finish: source failed" in result.failed["target"] and "no_such_images" in result.failed["target"]
    recorded = json.loads((tmp_path / "runs" / STUDY["study"] / "target" / "metrics.json").read_text())
    assert recorded["status"] == "skipped" and "source failed" in recorded["error"]
    # exporting (or loading) the skipped run says it was skipped and why, not "not a transferlab run directory"
    with pytest.raises(RunError, match=r"the run was skipped, so it has no model: .*source failed"):
        transferlab.export_run(tmp_path / "runs" / STUDY["study"] / "target", "safetensors")


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.name)
def test_seed_study_files_are_valid(path):
    study = load_study(path)
    assert study.experiments
    names = {c.name for c in study.experiments}
    for cfg in study.experiments:
        w = cfg.model.weights
        if w.startswith("run:"):  # every transfer names an earlier experiment of the same study
            ref = w[len("run:") :]
            assert ref in names, f"{path.name}: {cfg.name} loads run:{ref}, not an experiment of the study"
            order = [c.name for c in study.experiments]
            assert order.index(ref) < order.index(cfg.name)
    for ens in study.ensembles:
        assert all(m in names for m in ens.members)


def test_seed_rows_have_study_files():
    files = {p.name for p in STUDIES.glob("*.yaml")}
    text = {p.name: p.read_text() for p in STUDIES.glob("*.yaml")}
    for row in ("0b", "0c", "2b", "2c"):
        assert any(f"row {row}" in t for t in text.values()), f"no study file mentions seed row {row}"
    assert len(files) >= 5


@pytest.mark.slow
@pytest.mark.parametrize(
    "study, floors",
    [
        ("transfer_fmnist_to_digits.yaml", {"fmnist_cnn": 0.8, "digits_probe": 0.7, "digits_fine_tune": 0.95, "digits_scratch": 0.9}),
        (
            "transfer_fmnist_0-4_to_5-9.yaml",
            {"source_0to4": 0.8, "truncated_probe_5to9": 0.7, "truncated_finetune_0to4": 0.75, "scratch_5to9": 0.85, "truncated_gradual_5to9": 0.8},
        ),
    ],
)
def test_fashion_mnist_transfer_studies_run_end_to_end(study, floors, tmp_path):
    """Real data, the shipped study files (a few minutes each on 2 CPU cores)."""
    result = run_study(STUDIES / study, tmp_path, console=QUIET)
    assert result.ok, result.failed
    for name, floor in floors.items():
        m = json.loads((result.runs_dir / name / "metrics.json").read_text())
        assert m["test_acc"] >= floor, (name, m["test_acc"])
        if m["weights"].startswith("run:"):
            assert "head of the source run" in m["weights_source"]
