"""Every strategy: frozen parameters and frozen BatchNorm statistics are bit-identical after real
training with the engine; everything that should train changed."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric import Fabric
from rich.console import Console

from transferlab.config import ConfigError, StrategyConfig
from transferlab.data import TensorBatches, prepare_splits
from transferlab.engine import fit
from transferlab.models import build_model
from transferlab.models.model import BN_TYPES
from transferlab.strategies import STRATEGIES, apply_strategy, stage_groups


def _train(cfg, tmp_path):
    splits = prepare_splits(cfg.data, cfg.seed)
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, cfg.head, splits.num_classes)
    apply_strategy(model, cfg.strategy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pre = model.preprocess()
    train = TensorBatches(splits.train_x, splits.train_y, cfg.train.batch_size, pre, shuffle=True, seed=0)
    val = TensorBatches(splits.val_x, splits.val_y, 64, pre)
    fit(model, train, val, cfg, Fabric(accelerator="cpu", devices=1), tmp_path / "ck", {}, console=Console(quiet=True))
    return model, before


def _check_frozen_vs_trained(model, before):
    after = model.state_dict()
    params = dict(model.named_parameters())
    for name, p in params.items():
        same = torch.equal(before[name], after[name])
        if p.requires_grad:
            assert not same, f"trainable parameter {name} did not change"
        else:
            assert same, f"frozen parameter {name} changed"
    modules = dict(model.named_modules())
    for mname, m in modules.items():
        if isinstance(m, BN_TYPES) and m.track_running_stats:
            same = torch.equal(before[f"{mname}.running_mean"], after[f"{mname}.running_mean"]) and torch.equal(
                before[f"{mname}.running_var"], after[f"{mname}.running_var"]
            )
            if mname in model.frozen_bn:
                assert same, f"frozen BatchNorm {mname} updated its running stats"
                assert torch.equal(before[f"{mname}.num_batches_tracked"], after[f"{mname}.num_batches_tracked"])
            else:
                assert not same, f"trainable BatchNorm {mname} did not update its running stats"


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


CASES = {
    "scratch": ({"name": "scratch"}, "transferlab_cnn"),
    "finetune": ({"name": "finetune"}, "transferlab_cnn"),
    "linear_probe": ({"name": "linear_probe"}, "transferlab_cnn"),
    "freeze_first_stages": ({"name": "freeze_first", "stages": 1}, "transferlab_cnn"),
    "freeze_first_children": ({"name": "freeze_first", "children": 6}, "resnet18"),
    "freeze_first_params": ({"name": "freeze_first", "params": 3}, "transferlab_cnn"),
    "bn_only": ({"name": "bn_only"}, "transferlab_cnn"),
    "norm_only": ({"name": "norm_only"}, "transferlab_cnn"),
    "bitfit": ({"name": "bitfit"}, "transferlab_cnn"),
    "lora": ({"name": "lora", "rank": 2}, "transferlab_cnn"),
    "vpt": ({"name": "vpt", "prompts": 2, "deep": True}, "test_vit"),  # the family matrix: tests/test_families.py
}


PHASED = {"lp_ft"}
"""Strategies of two training phases (a probe, then everything): tested in tests/test_modern_finetuning.py."""


def test_every_registered_strategy_is_covered_and_documented():
    assert {c[0]["name"] for c in CASES.values()} | PHASED == set(STRATEGIES)
    for fn in STRATEGIES.values():
        assert fn.__doc__ and len(fn.__doc__.strip()) > 20


@pytest.mark.parametrize("case", list(CASES))
def test_strategy_freezes_exactly_what_it_says(case, make_cfg, tmp_path):
    strategy, backbone = CASES[case]
    data = {"image_size": 32} if backbone == "test_vit" else {}  # a ViT is built at the data's size
    cfg = make_cfg(strategy=strategy, model={"backbone": backbone}, data=data, train={"epochs": 1, "optimizer": "adamw", "lr": 0.01})
    model, before = _train(cfg, tmp_path)
    _check_frozen_vs_trained(model, before)

    trainable = _trainable(model)
    head = {n for n in trainable if n.startswith("head.")}
    assert head == {n for n, _ in model.head.named_parameters(prefix="head")}, "the head always trains"
    backbone_params = {n for n, _ in model.backbone.named_parameters(prefix="backbone")}
    bn_params = {
        f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, BN_TYPES) for p, _ in mod.named_parameters()
    }
    if case in ("scratch", "finetune"):
        assert trainable >= backbone_params and not model.frozen_bn
    elif case == "linear_probe":
        assert not (trainable & backbone_params)
        assert model.frozen_bn == {m for m, mod in model.backbone.named_modules(prefix="backbone") if isinstance(mod, BN_TYPES)}
    elif case == "bn_only":
        assert trainable & backbone_params == bn_params
        assert not model.frozen_bn
    elif case == "freeze_first_stages":  # stem (blocks.0) and stage 1 (blocks.1) frozen, blocks.2 trains
        frozen = backbone_params - trainable
        assert frozen == {n for n in backbone_params if n.startswith(("backbone.blocks.0.", "backbone.blocks.1."))}
        assert "backbone.blocks.1.1" in model.frozen_bn and "backbone.blocks.2.1" not in model.frozen_bn
    elif case == "freeze_first_children":  # seed 004: first 6 children of ResNet-18 = conv1, bn1, act1, maxpool, layer1, layer2
        frozen = backbone_params - trainable
        assert frozen == {n for n in backbone_params if n.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1.", "backbone.layer2."))}
        assert "backbone.layer2.1.bn2" in model.frozen_bn and "backbone.layer3.0.bn1" not in model.frozen_bn
    elif case == "freeze_first_params":  # first 3 tensors: conv weight, BN weight, BN bias of block 0
        frozen = backbone_params - trainable
        assert frozen == {"backbone.blocks.0.0.weight", "backbone.blocks.0.1.weight", "backbone.blocks.0.1.bias"}
        assert model.frozen_bn == {"backbone.blocks.0.1"}


def test_frozen_batchnorm_stays_in_eval_mode_after_train_calls(make_cfg):
    cfg = make_cfg(strategy={"name": "linear_probe"})
    model, _ = build_model(cfg.model, cfg.head, 4)
    apply_strategy(model, cfg.strategy)
    model.train()
    model.eval()
    model.train(True)
    bns = [m for m in model.backbone.modules() if isinstance(m, BN_TYPES)]
    assert bns and all(not m.training for m in bns)
    assert model.head.training


def test_stage_groups_of_timm_models_follow_their_stages():
    import timm

    resnet = timm.create_model("resnet18", num_classes=0)
    groups = stage_groups(resnet)
    assert len(groups) == 5  # stem + layer1..layer4
    assert groups[0][0].startswith("conv1") and groups[4][-1].startswith("layer4")
    import transferlab.models  # noqa: F401

    cnn = timm.create_model("transferlab_cnn", num_classes=0)
    assert [g[0].split(".")[1] for g in stage_groups(cnn)] == ["0", "1", "2"]


@pytest.mark.parametrize(
    "strategy, message",
    [
        ({"name": "freeze_first"}, "exactly one of"),
        ({"name": "freeze_first", "stages": 1, "children": 2}, "exactly one of"),
        ({"name": "freeze_first", "stages": 9}, "has only 2 stages"),
        ({"name": "freeze_first", "children": 99}, "only 4 children"),
        ({"name": "freeze_first", "params": 10_000}, "parameter tensors"),
    ],
)
def test_freeze_first_rejects_impossible_cuts(strategy, message, make_cfg):
    cfg = make_cfg()
    model, _ = build_model(cfg.model, cfg.head, 4)
    with pytest.raises(ConfigError, match=message):
        apply_strategy(model, StrategyConfig(**strategy))
