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


@pytest.fixture
def interrupt_and_resume(monkeypatch):
    """``(cfg, root, die_at, directory="checkpoints") -> (full, resumed, full_dir, cut_dir)``: the run uninterrupted
    into ``root/full``, then into ``root/cut`` killed right after the ``last`` checkpoint of epoch index ``die_at`` in
    ``directory`` (a simulated kill: ``KeyboardInterrupt`` out of ``save_checkpoint``) and resumed; both runs' metrics."""
    from rich.console import Console

    import transferlab.engine.checkpointing as engine
    from transferlab.kinds import run_experiment

    quiet = Console(quiet=True)

    def run(cfg, root, die_at, directory="checkpoints"):
        full = run_experiment(cfg, root / "full", console=quiet)
        real = engine.save_checkpoint

        def save_then_die(path, *args, **kwargs):
            real(path, *args, **kwargs)
            if path.name == "last.safetensors" and path.parent.name == directory and args[1]["epoch"] == die_at:
                raise KeyboardInterrupt("simulated kill")

        monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(cfg, root / "cut", console=quiet)
        monkeypatch.setattr(engine, "save_checkpoint", real)
        resumed = run_experiment(cfg, root / "cut", resume=True, console=quiet)
        return full, resumed, root / "full", root / "cut"

    return run
