"""Feature caching: same training as the plain loop, the right cut or a clear reason, keys that invalidate,
memory → disk spill with memory-mapped safetensors, sharing across the experiments of a study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file

from transferlab.data.batches import TensorBatches
from transferlab.data.prepare import prepare_splits
from transferlab.engine.distributed import make_fabric
from transferlab.engine.features import (
    STORE,
    CachedSuffix,
    CutPoint,
    FeatureBatches,
    FeatureCache,
    FeatureCacheError,
    cache_key,
    cached_training,
    check_cut,
    split_parts,
    state_hash,
)
from transferlab.kinds import run_experiment
from transferlab.models.model import build_model
from transferlab.rundir import load_run
from transferlab.strategies import apply_strategy

QUIET = Console(quiet=True)
TINY = "test_efficientnet"  # timm's tiny EfficientNet (99 k params): no dropout, BatchNorm everywhere


@pytest.fixture(autouse=True)
def _fresh_store():
    STORE.clear()
    yield
    STORE.clear()


def _cfg(make_cfg, backbone=TINY, strategy=None, **over):
    over.setdefault("data", {})
    over["data"] = {"image_size": 32, **over["data"]}
    return make_cfg(model={"backbone": backbone, **over.pop("model", {})}, strategy=strategy or {"name": "linear_probe"}, **over)


def _setup(cfg):
    splits = prepare_splits(cfg.data, cfg.seed)
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg.model, cfg.head, splits.num_classes)
    apply_strategy(model, cfg.strategy)
    fabric = make_fabric(cfg)
    kw = dict(preprocess=model.preprocess(), device=fabric.device, channels_last=cfg.model.channels_last, num_workers=0)
    return splits, model, fabric, kw


def _history(run_dir: Path) -> list[dict[str, float]]:
    return load_run(run_dir).history


@pytest.mark.parametrize(
    "backbone,strategy,head,cut,data",
    [
        (TINY, {"name": "linear_probe"}, {"type": "mlp", "hidden": 32, "dropout": 0.3}, "pooled", {}),
        ("test_resnet", {"name": "freeze_first", "stages": 2}, {"type": "linear"}, "after:layer2", {}),
        (TINY, {"name": "linear_probe"}, {"type": "conv", "hidden": 16}, "features", {"in_memory": False, "num_workers": 0}),
    ],
)
def test_cached_training_matches_the_plain_loop(make_cfg, tmp_path, backbone, strategy, head, cut, data):
    """Same shuffling, same head dropout, same inputs: the histories and the trained weights agree
    (in-memory batches and the PIL DataLoader path; pooled, stage and feature-map cuts)."""
    runs = {}
    for mode in ("off", "auto"):
        cfg = _cfg(make_cfg, backbone, strategy, head=head, data=data, train={"epochs": 3, "cache": mode, "lr": 0.01})
        runs[mode] = run_experiment(cfg, tmp_path / mode, console=QUIET)
    off, on = runs["off"], runs["auto"]
    assert off["feature_cache"] == {"used": False, "reason": "train.cache: off", "head_seconds": off["train_seconds"]}
    assert on["feature_cache"]["used"] and on["feature_cache"]["cut"] == cut
    assert on["feature_cache"]["pass_seconds"] > 0 and on["feature_cache"]["head_seconds"] == on["train_seconds"]
    for a, b in zip(_history(tmp_path / "off"), _history(tmp_path / "auto"), strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), key
    w_off = load_file(tmp_path / "off" / "checkpoints" / "last.safetensors")
    w_on = load_file(tmp_path / "auto" / "checkpoints" / "last.safetensors")
    model_keys = [k for k in w_off if k.startswith("model.")]
    assert model_keys == [k for k in w_on if k.startswith("model.")]  # a cached run's checkpoint is a normal one
    for k in model_keys:
        torch.testing.assert_close(w_on[k], w_off[k], rtol=1e-3, atol=1e-4, msg=k)
    assert on["test_acc"] == pytest.approx(off["test_acc"], abs=1 / on["n_test"] + 1e-9)
    # the test split runs through the whole model on images: the reloaded model reproduces the number
    from transferlab.engine.evaluation import evaluate

    model = load_run(tmp_path / "auto").load_model()
    splits = prepare_splits(load_run(tmp_path / "auto").config.data, 0)
    assert evaluate(model, TensorBatches(splits.test_x, splits.test_y, 64, model.preprocess()), 4).acc == pytest.approx(on["test_acc"])


def test_caching_is_off_with_a_reason(make_cfg, tmp_path):
    cases = [
        # the built-in CNN has dropout inside its blocks: the frozen body is random in training mode
        (_cfg(make_cfg, "transferlab_cnn"), "dropout"),
        (_cfg(make_cfg, TINY, {"name": "finetune"}), "no frozen part"),
        (_cfg(make_cfg, data={"augment": ["flip"]}), "train.cache_views"),
        (_cfg(make_cfg, TINY, {"name": "linear_probe", "freeze_epochs": 1}), "strategy.freeze_epochs"),
    ]
    for cfg, words in cases:
        splits, model, fabric, kw = _setup(cfg)
        res = cached_training(model, splits, cfg, fabric, kw, tmp_path / "cache", QUIET)
        assert not res.used and words in res.reason, (cfg.model.backbone, res.reason)
        assert res.apply(model, "train", "val") == (model, "train", "val")
    # train.cache: on turns the reason into an error naming the experiment
    cfg = _cfg(make_cfg, "transferlab_cnn", train={"cache": "on"})
    splits, model, fabric, kw = _setup(cfg)
    with pytest.raises(FeatureCacheError, match="experiment 't': train.cache: on.*dropout"):
        cached_training(model, splits, cfg, fabric, kw, None, QUIET)


def test_dropout_rate_of_the_backbone_moves_the_cut_before_the_pooling(make_cfg, tmp_path):
    """``model.drop_rate`` is functional dropout inside timm's pooling head: cache the unpooled features."""
    cfg = _cfg(make_cfg, model={"drop_rate": 0.3})
    splits, model, fabric, kw = _setup(cfg)
    res = cached_training(model, splits, cfg, fabric, kw, None, QUIET)
    assert res.used and res.cut == "features"
    assert any("pooled" in r and "random in training mode" in r for r in res.record["rejected_cuts"])


def test_check_cut_finds_trainable_parameters_and_training_batchnorm(make_cfg):
    cfg = _cfg(make_cfg, strategy={"name": "freeze_first", "stages": 1})
    splits, model, fabric, kw = _setup(cfg)
    x = next(iter(TensorBatches(splits.train_x, splits.train_y, 4, kw["preprocess"])))[0]
    assert not check_cut(model, CutPoint("pooled"), x).ok
    ok = check_cut(model, CutPoint("after:blocks.0", 2), x)
    assert ok.ok and ok.mode_free and ok.shape[0] > 0
    model.frozen_bn = set()  # a frozen conv whose BatchNorm updates its statistics is not a fixed function
    assert "BatchNorm" in check_cut(model, CutPoint("after:blocks.0", 2), x).reason


def test_augmented_views_are_cached_and_cycled(make_cfg, tmp_path):
    cfg = _cfg(make_cfg, data={"augment": ["flip"]}, train={"cache_views": 2})
    splits, model, fabric, kw = _setup(cfg)
    res = cached_training(model, splits, cfg, fabric, kw, tmp_path / "cache", QUIET)
    assert res.used and res.record["views"] == 2
    views = res.train.views
    assert not torch.allclose(views[0], views[1])  # flips drawn per view
    # view v holds exactly the features of the loop's augmented images of epoch v (unshuffled order)
    src = TensorBatches(splits.train_x, splits.train_y, 1000, kw["preprocess"], augment=["flip"], seed=cfg.seed)
    src.set_epoch(1)
    x, _ = next(iter(src))
    model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(views[1], model.forward_head(model.forward_features(x), pre_logits=True), rtol=1e-4, atol=1e-5)
    batches = res.train
    first = {}
    for epoch in (0, 1, 2):
        batches.set_epoch(epoch)
        first[epoch] = next(iter(batches))[0]
    assert not torch.allclose(first[0], first[1])
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + 2)
    order = torch.randperm(len(splits.train_y), generator=g)[: cfg.train.batch_size]
    torch.testing.assert_close(first[2], views[0][order])  # epoch 2 reads view 0 again, in epoch 2's order


def test_feature_batches_follow_the_loops_order():
    x = torch.arange(10, dtype=torch.float32)[:, None]
    y = torch.arange(10)
    images = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)
    from transferlab.data.batches import Preprocess

    tb = TensorBatches(images, y, 3, Preprocess((0.5,), (0.5,), 1), shuffle=True, seed=7)
    fb = FeatureBatches([x], y, 3, shuffle=True, seed=7)
    assert len(fb) == len(tb) == 4
    for epoch in (0, 3):
        tb.set_epoch(epoch)
        fb.set_epoch(epoch)
        assert [b[1].tolist() for b in tb] == [b[1].tolist() for b in fb]
        assert [b[0].flatten().long().tolist() for b in fb] == [b[1].tolist() for b in fb]


def test_suffix_model_refuses_a_prefix_that_became_trainable(make_cfg, tmp_path):
    cfg = _cfg(make_cfg)
    splits, model, fabric, kw = _setup(cfg)
    res = cached_training(model, splits, cfg, fabric, kw, None, QUIET)
    assert isinstance(res.model, CachedSuffix)
    xb, _ = next(iter(res.train))
    assert res.model(xb).shape == (len(xb), 4)
    assert list(res.model.state_dict()) == list(model.state_dict())
    model.backbone.conv_stem.weight.requires_grad_(True)  # e.g. an unfreezing step the cache does not know about
    with pytest.raises(FeatureCacheError, match="conv_stem.weight .*became trainable"):
        res.model(xb)


def test_cache_key_changes_with_everything_the_features_depend_on(make_cfg):
    base = _cfg(make_cfg)
    splits, model, fabric, kw = _setup(base)
    x = next(iter(TensorBatches(splits.train_x, splits.train_y, 4, kw["preprocess"])))[0]
    check = check_cut(model, CutPoint("pooled"), x)
    w = state_hash(model.backbone)

    def key(cfg=base, splits=splits, model=model, check=check, weights=w, mode="eval", split="train", augment=None, view=0):
        return cache_key(split_parts(model, check, splits, split, cfg, fabric.device, weights, mode, augment, view))

    k0 = key()
    assert k0 == key()  # deterministic
    with torch.no_grad():
        model.backbone.conv_stem.weight[0, 0, 0, 0] += 1e-3
    assert state_hash(model.backbone) != w and key(weights=state_hash(model.backbone)) != k0  # weights
    assert key(check=check_cut(model, CutPoint("features"), x)) != k0  # cut point
    assert key(mode="train") != k0 and key(split="val") != k0
    other = prepare_splits(_cfg(make_cfg, data={"val_fraction": 0.3}).data, 0)
    assert key(splits=other) != k0  # dataset selection
    assert key(splits=prepare_splits(base.data, 1)) != k0  # another seed selects other images
    assert key(splits=prepare_splits(_cfg(make_cfg, data={"image_size": 24}).data, 0)) != k0  # resize
    assert key(augment=["flip"]) != key(augment=["flip"], view=1) != key(augment=["vflip"])  # transform
    assert key(cfg=_cfg(make_cfg, train={"precision": "bf16-mixed"})) != k0
    assert key(cfg=_cfg(make_cfg, model={"channels_last": False})) != k0
    resnet_cfg = _cfg(make_cfg, "test_resnet")  # other normalisation (mean/std) and architecture
    _, resnet, _, _ = _setup(resnet_cfg)
    assert key(cfg=resnet_cfg, model=resnet, weights=state_hash(resnet.backbone)) != k0


def test_experiments_of_a_study_share_one_pass_and_a_change_invalidates(tmp_path):
    from transferlab.config import parse_study
    from transferlab.study import run_study

    common = {"data": {"dataset": "synthetic", "synthetic_size": 128, "val_fraction": 0.25, "image_size": 32},
              "model": {"backbone": TINY}, "train": {"epochs": 1, "batch_size": 32, "progress": False, "accelerator": "cpu"}}
    study = parse_study({
        "study": "share", "defaults": common,
        "experiments": [
            {"name": "linear", "strategy": {"name": "linear_probe"}},
            {"name": "mlp", "strategy": {"name": "linear_probe"}, "head": {"type": "mlp", "hidden": 16}},
            {"name": "logistic", "kind": "logistic", "probe": {"l2": [0.1, 1.0]}},
            {"name": "other_seed_weights", "seed": 5, "strategy": {"name": "linear_probe"}},
        ],
    })
    result = run_study(study, tmp_path, console=QUIET)
    assert result.ok, result.failed
    fc = {n: json.loads((tmp_path / "share" / n / "metrics.json").read_text())["feature_cache"] for n in result.finished}
    assert fc["linear"]["sources"] == ["computed", "computed"]
    assert fc["mlp"]["sources"] == ["memory", "memory"] and fc["mlp"]["pass_seconds"] == 0
    assert fc["mlp"]["keys"] == fc["linear"]["keys"]
    assert fc["logistic"]["sources"][:2] == ["memory", "memory"] and fc["logistic"]["keys"][:2] == fc["linear"]["keys"]
    assert fc["logistic"]["sources"][2] == "computed"  # the test split is only needed by the probe
    # seed 5 initialises the scratch backbone (and selects images) differently: a new pass
    assert fc["other_seed_weights"]["sources"] == ["computed", "computed"]
    assert not set(fc["other_seed_weights"]["keys"]) & set(fc["linear"]["keys"])


def _batches(n: int, shape: tuple[int, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, *shape, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return feats, labels, [(feats[i : i + 7], labels[i : i + 7]) for i in range(0, n, 7)]


def test_large_sets_stream_to_disk_as_memory_mapped_safetensors(tmp_path):
    store = FeatureCache(memory_bytes=1000)
    feats, labels, batches = _batches(50, (3, 4, 4))
    fs = store.compute("k1", {"note": "x"}, 50, (3, 4, 4), torch.float32, batches, tmp_path)
    assert fs.storage == "disk" and fs.path == tmp_path / "k1.safetensors"
    torch.testing.assert_close(fs.features, feats)
    assert torch.equal(fs.labels, labels)
    with safe_open(str(fs.path), framework="pt") as f:  # an ordinary safetensors file, metadata included
        torch.testing.assert_close(f.get_tensor("features"), feats)
        assert json.loads(f.metadata()["transferlab_features"])["key"] == "k1"
    assert json.loads((tmp_path / "k1.json").read_text())["shape"] == [3, 4, 4]
    assert not list(tmp_path.glob(".*.tmp"))
    again = FeatureCache(memory_bytes=1000).get("k1", tmp_path)  # another process: found on disk, memory-mapped
    assert again is not None and again.source == "disk"
    torch.testing.assert_close(again.features, feats)
    assert FeatureCache().get("k2", tmp_path) is None
    # a truncated file is detected, removed and reported as a miss
    data = fs.path.read_bytes()
    fs.path.write_bytes(data[: len(data) - 100])
    assert FeatureCache().get("k1", tmp_path) is None and not fs.path.exists()


def test_memory_store_evicts_least_recent_to_disk(tmp_path):
    store = FeatureCache(memory_bytes=4000)
    a = _batches(20, (8,), seed=1)
    b = _batches(20, (8,), seed=2)
    store.compute("a", {}, 20, (8,), torch.float32, a[2], tmp_path)  # 20·8·4 + 20·8 = 800 bytes
    assert store.get("a", tmp_path).source == "memory" and not (tmp_path / "a.safetensors").exists()
    store.memory_bytes = 1000
    store.compute("b", {}, 20, (8,), torch.float32, b[2], tmp_path)
    assert (tmp_path / "a.safetensors").exists() and store.get("a", tmp_path).source == "disk"
    assert store.get("b", tmp_path).source == "memory"
    torch.testing.assert_close(store.get("a", tmp_path).features, a[0])


def test_spilled_cache_is_reused_by_a_later_run(make_cfg, tmp_path, monkeypatch):
    """Sets above the memory budget go to <study>/.feature_cache and a second run (new store) maps them."""
    import transferlab.engine.features.store as features

    monkeypatch.setattr(features.STORE, "memory_bytes", 1)
    cfg = _cfg(make_cfg, train={"epochs": 1})
    m1 = run_experiment(cfg, tmp_path / "study" / "a", console=QUIET)
    cache_dir = tmp_path / "study" / ".feature_cache"
    assert m1["feature_cache"]["storage"] == ["disk"] and len(list(cache_dir.glob("*.safetensors"))) == 2
    features.STORE.clear()
    m2 = run_experiment(cfg, tmp_path / "study" / "b", console=QUIET)
    assert m2["feature_cache"]["sources"] == ["disk", "disk"]
    assert m2["test_acc"] == m1["test_acc"]


def test_an_interrupted_cached_run_resumes_bit_identically(make_cfg, tmp_path, monkeypatch):
    import transferlab.engine.checkpointing as engine

    cfg = _cfg(make_cfg, head={"type": "mlp", "hidden": 16, "dropout": 0.3}, train={"epochs": 3, "checkpoint_every_steps": 2})
    full = run_experiment(cfg, tmp_path / "full", console=QUIET)
    real_save = engine.save_checkpoint

    def save_then_die(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        t = args[1]["trainer"]
        if path.name == "last.safetensors" and t["epoch"] == 1 and t["step"] == 2:  # mid-way through epoch 2
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", console=QUIET)
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    STORE.clear()  # a new process: the features are computed again
    resumed = run_experiment(cfg, tmp_path / "cut", resume=True, console=QUIET)
    assert resumed["feature_cache"]["used"] and resumed["resumed_from"].endswith("last.safetensors")
    a = load_file(tmp_path / "full" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # weights, optimizer state, RNG
    assert resumed["test_acc"] == full["test_acc"]
