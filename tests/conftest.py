"""Shared fixtures: tiny configs on the synthetic dataset so unit tests take seconds."""

from __future__ import annotations

import pytest

from transferlab.config import ExperimentConfig, from_dict


@pytest.fixture
def make_cfg():
    """Build an ExperimentConfig from a (partial) dict on top of a fast synthetic setup."""

    def _make(**overrides) -> ExperimentConfig:
        base = {
            "name": "t",
            "data": {"dataset": "synthetic", "synthetic_classes": 4, "synthetic_size": 128, "val_fraction": 0.25},
            "model": {"backbone": "transferlab_cnn", "weights": "scratch"},
            # precision pinned: the default `auto` is bf16 on CPUs with native bf16 and fp32 elsewhere, and unit tests
            # must give the same numbers on every machine (tests/test_precision.py tests `auto` itself)
            "train": {"epochs": 2, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": "cpu", "precision": "32-true"},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        cfg = from_dict(ExperimentConfig, base)
        cfg.validate()
        return cfg

    return _make
