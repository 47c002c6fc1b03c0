"""Calibration of the test predictions: ECE, NLL, Brier score, reliability bins, temperature scaling.

* **ECE** is torchmetrics' ``MulticlassCalibrationError`` with ``ECE_BINS`` = 15 equal-width bins and
  the L1 norm: the top-label confidence c (the highest softmax probability) of every image falls in
  bin ``i`` when ``i/15 <= c < (i+1)/15``; ECE = sum over bins of (n_bin / n) * |accuracy_bin - mean c_bin|.
* **NLL** is the mean negative log-likelihood of the true class (the cross-entropy of the logits).
* **Brier score** is the multiclass one of Brier (1950): the mean over images of sum_k (p_k - [y = k])^2,
  from 0 (perfect) to 2.
* **Temperature scaling** (Guo et al. 2017, ``train.calibrate: temperature``): one scalar T > 0 fitted by
  L-BFGS on the *validation* logits to minimise the NLL of ``softmax(logits / T)``; it never changes
  the predicted class, so accuracy is unchanged. Fitted on validation only, never on test.

``CalibrationSums`` accumulates all of it on the device during ``evaluate`` (no logits are kept); its
reliability bins (count, summed confidence, correct per bin) are what the report's diagram draws.

Multi-label (``data.task: multilabel``, ``multilabel_calibration``): every class is a binary problem — its sigmoid
probability p against its 0/1 label. ECE is the mean over classes of each class's binary ECE (torchmetrics'
``BinaryCalibrationError``, same bins and norm; the confidence is p itself), NLL the mean BCE, Brier the mean of
(p − y)² over images and classes (0 … 1), and the reliability bins pool every image-class pair. Temperature
scaling is multiclass only (the config check says so): the thresholds are chosen on the validation probabilities,
and rescaling them afterwards would move every threshold.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassCalibrationError
from torchmetrics.functional.classification import binary_calibration_error

__all__ = ["ECE_BINS", "CalibrationSums", "collect_logits", "ece_from_bins", "fit_temperature", "multilabel_calibration"]

ECE_BINS = 15
"""Equal-width confidence bins of the ECE and the reliability diagram (torchmetrics' and Guo et al.'s 15)."""


class CalibrationSums:
    """Running calibration sums of one evaluation, on the device: ECE (torchmetrics), NLL, Brier, reliability bins.

    With ``temperature`` the same sums are kept for ``logits / temperature`` too (the ``calibrated`` entries).
    """

    def __init__(self, num_classes: int, device: torch.device | str, temperature: float | None = None) -> None:
        self.num_classes, self.temperature = num_classes, temperature
        scales = [1.0] if temperature is None else [1.0, float(temperature)]
        self.scales = scales
        self.ece = [MulticlassCalibrationError(num_classes, n_bins=ECE_BINS, norm="l1").to(device) for _ in scales]
        # per scale: nll sum, brier sum, then per bin: count, confidence sum, correct sum
        self.sums = torch.zeros(len(scales), 2 + 3 * ECE_BINS, device=device, dtype=torch.float64)

    def update(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        for i, t in enumerate(self.scales):
            z = logits.float() / t
            probs = z.softmax(-1)  # probabilities, not logits: torchmetrics would skip its softmax on logits in [0, 1]
            self.ece[i].update(probs, y)
            conf, pred = probs.max(-1)
            onehot = F.one_hot(y, self.num_classes).to(probs.dtype)
            row = self.sums[i]
            row[0] += F.cross_entropy(z, y, reduction="sum").double()
            row[1] += ((probs - onehot) ** 2).sum().double()
            # bucketize as torchmetrics does (i/15 <= c < (i+1)/15); c = 1 goes to the last bin
            b = (conf.double() * ECE_BINS).floor().long().clamp(0, ECE_BINS - 1)
            bins = row[2:].view(3, ECE_BINS)
            bins[0].index_add_(0, b, torch.ones_like(conf, dtype=torch.float64))
            bins[1].index_add_(0, b, conf.double())
            bins[2].index_add_(0, b, (pred == y).double())

    def compute(self, totals: torch.Tensor, n: int) -> dict[str, Any]:
        """The metrics from ``totals`` (``self.sums`` summed over ranks) and the image count ``n``."""
        out: dict[str, Any] = {}
        for i, suffix in enumerate(["", "_calibrated"][: len(self.scales)]):
            row = totals[i]
            bins = row[2:].view(3, ECE_BINS)
            out[f"ece{suffix}"] = float(self.ece[i].compute())
            out[f"nll{suffix}"] = float(row[0]) / max(n, 1)
            out[f"brier{suffix}"] = float(row[1]) / max(n, 1)
            out[f"reliability{suffix}"] = {"count": bins[0].long().tolist(), "confidence": bins[1].tolist(), "correct": bins[2].tolist()}
        if self.temperature is not None:
            out["temperature"] = float(self.temperature)
        return out


def multilabel_calibration(probs: torch.Tensor, targets: torch.Tensor, nll: float) -> dict[str, Any]:
    """The calibration of N×K multi-label sigmoid probabilities, each class a binary problem (its probability against
    its 0/1 label): ``ece`` the mean over classes of torchmetrics' ``BinaryCalibrationError`` (``ECE_BINS`` bins, L1;
    ``per_class_ece`` each), ``brier`` the mean over images and classes of (p − y)², ``nll`` the mean BCE the caller
    measured from the logits, ``reliability`` the bins of every image-class pair pooled (count, summed p, summed y).
    Keys as ``CalibrationSums.compute``'s, so ``Calibration.from_sums`` reads it."""
    p, y = probs.detach().float().cpu(), (targets.detach().cpu() >= 0.5).long()
    per_class = [float(binary_calibration_error(p[:, k].contiguous(), y[:, k].contiguous(), n_bins=ECE_BINS, norm="l1")) for k in range(p.shape[1])]
    flat_p, flat_y = p.flatten().double(), y.flatten().double()
    b = (flat_p * ECE_BINS).floor().long().clamp(0, ECE_BINS - 1)  # as torchmetrics bins (p = 1 in the last bin)
    bins = torch.zeros(3, ECE_BINS, dtype=torch.float64)
    for row, values in enumerate((torch.ones_like(flat_p), flat_p, flat_y)):
        bins[row].index_add_(0, b, values)
    return {
        "ece": sum(per_class) / max(len(per_class), 1), "per_class_ece": per_class, "nll": nll,
        "brier": float(((flat_p - flat_y) ** 2).mean()) if len(flat_p) else float("nan"),
        "reliability": {"count": bins[0].long().tolist(), "confidence": bins[1].tolist(), "correct": bins[2].tolist()},
    }


def ece_from_bins(reliability: dict[str, list[float]]) -> float | None:
    """The L1 ECE of reliability bins (``count`` / ``confidence`` / ``correct`` sums per bin), or ``None`` when empty."""
    n = sum(reliability["count"])
    if not n:
        return None
    return sum(abs(c - k) for c, k in zip(reliability["correct"], reliability["confidence"], strict=True)) / n


@torch.inference_mode()
def collect_logits(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, labels) of ``model`` on ``batches``, on the device (what temperature scaling fits on)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        logits.append(model(x).float())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 that minimises the mean NLL of ``softmax(logits / T)`` (L-BFGS on log T, so T stays positive)."""
    logits, y = logits.detach().to(torch.float64, copy=True), y.detach().clone()  # plain tensors, not inference ones
    log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)  # T = 1 to start
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():  # callers evaluate under inference mode
        opt.step(closure)
    t = float(log_t.detach().exp())
    if not (t > 0 and torch.isfinite(torch.tensor(t))):
        raise RuntimeError(f"temperature scaling did not converge (T = {t})")
    return t
