"""``transferlab summary``: per-stage output shapes, parameters (trainable / frozen under a strategy)
and FLOPs — the tables the seed reports wrote by hand."""

from __future__ import annotations

import pytest
import timm
from rich.console import Console

from transferlab.config import ConfigError, StrategyConfig, TruncateConfig
from transferlab.kinds import run_experiment
from transferlab.tools.summary import model_summary

QUIET = Console(quiet=True)


def test_resnet18_per_stage_table_under_freeze_first():
    s = model_summary("resnet18", input_size=224, strategy=StrategyConfig(name="freeze_first", stages=2))
    rows = {r.name: r for r in s.rows}
    assert [r.name for r in s.rows] == ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4", "global_pool", "new head"]
    assert [rows[n].output_shape for n in ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4", "global_pool", "new head")] == [
        (64, 112, 112), (64, 56, 56), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7), (512,), (1000,)
    ]
    # parameters, from the model itself
    ref = timm.create_model("resnet18", num_classes=1000)
    for n in ("layer1", "layer2", "layer3", "layer4"):
        assert rows[n].params == sum(p.numel() for p in getattr(ref, n).parameters())
    assert rows["new head"].params == 513_000 and s.total_params == sum(p.numel() for p in ref.parameters())
    # trainable / frozen: stem, layer1, layer2 frozen
    assert [rows[n].trainable == 0 for n in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "new head")] == [True] * 4 + [False] * 3
    assert s.frozen_params == 9_408 + 128 + 147_968 + 525_568
    assert [rows[n].group for n in ("conv1", "maxpool", "layer2", "new head")] == ["stem", "", "layer2", "new head"]
    # FLOPs: conv1 by hand (2 · 64 · 3·7·7 · 112·112), every FLOP attributed to a row, ~3.6 GFLOPs in all
    assert rows["conv1"].flops == 2 * 64 * 3 * 7 * 7 * 112 * 112
    assert sum(r.flops for r in s.rows) == s.total_flops
    assert 3.5e9 < s.total_flops < 3.7e9
    text = s.to_text()
    assert "128×28×28" in text and "525,568" in text and "freeze_first stages=2" in text


def test_truncated_resnet50_block_table_matches_the_seed_numbers():
    """Seed 000's ResNet-50 table lists 75,008 parameters for the first residual block (56, 56, 256)."""
    s = model_summary("resnet50", input_size=224, truncate=TruncateConfig(stages=2), depth=2)
    rows = {r.name: r for r in s.rows}
    assert rows["layer1.0"].params == 75_008 and rows["layer1.0"].output_shape == (256, 56, 56)
    assert rows["layer2.0"].params == 379_392 and rows["layer2.3"].output_shape == (512, 28, 28)
    assert not any(n.startswith(("layer3", "layer4")) for n in rows)
    assert s.num_features == 512 and rows["new head"].params == 512 * 1000 + 1000
    assert "truncated after layer2" in s.caption()


def test_summary_of_a_run_uses_its_config_and_schedule(make_cfg, tmp_path):
    cfg = make_cfg(
        model={"backbone": "resnet18"},
        data={"image_size": 32},
        head={"type": "conv", "conv_channels": 8, "hidden": 16},
        strategy={"name": "linear_probe", "unfreeze": {"at_epochs": [1], "stages_per_step": 1}},
        train={"epochs": 2},
    )
    run_experiment(cfg, tmp_path / "run", console=QUIET)
    s0 = model_summary(tmp_path / "run")
    assert s0.input_shape == (3, 32, 32)
    rows = {r.name: r for r in s0.rows}
    assert rows["layer4"].output_shape == (512, 1, 1) and rows["new head"].output_shape == (4,)
    assert rows["new head"].kind == "ConvHead" and s0.trainable_params == rows["new head"].params
    s1 = model_summary(tmp_path / "run", epoch=1)
    assert {r.name for r in s1.rows if r.trainable} == {"layer4", "new head"}
    assert "(epoch 1)" in s1.strategy


def test_cli_summary(tmp_path, capsys):
    from transferlab.cli import main

    assert main(["summary", "transferlab_cnn", "--input-size", "28", "--stages", "1", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| blocks.2 | Sequential | blocks.2 | 128×3×3 |" in out
    assert "freeze_first stages=1" in out and "| total |" in out
    assert main(["summary", "resnet81"]) == 2
    assert "did you mean" in capsys.readouterr().out


def test_summary_rejects_unknown_targets(tmp_path):
    with pytest.raises(ConfigError, match="neither a run directory nor a timm model name"):
        model_summary("no_such_model")
    with pytest.raises(ConfigError, match="not a run directory"):
        model_summary(tmp_path)
