"""Activation maps and Grad-CAM of token transformers (issue 22): a ViT's N×T×D tokens are shown as maps over its
patch grid, a Swin stage's N×H×W×C output as maps (``models.archs.feature_maps``)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from transferlab.config import HeadConfig, ModelConfig
from transferlab.models import build_model
from transferlab.models.archs import feature_maps
from transferlab.tools.inspect import capture_activations, default_layers, gradcam, image_activations


def _vit(size: int = 32, vpt: bool = False):
    model, _ = build_model(ModelConfig(backbone="vit_tiny_patch16_224", weights="scratch", image_size=size), HeadConfig(), 3)
    if vpt:
        from transferlab.config import StrategyConfig
        from transferlab.strategies import apply_strategy

        apply_strategy(model, StrategyConfig(name="vpt", prompts=5, deep=True))
    return model.eval()


def test_tokens_become_the_patch_grid_row_by_row():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=48, num_classes=0)
    tokens = vit.forward_features(torch.randn(2, 3, 48, 48))  # 1 class token + 3×3 patches
    maps = feature_maps(vit, tokens)
    assert maps.shape == (2, tokens.shape[2], 3, 3)
    # patch (row 1, col 2) is token 1 + 1·3 + 2 (timm's PatchEmbed flattens row-major after the prefix)
    assert torch.equal(maps[:, :, 1, 2], tokens[:, 1 + 1 * 3 + 2, :])


def test_swin_stage_output_is_permuted():
    swin = timm.create_model("swinv2_tiny_window8_256", img_size=64, num_classes=0)
    x = swin.layers[0](swin.patch_embed(torch.randn(1, 3, 64, 64)))  # N×H×W×C
    assert torch.equal(feature_maps(swin, x), x.permute(0, 3, 1, 2))


def test_cnn_maps_and_other_tensors_unchanged():
    cnn = timm.create_model("resnet18", num_classes=0)
    t = torch.randn(1, 64, 8, 8)
    assert feature_maps(cnn, t) is t
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0)
    logits = torch.randn(1, 10)
    assert feature_maps(vit, logits) is logits


@pytest.mark.parametrize("vpt", [False, True])
def test_vit_activations_and_gradcam(vpt):
    torch.manual_seed(0)
    model = _vit(32, vpt)
    x = torch.randn(1, 3, 32, 32)
    layers = default_layers(model, x)  # the first and a middle block: token outputs, now maps
    assert layers and all(name.startswith("backbone.blocks.") for name in layers)
    acts = capture_activations(model, x, layers)
    assert all(a.shape == (1, 192, 2, 2) for a in acts.values())
    cam = gradcam(model, x)  # `features`: for a class-token ViT, the last block's input norm (the final tokens get no gradient)
    assert cam.cam.shape == (32, 32) and np.isfinite(cam.cam).all() and cam.cam.max() == pytest.approx(1.0)
    png = image_activations(model, torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), model.preprocess(), ["a", "b", "c"],
                            "vit", gradcam_layer="features").png
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
