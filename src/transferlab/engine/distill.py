"""Knowledge distillation (``train.distill``, Hinton et al. 2015) from a finished run's frozen model.

The teacher sees the very batch the student trains on (augmented, mixed): the loop hands it over through the
``on_train_batch_start`` hook, and the loss is

    (1 − alpha) · hard(student, target) + alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T)).

Multi-label (``data.task: multilabel``: K independent sigmoids) the soft term is per class instead, the binary
cross-entropy of sigmoid(student / T) against the teacher's sigmoid(teacher / T), averaged over images and classes.

Teacher and student may differ in backbone, input size, channels and normalisation: the student's normalised batch
is turned back into pixels, resized to the teacher's input size (bilinear, antialiased) and normalised the
teacher's way (its own ``Preprocess``). The teacher is in eval mode without gradients and uses no randomness, so a
resumed run continues bit-identically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transferlab.data.normalize import Preprocess
from transferlab.engine.loop import Callback, Loop

__all__ = ["DistillLoss", "teacher_inputs"]


def teacher_inputs(x: torch.Tensor, student: Preprocess, teacher: Preprocess, size: int | None) -> torch.Tensor:
    """The student's normalised batch ``x`` as the teacher's input: pixels (0..255), resized to ``size``, normalised."""
    mean = torch.tensor(student.mean, device=x.device).view(1, -1, 1, 1) * 255
    std = torch.tensor(student.std, device=x.device).view(1, -1, 1, 1) * 255
    pixels = x.float() * std + mean
    if size is not None and tuple(pixels.shape[-2:]) != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return teacher(pixels)


class DistillLoss(nn.Module, Callback):
    """The distillation loss around the run's ``base`` loss; also the hook that hands it each training batch."""

    def __init__(self, base: nn.Module, teacher: nn.Module, student_pre: Preprocess, teacher_pre: Preprocess,
                 teacher_size: int | None, alpha: float, temperature: float, multilabel: bool = False) -> None:
        super().__init__()
        self.base, self.teacher = base, teacher.eval().requires_grad_(False)
        self.student_pre, self.teacher_pre, self.teacher_size = student_pre, teacher_pre, teacher_size
        self.alpha, self.temperature, self.multilabel = alpha, temperature, multilabel
        self.inputs: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor | None:
        """The base loss's class weights (``train.class_weights``)."""
        return getattr(self.base, "weight", None)

    def train(self, mode: bool = True) -> DistillLoss:
        super().train(mode)
        self.teacher.eval()  # frozen: dropout off, BatchNorm statistics fixed, whatever the loop asks
        return self

    def on_train_batch_start(self, loop: Loop) -> None:
        self.inputs = loop.batch_x

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        hard = self.base(logits, target)
        if self.inputs is None or self.alpha == 0:  # no batch handed over (e.g. the LR finder): the hard loss alone
            return hard
        x, self.inputs = self.inputs, None
        with torch.no_grad():
            t = self.teacher(teacher_inputs(x, self.student_pre, self.teacher_pre, self.teacher_size)).float()
        temp = self.temperature
        if self.multilabel:  # each class its own binary distribution
            soft = F.binary_cross_entropy_with_logits(logits.float() / temp, (t / temp).sigmoid())
        else:
            soft = F.kl_div(F.log_softmax(logits.float() / temp, 1), F.log_softmax(t / temp, 1), log_target=True, reduction="batchmean")
        return (1 - self.alpha) * hard + self.alpha * temp * temp * soft
