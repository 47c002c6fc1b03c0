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

from transferlab.engine.ema import WeightEma
from transferlab.engine.mixup import Mixup
from transferlab.files import CheckpointError, load_checkpoint, load_checkpoint_group, save_checkpoint

__all__ = ["LoopCheckpoints", "LoopState", "Restored"]


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
        full = {
            **self.meta,
            "kind": kind,
            "epoch": state.epoch - 1,  # index of the last completed epoch (-1: none yet)
            "trainer": dataclasses.asdict(state),
            "history": history,
            "scheduler": scheduler.state_dict(),
        }
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
        model.load_state_dict(state, strict=True)
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
