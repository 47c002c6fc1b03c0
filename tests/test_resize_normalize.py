"""``data.resize`` (crop / pad / stretch), the default size of mixed-size folders, ``data.normalize``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console

from data_fixtures import write_folder
from transferlab.config import ConfigError, DataConfig, parse_study
from transferlab.data import TensorBatches, make_batches, prepare_splits
from transferlab.data.check import check_config
from transferlab.data.images import load_image
from transferlab.data.normalize import Preprocess, channel_stats
from transferlab.data.resize import fit_geometry, resize_uint8
from transferlab.kinds.common import default_image_size
from transferlab.models.model import build_model
from transferlab.results.export import export_spec
from transferlab.rundir import load_run
from transferlab.study import run_study

QUIET = Console(quiet=True)


# --------------------------------------------------------------------------------------------
# resizing


def test_square_images_resize_exactly_as_before() -> None:
    x = torch.randint(0, 256, (5, 3, 28, 28), dtype=torch.uint8)
    before = F.interpolate(x.float(), size=(40, 40), mode="bilinear", antialias=True, align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    for fit in ("crop", "pad", "stretch"):
        assert torch.equal(resize_uint8(x, 40, fit), before), fit


def test_square_files_load_exactly_as_before(tmp_path: Path) -> None:
    write_folder(tmp_path, ["a"], 1, size=(20, 20))
    path = tmp_path / "a" / "0.png"
    before = np.asarray(Image.open(path).convert("RGB").resize((12, 12), Image.Resampling.BILINEAR))
    for fit in ("crop", "pad", "stretch"):
        assert np.array_equal(load_image(path, 3, 12, fit), before), fit


def _halves(h: int, w: int) -> torch.Tensor:
    """A 1×1×h×w image: left half 0, right half 200."""
    x = torch.zeros((1, 1, h, w), dtype=torch.uint8)
    x[..., w // 2 :] = 200
    return x


def test_crop_keeps_the_aspect_and_the_centre() -> None:
    assert fit_geometry(20, 40, 10, "crop") == (10, 20, 0, 5)  # shorter side to 10, a centered 10×10 window
    assert fit_geometry(20, 40, 10, "crop", crop_pct=0.875) == (11, 22, 0, 6)  # timm: floor(10 / 0.875) = 11
    out = resize_uint8(_halves(20, 40), 10, "crop")
    assert out.shape == (1, 1, 10, 10)
    assert out[0, 0, :, :4].max() == 0 and out[0, 0, :, 6:].min() == 200  # the centre of the image, undistorted


def test_pad_letterboxes_with_black() -> None:
    x = torch.full((1, 1, 20, 40), 100, dtype=torch.uint8)
    out = resize_uint8(x, 10, "pad")
    assert out.shape == (1, 1, 10, 10)
    assert (out[0, 0, :2] == 0).all() and (out[0, 0, 8:] == 0).all() and (out[0, 0, 3:7] == 100).all()
    stretched = resize_uint8(x, 10, "stretch")
    assert (stretched == 100).all()


@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_both_data_paths_resize_alike(tmp_path: Path, fit: str) -> None:
    write_folder(tmp_path / "ds" / "a", ["x"], 3, size=(30, 18))
    write_folder(tmp_path / "ds" / "b", ["x"], 3, size=(14, 22), seed=1)
    common = dict(dataset="folder", root=str(tmp_path / "ds"), val_count=2, image_size=12, resize=fit, test_fraction=0.34)
    mem = prepare_splits(DataConfig(**common, in_memory=True), 0)
    pil = prepare_splits(DataConfig(**common, in_memory=False), 0)
    assert mem.in_memory and not pil.in_memory
    pil_batches = make_batches(pil, "train", 64, _identity(), num_workers=0, channels_last=False)
    got = next(iter(pil_batches))[0]
    assert torch.equal(got.round().to(torch.uint8), mem.train_x)


def _identity() -> Preprocess:
    """Mean 0, std 1/255: batches come out as the uint8 pixels, in float."""
    return Preprocess(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))


def test_bad_resize_is_an_error_with_a_suggestion() -> None:
    raw = {"study": "s", "experiments": [{"name": "e", "data": {"resize": "crpo"}}]}
    with pytest.raises(ConfigError, match=r"data.resize.*did you mean 'crop'"):
        parse_study(raw)


# --------------------------------------------------------------------------------------------
# the default size of a folder of mixed sizes


def test_mixed_sizes_use_the_given_default_size(tmp_path: Path) -> None:
    write_folder(tmp_path / "ds" / "train", ["a", "b"], 4, size=(12, 10))
    write_folder(tmp_path / "ds" / "test", ["a", "b"], 2, size=(30, 20))
    s = prepare_splits(DataConfig(dataset="folder", root=str(tmp_path / "ds"), val_count=2), 0, default_size=16)
    assert s.train_x.shape[1:] == (3, 16, 16) and s.test_x.shape[1:] == (3, 16, 16)
    assert s.selection_record()["image_size"] == {"value": 16, "from": "backbone"}
    assert default_image_size("transferlab_cnn") == 32 and default_image_size("efficientnet_lite0") == 224
    report = check_config(DataConfig(dataset="folder", root=str(tmp_path / "ds"), val_count=2))
    assert report.ok and not report.warnings
    assert [p.kind for p in report.infos] == ["mixed_sizes"] and "pretrained input size" in report.format()


# --------------------------------------------------------------------------------------------
# normalisation


def test_dataset_stats_are_the_channel_mean_and_std() -> None:
    x = torch.randint(0, 256, (7, 3, 5, 6), dtype=torch.uint8)
    mean, std = channel_stats(x)
    f = x.double().transpose(0, 1).reshape(3, -1) / 255
    assert np.allclose(mean, f.mean(1).numpy()) and np.allclose(std, f.std(1, unbiased=False).numpy())


def test_normalize_none_and_dataset_reach_the_batches() -> None:
    base = dict(dataset="synthetic", synthetic_size=32, val_fraction=0.25)
    backbone_pre = _identity()
    none = prepare_splits(DataConfig(**base, normalize="none"), 0)
    xb = next(iter(make_batches(none, "train", 8, backbone_pre, channels_last=False)))[0]
    assert xb.min() >= 0 and xb.max() <= 1  # pixels / 255
    ds = prepare_splits(DataConfig(**base, normalize="dataset"), 0)
    xb = torch.cat([b[0] for b in make_batches(ds, "train", 8, backbone_pre, channels_last=False)])
    per_channel = xb.transpose(0, 1).reshape(xb.shape[1], -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(xb.shape[1]), atol=1e-4)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(xb.shape[1]), atol=1e-3)


def test_a_run_with_dataset_normalisation_predicts_with_its_stats(tmp_path: Path) -> None:
    study = {
        "study": "norm",
        "defaults": {
            "data": {"dataset": "synthetic", "synthetic_size": 64, "val_fraction": 0.25, "normalize": "dataset"},
            "model": {"backbone": "transferlab_cnn"},
            # fp32: the check below recomputes the test accuracy in fp32 arithmetic (bf16 may flip a borderline image)
            "train": {"epochs": 2, "batch_size": 16, "lr": 0.01, "progress": False, "accelerator": "cpu", "precision": "32-true"},
        },
        "experiments": [{"name": "cnn"}],
    }
    run_study(parse_study(study), tmp_path / "runs", console=QUIET)
    run = load_run(tmp_path / "runs" / "norm" / "cnn")
    recorded = json.loads((run.path / "selection.json").read_text())["normalize"]
    assert recorded["mode"] == "dataset"
    model = run.load_model()
    pre = model.preprocess()
    own = build_model(run.config.model, run.config.head, 4)[0].preprocess()  # the backbone's pretrained normalisation
    assert np.allclose(pre.mean, recorded["mean"] * (3 // len(recorded["mean"]))) and not np.allclose(pre.mean, own.mean)
    # the rebuilt model, fed through its own preprocess() only, scores the test split exactly as the run did
    splits = prepare_splits(run.config.data, run.config.seed)
    with torch.no_grad():
        logits = torch.cat([model(xb) for xb, _ in TensorBatches(splits.test_x, splits.test_y, 64, pre, channels_last=False)])
    acc = (logits.argmax(1) == splits.test_y).float().mean().item()
    assert acc == pytest.approx(run.record.test_acc, abs=1e-6)
    spec = export_spec(model, run.config, run.class_names, 32, 1)
    assert np.allclose(spec.preprocess().mean, pre.mean) and np.allclose(spec.preprocess().std, pre.std)
