"""Benchmark: ``transferlab auto``'s training-step estimate against a step timed at the training batch.

Auto times a fine-tune step of its fastest candidate at batches 8 and 16 and extrapolates to its training batch of 32
along the line through both (``tools.auto.measure``); it used to time batch 8 and multiply by 4. This prints, for
EfficientNet-Lite0 (random weights: the cost does not depend on them) at 64 and 224 px, the step timed at batch 32,
the current estimate and the old one, each as a ratio to the timed step (RESULTS §12g).

    .venv/bin/python benchmarks/auto_step_estimate.py          # ~1 minute on 2 cores; run it on a quiet machine
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import torch

from transferlab.config import ExperimentConfig, from_dict
from transferlab.engine.costs import measure_cost
from transferlab.engine.precision import cpu_flags
from transferlab.models.model import build_model
from transferlab.strategies import apply_strategy
from transferlab.tools import auto
from transferlab.tools.rank import parse_candidates


def timed_step(name: str, side: int, batch: int) -> float:
    """The engine's probe of a full fine-tune step at ``batch`` (as ``transferlab plan`` times a run)."""
    c = parse_candidates([name])[0]
    cfg = from_dict(ExperimentConfig, {"name": "cost", "model": {"backbone": c.backbone, "weights": "scratch"},
                                       "strategy": {"name": "finetune"}, "train": {**auto.TRAIN, "batch_size": batch}})
    model, _ = build_model(cfg.model, cfg.head, 10)
    apply_strategy(model, cfg.strategy)
    step = measure_cost(model, cfg, side, 10, train=True).step
    assert step is not None
    return step


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    splits = auto.Splits(folder / "dev.csv", folder / "final.csv", n_pool=2000, n_test=500, n_classes=10, folds=None)
    name, batch = "tf_efficientnet_lite0:embedded", auto.TRAIN["batch_size"]
    for side in (64, 224):
        t8, t_batch = timed_step(name, side, auto.MEASURE_BATCH), timed_step(name, side, batch)
        new = auto.measure(parse_candidates([name])[0], side, splits, train=True).step
        assert new is not None
        old = t8 * batch / auto.MEASURE_BATCH
        print(f"{name} at {side} px: step timed at batch {batch} {t_batch:.3f} s; estimate (batches {auto.MEASURE_BATCH} and "
              f"{2 * auto.MEASURE_BATCH}, extrapolated) {new:.3f} s = {new / t_batch:.2f}x; old ({batch // auto.MEASURE_BATCH} x batch "
              f"{auto.MEASURE_BATCH}) {old:.3f} s = {old / t_batch:.2f}x")
    flags = cpu_flags() or frozenset()
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; bf16 flags: "
          f"{' '.join(f for f in ('avx512_bf16', 'amx_bf16') if f in flags) or 'none'}")


if __name__ == "__main__":
    main()
