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

__all__ = ["LOSSES", "FocalLoss", "class_weights", "make_loss"]

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
