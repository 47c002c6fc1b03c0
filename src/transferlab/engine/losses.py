"""Training losses by name (``train.loss``) and per-class weights (``train.class_weights``).

Multiclass losses (``cross_entropy``, ``focal``) take hard labels (N,) or soft targets (N × classes, e.g. from
mixup) and the same optional per-class weights ``w``. The reduction is cross-entropy's, so ``focal`` with gamma 0
*is* ``cross_entropy``: a weighted mean over hard labels (divided by the sum of the labels' weights), a plain mean
over soft targets.

Multi-label losses (``bce``, ``asymmetric``; ``data.task: multilabel``) take N × classes targets in [0, 1]
(multi-hot, or mixed by mixup) and read each logit as an independent sigmoid probability; both are means over
images *and* classes, so ``asymmetric`` with both gammas and the margin 0 *is* ``bce``. Their class weights are
``pos_weight``s: the weight of each class's positive term.

``balanced`` weights are scikit-learn's ``compute_class_weight('balanced')`` on the training split:
w_c = n / (classes · n_c), so every class contributes as much to the loss as the others, whatever
its size. Multi-label: w_c = negatives_c / positives_c (the ``pos_weight`` that makes a class's positive and
negative terms weigh the same), from the training split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.config import ExperimentConfig, TrainConfig, register_check, register_choices
from transferlab.registry import Registry

__all__ = ["LOSSES", "AsymmetricLoss", "BceLoss", "FocalLoss", "L2SpLoss", "balanced_pos_weight", "class_weights", "make_loss", "with_l2_sp"]

LOSSES: Registry[Callable[[TrainConfig, torch.Tensor | None], nn.Module]] = Registry("loss", "train.loss: the training loss")


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): cross-entropy with each term scaled by (1 − p)^gamma, so that
    well-classified images weigh less; per-class weights ``weight`` as in ``nn.CrossEntropyLoss``."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean focal loss of N×classes ``logits`` against hard labels (N,) or soft targets (N×classes)."""
        logp = F.log_softmax(logits.float(), -1)
        hard = target.dim() == 1
        soft = F.one_hot(target, logits.shape[-1]).float() if hard else target.float()
        if self.label_smoothing:
            soft = soft * (1 - self.label_smoothing) + self.label_smoothing / logits.shape[-1]
        w = self.weight if self.weight is not None else torch.ones(logits.shape[-1], device=logits.device)
        per_image = -(soft * w * (1 - logp.exp()).pow(self.gamma) * logp).sum(-1)
        if hard and not self.label_smoothing:  # cross-entropy's weighted mean over hard labels
            return per_image.sum() / w[target].sum()
        return per_image.mean()


@LOSSES.register("cross_entropy")
def cross_entropy(cfg: TrainConfig, weight: torch.Tensor | None) -> nn.Module:
    """Cross-entropy (``train.label_smoothing``); with mixup, against its soft targets."""
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


@LOSSES.register("focal")
def focal(cfg: TrainConfig, weight: torch.Tensor | None) -> nn.Module:
    """Focal loss with ``train.focal_gamma`` (0 = cross-entropy), for class imbalance and hard examples."""
    return FocalLoss(cfg.focal_gamma, weight, cfg.label_smoothing)


def _multi_hot(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``target`` as float N×K beside N×K ``logits``; hard class labels (N,) are a multiclass loss's input, named."""
    if target.shape != logits.shape:
        raise ValueError(f"a multi-label loss needs N×K targets like its logits {tuple(logits.shape)}, got {tuple(target.shape)} "
                         "(class labels: use a multiclass loss, cross_entropy or focal)")
    return target.float()


class BceLoss(nn.Module):
    """Binary cross-entropy with logits over N×K targets in [0, 1], the mean over images and classes; ``pos_weight``
    (K) multiplies each class's positive term (``train.class_weights``), as in ``nn.BCEWithLogitsLoss``."""

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    @property
    def weight(self) -> torch.Tensor | None:
        """The class weights (here: ``pos_weight``), as every loss of the registry names them."""
        return self.pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), _multi_hot(logits, target), pos_weight=self.pos_weight)


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al. 2021, "Asymmetric Loss For Multi-Label Classification"), their reference
    implementation's formula: with p = sigmoid(logit) and the shifted p_m = max(p − m, 0),

        L = −[ y · (1 − p)^gamma_pos · log p  +  (1 − y) · p_m^gamma_neg · log(1 − p_m) ]

    (log clamped at 1e-8), the mean over images and classes; ``pos_weight`` multiplies the positive term. Easy
    negatives are down-weighted (gamma_neg) and very easy ones (p < m) discarded, which suits data where most labels
    of an image are negative. A soft target y (mixup) weighs the two terms. gamma_pos = gamma_neg = m = 0 is BCE.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, pos_weight: torch.Tensor | None = None,
                 eps: float = 1e-8) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    @property
    def weight(self) -> torch.Tensor | None:
        """The class weights (here: ``pos_weight``)."""
        return self.pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y, p = _multi_hot(logits, target), logits.float().sigmoid()
        q = (1 - p + self.clip).clamp(max=1) if self.clip > 0 else 1 - p  # 1 − p_m: the shifted negative probability
        pos = y * (1 - p).pow(self.gamma_pos) * p.clamp(min=self.eps).log()
        neg = (1 - y) * (1 - q).pow(self.gamma_neg) * q.clamp(min=self.eps).log()
        if self.pos_weight is not None:
            pos = pos * self.pos_weight
        return -(pos + neg).mean()


@LOSSES.register("bce")
def bce(cfg: TrainConfig, weight: torch.Tensor | None) -> nn.Module:
    """Multi-label: binary cross-entropy with logits per class (``data.task: multilabel``'s default); class weights
    are ``pos_weight``."""
    return BceLoss(weight)


@LOSSES.register("asymmetric")
def asymmetric(cfg: TrainConfig, weight: torch.Tensor | None) -> nn.Module:
    """Multi-label: asymmetric loss (Ridnik et al. 2021) with ``train.asl_gamma_neg`` / ``asl_gamma_pos`` / ``asl_clip``."""
    return AsymmetricLoss(cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip, weight)


@register_check
def check_asymmetric(cfg: ExperimentConfig) -> None:
    """``train.asl_*``: gammas >= 0, the margin in [0, 1)."""
    t = cfg.train
    for key, value in (("asl_gamma_neg", t.asl_gamma_neg), ("asl_gamma_pos", t.asl_gamma_pos)):
        if not value >= 0:
            raise cfg.error(f"train.{key}={value!r} must be >= 0")
    if not 0 <= t.asl_clip < 1:
        raise cfg.error(f"train.asl_clip={t.asl_clip!r} must be in [0, 1)")


def class_weights(cfg: ExperimentConfig, train_labels: torch.Tensor | None, class_names: Sequence[str]) -> torch.Tensor | None:
    """``train.class_weights`` as a tensor (``None`` when unset): ``balanced`` from the training labels, or the list.
    Multi-label (``data.task: multilabel``): the same, as each class's ``pos_weight`` (``balanced_pos_weight``).

    A list of the wrong length, or ``balanced`` with a class that has no training image, is a ConfigError
    naming the key.
    """
    spec, n = cfg.train.class_weights, len(class_names)
    if spec is None:
        return None
    if spec == "balanced" and cfg.multilabel:
        return balanced_pos_weight(cfg, train_labels, class_names)
    if spec == "balanced":
        if train_labels is None:
            raise cfg.error("train.class_weights: balanced needs the training labels (make_loss(cfg, classes, train_labels))")
        counts = torch.bincount(train_labels.cpu(), minlength=n).double()
        if (counts == 0).any():
            empty = [class_names[i] for i in (counts == 0).nonzero().flatten().tolist()]
            raise cfg.error(f"train.class_weights: balanced, but the training split has no image of class(es) {', '.join(empty)}")
        return (counts.sum() / (n * counts)).float()
    if len(spec) != n:
        raise cfg.error(f"train.class_weights has {len(spec)} weights, but the data has {n} classes ({', '.join(class_names)})")
    return torch.tensor(spec, dtype=torch.float32)


def balanced_pos_weight(cfg: ExperimentConfig, train_labels: torch.Tensor | None, class_names: Sequence[str]) -> torch.Tensor:
    """Multi-label ``train.class_weights: balanced``: each class's negatives / positives on the training split (N×K
    multi-hot labels); a class in no training image, or in every one, is a ConfigError naming it."""
    if train_labels is None or train_labels.dim() != 2:
        raise cfg.error("train.class_weights: balanced needs the N×K training labels (make_loss(cfg, classes, train_labels))")
    y = (train_labels.cpu() >= 0.5).double()
    pos = y.sum(0)
    neg = len(y) - pos
    for counts, what in ((pos, "no training image of"), (neg, "every training image showing")):
        if (counts == 0).any():
            classes = [class_names[i] for i in (counts == 0).nonzero().flatten().tolist()]
            raise cfg.error(f"train.class_weights: balanced (negatives / positives per class), but there is {what} class(es) "
                            f"{', '.join(classes)}")
    return (neg / pos).float()


def make_loss(cfg: ExperimentConfig, class_names: Sequence[str], train_labels: torch.Tensor | None = None) -> nn.Module:
    """The registered ``train.loss`` with the run's class weights (``train_labels``: for ``balanced``)."""
    return LOSSES.get(cfg.train.loss)(cfg.train, class_weights(cfg, train_labels, class_names))


register_choices(TrainConfig, "loss", LOSSES.names)


class L2SpLoss(nn.Module):
    """``train.l2_sp`` (Li et al. 2018): ``base(logits, target) + alpha/2 · Σ|w − w0|²`` over the backbone's trainable
    parameters, with ``w0`` the weights the run started from (pretrained, or ``weights: run:``), ``+ beta/2 · Σ|w|²``
    over the new head's. Built before training starts (before a resume restores anything), so ``w0`` is always the
    start; the parameters are read at every step (the same tensors the optimizer updates)."""

    def __init__(self, base: nn.Module, model: nn.Module, alpha: float, beta: float) -> None:
        super().__init__()
        self.base, self.alpha, self.beta = base, alpha, beta
        backbone = model.backbone
        head = model.head
        # every backbone parameter that trains at some point (lp_ft's second phase, unfreezing) has its start kept
        self.backbone_params = list(backbone.parameters())
        self.head_params = list(head.parameters())
        for i, p in enumerate(self.backbone_params):
            self.register_buffer(f"start{i}", p.detach().clone(), persistent=False)

    @property
    def weight(self) -> torch.Tensor | None:
        """The base loss's class weights (``train.class_weights``)."""
        return getattr(self.base, "weight", None)

    def penalty(self) -> torch.Tensor:
        """``alpha/2 · Σ|w − w0|² + beta/2 · Σ|w_head|²`` over the parameters that train now."""
        dev = self.backbone_params[0].device if self.backbone_params else self.head_params[0].device
        total = torch.zeros((), device=dev)
        if self.alpha:
            for i, p in enumerate(self.backbone_params):
                if p.requires_grad:
                    total = total + (self.alpha / 2) * (p.float() - getattr(self, f"start{i}").float()).pow(2).sum()
        if self.beta:
            for p in self.head_params:
                if p.requires_grad:
                    total = total + (self.beta / 2) * p.float().pow(2).sum()
        return total

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.base(logits, target) + self.penalty()


def with_l2_sp(criterion: nn.Module, model: nn.Module, cfg: ExperimentConfig) -> nn.Module:
    """``criterion`` with the L2-SP penalty of ``train.l2_sp`` toward ``model``'s current weights (unchanged when off)."""
    l2 = cfg.train.l2_sp
    return criterion if l2 is None else L2SpLoss(criterion, model, l2.alpha, l2.beta)
