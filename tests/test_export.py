"""``transferlab export`` / ``Run.export``: every format, every model family, the parity check, and
``transferlab predict`` on an exported ONNX file.

One tiny study (one epoch each, a few seconds) gives a finished run per family: the built-in CNN on
scikit-learn's grayscale digits, the built-in CNN with a conv head, ResNet-18, a truncated ResNet-18
and EfficientNet-Lite0 (the TF "same" padding) on the synthetic dataset. Each exported file is also
opened here with its own runtime, independently of the parity code, and compared with the run's model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import transferlab
from report_fixtures import synthetic_class_image
from transferlab.cli import main
from transferlab.config import DataConfig, HeadConfig, ModelConfig, from_dict
from transferlab.models.model import build_model
from transferlab.results.export import (
    EXPORT_FORMATS,
    ONNX_OPSET,
    ExportError,
    ExportParityError,
    parity_inputs,
    parity_path,
)
from transferlab.rundir import load_run, load_test_predictions
from transferlab.tools.predict import predict

SYNTH = {"dataset": "synthetic", "synthetic_size": 64, "val_fraction": 0.25}
STUDY = {
    "study": "export",
    "defaults": {
        "data": SYNTH,
        # fp32 runs: the exports are fp32, and `predict <run>` computes as the run did (bf16 autocast for a bf16 run,
        # which `auto` picks on CPUs with native bf16), so only an fp32 run's outputs can match them to 1e-5
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": "cpu", "precision": "32-true"},
    },
    "experiments": [
        {"name": "cnn", "data": {"dataset": "digits", "train_subset": 300}, "model": {"backbone": "transferlab_cnn"}},
        {"name": "cnn_conv_head", "model": {"backbone": "transferlab_cnn"}, "head": {"type": "conv", "conv_channels": 8, "hidden": 16}},
        {"name": "resnet18", "data": {"image_size": 32}, "model": {"backbone": "resnet18"}},
        {"name": "resnet18_truncated", "data": {"image_size": 32}, "model": {"backbone": "resnet18", "truncate": {"stages": 2}}},
        {"name": "lite0", "data": {"image_size": 32}, "model": {"backbone": "tf_efficientnet_lite0"}},
    ],
}
FAMILIES = [e["name"] for e in STUDY["experiments"]]
TORCH_FORMATS = ["torchscript", "exported-program", "safetensors"]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export_study")
    path = root / "export.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    result = transferlab.run_study(path, runs_dir=root / "runs")
    assert sorted(result.finished) == sorted(FAMILIES), result
    return result.runs_dir


def _reference(run_dir: Path, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(preprocessed recorded test samples, the run's own logits on them)."""
    run = load_run(run_dir)
    model = run.load_model()
    images = load_test_predictions(run_dir).images[:n]
    x = model.preprocess()(images)
    with torch.inference_mode():
        return x, model(x)


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-4 + 1e-4 * ref.abs().max()
    assert torch.equal(got.argmax(1), ref.argmax(1))


# --------------------------------------------------------------------------------------------
# every family to ONNX


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_to_onnx_and_passes_parity(study_dir, tmp_path, family):
    run = load_run(study_dir / family)
    out = tmp_path / f"{family}.onnx"
    result = run.export("onnx", out)
    recorded = load_test_predictions(run.path)
    # the report: on the run's recorded samples, written beside the file, figures within the stated tolerance
    assert result.parity.ok and result.parity.n == len(recorded.images) and "recorded test samples" in result.parity.samples
    assert result.parity.top1_agreement == 1.0 and result.parity.max_abs_logit_diff <= result.parity.allowed
    report = json.loads(parity_path(out).read_text())
    assert report["ok"] is True and report["format"] == "onnx" and report["batch_sizes"] == [len(recorded.images), 1]

    # the file itself: opset, a symbolic batch axis, the preprocessing in metadata_props
    proto = onnx.load(str(out))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic, not a number
    meta = {p.key: p.value for p in proto.metadata_props}
    metrics = run.metrics
    pre = run.load_model().preprocess()
    assert int(meta["image_size"]) == metrics["image_size"] and int(meta["channels"]) == metrics["channels"]
    assert int(meta["in_chans"]) == pre.in_chans
    assert json.loads(meta["mean"]) == pytest.approx(list(pre.mean)) and json.loads(meta["std"]) == pytest.approx(list(pre.std))
    assert json.loads(meta["class_names"]) == run.class_names

    # onnxruntime directly, on a batch size the export never saw
    x, ref = _reference(run.path, 3)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    _close(torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]), ref)


def test_grayscale_run_records_one_channel_images_and_a_three_channel_model(study_dir, tmp_path):
    """digits are grayscale: the metadata says so, and the model input is the repeated RGB the backbone wants."""
    result = load_run(study_dir / "cnn").export("onnx", tmp_path / "m.onnx")
    meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert (meta["channels"], meta["in_chans"]) == ("1", "3")
    assert "N×3×8×8" in meta["input"]


# --------------------------------------------------------------------------------------------
# the torch formats


def _open_with_own_runtime(fmt: str, path: Path):
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch calls TorchScript deprecated
            return torch.jit.load(str(path))
    if fmt == "exported-program":
        return torch.export.load(str(path)).module()
    config = json.loads(path.with_suffix(".json").read_text())  # safetensors: the JSON config rebuilds the model
    model, _ = build_model(from_dict(ModelConfig, config["model"]), from_dict(HeadConfig, config["head"]), config["num_classes"])
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


# one family each (the ONNX test above covers every family; benchmarks/export_parity.py runs every pair)
@pytest.mark.parametrize(("fmt", "family"), [("torchscript", "lite0"), ("exported-program", "resnet18_truncated"), ("safetensors", "cnn_conv_head")])
def test_torch_formats_export_and_load_with_their_own_runtime(study_dir, tmp_path, fmt, family):
    result = load_run(study_dir / family).export(fmt, tmp_path / EXPORT_FORMATS.get(fmt).filename)
    assert result.parity.ok and result.parity.top1_agreement == 1.0
    assert parity_path(result.path).is_file() and all(f.is_file() for f in result.files)
    x, ref = _reference(study_dir / family, 5)
    with torch.inference_mode():
        _close(_open_with_own_runtime(fmt, result.path)(x), ref)


def test_default_output_is_in_the_run_folder_and_the_api_function_matches(study_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(study_dir / "cnn_conv_head", run_dir)
    result = transferlab.export_run(run_dir, "safetensors")
    assert result.path == run_dir / "export" / "model.safetensors"
    assert (run_dir / "export" / "model.json").is_file() and (run_dir / "export" / "model.safetensors.parity.json").is_file()


# --------------------------------------------------------------------------------------------
# the parity check fails when it should


def _perturbed(how: str):
    base = EXPORT_FORMATS.get("torchscript")

    def load(path):
        module = base.load(path)
        if how == "offset":  # same ranking, logits off by more than the tolerance
            return lambda x: module(x) + 0.01
        if how == "swap":  # a different top-1
            return lambda x: module(x).roll(1, dims=1)
        return lambda x: module(x) if len(x) > 1 else module(x).repeat(2, 1)  # a baked-in batch size

    return dataclasses.replace(base, load=load)


@pytest.mark.parametrize(("how", "says"), [("offset", "max |Δlogit|"), ("swap", "top-1 differs"), ("batch", "output shape")])
def test_a_failed_parity_check_is_an_error_and_is_reported(study_dir, tmp_path, how, says):
    out = tmp_path / "m.pt"
    with pytest.raises(ExportParityError) as e:
        load_run(study_dir / "cnn_conv_head").export(_perturbed(how), out)
    assert str(out) in str(e.value) and says in str(e.value) and "FAILED" in str(e.value)
    report = json.loads(parity_path(out).read_text())
    assert report["ok"] is False and says in report["problem"]


# --------------------------------------------------------------------------------------------
# what the check runs on


def test_without_recorded_samples_the_datasets_test_images_are_used(study_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(study_dir / "cnn_conv_head", run_dir)
    (run_dir / "predictions.json").unlink()
    (run_dir / "test_samples.safetensors").unlink()
    result = load_run(run_dir).export("torchscript", tmp_path / "m.pt")
    assert result.parity.ok and "test images of dataset 'synthetic'" in result.parity.samples and result.parity.n == 16


def test_unreadable_dataset_falls_back_to_seeded_noise_and_says_so():
    images, what = parity_inputs(None, DataConfig(dataset="folder", root="/nonexistent/images"), 3, 12)
    assert images.shape == (16, 3, 12, 12) and images.dtype == torch.uint8
    assert "seeded random images" in what and "'folder' unreadable" in what
    again, _ = parity_inputs(None, DataConfig(dataset="folder", root="/nonexistent/images"), 3, 12)
    assert torch.equal(images, again)


def test_large_runs_samples_are_resized_to_the_input_size():
    samples = torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8)
    images, what = parity_inputs(samples, DataConfig(**SYNTH), 3, 224)
    assert images.shape == (4, 3, 224, 224) and "resized to 224 px" in what


# --------------------------------------------------------------------------------------------
# the CLI, and predict with an ONNX file


def _images(folder: Path) -> list[Path]:
    folder.mkdir()
    paths = []
    for cls in range(4):
        paths.append(folder / f"class{cls}.png")
        Image.fromarray(synthetic_class_image(cls, scale=2, seed=cls)).save(paths[-1])
    return paths


def test_cli_export_then_predict_with_the_onnx_file_gives_the_runs_output(study_dir, tmp_path, capsys):
    run_dir = study_dir / "resnet18"
    out = tmp_path / "deploy" / "resnet18.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"written: {out}" in printed and "parity onnx" in printed and "— ok" in printed and str(parity_path(out)) in printed

    images = _images(tmp_path / "imgs")
    assert main(["predict", str(run_dir), str(tmp_path / "imgs"), "--top-k", "4", "--json", "-"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["predict", str(out), str(tmp_path / "imgs"), "--top-k", "4", "--json", "-"]) == 0
    from_onnx = json.loads(capsys.readouterr().out)
    assert from_onnx["format"] == "onnx" and from_onnx["run"] == str(run_dir) and from_onnx["class_names"] == from_run["class_names"]
    assert from_onnx["input"] == from_run["input"]
    for a, b in zip(from_run["images"], from_onnx["images"], strict=True):
        assert a["file"] == b["file"]
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        assert [p["prob"] for p in a["predictions"]] == pytest.approx([p["prob"] for p in b["predictions"]], abs=1e-5)
    # the table too, and the API
    assert main(["predict", str(out), str(images[0]), "--top-k", "2"]) == 0
    assert "resnet18: top 2" in capsys.readouterr().out
    api = predict(out, images, top_k=1)
    assert [p.top[0][1] for p in api] == [b["predictions"][0]["index"] for b in from_onnx["images"]]


def test_cli_several_formats_into_a_folder(study_dir, tmp_path, capsys):
    out = tmp_path / "exports"
    assert main(["export", str(study_dir / "cnn"), "--format", "torchscript,safetensors", "--out", str(out), "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["format"] for r in reports] == ["torchscript", "safetensors"] and all(r["ok"] for r in reports)
    assert (out / "model.torchscript.pt").is_file() and (out / "model.safetensors").is_file()


def test_cli_unknown_format_is_answered_with_the_closest_name(study_dir, capsys):
    assert main(["export", str(study_dir / "cnn"), "--format", "onx"]) == 2
    assert "unknown export format 'onx' (did you mean 'onnx'?)" in capsys.readouterr().out


def test_cli_export_of_an_unfinished_or_missing_run_names_it(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().out


def test_missing_onnx_extra_fails_before_any_work_naming_the_install(study_dir, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(study_dir / "cnn", run_dir)
    onnx_file = load_run(run_dir).export("onnx", tmp_path / "m.onnx").path
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    assert main(["export", str(run_dir), "--format", "onnx"]) == 2
    assert "pip install 'transferlab[onnx]'" in capsys.readouterr().out
    assert not (run_dir / "export").exists()  # nothing was written
    with pytest.raises(ExportError, match=r"transferlab\[onnx\]"):
        load_run(run_dir).export("onnx")
    assert main(["predict", str(onnx_file), str(_images(tmp_path / "imgs")[0])]) == 2
    assert "pip install 'transferlab[onnx]'" in capsys.readouterr().out


def test_predict_refuses_an_onnx_file_transferlab_did_not_write(study_dir, tmp_path, capsys):
    exported = load_run(study_dir / "cnn").export("onnx", tmp_path / "m.onnx").path
    proto = onnx.load(str(exported))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(proto, str(foreign))
    assert main(["predict", str(foreign), str(_images(tmp_path / "imgs")[0])]) == 2
    out = capsys.readouterr().out
    assert str(foreign) in out and "no transferlab metadata" in out


def test_formats_are_registered_with_their_runtime_and_extra():
    onnx_fmt = EXPORT_FORMATS.get("onnx")
    assert onnx_fmt.extra == "onnx" and set(onnx_fmt.requires) == {"onnx", "onnxruntime", "onnxscript"}
    assert {"onnx", *TORCH_FORMATS} <= set(EXPORT_FORMATS.names())
    assert all(EXPORT_FORMATS.get(f).extra is None for f in TORCH_FORMATS)  # torch formats need nothing extra
