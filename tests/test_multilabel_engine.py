"""Multi-label engine (issue 24): metrics against scikit-learn, thresholds chosen on validation only, the losses,
mixup of target vectors, flip TTA of sigmoid probabilities, calibration per class, the feature cache's N×K labels and
the predictions file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    hamming_loss,
    precision_score,
    recall_score,
)
from torch import nn

from transferlab.config import ConfigError
from transferlab.config.schema import MixupConfig
from transferlab.data.normalize import Preprocess
from transferlab.data.prepare import ImageSplits
from transferlab.engine.calibration import ECE_BINS, multilabel_calibration
from transferlab.engine.distill import DistillLoss
from transferlab.engine.evaluation import TestTimeAugmentation as FlipTta
from transferlab.engine.evaluation import with_tta
from transferlab.engine.features.store import FeatureCache
from transferlab.engine.loop import right_decisions
from transferlab.engine.losses import AsymmetricLoss, make_loss
from transferlab.engine.mixup import Mixup
from transferlab.engine.multilabel import (
    choose_thresholds,
    evaluate_at_val_thresholds,
    evaluate_multilabel,
    multilabel_part,
    multilabel_predictions,
    multilabel_scores,
)
from transferlab.engine.predictions import save_test_predictions
from transferlab.rundir.predictions import load_test_predictions


def _data(n: int = 60, k: int = 4, seed: int = 0, empty_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities that lean toward the labels (so the scores are neither 0 nor 1), and multi-hot targets."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, k, generator=g) < 0.35).float()
    if empty_class is not None:
        y[:, empty_class] = 0
    probs = (0.35 * y + 0.65 * torch.rand(n, k, generator=g)).clamp(0, 1)
    return probs, y


def _sklearn_f1(p: np.ndarray, y: np.ndarray, t: float) -> float:
    return f1_score(y, (p >= t).astype(int), zero_division=0)


# --------------------------------------------------------------------------------------------
# scores


def test_scores_match_scikit_learn_and_a_class_without_positives_has_no_ap():
    probs, y = _data(empty_class=2)
    thresholds = [0.3, 0.5, 0.45, 0.6]
    s = multilabel_scores(probs, y, thresholds)
    p, t = probs.numpy(), y.numpy().astype(int)
    pred = (p >= np.array(thresholds)).astype(int)
    ap = [average_precision_score(t[:, c], p[:, c]) if t[:, c].any() else None for c in range(4)]
    assert s["per_class_ap"][2] is None
    assert s["per_class_ap"] == pytest.approx(ap)
    assert s["map"] == pytest.approx(np.mean([a for a in ap if a is not None]))
    assert s["map_micro"] == pytest.approx(average_precision_score(t.ravel(), p.ravel()))
    assert s["f1"] == pytest.approx(f1_score(t, pred, average="macro", zero_division=0))
    assert s["f1_micro"] == pytest.approx(f1_score(t, pred, average="micro", zero_division=0))
    assert s["precision"] == pytest.approx(precision_score(t, pred, average="macro", zero_division=0))
    assert s["recall"] == pytest.approx(recall_score(t, pred, average="macro", zero_division=0))
    assert s["exact_match"] == pytest.approx(accuracy_score(t, pred))
    assert s["hamming"] == pytest.approx(hamming_loss(t, pred))
    part = multilabel_part(s, thresholds, "fixed", 0.25, 100.0)
    assert part["task"] == "multilabel" and part["test_map"] == s["map"] and part["thresholds"] == thresholds
    assert part["threshold_mode"] == "fixed" and part["test_hamming"] == s["hamming"] and part["test_loss"] == 0.25


def test_a_label_is_predicted_at_exactly_its_threshold():
    probs = torch.tensor([[0.5, 0.2], [0.49, 0.8]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert multilabel_scores(probs, y, [0.5, 0.8])["exact_match"] == 1.0  # 0.5 >= 0.5 and 0.8 >= 0.8 are predicted


# --------------------------------------------------------------------------------------------
# thresholds


def test_global_threshold_has_the_best_micro_f1_of_every_candidate():
    probs, y = _data(seed=1)
    thresholds, mode = choose_thresholds(probs, y, "global")
    p, t = probs.numpy().ravel(), y.numpy().ravel().astype(int)
    best = max(_sklearn_f1(p, t, c) for c in np.unique(p))
    assert mode == "global" and len(set(thresholds)) == 1 and len(thresholds) == 4
    assert _sklearn_f1(p, t, thresholds[0]) == pytest.approx(best)
    # the threshold sits between two validation probabilities (the midpoint), not on one of them
    assert thresholds[0] not in set(p.tolist())


def test_per_class_thresholds_are_each_class_best_f1_and_a_class_without_positives_gets_the_global_one():
    probs, y = _data(seed=2, empty_class=3)
    thresholds, mode = choose_thresholds(probs, y, "per_class")
    glob, _ = choose_thresholds(probs, y, "global")
    p, t = probs.numpy(), y.numpy().astype(int)
    assert mode == "per_class" and thresholds[3] == glob[3]
    for c in range(3):
        best = max(_sklearn_f1(p[:, c], t[:, c], v) for v in np.unique(p[:, c]))
        assert _sklearn_f1(p[:, c], t[:, c], thresholds[c]) == pytest.approx(best)
    assert len(set(thresholds[:3])) > 1  # the classes differ here


def test_a_fixed_threshold_and_a_validation_split_without_positives():
    probs, y = _data(seed=3)
    assert choose_thresholds(probs, y, 0.3) == ([0.3] * 4, "fixed")
    assert choose_thresholds(probs, torch.zeros_like(y), "global") == ([0.5] * 4, "global")  # nothing to choose from


def _same_scores(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key]), key  # per_class_ap: a list, compared as one


class _Probs(nn.Module):
    """A 'model' whose input already is the probability: the logit of it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(x, eps=1e-6)


def test_thresholds_come_from_validation_never_from_test():
    # validation: positives ~0.3, negatives ~0.1 (best threshold near 0.2); test: positives ~0.8, negatives ~0.5 — there
    # the best threshold would be near 0.65, and 0.2 predicts every label
    g = torch.Generator().manual_seed(4)
    y_val = (torch.rand(40, 3, generator=g) < 0.4).float()
    y_test = (torch.rand(40, 3, generator=g) < 0.4).float()
    p_val = torch.where(y_val > 0, 0.3, 0.1) + 0.02 * torch.rand(40, 3, generator=g)
    p_test = torch.where(y_test > 0, 0.8, 0.5) + 0.02 * torch.rand(40, 3, generator=g)
    val, test = [(p_val[:20], y_val[:20]), (p_val[20:], y_val[20:])], [(p_test, y_test)]
    ev, mode = evaluate_at_val_thresholds(_Probs(), val, test, 3, "cpu", "global")
    from_val, _ = choose_thresholds(p_val, y_val, "global")
    from_test, _ = choose_thresholds(p_test, y_test, "global")
    assert mode == "global" and ev.thresholds == pytest.approx(from_val) and from_val != pytest.approx(from_test)
    _same_scores(ev.scores, multilabel_scores(ev.probs, y_test, ev.thresholds))
    assert ev.scores["recall"] == 1.0 and ev.scores["precision"] < 0.6  # what the too-low validation threshold costs on test
    assert ev.probs == pytest.approx(p_test, abs=1e-5) and torch.equal(ev.targets, y_test)


def test_evaluate_multilabel_loss_is_the_mean_bce():
    probs, y = _data(n=30, k=3, seed=5)
    ev = evaluate_multilabel(_Probs(), [(probs[:4], y[:4]), (probs[4:], y[4:])], 3)
    assert ev.n == 30 and ev.scores is None and (y.sum(0) > 0).all()
    assert ev.loss == pytest.approx(float(F.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), y)), rel=1e-5)
    assert ev.map == pytest.approx(np.mean([average_precision_score(y[:, c], probs[:, c]) for c in range(3)]))


# --------------------------------------------------------------------------------------------
# losses


def test_bce_balanced_pos_weight_is_negatives_over_positives(make_cfg):
    cfg = make_cfg(data={"task": "multilabel"}, train={"class_weights": "balanced"})
    assert cfg.train.loss == "bce" and cfg.train.early_stopping.monitor == "val_map"  # the multi-label defaults
    y = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 1, 0], [1, 0, 0]], dtype=torch.float32)
    loss = make_loss(cfg, ["a", "b", "c"], y)
    pos = y.sum(0)
    assert torch.allclose(loss.weight, (len(y) - pos) / pos)
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    ref = nn.BCEWithLogitsLoss(pos_weight=(len(y) - pos) / pos)(logits, y)
    assert float(loss(logits, y)) == pytest.approx(float(ref))
    listed = make_loss(make_cfg(data={"task": "multilabel"}, train={"class_weights": [1.0, 2.0, 3.0]}), ["a", "b", "c"], y)
    assert float(listed(logits, y)) == pytest.approx(float(nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 3.0]))(logits, y)))
    with pytest.raises(ConfigError, match=r"no training image of class\(es\) c"):
        make_loss(cfg, ["a", "b", "c"], torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.float32))


def test_asymmetric_loss_is_the_papers_formula_and_bce_without_focusing():
    g = torch.Generator().manual_seed(6)
    logits, y = 3 * torch.randn(8, 5, generator=g), (torch.rand(8, 5, generator=g) < 0.3).float()
    gn, gp, m = 4.0, 1.0, 0.05
    p = torch.sigmoid(logits)
    p_m = (p - m).clamp(min=0)  # Ridnik et al. (2021), eq. 5: the shifted probability of the negatives
    ref = -(y * (1 - p) ** gp * torch.log(p) + (1 - y) * p_m**gn * torch.log(1 - p_m)).mean()
    assert float(AsymmetricLoss(gn, gp, m)(logits, y)) == pytest.approx(float(ref), rel=1e-5)
    bce = F.binary_cross_entropy_with_logits(logits, y)
    assert float(AsymmetricLoss(0.0, 0.0, 0.0)(logits, y)) == pytest.approx(float(bce), rel=1e-5)


def test_multilabel_losses_are_refused_for_multiclass_data_and_the_reverse(make_cfg):
    with pytest.raises(ConfigError, match="train.loss='bce' is a multi-label loss"):
        make_cfg(train={"loss": "bce"})
    with pytest.raises(ConfigError, match="train.loss='focal' is a multiclass"):
        make_cfg(data={"task": "multilabel"}, train={"loss": "focal"})
    with pytest.raises(ConfigError, match=r"train.asl_clip=1.5 must be in \[0, 1\)"):
        make_cfg(data={"task": "multilabel"}, train={"loss": "asymmetric", "asl_clip": 1.5})
    with pytest.raises(ConfigError, match="train.calibrate: temperature is multiclass only"):
        make_cfg(data={"task": "multilabel"}, train={"calibrate": "temperature"})


# --------------------------------------------------------------------------------------------
# mixup, TTA, the training accuracy


@pytest.mark.parametrize("mix", [{"alpha": 0.4, "label_smoothing": 0.0}, {"alpha": None, "cutmix_alpha": 1.0, "label_smoothing": 0.0},
                                 {"alpha": 0.4, "label_smoothing": 0.1}])
def test_mixup_and_cutmix_mix_the_target_vectors(mix):
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(6, 3, 8, 8, generator=g), (torch.rand(6, 4, generator=g) < 0.5).float()
    mixer = Mixup(MixupConfig(**mix), 4, seed=3)
    for _ in range(5):
        _, target, dominant = mixer(x, y)
        s = mix["label_smoothing"]
        smooth = y * (1 - s) + s / 4  # timm's on / off values, per entry
        assert torch.allclose(target, mixer.lam * smooth + (1 - mixer.lam) * smooth.flip(0))
        assert torch.equal(dominant, y if mixer.lam >= 0.5 else y.flip(0))


def test_flip_tta_averages_the_sigmoid_probabilities_for_multilabel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.randn(6, 3, 4, 4)
    wrapped = with_tta(model, "flip", multilabel=True)
    assert isinstance(wrapped, FlipTta) and wrapped.multilabel
    expected = (model(x).sigmoid() + model(x.flip(-1)).sigmoid()) / 2
    assert torch.allclose(wrapped(x).sigmoid(), expected, atol=1e-6)
    assert torch.allclose(with_tta(model, "flip")(x).exp(), (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2, atol=1e-6)


def test_the_training_accuracy_of_multilabel_counts_right_label_decisions_at_one_half():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.1, 0.0, -3.0]])
    label = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    assert int(right_decisions(logits, label)) == int(((logits.sigmoid() >= 0.5) == label.bool()).sum())
    assert int(right_decisions(logits, torch.tensor([0, 1]))) == 2  # class labels: the argmax


# --------------------------------------------------------------------------------------------
# calibration, the feature cache, predictions.json


def test_per_class_calibration():
    probs, y = _data(n=80, k=3, seed=8)
    cal = multilabel_calibration(probs, y, nll=0.5)
    p, t = probs.double().numpy(), y.numpy()

    def ece(pc: np.ndarray, yc: np.ndarray) -> float:  # Guo et al.: bins i/15 <= p < (i+1)/15, |mean label - mean p| weighted
        b = np.minimum((pc * ECE_BINS).astype(int), ECE_BINS - 1)
        return sum(abs(yc[b == i].mean() - pc[b == i].mean()) * (b == i).mean() for i in range(ECE_BINS) if (b == i).any())

    assert cal["per_class_ece"] == pytest.approx([ece(p[:, c], t[:, c]) for c in range(3)], abs=1e-5)
    assert cal["ece"] == pytest.approx(np.mean(cal["per_class_ece"]))
    assert cal["brier"] == pytest.approx(np.mean([brier_score_loss(t[:, c], p[:, c]) for c in range(3)]))
    assert sum(cal["reliability"]["count"]) == 240 and cal["nll"] == 0.5
    assert sum(cal["reliability"]["correct"]) == pytest.approx(float(y.sum()))


@pytest.mark.parametrize("to_disk", [False, True])
def test_the_feature_cache_keeps_multi_hot_float_labels(tmp_path, to_disk):
    feats, y = torch.randn(10, 6), (torch.rand(10, 3) < 0.5).float()
    batches = [(feats[:4], y[:4]), (feats[4:], y[4:])]
    fs = FeatureCache().compute("k" * 40, {}, 10, (6,), torch.float32, batches, tmp_path, to_disk=to_disk, labels=((3,), torch.float32))
    assert fs.storage == ("disk" if to_disk else "memory")
    assert fs.labels.dtype == torch.float32 and torch.equal(fs.labels, y) and torch.equal(fs.features, feats)
    if to_disk:  # a new process memory-maps the file: the labels come back as written
        again = FeatureCache().get("k" * 40, tmp_path)
        assert again is not None and again.labels.shape == (10, 3) and torch.equal(again.labels, y)


def test_multilabel_predictions_file_round_trip(tmp_path):
    g = torch.Generator().manual_seed(9)
    y = (torch.rand(50, 3, generator=g) < 0.5).float()
    probs = 0.1 + 0.8 * y
    probs[40:45, 0] = 0.9 - 0.8 * y[40:45, 0]  # five images with a wrong label 0
    thresholds = [0.4, 0.5, 0.6]
    x = torch.randint(0, 255, (50, 3, 8, 8), dtype=torch.uint8, generator=g)
    splits = ImageSplits(x[:1], y[:1], x[:1], y[:1], x, y, ["a", "b", "c"], "test")
    save_test_predictions(tmp_path, multilabel_predictions(probs, y, thresholds), splits, seed=0)
    back = load_test_predictions(tmp_path)
    assert back is not None and back.multilabel and back.thresholds == thresholds
    assert back.true.shape == back.pred.shape == back.prob.shape == (50, 3) and back.true_prob.size == 0
    assert np.array_equal(back.true, y.numpy().astype(int))
    assert np.array_equal(back.pred, (probs.numpy() >= np.array(thresholds)).astype(int))
    assert back.prob == pytest.approx(probs.numpy(), abs=1e-5)
    wrong = {i for i in range(50) if (back.true[i] != back.pred[i]).any()}
    assert wrong == set(range(40, 45)) and wrong <= set(back.positions)  # the sample keeps the images with a wrong label
    assert back.images is not None and len(back.images) == len(back.positions) <= 32 + 5


def test_multilabel_distillation_soft_term_is_the_bce_against_the_teachers_sigmoids():
    g = torch.Generator().manual_seed(10)
    student, teacher_logits = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    y = (torch.rand(5, 3, generator=g) < 0.5).float()
    teacher = _Fixed(teacher_logits)
    pre = Preprocess((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 3)
    loss = DistillLoss(nn.BCEWithLogitsLoss(), teacher, pre, pre, None, alpha=0.5, temperature=2.0, multilabel=True)
    loss.inputs = torch.zeros(5, 3, 4, 4)
    soft = F.binary_cross_entropy_with_logits(student / 2, torch.sigmoid(teacher_logits / 2))
    expected = 0.5 * F.binary_cross_entropy_with_logits(student, y) + 0.5 * 4 * soft
    assert float(loss(student, y)) == pytest.approx(float(expected), rel=1e-6)


class _Fixed(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits
