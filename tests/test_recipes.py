"""Training recipes: mixup / CutMix, EMA of the weights, automatic augmentation, class imbalance.

Each recipe is checked against its definition (a mixed batch is the convex combination with the
drawn lambda, timm's batches for the same seed; the EMA is the closed form; the balanced sampler's
class frequencies; focal with gamma 0 is cross-entropy), on both data paths where it touches data,
end to end through a run (metrics.json, checkpoints, compare), and for bad input. The SIGKILL resume
test with mixup + EMA + the balanced sampler is in ``tests/test_reliability.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from rich.console import Console
from torch import nn

import transferlab
from transferlab.cli import main
from transferlab.config import ConfigError, ExperimentConfig, from_dict, load_study
from transferlab.config.schema import EmaConfig, MixupConfig
from transferlab.data.augment import parse_augmentation
from transferlab.data.batches import ImageDataset, LoaderBatches, Preprocess, TensorBatches
from transferlab.data.prepare import prepare_splits
from transferlab.data.sampler import balanced_order
from transferlab.engine.ema import WeightEma
from transferlab.engine.evaluation import evaluate
from transferlab.engine.features.cached import FeatureBatches
from transferlab.engine.losses import FocalLoss, class_weights, make_loss
from transferlab.engine.mixup import Mixup
from transferlab.files import load_checkpoint, load_checkpoint_group
from transferlab.kinds import run_experiment
from transferlab.results.report import build_report
from transferlab.rundir.metrics import balanced_scores

QUIET = Console(quiet=True)
GRAY = Preprocess((0.0,), (1 / 255,), 1)  # identity on uint8 values: batches come back as pixel values
STUDY_FILE = Path(__file__).resolve().parents[1] / "studies" / "recipes_fmnist.yaml"


# --------------------------------------------------------------------------------------------
# mixup / CutMix


def _batch(n: int = 8, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 12, 10, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_mixup_batch_is_the_convex_combination_with_the_drawn_lambda():
    x, y = _batch()
    mix = Mixup(MixupConfig(alpha=0.4, label_smoothing=0.0), 5, seed=7)
    out, target, label = mix(x, y)
    rng = np.random.RandomState(7)  # the draws, independently: mix at all (prob 1), then lambda ~ Beta(0.4, 0.4)
    assert rng.rand() < 1.0
    lam = rng.beta(0.4, 0.4)
    assert mix.lam == pytest.approx(lam) and 0 < lam < 1 and mix.box is None
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    one_hot = nn.functional.one_hot(y, 5).float()
    assert torch.allclose(target, lam * one_hot + (1 - lam) * one_hot.flip(0), atol=1e-6)
    assert torch.equal(label, y if lam >= 0.5 else y.flip(0))  # training accuracy counts the dominant label


def test_cutmix_pastes_the_partners_box_and_lambda_is_the_kept_area():
    x, y = _batch()
    mix = Mixup(MixupConfig(alpha=None, cutmix_alpha=1.0, label_smoothing=0.1), 5, seed=3)
    for _ in range(10):
        out, target, _ = mix(x, y)
        top, bottom, left, right = mix.box
        inside = torch.zeros(12, 10, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(out[..., inside], x.flip(0)[..., inside]) and torch.equal(out[..., ~inside], x[..., ~inside])
        assert mix.lam == pytest.approx(1 - inside.sum().item() / 120)
        assert torch.allclose(target.sum(1), torch.ones(8)) and target.min() >= 0.1 / 5 - 1e-7  # smoothed soft targets


@pytest.mark.parametrize("alpha, cutmix, prob", [(0.4, None, 1.0), (None, 1.0, 1.0), (0.8, 1.0, 0.6)], ids=["mixup", "cutmix", "both"])
def test_same_batches_as_timm_mixup_for_the_same_numpy_seed(alpha, cutmix, prob):
    from timm.data import Mixup as TimmMixup

    x, y = _batch()
    ours = Mixup(MixupConfig(alpha=alpha, cutmix_alpha=cutmix, prob=prob, switch_prob=0.5, label_smoothing=0.1), 5, seed=123)
    theirs = TimmMixup(mixup_alpha=alpha or 0.0, cutmix_alpha=cutmix or 0.0, prob=prob, switch_prob=0.5, label_smoothing=0.1, num_classes=5)
    saved = np.random.get_state()
    np.random.seed(123)  # timm draws from numpy's global generator
    try:
        lams = set()
        for _ in range(20):
            xa, ta, _ = ours(x, y)
            xb, tb = theirs(x.clone(), y)
            assert torch.equal(xa, xb) and torch.equal(ta, tb)
            lams.add(round(ours.lam, 6))
        assert len(lams) > 5  # the batches really were mixed differently
    finally:
        np.random.set_state(saved)


def test_mixup_state_continues_the_stream_exactly():
    x, y = _batch()
    cfg = MixupConfig(alpha=0.3, cutmix_alpha=1.0)
    a = Mixup(cfg, 5, seed=1)
    for _ in range(3):
        a(x, y)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    later = [a(x, y)[0] for _ in range(6)]
    b = Mixup(cfg, 5, seed=999)
    b.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(later, (b(x, y)[0] for _ in range(6)), strict=True))


def test_soft_target_loss_is_timms_soft_target_cross_entropy():
    from timm.loss import SoftTargetCrossEntropy

    x, y = _batch()
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    _, target, _ = Mixup(MixupConfig(alpha=1.0), 5, seed=0)(x, y)
    cfg = from_dict(ExperimentConfig, {"train": {"mixup": {"alpha": 1.0}}})
    ours = make_loss(cfg, list("abcde"))(logits, target)
    assert torch.allclose(ours, SoftTargetCrossEntropy()(logits, target))


# --------------------------------------------------------------------------------------------
# EMA


def _trajectory(model: nn.Module, ema: WeightEma, steps: int) -> list[dict[str, torch.Tensor]]:
    """Train a few SGD steps (BatchNorm in training mode), updating the EMA; the weights after each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(2)
    seen = []
    for _ in range(steps):
        loss = model(torch.randn(16, 3, generator=g) * 2 + 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
    return seen


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_weights_equal_the_closed_form_after_k_steps(warmup):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    decay, k = 0.8, 7
    ema = WeightEma(model, EmaConfig(decay=decay, warmup=warmup))
    seen = _trajectory(model, ema, k)
    # d_1 = 0 (a copy), then decay — or with warm-up min(decay, 1 - t^(-2/3))
    d = [0.0] + [min(decay, 1 - t ** (-2 / 3)) if warmup else decay for t in range(2, k + 1)]
    assert ema.updates == k and all(ema.decay_at(t + 1) == pytest.approx(d[t]) for t in range(k))
    for key, value in ema.state_dict().items():
        if not value.is_floating_point():  # num_batches_tracked: copied
            assert torch.equal(value, seen[-1][key])
            continue
        # ema_k = sum_t (1 - d_t) * prod_{s > t} d_s * theta_t
        expected = sum((1 - d[t]) * float(np.prod(d[t + 1 :])) * seen[t][key].double() for t in range(k))
        assert torch.allclose(value.double(), expected, atol=1e-6), key
    assert "1.running_mean" in ema.state_dict() and not torch.equal(ema.state_dict()["1.running_mean"], seen[-1]["1.running_mean"])


# --------------------------------------------------------------------------------------------
# class imbalance: weights, focal loss, the balanced sampler, balanced metrics


def test_balanced_class_weights_are_inverse_frequency_on_the_training_split():
    from sklearn.utils.class_weight import compute_class_weight

    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 20)
    cfg = from_dict(ExperimentConfig, {"train": {"class_weights": "balanced"}})
    w = class_weights(cfg, labels, ["a", "b", "c"])
    assert torch.allclose(w, torch.tensor(compute_class_weight("balanced", classes=np.arange(3), y=labels.numpy()), dtype=torch.float32))
    assert (w * torch.bincount(labels)).unique().numel() == 1  # every class weighs the same in total
    listed = from_dict(ExperimentConfig, {"train": {"class_weights": [1.0, 2.0, 3.0]}})
    assert torch.equal(class_weights(listed, None, ["a", "b", "c"]), torch.tensor([1.0, 2.0, 3.0]))


def test_focal_loss_with_gamma_0_is_cross_entropy_and_gamma_down_weights_easy_images():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(32, 4, generator=g) * 3, torch.randint(0, 4, (32,), generator=g)
    soft = torch.softmax(torch.randn(32, 4, generator=g), -1)
    w = torch.tensor([0.5, 1.0, 2.0, 4.0])
    for weight in (None, w):
        for target in (y, soft):
            ce = nn.CrossEntropyLoss(weight=weight)(logits, target)
            assert torch.allclose(FocalLoss(0.0, weight)(logits, target), ce, atol=1e-6)
    assert torch.allclose(FocalLoss(0.0, None, 0.1)(logits, y), nn.CrossEntropyLoss(label_smoothing=0.1)(logits, y), atol=1e-6)
    per_image = lambda gamma: FocalLoss(gamma)(logits[:1], y[:1])  # noqa: E731
    assert per_image(2.0) < per_image(0.0)
    p = torch.softmax(logits[:1], -1)[0, y[0]]
    assert torch.allclose(per_image(2.0), (1 - p) ** 2 * per_image(0.0), atol=1e-6)  # the focal factor itself


def test_balanced_sampler_draws_every_class_equally_often():
    labels = torch.tensor([0] * 1000 + [1] * 100 + [2] * 10)
    order = balanced_order(labels, torch.Generator().manual_seed(0))
    assert len(order) == len(labels)
    share = torch.bincount(labels[order], minlength=3).double() / len(order)
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.04), share
    again = balanced_order(labels, torch.Generator().manual_seed(0))
    assert torch.equal(order, again) and not torch.equal(order, balanced_order(labels, torch.Generator().manual_seed(1)))


def test_balanced_sampler_gives_the_same_batches_on_every_path():
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (44, 1, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.tensor([0] * 40 + [1] * 4)
    fast = TensorBatches(x, y, 16, GRAY, shuffle=True, seed=3, sampler="balanced")
    slow = LoaderBatches(x, y, 16, GRAY, shuffle=True, seed=3, num_workers=0, sampler="balanced")
    feats = FeatureBatches([x.flatten(1).float()], y, 16, shuffle=True, seed=3, sampler="balanced")
    orders = []
    for epoch in (0, 1):
        for b in (fast, slow, feats):
            b.set_epoch(epoch)
        for (xa, ya), (xb, yb), (xc, yc) in zip(fast, slow, feats, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(yb, yc) and torch.equal(xa.flatten(1), xc)
        orders.append(torch.cat([yb for _, yb in fast]))
    assert not torch.equal(orders[0], orders[1])  # a new draw every epoch
    assert (torch.cat(orders) == 1).float().mean() > 0.3  # the rare class: 4 of 44 images, about half the draws


def test_balanced_accuracy_and_macro_f1_are_scikit_learns():
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score

    g = np.random.default_rng(0)
    y = g.integers(0, 4, 200)
    y[y == 3] = 0  # class 3 never occurs in the truth ...
    pred = np.where(g.random(200) < 0.6, y, g.integers(0, 5, 200))  # ... but is predicted; class 4 only predicted too
    cm = confusion_matrix(y, pred, labels=range(6)).tolist()  # class 5: neither
    balanced, f1 = balanced_scores(cm)
    with pytest.warns(UserWarning):  # scikit-learn warns about the predicted-only classes
        assert balanced == pytest.approx(balanced_accuracy_score(y, pred))
    assert f1 == pytest.approx(f1_score(y, pred, average="macro"))


# --------------------------------------------------------------------------------------------
# automatic augmentation: the same distribution on both paths


def _asym_images(n: int, size: int = 16) -> torch.Tensor:
    x = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    x[:, :, :, : size // 2] //= 4  # a dark left half: geometric ops are visible
    return x


def _both_paths(spec: object, n: int = 1500) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _asym_images(n)
    fast = torch.cat([xb for xb, _ in TensorBatches(x, torch.zeros(n, dtype=torch.long), 250, GRAY, augment=[spec], seed=5, channels_last=False)])
    ds = ImageDataset(x, torch.zeros(n, dtype=torch.long), [spec])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (AugMix runs tensor ops on the PIL path too)
    try:
        slow = torch.stack([ds[(i, 1000 + i)][0] for i in range(n)])
    finally:
        torch.set_num_threads(threads)
    return x, fast.round().to(torch.uint8), slow


def _stats(x: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    change = (out.float() - x.float()).abs()
    return {
        # "unchanged" up to 1 grey level: PIL's and torch's autocontrast round a few pixels differently
        "unchanged": (change.flatten(1).amax(1) <= 1).float().mean().item(),
        "zeros": (out == 0).float().mean().item(),
        "mean_abs_change": change.mean().item(),
        "left_mean": out[..., : out.shape[-1] // 2].float().mean().item(),
        "mean": out.float().mean().item(),
        "std": out.float().std().item(),
    }


@pytest.mark.parametrize(
    "spec", ["randaugment", {"randaugment": {"num_ops": 1, "magnitude": 15}}, "trivialaugment", {"autoaugment": "cifar10"}, "augmix"]
)
def test_automatic_augmentations_agree_in_distribution(spec):
    """The same policy on the in-memory path (per-image torchvision ops on the uint8 batch) and the PIL
    path: rates within 0.05, magnitudes within 10 % (as the other augmentations' test)."""
    x, fast, slow = _both_paths(spec, n=600 if spec == "augmix" else 1500)
    assert fast.shape == slow.shape == x.shape and slow.dtype == torch.uint8
    a, b = _stats(x, fast), _stats(x, slow)
    assert a["mean_abs_change"] > 1.0  # the augmentation did something
    for key in a:
        tol = 0.05 if key in ("unchanged", "zeros") else 0.1 * max(a[key], b[key])
        assert abs(a[key] - b[key]) <= tol, (spec, key, a[key], b[key])


def test_distribution_check_sees_a_different_magnitude():
    x, fast, _ = _both_paths({"randaugment": 9})
    _, _, slow = _both_paths({"randaugment": 3})
    assert abs(_stats(x, fast)["mean_abs_change"] - _stats(x, slow)["mean_abs_change"]) > 0.1 * _stats(x, fast)["mean_abs_change"]


def test_policy_augmentations_are_seeded_and_leave_the_global_generator_alone():
    x = _asym_images(20)
    aug = parse_augmentation("trivialaugment")
    before = torch.get_rng_state()
    a = aug.apply_batch(x, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, aug.apply_batch(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, aug.apply_batch(x, torch.Generator().manual_seed(2)))


# --------------------------------------------------------------------------------------------
# bad input: each a ConfigError naming the key


def _validate(**sections):
    cfg = from_dict(ExperimentConfig, sections)
    cfg.validate()
    return cfg


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"train": {"mixup": {"alpha": 0}}}, r"train\.mixup\.alpha=0\.0 must be > 0"),
        ({"train": {"mixup": {"alpha": -1}}}, r"train\.mixup\.alpha=-1\.0 must be > 0"),
        ({"train": {"mixup": {"cutmix_alpha": 0}}}, r"train\.mixup\.cutmix_alpha=0\.0 must be > 0"),
        ({"train": {"mixup": {"alpha": None}}}, r"train\.mixup=.* mixes nothing"),
        ({"train": {"mixup": {"prob": 1.5}}}, r"train\.mixup\.prob=1\.5 must be in \[0, 1\]"),
        ({"train": {"mixup": {}, "label_smoothing": 0.1}}, r"train\.label_smoothing=0\.1 does not apply with train\.mixup"),
        ({"train": {"ema": {"decay": 0}}}, r"train\.ema\.decay=0\.0 must be in \(0, 1\)"),
        ({"train": {"ema": {"decay": 1}}}, r"train\.ema\.decay=1\.0 must be in \(0, 1\)"),
        ({"train": {"ema": {"decay": 1.5}}}, r"train\.ema\.decay=1\.5 must be in \(0, 1\)"),
        ({"train": {"ema": {"evaluate": "emma"}}}, r"train\.ema\.evaluate: 'emma' is not one of .*did you mean 'ema'"),
        ({"train": {"class_weights": [1, 2]}, "data": {"classes": [0, 1, 2]}}, r"class_weights=\[1\.0, 2\.0\] has 2 weights, data\.classes lists"),
        ({"train": {"class_weights": [1, 0]}}, r"train\.class_weights=.* weights > 0"),
        ({"train": {"class_weights": "balance"}}, r"train\.class_weights: 'balance' is not one of 'balanced' \(did you mean 'balanced'\?\)"),
        ({"train": {"loss": "focall"}}, r"train\.loss: 'focall' is not one of .*did you mean 'focal'"),
        ({"train": {"focal_gamma": -1}}, r"train\.focal_gamma=-1\.0 must be >= 0"),
        ({"data": {"sampler": "balance"}}, r"data\.sampler: 'balance' is not one of .*did you mean 'balanced'"),
        ({"data": {"augment": [{"randaugment": 31}]}}, r"data\.augment\[0\]: randaugment: magnitude=31 must be in 0\.\.30"),
        ({"data": {"augment": [{"autoaugment": "cifar"}]}}, r"autoaugment: policy='cifar' is not one of .*did you mean 'cifar10'"),
        ({"data": {"augment": [{"augmix": {"severity": 0}}]}}, r"augmix: severity=0 must be in 1\.\.10"),
        ({"kind": "logistic", "train": {"mixup": {}}}, r"train\.mixup=.* applies to kind: train only"),
    ],
)
def test_bad_recipe_settings_are_errors_naming_the_key(sections, message):
    with pytest.raises(ConfigError, match=message):
        _validate(**sections)


def test_class_weights_of_the_wrong_length_fail_before_training(make_cfg, tmp_path):
    cfg = make_cfg(train={"class_weights": [1.0, 2.0, 3.0]})  # the synthetic data has 4 classes
    with pytest.raises(ConfigError, match=r"train\.class_weights has 3 weights, but the data has 4 classes"):
        run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert not (tmp_path / "run" / "checkpoints" / "last.safetensors").exists()


# --------------------------------------------------------------------------------------------
# end to end


def test_ema_both_tests_both_weight_sets_and_the_checkpoint_model_is_the_ema(make_cfg, tmp_path):
    cfg = make_cfg(train={"epochs": 2, "ema": {"decay": 0.9, "evaluate": "both"}, "mixup": {"alpha": 0.4}})
    run_experiment(cfg, tmp_path / "run", console=QUIET)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["tested_weights"] == "ema" and m["ema"]["evaluate"] == "both" and m["ema"]["main"] == "ema"
    assert {"acc", "loss", "balanced_acc", "macro_f1"} <= set(m["ema"]["test_raw"])
    with open(tmp_path / "run" / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"val_acc", "val_acc_raw", "val_loss_raw"} <= set(rows[0])
    best = tmp_path / "run" / "checkpoints" / f"{'best' if (tmp_path / 'run' / 'checkpoints' / 'best.safetensors').exists() else 'last'}.safetensors"
    state, meta, _, rng = load_checkpoint(best)
    raw = load_checkpoint_group(best, "raw")
    assert meta["ema"]["model"] == "ema" and raw.keys() == state.keys() and {"mixup", "mixup_gauss"} <= set(rng)
    assert any(not torch.equal(state[k], raw[k]) for k in state)
    # the recorded numbers are those of the two weight sets: re-evaluate both
    run = transferlab.load_run(tmp_path / "run")
    model = run.load_model()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # load_run gives the EMA weights
    splits = prepare_splits(cfg.data, cfg.seed)
    test = TensorBatches(splits.test_x, splits.test_y, cfg.train.eval_batch_size, model.preprocess(), channels_last=cfg.model.channels_last)
    assert evaluate(model, test, 4).acc == pytest.approx(m["test_acc"])
    model.load_state_dict(raw)
    assert evaluate(model, test, 4).acc == pytest.approx(m["ema"]["test_raw"]["acc"])


def test_ema_raw_keeps_the_average_beside_the_raw_weights(make_cfg, tmp_path):
    cfg = make_cfg(train={"epochs": 1, "ema": {"decay": 0.9, "evaluate": "raw"}})
    run_experiment(cfg, tmp_path / "run", console=QUIET)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["tested_weights"] == "raw" and "test_raw" not in m["ema"]
    last = tmp_path / "run" / "checkpoints" / "last.safetensors"
    assert load_checkpoint(last)[1]["ema"]["model"] == "raw" and load_checkpoint_group(last, "ema").keys() == load_checkpoint(last)[0].keys()


def test_ema_and_the_balanced_sampler_train_on_cached_features(make_cfg, tmp_path):
    cfg = make_cfg(model={"backbone": "test_efficientnet"}, strategy={"name": "linear_probe"}, data={"sampler": "balanced"},
                   train={"epochs": 2, "ema": {"decay": 0.9, "evaluate": "both"}, "class_weights": "balanced"})
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert m["feature_cache"]["used"] and m["tested_weights"] == "ema" and "test_raw" in m["ema"]
    model = transferlab.load_run(tmp_path / "run").load_model()  # a full-model checkpoint of the averaged weights
    splits = prepare_splits(cfg.data, cfg.seed)
    test = TensorBatches(splits.test_x, splits.test_y, cfg.train.eval_batch_size, model.preprocess(), channels_last=cfg.model.channels_last)
    assert evaluate(model, test, 4).acc == pytest.approx(m["test_acc"])


def test_mixup_switches_feature_caching_off_and_says_why(make_cfg, tmp_path):
    cfg = make_cfg(strategy={"name": "linear_probe"}, train={"epochs": 1, "mixup": {"alpha": 0.2}})
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert m["feature_cache"]["used"] is False and "train.mixup" in m["feature_cache"]["reason"]
    with pytest.raises(Exception, match="train.cache: on, but features cannot be cached: train.mixup"):
        run_experiment(make_cfg(strategy={"name": "linear_probe"}, train={"epochs": 1, "cache": "on", "mixup": {}}), tmp_path / "on", console=QUIET)


def _imbalanced_folder(root: Path, common: int = 50, rare: int = 5) -> Path:
    """A 10:1 image folder: ``common/`` and ``rare/``, 8 px PNGs whose brightness tells the class apart."""
    g = np.random.default_rng(0)
    for name, n, level in (("common", common, 60), ("rare", rare, 190)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(level + g.normal(0, 25, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_imbalanced_folder_from_the_cli_records_balanced_metrics_and_weights(tmp_path, capsys):
    root = _imbalanced_folder(tmp_path / "images")
    study = {
        "study": "imbalanced",
        "defaults": {
            "data": {"dataset": "folder", "root": str(root), "image_size": 8, "val_fraction": 0.25, "test_fraction": 0.2},
            "model": {"backbone": "transferlab_cnn"},
            "train": {"epochs": 2, "batch_size": 16, "lr": 0.01, "progress": False, "accelerator": "cpu"},
        },
        "experiments": [
            {"name": "plain"},
            {"name": "rebalanced", "data": {"sampler": "balanced"}, "train": {"class_weights": "balanced", "loss": "focal", "focal_gamma": 1.0}},
        ],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
    study_dir = tmp_path / "runs" / "imbalanced"
    m = json.loads((study_dir / "rebalanced" / "metrics.json").read_text())
    assert m["class_names"] == ["common", "rare"]
    # balanced weights = n / (2 n_c) on the run's training split
    run = transferlab.load_run(study_dir / "rebalanced")
    counts = np.bincount(prepare_splits(run.config.data, run.config.seed).train_y.numpy(), minlength=2)
    assert counts[0] >= 9 * counts[1] and m["n_train"] == counts.sum()
    assert m["class_weights"] == pytest.approx(list(counts.sum() / (2 * counts)), rel=1e-5)
    for name in ("plain", "rebalanced"):
        mm = json.loads((study_dir / name / "metrics.json").read_text())
        assert (mm["test_balanced_acc"], mm["test_macro_f1"]) == balanced_scores(mm["confusion_matrix"]) != (None, None)
    capsys.readouterr()
    assert main(["compare", str(study_dir), "--wide"]) == 0  # the default table is 120 columns; --wide has every column
    assert "balanced acc" in capsys.readouterr().out
    with open(study_dir / "compare.csv", newline="") as f:
        assert {"test_balanced_acc", "test_macro_f1"} <= set(next(csv.reader(f)))
    report = build_report(study_dir)
    assert "balanced accuracy" in report.html_path.read_text() and "macro F1" in report.md_path.read_text()


def test_recipes_study_file_parses_and_validates():
    study = load_study(STUDY_FILE)
    names = {e.name for e in study.experiments}
    assert names == {"cnn_scratch", "cnn_scratch_recipes", "lite0_finetune", "lite0_finetune_recipes",
                     "cnn_scratch_lrfind", "lite0_finetune_lrfind"}
    assert len(study.experiments) == 18  # 3 seeds each
    recipes = [e for e in study.experiments if e.name.endswith("_recipes")]
    assert all(e.train.mixup and e.train.ema and e.data.augment for e in recipes)
    by_name = {e.name: e for e in study.experiments if e.seed == 0}
    for base in ("cnn_scratch", "lite0_finetune"):  # the LR finder's rows differ from the demo's only in the lr
        found, hand = by_name[f"{base}_lrfind"], by_name[base]
        assert found.train.lr == "find" and isinstance(hand.train.lr, float)
        assert dataclasses.replace(found.train, lr=hand.train.lr) == hand.train and found.model == hand.model
