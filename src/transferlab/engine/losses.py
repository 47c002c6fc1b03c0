"""Training losses by name (``train.loss``) and per-class weights (``train.class_weights``).

Every loss takes hard labels (N,) or soft targets (N × classes, e.g. from mixup) and the same
optional per-class weights ``w``. The reduction is cross-entropy's, so ``focal`` with gamma 0 *is*
``cross_entropy``: a weighted mean over hard labels (divided by the sum of the labels' weights), a
plain mean over soft targets.

``balanced`` weights are scikit-learn's ``compute_class_weight('balanced')`` on the training split:
w_c = n / (classes · n_c), so every class contributes as much to the loss as the others, whatever
its size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.config import ExperimentConfig, TrainConfig, register_choices
from transferlab.registry import Registry

__all__ = ["LOSSES", "FocalLoss", "L2SpLoss", "class_weights", "make_loss", "with_l2_sp"]

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


def class_weights(cfg: ExperimentConfig, train_labels: torch.Tensor | None, class_names: Sequence[str]) -> torch.Tensor | None:
    """``train.class_weights`` as a tensor (``None`` when unset): ``balanced`` from the training labels, or the list.

    A list of the wrong length, or ``balanced`` with a class that has no training image, is a ConfigError
    naming the key.
    """
    spec, n = cfg.train.class_weights, len(class_names)
    if spec is None:
        return None
    if spec == "balanced":
        if train_labels is None:
            raise cfg.error("train.class_weights: balanced needs the training labels (make_loss(cfg, classes, train_labels))")
        counts = torch.bincount(train_labels.cpu(), minlength=n).double()
        if (counts == 0).any():
            empty = [class_names[i] for i in torch.flatnonzero(counts == 0).tolist()]
            raise cfg.error(f"train.class_weights: balanced, but the training split has no image of class(es) {', '.join(empty)}")
        return (counts.sum() / (n * counts)).float()
    if len(spec) != n:
        raise cfg.error(f"train.class_weights has {len(spec)} weights, but the data has {n} classes ({', '.join(class_names)})")
    return torch.tensor(spec, dtype=torch.float32)


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
