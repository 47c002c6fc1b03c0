"""Mixup and CutMix of training batches (``train.mixup``), with timm's ``Mixup`` semantics in batch mode.

Each batch draws, in timm's order: whether to mix at all (``prob``); with both mixup and CutMix set,
which one (``switch_prob``); the weight ``lam`` ~ Beta(alpha, alpha) of the batch itself. Mixup blends
every image with its partner of the reversed batch, ``lam · x + (1 − lam) · x.flip(0)``; CutMix pastes
a box of the partner covering about 1 − lam of the image and recomputes ``lam`` from the clipped box.
The targets are timm's ``mixup_target``: ``lam`` of the smoothed one-hot label plus 1 − lam of the
partner's, for a soft-target cross-entropy.

Why not ``timm.data.Mixup`` itself: it draws from numpy's *global* generator, which anything else
in the process may advance, which a checkpoint does not capture, and which every DataLoader worker
shares with the main process; and it refuses odd batch sizes (our last batch may be one). This class
makes the same draws in the same order from a private ``numpy.random.RandomState`` — the generator
behind numpy's global functions — so for equal seeds it gives timm's batches bit for bit (a test
checks it), and its state goes into every checkpoint, so a resumed run mixes exactly as an
uninterrupted one. The parameters are drawn on the host (a few scalars, nothing read from the
device); the mixing runs on the batch's device.

Training accuracy under mixup counts a prediction as right when it is the batch's *dominant* label:
the image's own label when lam >= 0.5, else its partner's.

Multi-label targets (N×K multi-hot, ``data.task: multilabel``) are mixed the same way, as vectors:
``lam · y + (1 − lam) · y.flip(0)`` (``mixed_multi_hot``; ``label_smoothing`` maps each entry to timm's on / off
values first); the dominant labels are the dominant image's label vector. Class labels take exactly the path above.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.data.mixup import mixup_target

from transferlab.config.schema import MixupConfig

__all__ = ["Mixup", "make_mixup", "mixed_multi_hot"]


class Mixup:
    """Mixup / CutMix of a batch; returns (mixed images, soft targets, dominant labels).

    ``lam`` is the weight of the last batch's own images (1.0: not mixed), as used for its targets.
    ``state_dict`` / ``load_state_dict`` hold the generator (tensors, saved with the run's RNG state).
    """

    def __init__(self, cfg: MixupConfig, num_classes: int, seed: int = 0) -> None:
        self.cfg, self.num_classes = cfg, num_classes
        self.rng = np.random.RandomState(seed % 2**32)
        self.lam = 1.0
        self.box: tuple[int, int, int, int] | None = None  # (top, bottom, left, right) of the last CutMix box

    def draw(self, height: int, width: int) -> tuple[float, tuple[int, int, int, int] | None]:
        """``lam`` and (CutMix) the box of the next batch — timm's ``_params_per_batch`` and ``rand_bbox``."""
        c, rng = self.cfg, self.rng
        if rng.rand() >= c.prob:
            return 1.0, None
        mixup, cutmix = c.alpha is not None, c.cutmix_alpha is not None
        use_cutmix = rng.rand() < c.switch_prob if mixup and cutmix else cutmix
        lam = float(rng.beta(c.cutmix_alpha, c.cutmix_alpha) if use_cutmix else rng.beta(c.alpha, c.alpha))
        if not use_cutmix or lam == 1.0:  # timm mixes nothing (and draws no box) at lam = 1
            return lam, None
        ratio = np.sqrt(1 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = rng.randint(0, height), rng.randint(0, width)
        top, bottom = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + (cut_h + 1) // 2, 0, height))
        left, right = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + (cut_w + 1) // 2, 0, width))
        lam = 1.0 - (bottom - top) * (right - left) / float(height * width)  # timm's correct_lam: the clipped box
        return lam, (top, bottom, left, right)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mix the batch ``x`` (N×C×H×W, any float) with labels ``y``: (mixed x, N×classes soft targets, dominant labels)."""
        lam, box = self.draw(x.shape[-2], x.shape[-1])
        self.lam, self.box = lam, box
        if box is not None:
            top, bottom, left, right = box
            x = x.clone()
            x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
        elif lam != 1.0:
            x = x * lam + x.flip(0) * (1.0 - lam)
        if y.dim() == 1:  # class labels
            target = mixup_target(y, self.num_classes, lam, self.cfg.label_smoothing)
        else:  # multi-label: N×K multi-hot targets
            target = mixed_multi_hot(y, lam, self.cfg.label_smoothing)
        return x, target, (y if lam >= 0.5 else y.flip(0))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator's state as tensors: ``mixup`` (int64: position, has_gauss, the 624 MT19937 words), ``mixup_gauss``."""
        _, keys, pos, has_gauss, gauss = self.rng.get_state()
        head = torch.tensor([pos, has_gauss], dtype=torch.int64)
        return {"mixup": torch.cat([head, torch.from_numpy(keys.astype(np.int64))]), "mixup_gauss": torch.tensor([gauss], dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue the stream from a ``state_dict`` (extra keys, e.g. the rest of a checkpoint's RNG state, are ignored)."""
        words = state["mixup"].tolist()
        keys = np.array(words[2:], dtype=np.uint32)
        self.rng.set_state(("MT19937", keys, int(words[0]), int(words[1]), float(state["mixup_gauss"][0])))


def mixed_multi_hot(y: torch.Tensor, lam: float, smoothing: float = 0.0) -> torch.Tensor:
    """Multi-label mixup targets: ``lam · s(y) + (1 − lam) · s(y.flip(0))`` of N×K multi-hot ``y``, with timm's smoothing
    of each entry, s(y) = y · (1 − smoothing) + smoothing / K (its on / off values; none with ``smoothing`` 0)."""
    y = y.float()
    if smoothing:
        y = y * (1 - smoothing) + smoothing / y.shape[-1]
    return y * lam + y.flip(0) * (1.0 - lam)


def make_mixup(cfg: MixupConfig | None, num_classes: int, seed: int) -> Mixup | None:
    """The run's ``Mixup`` (``train.mixup``), or ``None`` when it is off."""
    return None if cfg is None else Mixup(cfg, num_classes, seed)
