"""Backbones, heads and weight sources: strict loading names exactly what was dropped or mismatched."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from transferlab.config import HeadConfig, ModelConfig
from transferlab.models import TransferModel, WeightsError, build_model, count_params, create_backbone


def test_builtin_cnn_is_a_timm_model_with_the_timm_interface():
    import transferlab.models  # noqa: F401

    assert timm.is_model("transferlab_cnn") and timm.is_model("transferlab_cnn_deep")
    m = timm.create_model("transferlab_cnn", num_classes=7)
    x = torch.randn(2, 3, 28, 28)
    feats = m.forward_features(x)
    assert feats.shape == (2, 128, 3, 3)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 128)
    assert m(x).shape == (2, 7)
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)
    # the seeds' block: conv, BN, ReLU, max-pool, dropout
    kinds = [type(layer).__name__ for layer in m.blocks[0]]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Dropout"]


def test_fast_cnn_is_airbenchs_pool_first_block_and_trains_as_a_backbone():
    import transferlab.models  # noqa: F401

    m = timm.create_model("transferlab_cnn_fast", num_classes=10)
    kinds = [type(layer).__name__ for layer in m.blocks[0]]
    assert kinds == ["Conv2d", "MaxPool2d", "BatchNorm2d", "GELU", "Conv2d", "BatchNorm2d", "GELU"]  # pooled before BN
    x = torch.randn(2, 3, 28, 28)
    assert m.forward_features(x).shape == (2, 256, 3, 3) and m(x).shape == (2, 10)
    assert isinstance(m.global_pool, torch.nn.AdaptiveMaxPool2d)
    # the second conv of each block runs at half the resolution of the first (what halves the FLOPs)
    seen = []
    hooks = [c.register_forward_hook(lambda mod, i, o: seen.append(i[0].shape[-1]))
             for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    m(x)
    [h.remove() for h in hooks]
    assert seen == [28, 14, 14, 7, 7, 3]
    model, _ = build_model(ModelConfig(backbone="transferlab_cnn_fast"), HeadConfig(), num_classes=4)
    assert model.num_features == 256 and model(x).shape == (2, 4)
    with pytest.raises(ValueError, match="unknown style"):
        timm.create_model("transferlab_cnn", style="resnet")


@pytest.mark.parametrize("head", [HeadConfig(type="linear", dropout=0.2), HeadConfig(type="mlp", hidden=32, dropout=0.3)])
def test_transfer_model_interface_and_heads(head):
    model, report = build_model(ModelConfig(backbone="transferlab_cnn"), head, num_classes=5)
    assert report is None  # scratch
    assert isinstance(model, TransferModel) and model.num_features == 128
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (4, 128)
    assert torch.equal(model.forward_head(feats), model(x))
    assert model(x).shape == (4, 5)
    drops = [m.p for m in model.head.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops == [head.dropout]
    if head.type == "mlp":
        assert [m.out_features for m in model.head.modules() if isinstance(m, torch.nn.Linear)] == [32, 5]
    model.reset_classifier(9)
    assert model(x).shape == (4, 9)
    total, trainable = count_params(model)
    assert total == trainable == sum(p.numel() for p in model.parameters())


def test_preprocess_comes_from_the_backbone_pretrained_config():
    model, _ = build_model(ModelConfig(backbone="tf_efficientnet_lite0"), HeadConfig(), 10)
    pre = model.preprocess()
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5) and pre.in_chans == 3
    resnet, _ = build_model(ModelConfig(backbone="resnet18"), HeadConfig(), 10)
    assert resnet.preprocess().mean == pytest.approx((0.485, 0.456, 0.406))


def test_file_weights_load_strictly_and_name_the_dropped_classifier(tmp_path):
    src = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "r18.safetensors"
    save_file(src.state_dict(), str(path))
    backbone, report = create_backbone("resnet18", f"file:{path}")
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"]
    assert "dropped 2" in report.describe() and "fc.weight" in report.describe()
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k


def test_torch_file_weights_are_read_with_weights_only(tmp_path, capsys):
    src = timm.create_model("transferlab_cnn", num_classes=0)
    path = tmp_path / "cnn.pt"
    torch.save(src.state_dict(), path)
    backbone, report = create_backbone("transferlab_cnn", f"file:{path}")
    assert report.loaded == len(src.state_dict()) and not report.dropped

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, bad, _use_new_zipfile_serialization=True)
    with pytest.raises(WeightsError, match="evil.pt"):
        create_backbone("transferlab_cnn", f"file:{bad}")
    assert "pwned" not in capsys.readouterr().out


def test_mismatched_architecture_says_expected_vs_found(tmp_path):
    path = tmp_path / "r18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(path))
    with pytest.raises(WeightsError) as e:
        create_backbone("resnet34", f"file:{path}")
    assert "r18.safetensors" in str(e.value) and "missing keys" in str(e.value)
    wide = timm.create_model("resnet18", num_classes=0).state_dict()
    wide["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    save_file(wide, str(path))
    with pytest.raises(WeightsError, match=r"conv1.weight: expected \(64, 3, 7, 7\), found \(32, 3, 7, 7\)"):
        create_backbone("resnet18", f"file:{path}")


def test_missing_or_corrupt_weights_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match="not found: .*nope.safetensors"):
        create_backbone("resnet18", f"file:{tmp_path}/nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(WeightsError, match="bad.safetensors"):
        create_backbone("resnet18", f"file:{bad}")


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(WeightsError, match="resnet18"):
        create_backbone("resnet81", "scratch")


def test_unknown_weights_source_and_embedded_for_other_arch():
    with pytest.raises(WeightsError, match="scratch, imagenet, embedded or file"):
        create_backbone("resnet18", "imagenett")
    with pytest.raises(WeightsError, match="only for backbone 'tf_efficientnet_lite0'"):
        create_backbone("resnet18", "embedded")


def test_imagenet_weights_offline_fail_fast_naming_alternatives(monkeypatch):
    """Real hub code path; this machine is offline, so it must fail quickly with the alternatives."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    start = time.perf_counter()
    try:
        create_backbone("resnet18", "imagenet")
    except WeightsError as e:
        assert "weights: embedded" in str(e) and "file:" in str(e)
    else:  # a machine with the weights already in its hub cache: loading must have worked
        pass
    assert time.perf_counter() - start < 15


def test_embedded_weights_build_the_pretrained_backbone():
    model, report = build_model(ModelConfig(backbone="tf_efficientnet_lite0", weights="embedded"), HeadConfig(), 10)
    assert report.dropped == ["classifier.weight", "classifier.bias"]
    assert model.num_features == 1280
