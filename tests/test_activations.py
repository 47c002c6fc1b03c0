"""Feature maps of chosen layers and Grad-CAM: correct values, sensible defaults, the CLI on outside images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import transferlab
from report_fixtures import synthetic_class_image, tiny_study_dir
from transferlab.cli import main
from transferlab.config import HeadConfig, ModelConfig
from transferlab.models.model import build_model
from transferlab.tools.activations import ActivationError, capture_activations, default_layers, gradcam, save_activations


@pytest.fixture(scope="session")
def study_dir(tmp_path_factory) -> Path:
    return tiny_study_dir(tmp_path_factory.mktemp("report_study"))


class TwoBlobs(nn.Module):
    """Class 0's score is the sum of feature channel 0, class 1's of channel 1 (identity 1×1 conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(2).view(2, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).sum(dim=(2, 3))


def test_gradcam_points_at_the_evidence_of_the_chosen_class():
    x = torch.zeros(1, 2, 8, 8)
    x[0, 0, 1:3, 1:3] = 1.0  # channel 0 (class 0's evidence) top left
    x[0, 1, 5:7, 5:7] = 2.0  # channel 1 (class 1's evidence, the larger score) bottom right
    model = TwoBlobs()
    c1 = gradcam(model, x, "features")
    assert c1.class_index == 1  # the predicted class by default
    assert c1.cam[5:7, 5:7].min() == pytest.approx(1.0) and c1.cam[1:3, 1:3].max() == pytest.approx(0.0)
    c0 = gradcam(model, x, "features", class_index=0)
    assert c0.cam[1:3, 1:3].min() == pytest.approx(1.0) and c0.cam[5:7, 5:7].max() == pytest.approx(0.0)
    assert c0.weights.tolist() == pytest.approx([1.0, 0.0])  # d score_0 / d feature, averaged per channel
    assert c0.prob == pytest.approx(torch.softmax(torch.tensor([4.0, 8.0]), 0)[0].item())  # scores 4 and 8


def test_gradcam_on_the_final_features_equals_the_hooked_last_stage():
    model, _ = build_model(ModelConfig("transferlab_cnn"), HeadConfig(), 4)
    x = torch.randn(1, 3, 16, 16)
    a = gradcam(model, x)  # forward_features output
    b = gradcam(model, x, "backbone.blocks", class_index=a.class_index)  # the module that produces it
    np.testing.assert_allclose(a.cam, b.cam, atol=1e-5)
    assert a.cam.shape == (16, 16) and a.cam.max() == pytest.approx(1.0) and a.cam.min() == pytest.approx(0.0)


def test_activations_are_the_layer_outputs_and_defaults_are_first_and_middle_stage():
    model, _ = build_model(ModelConfig("transferlab_cnn"), HeadConfig(), 4)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    assert default_layers(model, x) == ["backbone.blocks.0", "backbone.blocks.1"]
    acts = capture_activations(model, x, ["backbone.blocks.0", "backbone.blocks.1"])
    with torch.no_grad():
        first = model.backbone.blocks[0](x)
        second = model.backbone.blocks[1](first)
    torch.testing.assert_close(acts["backbone.blocks.0"], first)
    torch.testing.assert_close(acts["backbone.blocks.1"], second)
    resnet, _ = build_model(ModelConfig("resnet18"), HeadConfig(), 4)
    assert default_layers(resnet, torch.randn(1, 3, 32, 32)) == ["backbone.act1", "backbone.layer2"]


def test_layer_errors_name_the_layer_and_suggest(study_dir):
    model, _ = build_model(ModelConfig("transferlab_cnn"), HeadConfig(), 4)
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ActivationError, match=r"no layer named 'backbone\.block\.0'.*did you mean 'backbone\.blocks\.0'"):
        capture_activations(model, x, ["backbone.block.0"])
    with pytest.raises(ActivationError, match=r"'head\.1' outputs 1×4, not a N×C×H×W"):
        capture_activations(model, x, ["head.1"])
    with pytest.raises(ActivationError, match="Grad-CAM needs a convolutional layer"):
        gradcam(model, x, "head.1")


def test_activations_cli_on_an_outside_image(study_dir, tmp_path, capsys):
    run = study_dir / "scratch.seed0"
    image = tmp_path / "photo.png"
    Image.fromarray(synthetic_class_image(3, scale=4, seed=5)).convert("RGBA").save(image)
    out = tmp_path / "maps.png"
    assert main(["activations", str(run), str(image), "--gradcam", "--out", str(out), "--max-maps", "8"]) == 0
    text = capsys.readouterr().out
    assert "predicted class_3" in text and "backbone.blocks.0 32x8x8" in text and "backbone.blocks.1 64x4x4" in text
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 500 and im.height > 400
        assert len(im.convert("RGB").getcolors(1 << 20) or []) > 50

    res = save_activations(transferlab.load_run(run), image, tmp_path / "one.png", layers=["backbone.blocks.2"], gradcam_layer="backbone.blocks.1")
    assert res.layers == ["backbone.blocks.2"] and res.shapes["backbone.blocks.2"] == (1, 128, 2, 2)
    assert res.gradcam is not None and res.gradcam.layer == "backbone.blocks.1" and res.gradcam.cam.shape == (16, 16)
    assert res.predicted == "class_3" and res.gradcam.class_index == 3

    assert main(["activations", str(run), str(image), "--layers", "backbone.nope"]) == 2
    assert "no layer named 'backbone.nope'" in capsys.readouterr().out
