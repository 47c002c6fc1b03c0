"""Trainability schedules: gradual unfreezing (by milestones, fastai's freeze_epochs), discriminative
learning rates per stage, frozen BatchNorm in eval mode — also across an interrupted and resumed run."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from transferlab.config import ConfigError
from transferlab.engine import checkpointing as engine
from transferlab.engine.optim import make_optimizer, make_scheduler
from transferlab.kinds import run_experiment
from transferlab.models import build_model
from transferlab.models.model import BN_TYPES
from transferlab.rundir import load_run
from transferlab.strategies import apply_strategy_at_epoch, optimizer_param_groups

QUIET = Console(quiet=True)
# transferlab_cnn: stem = blocks.0, stages = blocks.1, blocks.2
GRADUAL = {"name": "linear_probe", "unfreeze": {"at_epochs": [1, 2], "stages_per_step": 1}}


def _trainable_blocks(model) -> set[str]:
    return {n.split(".")[0] if n.startswith("head.") else ".".join(n.split(".")[1:3]) for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_set_is_a_pure_function_of_the_epoch(make_cfg):
    cfg = make_cfg(strategy=GRADUAL, train={"epochs": 4})
    model, _ = build_model(cfg.model, cfg.head, 4)
    expected = {
        0: {"head"},
        1: {"head", "blocks.2"},
        2: {"head", "blocks.2", "blocks.1"},
        3: {"head", "blocks.2", "blocks.1"},  # no milestone at 3: the stem stays frozen
    }
    for epoch in (2, 0, 3, 1, 0, 2):  # any order: the result depends on the epoch alone
        unfrozen = apply_strategy_at_epoch(model, cfg.strategy, epoch)
        assert _trainable_blocks(model) == expected[epoch], epoch
        assert unfrozen == sorted(expected[epoch] - {"head"}, reverse=True)  # topmost first
        bns = {m for m, mod in model.backbone.named_modules() if isinstance(mod, BN_TYPES)}
        frozen_bn = {m.removeprefix("backbone.") for m in model.frozen_bn}
        assert frozen_bn == {b for b in bns if b.rsplit(".", 1)[0] not in expected[epoch]}
        model.train()
        assert all(not mod.training for n, mod in model.named_modules() if n in model.frozen_bn)


def test_freeze_epochs_is_fastais_fine_tune(make_cfg):
    cfg = make_cfg(strategy={"name": "linear_probe", "freeze_epochs": 2}, train={"epochs": 4})
    model, _ = build_model(cfg.model, cfg.head, 4)
    for epoch, all_trainable in ((0, False), (1, False), (2, True), (3, True)):
        apply_strategy_at_epoch(model, cfg.strategy, epoch)
        assert all(p.requires_grad for p in model.parameters()) == all_trainable
        assert (not model.frozen_bn) == all_trainable
    # on top of freeze_first: the frozen stem + first stage unfreeze together
    cfg = make_cfg(strategy={"name": "freeze_first", "stages": 1, "unfreeze": {"at_epochs": [1], "stages_per_step": None}}, train={"epochs": 2})
    apply_strategy_at_epoch(model, cfg.strategy, 0)
    assert _trainable_blocks(model) == {"head", "blocks.2"}
    apply_strategy_at_epoch(model, cfg.strategy, 1)
    assert _trainable_blocks(model) == {"head", "blocks.2", "blocks.1", "blocks.0"}


def _epoch_snapshots(monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """Model state at the end of every epoch, taken from the engine's ``last`` checkpoint saves."""
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    real = engine.save_checkpoint

    def spy(path, state, meta, *args, **kwargs):
        real(path, state, meta, *args, **kwargs)
        if path.name == "last.safetensors" and meta["trainer"]["step"] == 0:
            snaps[meta["epoch"]] = {k: v.clone() for k, v in state.items()}

    monkeypatch.setattr(engine, "save_checkpoint", spy)
    return snaps


def test_gradual_unfreezing_trains_each_stage_from_its_epoch_on(make_cfg, tmp_path, monkeypatch):
    from lightning.fabric.utilities.seed import seed_everything

    cfg = make_cfg(strategy=GRADUAL, train={"epochs": 3, "lr": 0.01})
    seed_everything(cfg.seed, verbose=False)  # what run_experiment does before it builds the model
    init, _ = build_model(cfg.model, cfg.head, 4)
    snaps = _epoch_snapshots(monkeypatch)
    snaps[-1] = init.state_dict()
    console = Console(record=True, width=200)
    run_experiment(cfg, tmp_path / "run", console=console)
    log = console.export_text()
    assert "epoch 2: unfrozen so far: blocks.2;" in log and "epoch 3: unfrozen so far: blocks.2, blocks.1;" in log
    assert sorted(snaps) == [-1, 0, 1, 2]

    # epoch e changes exactly: the head, and the stages unfrozen at or before e (weights and BN statistics)
    training = {0: [], 1: ["blocks.2"], 2: ["blocks.2", "blocks.1"]}
    for epoch in range(3):
        prev, now = snaps[epoch - 1], snaps[epoch]
        for block in ("blocks.0", "blocks.1", "blocks.2"):
            keys = [k for k in now if k.startswith(f"backbone.{block}.")]
            changed = {k for k in keys if not torch.equal(prev[k], now[k])}
            if block in training[epoch]:
                assert changed == set(keys), (epoch, block, set(keys) - changed)
            else:
                assert not changed, (epoch, block, changed)
        assert not any(torch.equal(prev[k], now[k]) for k in now if k.startswith("head.")), epoch


def test_gradual_unfreezing_survives_an_interrupted_run(make_cfg, tmp_path, monkeypatch):
    """Killed after epoch 1 (before the first milestone) and again mid-epoch 4 (no milestone; both
    unfreezing steps done before): the resumed run is bit-identical to the uninterrupted one —
    weights, BN statistics, optimizer state, RNG."""
    cfg = make_cfg(
        strategy=GRADUAL,
        train={"epochs": 4, "optimizer": "adamw", "schedule": "onecycle", "lr_ratio": 0.5, "checkpoint_every_steps": 1},
        head={"type": "mlp", "hidden": 16, "dropout": 0.3},
        data={"augment": ["flip"]},
    )
    full = run_experiment(cfg, tmp_path / "full", console=QUIET)

    real = engine.save_checkpoint
    kills = iter([(0, 0), (3, 1)])  # (epoch, step) of the checkpoint after which the process "dies"
    target = {"at": next(kills)}

    def save_then_die(path, state, meta, *args, **kwargs):
        real(path, state, meta, *args, **kwargs)
        t = meta["trainer"]
        here = (meta["epoch"], 0) if t["step"] == 0 else (t["epoch"], t["step"])
        if path.name == "last.safetensors" and here == target["at"]:
            raise KeyboardInterrupt(f"simulated kill at {here}")

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", console=QUIET)
    target["at"] = next(kills)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", resume=True, console=QUIET)
    monkeypatch.setattr(engine, "save_checkpoint", real)
    resumed = run_experiment(cfg, tmp_path / "cut", resume=True, console=QUIET)
    assert resumed["resumed_from"].endswith("last.safetensors")

    a = load_file(str(tmp_path / "full" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert resumed["test_acc"] == full["test_acc"]
    # the stem never unfroze: its BatchNorm statistics are the init's in both runs
    model = load_run(tmp_path / "cut").load_model("last")
    bn = model.backbone.blocks[0][1]
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) and int(bn.num_batches_tracked) == 0


def test_discriminative_learning_rates_per_stage(make_cfg):
    cfg = make_cfg(strategy={"name": "finetune"}, train={"lr": 0.01, "lr_ratio": 0.5})
    model, _ = build_model(cfg.model, cfg.head, 4)
    groups = optimizer_param_groups(model, cfg)
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 0.01), ("blocks.2", 0.005), ("blocks.1", 0.0025), ("stem", 0.00125)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    cfg = make_cfg(strategy={"name": "finetune"}, train={"lr": 0.01, "lr_ratio": [0.1, 0.2, 0.5, 1.0], "schedule": "onecycle"})
    opt = make_optimizer(optimizer_param_groups(model, cfg), cfg.train)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.005, 0.002, 0.001])
    make_scheduler(opt, cfg.train, 10)  # one-cycle peaks at each group's own lr
    assert [g["max_lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.005, 0.002, 0.001])

    bad = make_cfg(train={"lr_ratio": [1.0, 1.0]})
    with pytest.raises(ConfigError, match=r"lr_ratio has 2 values but SmallCNN has 4 parameter groups \(stem, blocks.1, blocks.2, head\)"):
        optimizer_param_groups(model, bad)


def test_optimizer_holds_every_parameter_that_will_ever_train(make_cfg):
    cfg = make_cfg(strategy=GRADUAL, train={"epochs": 3, "optimizer": "adamw"})
    model, _ = build_model(cfg.model, cfg.head, 4)
    apply_strategy_at_epoch(model, cfg.strategy, 0)
    opt = make_optimizer(optimizer_param_groups(model, cfg), cfg.train)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    ever = {id(p) for n, p in model.named_parameters() if not n.startswith("backbone.blocks.0.")}  # the stem never unfreezes
    assert in_opt == ever
    # the groups' membership does not depend on the epoch the loop starts in (a resume builds the same)
    apply_strategy_at_epoch(model, cfg.strategy, 2)
    again = make_optimizer(optimizer_param_groups(model, cfg), cfg.train)
    assert [[id(p) for p in g["params"]] for g in again.param_groups] == [[id(p) for p in g["params"]] for g in opt.param_groups]
    # a still-frozen parameter has no gradient, so AdamW leaves it alone and creates no state for it
    apply_strategy_at_epoch(model, cfg.strategy, 0)
    model.train()
    loss = model(torch.randn(8, 3, 16, 16)).sum()
    loss.backward()
    opt.step()
    assert all((p in opt.state) == p.requires_grad for g in opt.param_groups for p in g["params"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"strategy": {"name": "linear_probe", "unfreeze": {"at_epochs": [2, 1]}}}, "strictly increasing"),
        ({"strategy": {"name": "linear_probe", "unfreeze": {"at_epochs": [0]}}}, "epochs >= 1"),
        ({"strategy": {"name": "linear_probe", "unfreeze": {"at_epochs": [5]}}, "train": {"epochs": 3}}, r"at_epochs=5 never comes: train.epochs=3"),
        ({"strategy": {"name": "finetune", "freeze_epochs": 1}}, "trains everything already"),
        ({"strategy": {"name": "linear_probe", "freeze_epochs": 1, "unfreeze": {"at_epochs": [1]}}}, "cannot both be set"),
        ({"strategy": {"name": "linear_probe", "unfreeze": {"at_epochs": [1], "stages_per_step": 0}}}, "stages_per_step=0"),
        ({"train": {"lr_ratio": -0.5}}, "train.lr_ratio=-0.5 must be > 0"),
        ({"train": {"lr_ratio": [1.0, 0.0]}}, "multipliers > 0"),
    ],
)
def test_schedule_keys_are_validated(overrides, message, make_cfg):
    with pytest.raises(ConfigError, match=message):
        make_cfg(**overrides)
