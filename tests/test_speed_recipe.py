"""The speed-run tricks of issue 25 §4: progressive resizing, Lookahead, and testing the last epoch's weights.

Each is checked against its definition (the sides every epoch trains at, timm's ``Lookahead`` syncing every k steps, the
kept epoch), end to end through a run, through a kill and resume (bit-identical), in the plan's estimate, and for bad
input. What they buy on Fashion-MNIST is measured in ``benchmarks/RESULTS.md``, never here.
"""

from __future__ import annotations

import math

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from timm.optim import Lookahead

from transferlab.config import ConfigError, TrainConfig, from_dict, resize_scales
from transferlab.engine.costs import Cost
from transferlab.engine.loop import Callback, ProgressiveResize
from transferlab.engine.optim import make_optimizer
from transferlab.kinds import KINDS, run_experiment
from transferlab.rundir import load_run

QUIET = Console(quiet=True)


# --------------------------------------------------------------------------------------------
# progressive resizing


def test_resize_scales_grow_linearly_over_the_fraction_then_stay_full():
    tc = from_dict(TrainConfig, {"epochs": 10, "progressive_resize": {"start": 0.6, "fraction": 0.4}})
    assert resize_scales(tc) == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert resize_scales(from_dict(TrainConfig, {"epochs": 3})) == [1.0, 1.0, 1.0]
    one = from_dict(TrainConfig, {"epochs": 1, "progressive_resize": {"start": 0.5, "fraction": 0.1}})
    assert resize_scales(one) == [0.5]  # at least one growing epoch


class _Shapes(Callback):
    """Records the (H, W) of every batch the step trains on, per epoch."""

    def __init__(self) -> None:
        self.sides: dict[int, set[tuple[int, int]]] = {}

    def on_train_batch_end(self, loop) -> None:
        self.sides.setdefault(loop.state.epoch, set()).add(tuple(loop.batch_x.shape[-2:]))


def test_progressive_resize_trains_each_epoch_at_its_side_and_validates_at_full_size(make_cfg, tmp_path, monkeypatch):
    shapes = _Shapes()
    import transferlab.engine.loop as loop_mod

    real = loop_mod.default_callbacks
    monkeypatch.setattr(loop_mod, "default_callbacks", lambda cfg, fabric: [*real(cfg, fabric), shapes])
    cfg = make_cfg(train={"epochs": 4, "progressive_resize": {"start": 0.5, "fraction": 0.5}}, data={"image_size": 32})
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert shapes.sides == {0: {(16, 16)}, 1: {(24, 24)}, 2: {(32, 32)}, 3: {(32, 32)}}
    hist = load_run(tmp_path / "run").history
    assert [r["train_scale"] for r in hist] == pytest.approx([0.5, 0.75, 1.0, 1.0])
    assert math.isfinite(m["test_acc"]) and m["feature_cache"]["used"] is False


def test_progressive_resize_keeps_the_batch_layout_and_resizes_like_an_antialiased_resize():
    cb = ProgressiveResize()
    cb.scale = 0.5
    x = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)

    class L:  # the part of a Loop the hook reads
        batch_x = x

    cb.on_train_batch_start(L)
    assert L.batch_x.shape == (2, 3, 4, 4) and L.batch_x.is_contiguous(memory_format=torch.channels_last)
    # a 2x antialiased bilinear downscale of a constant 2x2 block is that constant
    blocks = torch.ones(1, 1, 8, 8) * torch.arange(16.0).reshape(4, 4).repeat_interleave(2, 0).repeat_interleave(2, 1)
    L.batch_x = blocks
    cb.on_train_batch_start(L)
    assert L.batch_x.shape == (1, 1, 4, 4)
    inner = L.batch_x[0, 0, 1:3, 1:3]
    assert torch.all(inner > 0) and torch.all(inner < 15)


def test_progressive_resize_resumes_bit_identically(make_cfg, tmp_path, interrupt_and_resume):
    cfg = make_cfg(train={"epochs": 3, "progressive_resize": {"start": 0.5, "fraction": 0.67}, "lookahead": {"k": 3}},
                   data={"image_size": 32, "augment": ["flip"]})
    full, resumed, a, b = interrupt_and_resume(cfg, tmp_path, die_at=0)  # killed inside the growing epochs
    wa, wb = (load_file(str(d / "checkpoints" / "last.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed["test_acc"] == full["test_acc"]
    ha, hb = load_run(a).history, load_run(b).history
    assert [(r["train_loss"], r["val_acc"], r["train_scale"]) for r in ha] == [(r["train_loss"], r["val_acc"], r["train_scale"]) for r in hb]


def test_progressive_resize_estimate_takes_the_area_share_off_the_small_epochs(make_cfg):
    base = make_cfg(train={"epochs": 4, "batch_size": 50})
    resized = make_cfg(train={"epochs": 4, "batch_size": 50, "progressive_resize": {"start": 0.5, "fraction": 0.5}})
    cost = Cost(0.1, 0.001)
    kind = KINDS.get("train")
    plain, small = (kind.explain(c, 1000, 100, 100, cost) for c in (base, resized))
    steps = 1000 / 50
    saved = steps * 0.1 * ((1 - 0.5**2) + (1 - 0.75**2))  # epochs at 0.5 and 0.75 of the side
    assert plain.seconds - small.seconds == pytest.approx(saved)
    assert "progressive resize: 2 epochs at 0.50-0.75 of the side" in small.describe()


def test_progressive_resize_bad_input(make_cfg):
    with pytest.raises(ConfigError, match=r"train.progressive_resize.start=1.2 must be in \(0, 1\)"):
        make_cfg(train={"progressive_resize": {"start": 1.2}})
    with pytest.raises(ConfigError, match=r"train.progressive_resize.fraction=0.0 must be in \(0, 1\]"):
        make_cfg(train={"progressive_resize": {"fraction": 0}})
    with pytest.raises(ConfigError, match="train.progressive_resize.*applies to kind: train only"):
        make_cfg(kind="logistic", train={"progressive_resize": {}})
    with pytest.raises(ConfigError, match="built for one input size"):
        make_cfg(model={"backbone": "vit_tiny_patch16_224", "weights": "scratch"}, train={"progressive_resize": {}})
    with pytest.raises(ConfigError, match="progressive_resize.*unknown key 'strat'|strat"):
        make_cfg(train={"progressive_resize": {"strat": 0.5}})


# --------------------------------------------------------------------------------------------
# Lookahead


def test_lookahead_wraps_the_optimizer_and_syncs_the_slow_weights_every_k_steps():
    p = torch.nn.Parameter(torch.zeros(3))
    tc = from_dict(TrainConfig, {"optimizer": "sgd", "momentum": 0.0, "lr": 1.0, "lookahead": {"k": 2, "alpha": 0.5}})
    opt = make_optimizer([p], tc)
    assert isinstance(opt, Lookahead) and opt.param_groups[0]["lr"] == 1.0
    steps = []
    for _ in range(4):
        p.grad = -torch.ones(3)  # each fast step adds 1
        opt.step()
        steps.append(p.detach().clone())
    # timm starts the slow weights at the first sync (step 2: 2 -> 2); step 4: the fast weights reached 4, slow = 2 + 0.5 * 2
    assert [s[0].item() for s in steps] == [1.0, 2.0, 3.0, 3.0]
    assert "lookahead_slow_buff" in opt.state_dict()["state"][0]


def test_lookahead_run_differs_from_plain_and_records_the_setting(make_cfg, tmp_path):
    plain = run_experiment(make_cfg(train={"epochs": 2, "optimizer": "sgd"}), tmp_path / "a", console=QUIET)
    cfg = make_cfg(train={"epochs": 2, "optimizer": "sgd", "lookahead": {"k": 2, "alpha": 0.5}})
    la = run_experiment(cfg, tmp_path / "b", console=QUIET)
    assert load_run(tmp_path / "b").config.train.lookahead.k == 2
    assert load_run(tmp_path / "a").history[-1]["train_loss"] != load_run(tmp_path / "b").history[-1]["train_loss"]
    assert math.isfinite(la["test_acc"]) and math.isfinite(plain["test_acc"])


def test_lookahead_bad_input(make_cfg):
    with pytest.raises(ConfigError, match="train.lookahead.k=0 must be >= 1"):
        make_cfg(train={"lookahead": {"k": 0}})
    with pytest.raises(ConfigError, match=r"train.lookahead.alpha=0.0 must be in \(0, 1\]"):
        make_cfg(train={"lookahead": {"alpha": 0}})


# --------------------------------------------------------------------------------------------
# keep: last


def test_keep_last_tests_the_final_epoch_even_when_an_earlier_one_scored_better(make_cfg, tmp_path):
    # val_loss rising while training continues at a large lr: the best-of-monitor would be an earlier epoch
    cfg = make_cfg(train={"epochs": 3, "lr": 0.05, "early_stopping": {"monitor": "val_loss", "keep": "last"}})
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert m["best_epoch"] == 3 and m["best_val"] == pytest.approx(load_run(tmp_path / "run").history[-1]["val_loss"])
    best, last = (load_file(str(tmp_path / "run" / "checkpoints" / f"{k}.safetensors")) for k in ("best", "last"))
    model_keys = [k for k in best if k in last and best[k].is_floating_point()]
    assert model_keys and all(torch.equal(best[k], last[k]) for k in model_keys)


def test_keep_last_refuses_patience(make_cfg):
    with pytest.raises(ConfigError, match="train.early_stopping.patience=2 does not apply with train.early_stopping.keep: last"):
        make_cfg(train={"early_stopping": {"keep": "last", "patience": 2}})
    with pytest.raises(ConfigError, match="keep"):
        make_cfg(train={"early_stopping": {"keep": "first"}})


# --------------------------------------------------------------------------------------------
# flip_translate test-time augmentation


def test_flip_translate_averages_airbenchs_six_views_with_their_weights():
    from transferlab.engine.evaluation import with_tta

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    x = torch.randn(2, 3, 6, 6)
    net(x)

    def mean2(v):
        return (net(v).softmax(-1) + net(v.flip(-1)).softmax(-1)) / 2

    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    expected = mean2(x) / 2 + (mean2(padded[..., :6, :6]) + mean2(padded[..., 2:, 2:])) / 4
    with torch.no_grad():
        got = with_tta(net, "flip_translate")(x).exp()
        flip = with_tta(net, "flip")(x).exp()
    assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(got.sum(-1), torch.ones(2))
    assert torch.allclose(flip, mean2(x), atol=1e-6)
    assert not torch.allclose(got, flip)  # the shifted views count


def test_flip_translate_runs_end_to_end(make_cfg, tmp_path):
    cfg = make_cfg(train={"epochs": 1, "tta": "flip_translate"}, data={"image_size": 16})
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert math.isfinite(m["test_acc"]) and load_run(tmp_path / "run").config.train.tta == "flip_translate"
