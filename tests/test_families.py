"""The family matrix: every backbone family × every strategy × 32 and 64 px where the family allows.

Random weights, tiny synthetic data. Two levels:

* ``test_one_step`` — the model is built from a validated config (fixed-size backbones at the data's
  size), the strategy applied, one optimizer step taken: exactly the parameters the strategy names
  change, and the trainable count is the one the strategy promises.
* ``test_run_resume`` — a real run (``run_experiment``) killed after its first epoch and resumed ends
  bit-identical to an uninterrupted one; the exported model (LoRA merged) gives the run's outputs.

CI runs the 32 px step of every family but VGG (128 M parameters: slow) and one run per family; the
rest of the matrix is marked slow.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from transferlab.config import ExperimentConfig, from_dict
from transferlab.models.adapters import add_strategy_modules, merge_adapters
from transferlab.models.model import build_model
from transferlab.models.weights import load_model_weights
from transferlab.results.export import export_format, export_run_model
from transferlab.rundir import load_run, load_test_predictions
from transferlab.strategies import NORM_TYPES, apply_strategy

QUIET = Console(quiet=True)

FAMILIES = {  # family: (smallest timm variant, sizes it takes)
    "resnet": ("resnet10t", (32, 64)),
    "vgg": ("vgg11_bn", (32, 64)),
    "efficientnet": ("efficientnet_b0", (32, 64)),
    "mobilenetv3": ("mobilenetv3_small_050", (32, 64)),
    "regnet": ("regnetx_002", (32, 64)),
    "convnext": ("convnext_atto", (32, 64)),
    "vit": ("vit_tiny_patch16_224", (32, 64)),
    "deit": ("deit_tiny_patch16_224", (32, 64)),
    "swin": ("swinv2_tiny_window8_256", (32, 64)),  # swin_tiny_patch4_window7_224 takes only 224 / 448 (test_peft)
}
VITS = {"vit", "deit"}
STRATEGIES = {
    "scratch": {"name": "scratch"},
    "finetune": {"name": "finetune"},
    "linear_probe": {"name": "linear_probe"},
    "freeze_first": {"name": "freeze_first", "stages": 1},
    "bn_only": {"name": "bn_only"},
    "norm_only": {"name": "norm_only"},
    "bitfit": {"name": "bitfit"},
    "lora": {"name": "lora", "rank": 2, "alpha": 4},
    "vpt": {"name": "vpt", "prompts": 2},
    "vpt_deep": {"name": "vpt", "prompts": 2, "deep": True},
}
SLOW_FAMILIES = {"vgg"}
STEP_IN_CI = {  # per family: lora and one of the other new strategies (the older ones: tests/test_strategies.py)
    "resnet": {"lora", "bitfit"}, "efficientnet": {"lora", "norm_only"}, "mobilenetv3": {"lora", "bitfit"},
    "regnet": {"lora", "norm_only"}, "convnext": {"lora", "bitfit"}, "vit": {"lora", "vpt", "vpt_deep", "norm_only"},
    "deit": {"lora", "vpt_deep", "bitfit"}, "swin": {"lora", "norm_only"},
}
RUNS_IN_CI = {  # a real run + resume + export: the new strategies on four families (the rest of the matrix: slow)
    "resnet": "bitfit", "regnet": "norm_only", "convnext": "lora", "vit": "vpt_deep",
}


def _applies(family: str, strategy: str) -> bool:
    return not (strategy.startswith("vpt") and family not in VITS)


def _cfg(family: str, strategy: str, size: int, **train) -> ExperimentConfig:
    cfg = from_dict(ExperimentConfig, {
        "name": f"{family}-{strategy}",
        "data": {"dataset": "synthetic", "synthetic_classes": 3, "synthetic_size": 16, "val_fraction": 0.25, "image_size": size},
        "model": {"backbone": FAMILIES[family][0], "weights": "scratch", "channels_last": False},
        "strategy": STRATEGIES[strategy],
        "train": {"epochs": 2, "batch_size": 6, "lr": 0.01, "optimizer": "adamw", "progress": False, "accelerator": "cpu",
                  "precision": "32-true", **train},
    })
    cfg.validate()
    return cfg


def _expected_trainable(model, strategy: str) -> int | None:
    """What the strategy promises to train, counted independently of it (``None``: not checked here)."""
    head = sum(p.numel() for p in model.head.parameters())
    bb = model.backbone
    if strategy in ("scratch", "finetune"):
        return sum(p.numel() for p in model.parameters())
    if strategy == "linear_probe":
        return head
    if strategy == "norm_only":
        return head + sum(p.numel() for m in bb.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False))
    if strategy == "bitfit":
        return head + sum(p.numel() for n, p in bb.named_parameters() if n.endswith(".bias") or n == "bias")
    if strategy == "lora":
        return head + sum(p.numel() for n, p in bb.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    if strategy.startswith("vpt"):
        return head + bb.prompt_tokens.numel()
    return None


def _no_zero_init(model) -> None:
    """timm zero-initialises the last norm of residual branches (ResNet, RegNet, Swin V2), which leaves every adapter
    inside the branch without gradient at the first step of a scratch model; pretrained weights have no such zeros."""
    with torch.no_grad():
        for m in model.backbone.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, NORM_TYPES) and isinstance(w, torch.Tensor) and not w.any():
                w.fill_(1.0)


def _step_cases():
    for family, (_, sizes) in FAMILIES.items():
        for strategy in STRATEGIES:
            if not _applies(family, strategy):
                continue
            for size in sizes:
                slow = family in SLOW_FAMILIES or size != 32 or strategy not in STEP_IN_CI.get(family, ())
                yield pytest.param(family, strategy, size, id=f"{family}-{strategy}-{size}", marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize(("family", "strategy", "size"), list(_step_cases()))
def test_one_step(family, strategy, size):
    cfg = _cfg(family, strategy, size)
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, cfg.head, 3)
    _no_zero_init(model)
    apply_strategy(model, cfg.strategy)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = _expected_trainable(model, strategy)
    if expected is not None:
        assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == expected
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    x = torch.randn(4, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    if strategy == "lora":  # lora_B starts at zero (the adapted model starts as the base model); it gets the first gradient
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    opt.step()
    after = model.state_dict()
    for n, _ in model.named_parameters():
        if n not in trainable:
            assert torch.equal(before[n], after[n]), f"frozen {n} changed"
    moved = [n for n in trainable if not torch.equal(before[n], after[n])]
    assert moved, "nothing trained"
    assert any(n.startswith("head.") for n in moved)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.backbone.modules())
    if strategy != "linear_probe" and (strategy != "bn_only" or has_bn):
        assert any(n.startswith("backbone.") for n in moved), "the strategy trains nothing in the backbone"
    for name in model.frozen_bn:  # frozen BatchNorm kept its statistics through the training-mode forward
        assert torch.equal(before[f"{name}.running_mean"], after[f"{name}.running_mean"])


def _run_cases():
    for family in FAMILIES:
        for strategy in STRATEGIES:
            if not _applies(family, strategy) or strategy in ("scratch",):
                continue
            ci = RUNS_IN_CI.get(family) == strategy
            yield pytest.param(family, strategy, id=f"{family}-{strategy}", marks=[] if ci else [pytest.mark.slow])


def _state(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last.safetensors"))


@pytest.mark.parametrize(("family", "strategy"), list(_run_cases()))
def test_run_resume(family, strategy, tmp_path, interrupt_and_resume):
    # the feature cache's search for a frozen prefix costs more than these runs; the ViT run keeps it (prompts train)
    cfg = _cfg(family, strategy, 32, cache="auto" if family == "vit" else "off")
    full, resumed, _, _ = interrupt_and_resume(cfg, tmp_path, die_at=0)  # killed right after epoch 1
    assert resumed["resumed_from"].endswith("last.safetensors")
    a, b = _state(tmp_path / "full"), _state(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert resumed["test_acc"] == full["test_acc"]

    # the run's model rebuilt from its folder (adapters / prompts first), then LoRA merged: same outputs
    model, _ = build_model(cfg.model, cfg.head, 3)
    add_strategy_modules(model, cfg.strategy)
    load_model_weights(model, tmp_path / "full" / "checkpoints" / "best.safetensors")
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        merge_adapters(model)
        got = model(x)
    assert not any("lora_" in k for k in model.state_dict())
    assert (got - ref).abs().max() <= 1e-4 + 1e-4 * ref.abs().max()
    if strategy in ("lora", "vpt_deep", "bitfit"):  # ONNX of the merged / prompted model, checked by the export's parity check
        run = load_run(tmp_path / "full")
        samples = load_test_predictions(run.path).images
        result = export_run_model(model, cfg, run.class_names, run.metrics, samples, run.path, export_format("onnx"),
                                  tmp_path / "model.onnx", "best", None, 32)
        assert result.path.is_file() and result.parity.max_abs_logit_diff < 1e-3  # a failed check raises ExportParityError
    if strategy in ("lora", "vpt", "vpt_deep"):  # the run's own readers: load_run merges LoRA and keeps the prompts ...
        loaded = load_run(tmp_path / "full").load_model()
        assert not any("lora_" in k for k in loaded.state_dict())
        with torch.no_grad():
            assert (loaded(x) - got).abs().max() <= 1e-4 + 1e-4 * got.abs().max()
        for fmt in ("safetensors", "hf"):  # ... and the formats that rebuild the model rebuild the prompts (parity raises otherwise)
            load_run(tmp_path / "full").export(fmt, tmp_path / f"export-{fmt}")
