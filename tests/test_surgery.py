"""Model surgery: truncation of timm backbones (seed 000's cut ResNet-50), the conv head (seed 002),
dropout on every head, head-only re-initialisation."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from rich.console import Console

import transferlab.models  # noqa: F401 - registers the built-in CNNs
from transferlab.config import ConfigError, HeadConfig, ModelConfig, StrategyConfig, TruncateConfig
from transferlab.kinds import run_experiment
from transferlab.models import build_model
from transferlab.models.heads import ConvHead
from transferlab.models.truncate import is_truncated, stage_modules, truncate_backbone
from transferlab.rundir import load_run
from transferlab.strategies import apply_strategy

QUIET = Console(quiet=True)


def _pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A backbone and an untouched deep copy of it (same weights)."""
    torch.manual_seed(0)
    full = timm.create_model(name, num_classes=0).eval()
    return copy.deepcopy(full), full


def test_resnet50_cut_after_two_stages_is_the_seed_model_with_512_features():
    """Seed 000: conv1, bn1, relu, maxpool, layer1, layer2 of a ResNet-50, then avgpool -> 512 features."""
    model, full = _pair("resnet50")
    report = truncate_backbone(model, TruncateConfig(stages=2))
    assert report.cut == "layer2" and report.num_features == 512 == model.num_features
    assert is_truncated(model) and isinstance(model, timm.models.ResNet)
    keys = set(model.state_dict())
    assert not any(k.startswith(("layer3.", "layer4.")) for k in keys)
    assert set(report.removed_keys) == set(full.state_dict()) - keys
    assert {k.split(".")[0] for k in report.removed_keys} == {"layer3", "layer4"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        by_hand = full.layer2(full.layer1(full.maxpool(full.act1(full.bn1(full.conv1(x))))))
        assert torch.equal(model.eval().forward_features(x), by_hand)
        assert torch.allclose(model(x), by_hand.mean((2, 3)), atol=1e-6)
    assert model(x).shape == (2, 512)


def test_cut_after_a_block_reproduces_the_seed_deleting_layer2_3():
    """The seed's code also did ``del self.layer2[3]``: ``after: layer2.2`` is exactly that model."""
    model, full = _pair("resnet50")
    truncate_backbone(model, TruncateConfig(after="layer2.2"))
    assert not any(k.startswith("layer2.3.") for k in model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = full.layer1(full.maxpool(full.act1(full.bn1(full.conv1(x)))))
        for i in range(3):
            y = full.layer2[i](y)
        assert torch.equal(model.forward_features(x), y)
    assert model.num_features == 512


@pytest.mark.parametrize(
    "name, stages, cut, width",
    [
        ("transferlab_cnn", 1, "blocks.1", 64),
        ("tf_efficientnet_lite0", 3, "blocks.2", 40),
        ("convnext_atto", 2, "stages.1", 80),
        ("vit_tiny_patch16_224", 3, "blocks.2", 192),
    ],
)
def test_truncation_by_stages_works_for_any_timm_family(name, stages, cut, width):
    model, full = _pair(name)
    report = truncate_backbone(model, TruncateConfig(stages=stages))
    assert report.cut == cut and model.num_features == width
    assert stage_modules(model) == stage_modules(full)[:stages]  # later stages are gone, the grouping still works
    size = full.pretrained_cfg["input_size"]
    x = torch.randn(2, *size)
    out = model.eval()(x)
    assert out.shape == (2, width)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    # a new head goes on the inferred width, and strategies that count stages still work
    tm, _ = build_model(ModelConfig(backbone=name, truncate=TruncateConfig(stages=stages), channels_last=False), HeadConfig(), 7)
    assert tm.num_features == width and tm.head[1].in_features == width
    apply_strategy(tm, StrategyConfig(name="freeze_first", stages=stages))
    assert not any(p.requires_grad for p in tm.backbone.parameters())  # stem + every remaining stage frozen
    assert tm.eval()(x).shape == (2, 7)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (TruncateConfig(stages=5), r"ResNet has 4 stages after its stem \(layer1, layer2, layer3, layer4\); use 1..4"),
        (TruncateConfig(stages=0), r"stages=0"),
        (TruncateConfig(after="layr2"), r"no module of that name \(did you mean layer2"),
        (TruncateConfig(after="layer2.0.conv1"), r"cutting ResNet after 'layer2.0.conv1'.*whole stage or block.*layer1, layer2"),
        (TruncateConfig(stages=1, after="layer1"), r"exactly one of stages / after"),
    ],
)
def test_impossible_cuts_are_refused_with_the_reason(cfg, message):
    model = timm.create_model("resnet18", num_classes=0)
    with pytest.raises(ConfigError, match=message):
        truncate_backbone(model, cfg)


def test_a_cut_that_skips_part_of_a_residual_block_is_detected():
    """bn2 of a block without downsample: identity-replacing the rest changes the output, not the shape."""
    model = timm.create_model("resnet18", num_classes=0)
    with pytest.raises(ConfigError, match=r"does not give that module's output"):
        truncate_backbone(model, TruncateConfig(after="layer1.1.bn2"))


def test_truncated_model_trains_and_its_run_reloads(make_cfg, tmp_path):
    from lightning.fabric import Fabric

    from transferlab.data import TensorBatches, prepare_splits
    from transferlab.engine import fit
    from transferlab.models.model import BN_TYPES

    cfg = make_cfg(
        model={"backbone": "resnet18", "truncate": {"stages": 2}},
        data={"image_size": 32},
        strategy={"name": "freeze_first", "stages": 1},
        train={"epochs": 1, "lr": 0.01},
    )
    splits = prepare_splits(cfg.data, cfg.seed)
    model, _ = build_model(cfg.model, cfg.head, splits.num_classes)
    apply_strategy(model, cfg.strategy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pre = model.preprocess()
    train = TensorBatches(splits.train_x, splits.train_y, 32, pre, shuffle=True)
    val = TensorBatches(splits.val_x, splits.val_y, 64, pre)
    fit(model, train, val, cfg, Fabric(accelerator="cpu", devices=1), tmp_path / "ck", {}, console=QUIET)
    after = model.state_dict()
    for name, p in model.named_parameters():  # layer2 and the head trained; stem and layer1 did not move
        assert torch.equal(before[name], after[name]) != p.requires_grad, name
        assert p.requires_grad == name.startswith(("backbone.layer2.", "head.")), name
    for mname, m in model.named_modules():
        if isinstance(m, BN_TYPES):
            moved = not torch.equal(before[f"{mname}.running_mean"], after[f"{mname}.running_mean"])
            assert moved == mname.startswith("backbone.layer2."), mname

    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert m["total_params"] == 683_072 + 128 * 4 + 4  # stem + layer1 + layer2 of ResNet-18, head 128 -> 4
    assert m["trainable_params"] == 525_568 + 128 * 4 + 4
    run = load_run(tmp_path / "run")
    assert run.config.model.truncate == TruncateConfig(stages=2)
    reloaded = run.load_model()
    assert is_truncated(reloaded.backbone) and reloaded.num_features == 128


def test_conv_head_gets_the_unpooled_features_and_pre_logits_keeps_its_meaning():
    head = HeadConfig(type="conv", conv_channels=8, kernel_size=3, hidden=16, dropout=0.2)
    model, _ = build_model(ModelConfig(backbone="transferlab_cnn", channels_last=False), head, num_classes=5)
    assert isinstance(model.head, ConvHead) and model.head_input == "spatial"
    assert model.head.conv.in_channels == 128 and model.head.conv.out_channels == 8 and model.head.fc1.out_features == 16
    assert [type(m).__name__ for m in model.head.children()] == ["Conv2d", "ReLU", "AdaptiveAvgPool2d", "Dropout", "Linear", "ReLU", "Linear"]
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (3, 128, 4, 4)
    assert torch.equal(model(x), model.head(feats))
    # pre_logits: the backbone's pooled features for every head kind (what feature caches store)
    assert torch.equal(model.forward_head(feats, pre_logits=True), model.backbone.forward_head(feats, pre_logits=True))
    assert model(x).shape == (3, 5)
    with pytest.raises(ValueError, match="N×C×H×W"):
        model.head(torch.randn(3, 10, 128))
    # a 2x2 feature map (e.g. a 64 px EfficientNet input) works: 'same' padding
    assert model.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 5)


def test_conv_head_trains_in_a_run(make_cfg, tmp_path):
    cfg = make_cfg(
        head={"type": "conv", "conv_channels": 8, "hidden": 32, "dropout": 0.2}, strategy={"name": "bn_only"},
        train={"epochs": 2, "optimizer": "rmsprop", "lr": 0.001},
    )
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert m["status"] == "ok" and m["head"] == "conv"
    model = load_run(tmp_path / "run").load_model()
    assert isinstance(model.head, ConvHead)


@pytest.mark.parametrize("kind", ["linear", "mlp", "conv"])
def test_every_head_has_dropout_before_a_linear_layer(kind):
    model, _ = build_model(ModelConfig(backbone="transferlab_cnn"), HeadConfig(type=kind, dropout=0.35, hidden=8), 3)
    mods = list(model.head.modules())[1:]
    drops = [i for i, m in enumerate(mods) if isinstance(m, torch.nn.Dropout)]
    assert drops and all(mods[i].p == 0.35 for i in drops)
    assert any(isinstance(m, torch.nn.Linear) for m in mods[drops[-1] :])


def test_reinit_head_touches_only_the_head():
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(backbone="transferlab_cnn"), HeadConfig(type="mlp", hidden=16), 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head_params = [id(p) for p in model.head.parameters()]
    model.reinit_head()
    after = model.state_dict()
    for k, v in before.items():
        same = torch.equal(v, after[k])
        assert same != k.startswith("head."), k  # backbone identical, every head tensor redrawn
    assert [id(p) for p in model.head.parameters()] == head_params  # same tensors: an optimizer keeps working


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"head": {"type": "conv", "kernel_size": 2}}, "head.kernel_size=2 must be odd"),
        ({"head": {"type": "conv", "conv_channels": 0}}, "head.conv_channels=0"),
        ({"model": {"keep_head": True}}, "model.keep_head=True needs weights: run:"),
        ({"model": {"truncate": {"stages": 0}}}, r"model.truncate.stages=0 must be >= 1"),
        ({"model": {"truncate": {}}}, "needs exactly one of stages / after"),
    ],
)
def test_surgery_keys_are_validated_before_any_data_is_loaded(overrides, message, make_cfg):
    with pytest.raises(ConfigError, match=message):
        make_cfg(**overrides)
