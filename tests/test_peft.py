"""Any backbone at any size, and the parameter-efficient strategies: lora (HF peft), bitfit, norm_only, vpt.

Everything here is structural (tiny timm models, random weights, a forward or two): the real runs are in
tests/test_families.py.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import timm
import torch
from rich.console import Console
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from transferlab.config import ConfigError, ExperimentConfig, from_dict
from transferlab.kinds import run_experiment
from transferlab.models import adapters
from transferlab.models.adapters import add_strategy_modules, lora_targets, merge_adapters, trainable_state_dict
from transferlab.models.backbones import backbone_skeleton, input_size_problem, merged_lora_state
from transferlab.models.model import build_model, count_params
from transferlab.models.prompts import has_prompts
from transferlab.models.weights import load_model_weights
from transferlab.strategies import STRATEGIES, apply_strategy

VIT = "test_vit"  # timm's own tiny VisionTransformer (0.3 M parameters): the ViT family in milliseconds


def _cfg(backbone="resnet10t", strategy=None, size=32, **model) -> ExperimentConfig:
    cfg = from_dict(ExperimentConfig, {
        "name": "p", "data": {"dataset": "synthetic", "image_size": size},
        "model": {"backbone": backbone, "weights": "scratch", "channels_last": False, **model},
        "strategy": strategy or {"name": "finetune"},
    })
    cfg.validate()
    return cfg


def _model(backbone, strategy, size=32):
    cfg = _cfg(backbone, strategy, size)
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, cfg.head, 4)
    apply_strategy(model, cfg.strategy)
    return model


# --------------------------------------------------------------------------------------------
# any backbone at any input size


def test_vit_is_built_at_the_data_size_recorded_in_the_model_section():
    cfg = _cfg("vit_tiny_patch16_224", size=32)
    assert cfg.model.image_size == 32 and cfg.to_dict()["model"]["image_size"] == 32
    model, _ = build_model(cfg.model, cfg.head, 4)
    assert model.backbone.pos_embed.shape[1] == 1 + 2 * 2  # class token + a 2×2 grid of 16-px patches
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    again = from_dict(ExperimentConfig, cfg.to_dict())  # what load_run / export read back
    assert again.model.image_size == 32


def test_a_size_the_architecture_cannot_take_lists_the_sizes_that_work():
    with pytest.raises(ConfigError, match=r"data.image_size=32: swin_tiny_patch4_window7_224 cannot take 32×32 inputs "
                                          r"\(the window 7 of stage 0 does not divide its 8×8 token grid\); sizes that work: 224, 448"):
        _cfg("swin_tiny_patch4_window7_224", size=32)
    with pytest.raises(ConfigError, match=r"data.image_size=40: .*the patch size 16 does not divide 40.*sizes that work: 16, 32, 48"):
        _cfg("vit_tiny_patch16_224", size=40)
    with pytest.raises(ConfigError, match=r"data.image_size: vit_tiny_patch16_224 is built for one input size; set data.image_size"):
        cfg = from_dict(ExperimentConfig, {"data": {"dataset": "synthetic"}, "model": {"backbone": "vit_tiny_patch16_224"}})
        cfg.validate()
    with pytest.raises(ConfigError, match="model.image_size=64 differs from data.image_size=32"):
        _cfg("vit_tiny_patch16_224", size=32, image_size=64)
    assert input_size_problem("resnet10t", 33) is None  # CNNs take any size


def test_weights_made_at_another_size_are_resampled_as_timm_does(tmp_path):
    torch.manual_seed(0)
    big = timm.create_model("vit_tiny_patch16_224", num_classes=0)  # 14×14 grid
    save_file(big.state_dict(), str(tmp_path / "w.safetensors"))
    cfg = _cfg("vit_tiny_patch16_224", size=64, weights=f"file:{tmp_path / 'w.safetensors'}")
    model, report = build_model(cfg.model, cfg.head, 4)
    want = resample_abs_pos_embed(big.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    assert torch.equal(model.backbone.pos_embed.detach(), want)
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, big.blocks[0].attn.qkv.weight)
    assert report is not None and report.loaded == len(big.state_dict())


# --------------------------------------------------------------------------------------------
# what each strategy trains


def test_the_new_strategies_are_registered_and_documented():
    assert {"norm_only", "bitfit", "lora", "vpt"} <= set(STRATEGIES)


def _head(model):
    return sum(p.numel() for p in model.head.parameters())


def test_trainable_parameters_of_norm_only_and_bitfit():
    model = _model(VIT, {"name": "norm_only"})
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert count_params(model)[1] == _head(model) + sum(p.numel() for m in norms for p in m.parameters())
    model = _model("resnet10t", {"name": "bitfit"})
    biases = [p for n, p in model.backbone.named_parameters() if n.endswith("bias")]
    assert count_params(model)[1] == _head(model) + sum(p.numel() for p in biases)
    assert not model.frozen_bn  # its BatchNorm biases train, so their statistics do too


def test_lora_trains_rank_times_fan_in_plus_fan_out_per_targeted_layer():
    model = _model(VIT, {"name": "lora", "rank": 4})
    vit = timm.create_model(VIT, num_classes=0)
    layers = [m for n, m in vit.named_modules() if n.startswith("blocks.") and n.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2")
              and isinstance(m, torch.nn.Linear)]
    assert len(layers) == 4 * len(vit.blocks)  # attention and MLP projections of every block: the table's targets: auto
    assert count_params(model)[1] == _head(model) + sum(4 * (m.in_features + m.out_features) for m in layers)
    conv = _model("resnet10t", {"name": "lora", "rank": 2, "targets": ["layer4.*.conv2"]})
    c = timm.create_model("resnet10t").layer4[0].conv2
    assert count_params(conv)[1] == _head(conv) + 2 * (c.in_channels * 9 + c.out_channels)


def test_vpt_trains_prompts_and_head_shallow_and_deep():
    shallow = _model(VIT, {"name": "vpt", "prompts": 3})
    deep = _model(VIT, {"name": "vpt", "prompts": 3, "deep": True})
    width, blocks = shallow.backbone.embed_dim, len(shallow.backbone.blocks)
    assert count_params(shallow)[1] == _head(shallow) + 3 * width
    assert count_params(deep)[1] == _head(deep) + blocks * 3 * width
    x = torch.randn(2, 3, 32, 32)
    shallow.eval()
    with torch.no_grad():
        feats = shallow.forward_features(x)
        assert feats.shape[1] == shallow.backbone.num_prefix_tokens + 4  # the prompts are dropped before pooling
        out = shallow(x)
        shallow.backbone.prompt_tokens.add_(torch.randn_like(shallow.backbone.prompt_tokens))  # (a constant: LayerNorm removes it)
        assert not torch.allclose(out, shallow(x))  # the prompts take part
    deep.train()
    deep(x).sum().backward()
    assert deep.backbone.prompt_tokens.grad is not None and (deep.backbone.prompt_tokens.grad.abs().sum((1, 2)) > 0).all()


# --------------------------------------------------------------------------------------------
# LoRA: merged weights, rebuilding, the small state


def test_lora_merges_into_the_plain_architecture_with_the_same_outputs():
    model = _model(VIT, {"name": "lora", "rank": 4})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)  # as if trained
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        merge_adapters(model)
        got = model(x)
    assert torch.allclose(got, ref, atol=1e-5)
    plain, _ = build_model(_cfg(VIT).model, _cfg(VIT).head, 4)
    assert set(model.state_dict()) == set(plain.state_dict())  # loads like a fine-tuned run


def test_a_lora_checkpoint_loads_after_the_adapters_are_added_and_the_small_state_reproduces_it():
    model = _model(VIT, {"name": "lora", "rank": 2})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    state = model.state_dict()
    small = trainable_state_dict(model)
    assert set(small) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(v.numel() for v in small.values()) < sum(v.numel() for v in state.values()) / 10

    cfg = _cfg(VIT, {"name": "lora", "rank": 2})
    torch.manual_seed(0)
    rebuilt, _ = build_model(cfg.model, cfg.head, 4)  # same starting weights (seed), then the adapters, then the checkpoint
    with pytest.raises(RuntimeError):
        rebuilt.load_state_dict(state)
    add_strategy_modules(rebuilt, cfg.strategy)
    rebuilt.load_state_dict(state)
    torch.manual_seed(0)
    fresh, _ = build_model(cfg.model, cfg.head, 4)
    apply_strategy(fresh, cfg.strategy)
    adapters.load_trainable_state(fresh, small)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), rebuilt.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x)) and torch.equal(model(x), fresh(x))


def test_reapplying_the_strategy_does_not_add_adapters_twice():
    model = _model(VIT, {"name": "lora", "rank": 2})
    n = count_params(model)
    apply_strategy(model, _cfg(VIT, {"name": "lora", "rank": 2}).strategy)
    assert count_params(model) == n
    vpt = _model(VIT, {"name": "vpt", "prompts": 2})
    apply_strategy(vpt, _cfg(VIT, {"name": "vpt", "prompts": 2}).strategy)
    assert has_prompts(vpt.backbone) and vpt.backbone.prompt_tokens.shape == (1, 2, vpt.backbone.embed_dim)


# --------------------------------------------------------------------------------------------
# bad input: config errors naming the key, before any data loads


@pytest.mark.parametrize(("backbone", "strategy", "message"), [
    (VIT, {"name": "lora", "targets": ["qvk"]},
     r"strategy.targets\[0\]='qvk' matches no Linear or Conv2d layer of VisionTransformer \(did you mean .*qkv.*\); "
     r"layers it could match: .*blocks\.\*\.attn\.qkv"),
    (VIT, {"name": "lora", "targets": ["qkv", "blocks.*.mlp.fc3"]}, r"strategy.targets\[1\]='blocks.\*.mlp.fc3' matches no"),
    ("efficientnet_b0", {"name": "lora", "targets": ["conv_dw"]},
     r"strategy.targets\[0\]='conv_dw' selects only grouped \(depthwise\) convolutions, which take no LoRA"),
    (VIT, {"name": "lora", "rank": 0}, r"strategy.rank=0 must be >= 1"),
    (VIT, {"name": "lora", "rank": 10_000, "targets": ["qkv"]},
     r"strategy.rank=10000 is larger than layer blocks.0.attn.qkv of VisionTransformer allows \(up to \d+"),
    (VIT, {"name": "lora", "rank": 10_000}, r"strategy.targets=auto: no layer of VisionTransformer takes rank 10000"),
    (VIT, {"name": "lora", "targets": "qkv"}, r"strategy.targets='qkv' must be 'auto' or a list"),
    (VIT, {"name": "lora", "alpha": 0}, r"strategy.alpha=0.0 must be > 0"),
    (VIT, {"name": "lora", "dropout": 1.0}, r"strategy.dropout=1.0 must be in \[0, 1\)"),
    ("resnet10t", {"name": "vpt"}, r"strategy.name: vpt \(visual prompt tuning\) needs a timm VisionTransformer-family backbone.*"
                                   r"ResNet is none"),
    (VIT, {"name": "vpt", "prompts": 0}, r"strategy.prompts=0 must be >= 1"),
    ("vgg11", {"name": "norm_only"}, r"strategy.name: norm_only: VGG has no normalisation layer"),
])
def test_bad_strategy_options_are_config_errors_naming_the_key(backbone, strategy, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(backbone, strategy, size=32)


def test_lora_without_the_peft_extra_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=r"strategy.name: lora needs HF peft, which is not installed: pip install 'transferlab\[peft\]'"):
        _cfg(VIT, {"name": "lora"})


def test_target_patterns_select_layers_inside_a_container_and_by_suffix():
    vit = backbone_skeleton(VIT, 32)
    last = len(vit.blocks) - 1
    inside = lora_targets(vit, [f"blocks.{last}"], 2)
    assert inside == [f"blocks.{last}.attn.qkv", f"blocks.{last}.attn.proj", f"blocks.{last}.mlp.fc1", f"blocks.{last}.mlp.fc2"]
    assert lora_targets(vit, ["qkv"], 2) == [f"blocks.{i}.attn.qkv" for i in range(len(vit.blocks))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resnet = backbone_skeleton("resnet10t")
    auto = lora_targets(resnet, "auto", 8)
    assert auto and all(n.startswith("layer") and ".conv" in n for n in auto)


def test_lora_state_merges_like_peft_for_linear_and_conv_layers():
    for backbone, strategy in ((VIT, {"name": "lora", "rank": 4, "alpha": 8}), ("resnet10t", {"name": "lora", "rank": 2, "alpha": 3})):
        model = _model(backbone, strategy)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.05)
        state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        merged = merge_adapters(model).backbone.state_dict()
        mine = merged_lora_state(state, strategy["alpha"])
        assert mine.keys() == merged.keys()
        for k in mine:
            assert torch.allclose(mine[k], merged[k], atol=1e-6), k


def test_a_lora_run_is_a_weights_source_with_its_adapters_merged(tmp_path):
    cfg = from_dict(ExperimentConfig, {
        "name": "src", "data": {"dataset": "synthetic", "synthetic_classes": 3, "synthetic_size": 16, "val_fraction": 0.25, "image_size": 32},
        "model": {"backbone": VIT}, "strategy": {"name": "lora", "rank": 2, "alpha": 4},
        "train": {"epochs": 1, "batch_size": 8, "progress": False, "accelerator": "cpu", "precision": "32-true"},
    })
    cfg.validate()
    run_experiment(cfg, tmp_path / "src", console=Console(quiet=True))
    model, _ = build_model(cfg.model, cfg.head, 3)
    add_strategy_modules(model, cfg.strategy)
    load_model_weights(model, tmp_path / "src" / "checkpoints" / "best.safetensors")
    merge_adapters(model)
    second = _cfg(VIT, {"name": "finetune"}, weights=f"run:{tmp_path / 'src'}")
    started, report = build_model(second.model, second.head, 3)
    assert report is not None and "head of the source run" in report.describe()
    for k, v in model.backbone.state_dict().items():
        assert torch.allclose(started.backbone.state_dict()[k], v, atol=1e-6), k
