"""The training loop's checkpoints: everything a killed run needs to continue exactly where it stopped.

A loop checkpoint is a ``transferlab.files`` checkpoint whose metadata holds the loop state (epoch,
step in the epoch, running sums, best value, patience, seconds), the history so far and the
scheduler state; its tensors hold the model, the optimizer state and the RNG state (torch's, and
mixup's generator with ``train.mixup``). With ``train.ema`` the checkpoint's model is the run's
evaluated weights (the EMA unless ``evaluate: raw``) and the other set is the tensor group ``raw`` or
``ema`` beside it, so ``best`` holds the weights that were selected and a resume restores both.
``last`` is written at every epoch end and inside epochs; ``best`` when the monitored metric
improved. Resuming takes the newest loadable one and says which; a corrupt one is reported and skipped.
Further state the loop carries (``extras``: e.g. ``train.swa``'s average) is saved as tensor groups of its name.

A run whose frozen parameters never change (``weights_scope``: a strategy of ``ADAPTER_ONLY`` from loadable base weights)
writes adapter-only checkpoints: the model tensors are the trainable parameters and every buffer, and the metadata
records the frozen keys, their base and their fingerprint (``transferlab.models.weights.FrozenPart``, computed once per
run). A resume loads them into the model built on that base, after checking the fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from rich.console import Console

from transferlab.config import ExperimentConfig, from_dict
from transferlab.engine.ema import WeightEma
from transferlab.engine.mixup import Mixup
from transferlab.engine.swa import unwrapped
from transferlab.files import CheckpointError, load_checkpoint, load_checkpoint_group, save_checkpoint
from transferlab.models.weights import FrozenPart, load_checkpoint_state
from transferlab.strategies import has_schedule

__all__ = ["ADAPTER_ONLY", "LoopCheckpoints", "LoopState", "Restored", "frozen_part", "weights_scope"]

ADAPTER_ONLY = frozenset({"linear_probe", "bn_only", "norm_only", "bitfit", "lora", "vpt"})
"""Strategies whose frozen parameters never change during a run: their checkpoints can leave them out."""


def weights_scope(cfg: ExperimentConfig) -> str:
    """``trainable`` when the run's checkpoints hold only the trainable parameters and the buffers, else ``full``.

    Adapter-only needs a strategy of ``ADAPTER_ONLY`` without a trainability schedule (``strategy.unfreeze`` /
    ``freeze_epochs`` train the frozen stages later), base weights that can be loaded again (not ``scratch``: a random
    start cannot be rebuilt), no ``train.ema`` (its float32 average of the frozen weights need not equal them bit for
    bit) and a precision that keeps the weights as they were loaded (not ``bf16-true`` / ``16-true`` / ``64-true``).
    """
    s, t = cfg.strategy, cfg.train
    if s.name not in ADAPTER_ONLY or has_schedule(s) or cfg.model.weights == "scratch":
        return "full"
    return "full" if t.ema is not None or t.precision in ("bf16-true", "16-true", "64-true") else "trainable"


def frozen_part(model: torch.nn.Module, cfg: ExperimentConfig) -> FrozenPart | None:
    """What the checkpoints of run ``cfg`` leave out of ``model`` (its frozen parameters, fingerprinted), or ``None``
    when they hold every tensor (``weights_scope``)."""
    return FrozenPart.of(unwrapped(model), cfg.model.weights) if weights_scope(cfg) == "trainable" else None


@dataclass
class LoopState:
    """Everything the loop needs to continue exactly where it stopped (saved in every checkpoint)."""

    epoch: int = 0  # the epoch in progress (0-based); == epochs when training is complete
    step: int = 0  # optimizer steps already done in that epoch
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    seconds: float = 0.0  # training time spent so far, summed over resumed sessions
    loss_sum: float = 0.0  # running sums of the epoch in progress (for mid-epoch checkpoints)
    correct: int = 0
    seen: int = 0
    stopped_early: bool = False


@dataclass
class Restored:
    """What a resume restored: the loop state, the history so far, and the checkpoint it came from."""

    state: LoopState
    history: list[dict[str, float]]
    path: Path


class LoopCheckpoints:
    """Writes and reads the ``best`` / ``last`` loop checkpoints of one run (rank 0 writes, every rank reads)."""

    def __init__(self, directory: Path, meta: dict[str, Any], fabric: Fabric) -> None:
        self.directory, self.meta, self.fabric = directory, meta, fabric
        self._frozen: FrozenPart | None = None  # the run's frozen parameters: fingerprinted once, they never change
        self._scoped = False

    def frozen(self, model: torch.nn.Module) -> FrozenPart | None:
        """What this run's checkpoints leave out (``frozen_part`` of the config in ``meta``), computed on first use."""
        if not self._scoped:
            config = self.meta.get("config")
            self._frozen = frozen_part(model, from_dict(ExperimentConfig, config)) if isinstance(config, dict) else None
            self._scoped = True
        return self._frozen

    def save(self, kind: str, state: LoopState, history: list[dict[str, float]], model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: Any, mix: Mixup | None = None, ema: WeightEma | None = None,
             extras: dict[str, Any] | None = None) -> None:
        if not self.fabric.is_global_zero:
            return
        rng = {"torch": torch.get_rng_state()}
        if self.fabric.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.fabric.device)
        if mix is not None:
            rng.update(mix.state_dict())
        weights, groups = model.state_dict(), {}
        if ema is not None:  # the checkpoint's model is the evaluated set; the other one rides along
            weights, groups = (ema.state_dict(), {"raw": weights}) if ema.main else (weights, {"ema": ema.state_dict()})
        groups.update({name: obj.state_dict() for name, obj in (extras or {}).items()})  # e.g. the SWA average
        frozen = self.frozen(model)
        if frozen is not None:  # adapter-only: the frozen parameters are the base's, recorded by fingerprint
            weights = frozen.strip(weights)
        full = {
            **self.meta,
            "kind": kind,
            "epoch": state.epoch - 1,  # index of the last completed epoch (-1: none yet)
            "trainer": dataclasses.asdict(state),
            "history": history,
            "scheduler": scheduler.state_dict(),
        }
        if frozen is not None:
            full.update(frozen.meta())
        if ema is not None:
            full["ema"] = {"updates": ema.updates, "model": "ema" if ema.main else "raw"}
        if extras:
            full["extras"] = sorted(extras)
        json.dumps(full)  # fail here, loudly, if anything is not JSON
        save_checkpoint(self.directory / f"{kind}.safetensors", weights, full, optimizer.state_dict(), rng, groups)

    def newest(self, console: Console) -> tuple[Path, tuple] | None:
        """The newest loadable checkpoint among last/best; corrupt ones are reported and skipped."""
        for tmp in self.directory.glob(".*.tmp"):  # half-written by a killed process: never a valid checkpoint
            tmp.unlink()
        found = []
        for name in ("last", "best"):
            path = self.directory / f"{name}.safetensors"
            if not path.exists():
                continue
            try:
                loaded = load_checkpoint(path)
            except CheckpointError as e:
                console.print(f"[yellow]cannot resume from {path}: {e}; trying an older checkpoint[/]")
                continue
            t = loaded[1]["trainer"]
            found.append(((t["epoch"], t["step"]), path, loaded))
        if not found:
            return None
        _, path, loaded = max(found, key=lambda t: t[0])
        return path, loaded

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, console: Console,
                mix: Mixup | None = None, ema: WeightEma | None = None, extras: dict[str, Any] | None = None) -> Restored | None:
        """Load the newest checkpoint into model, optimizer, scheduler, the RNG (and mixup, EMA); ``None`` when there is none."""
        found = self.newest(console)
        if found is None:
            return None
        path, (state, meta, opt_state, rng) = found
        if ema is not None:
            if "ema" not in meta:
                raise CheckpointError(f"{path}: written without train.ema, cannot resume a run with it")
            other = load_checkpoint_group(path, "raw" if meta["ema"]["model"] == "ema" else "ema")
            raw, averaged = (other, state) if meta["ema"]["model"] == "ema" else (state, other)
            ema.load_state_dict(averaged, meta["ema"]["updates"])
            state = raw
        load_checkpoint_state(unwrapped(model), state, meta, path)  # adapter-only: completed from the base, fingerprint checked
        self._frozen, self._scoped = FrozenPart.from_meta(meta, path), True  # checked just now: no second fingerprint
        for name, obj in (extras or {}).items():
            if name not in meta.get("extras", []):
                raise CheckpointError(f"{path}: written without {name} (train.{name}), cannot resume a run with it")
            obj.load_state_dict(load_checkpoint_group(path, name))
        if mix is not None:
            if "mixup" not in rng:
                raise CheckpointError(f"{path}: written without train.mixup, cannot resume a run with it")
            mix.load_state_dict(rng)
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"], self.fabric.device)
        return Restored(LoopState(**meta["trainer"]), meta["history"], path)
