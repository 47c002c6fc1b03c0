"""The training loop, on Lightning Fabric. Readable in one screen on purpose.

Per epoch: shuffle + augment (seeded by epoch, see ``TensorBatches``), forward, loss, backward,
step, schedule; evaluate on val; save ``best`` (when the monitored metric improved) and ``last``
checkpoints; stop early when patience runs out. Loss sums and the non-finite check stay on the
device, so the hot loop never waits for the host (one sync per epoch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from transferlab.config import ExperimentConfig
from transferlab.data.prepare import TensorBatches
from transferlab.distributed import all_reduce_sum
from transferlab.evaluation import evaluate, with_tta
from transferlab.models.model import TransferModel
from transferlab.strategies import optimizer_param_groups, trainability_for_epoch
from transferlab.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from transferlab.training.optim import make_optimizer, make_scheduler


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite. The message names the experiment, epoch and step."""


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_metric: float
    train_seconds: float
    stopped_early: bool
    resumed_from: str | None = None
    log: list[str] = field(default_factory=list)


def _improved(value: float, best: float | None, mode_max: bool, min_delta: float) -> bool:
    if not math.isfinite(value):
        return False  # NaN is never "best"
    if best is None:
        return True
    return value > best + min_delta if mode_max else value < best - min_delta


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


def _resume_state(ckpt_dir: Path, console: Console) -> tuple[Path, tuple] | None:
    """The newest loadable checkpoint among last/best; corrupt ones are reported and skipped."""
    for tmp in ckpt_dir.glob(".*.tmp"):  # half-written by a killed process: never a valid checkpoint
        tmp.unlink()
    found = []
    for name in ("last", "best"):
        path = ckpt_dir / f"{name}.safetensors"
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


def fit(
    model: TransferModel,
    train: TensorBatches,
    val: TensorBatches,
    cfg: ExperimentConfig,
    fabric: Fabric,
    ckpt_dir: Path,
    meta: dict[str, Any],
    resume: bool = False,
    console: Console | None = None,
) -> FitResult:
    """Train ``model`` (already strategy-applied) and write best/last checkpoints into ``ckpt_dir``.

    ``last`` is written at the end of every epoch and, within an epoch, every
    ``train.checkpoint_every_steps`` steps or ``train.checkpoint_every_minutes`` minutes; a resumed
    run replays the interrupted epoch's batch order, skips the steps already done and continues
    with the saved optimizer, scheduler, RNG and running sums — bit-identical on the CPU.
    """
    console = console or Console()
    tc = cfg.train
    optimizer = make_optimizer(optimizer_param_groups(model, cfg), tc)  # per-stage groups with a schedule / lr_ratio
    # A compiled module handed to Fabric is unwrapped, set up (DDP, precision) and compiled again on top.
    fmodel, optimizer = fabric.setup(torch.compile(model) if tc.compile else model, optimizer)
    scheduler = make_scheduler(optimizer, tc, len(train))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    mode_max = tc.early_stopping.monitor == "val_acc"

    history: list[dict[str, float]] = []
    st = LoopState()
    resumed_from = None
    if resume and (found := _resume_state(ckpt_dir, console)):
        path, (state, ck_meta, opt_state, rng) = found
        model.load_state_dict(state, strict=True)
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(ck_meta["scheduler"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"], fabric.device)
        st = LoopState(**ck_meta["trainer"])
        history = ck_meta["history"]
        resumed_from = str(path)
        console.print(f"resumed from {path} (epoch {st.epoch + 1}, step {st.step})")

    def save(kind: str) -> None:
        if not fabric.is_global_zero:
            return
        rng = {"torch": torch.get_rng_state()}
        if fabric.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(fabric.device)
        full = {
            **meta,
            "kind": kind,
            "epoch": st.epoch - 1,  # index of the last completed epoch (-1: none yet)
            "trainer": dataclasses.asdict(st),
            "history": history,
            "scheduler": scheduler.state_dict(),
        }
        json.dumps(full)  # fail here, loudly, if anything is not JSON
        save_checkpoint(ckpt_dir / f"{kind}.safetensors", model.state_dict(), full, optimizer.state_dict(), rng)

    distributed = fabric.world_size > 1
    every_steps = tc.checkpoint_every_steps or 0
    # time-based saves only in a single process: under DDP every rank must take the same decision
    every_s = 60 * tc.checkpoint_every_minutes if tc.checkpoint_every_minutes and not distributed else float("inf")
    show = tc.progress and fabric.is_global_zero
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]

    def reduced(loss_sum: torch.Tensor, correct: torch.Tensor, first_bad: torch.Tensor) -> tuple[float, int, int, bool]:
        """Running sums and the divergence flag summed over ranks (one host sync)."""
        t = torch.stack([loss_sum, correct.double(), torch.tensor(float(st.seen), device=fabric.device, dtype=torch.float64), (first_bad >= 0).double()])
        t = all_reduce_sum(t).tolist()
        return t[0], int(t[1]), int(t[2]), t[3] > 0

    if distributed and not fabric.is_global_zero:  # rank 0 alone carries the restored partial sums
        st.loss_sum, st.correct, st.seen = 0.0, 0, 0
    with Progress(*columns, console=console, disable=not show, transient=True) as progress:
        while st.epoch < tc.epochs and not st.stopped_early:
            epoch = st.epoch
            t0 = last_save = epoch_start = time.perf_counter()
            if (note := trainability_for_epoch(model, cfg, epoch, fabric.world_size)) and fabric.is_global_zero:  # gradual unfreezing
                console.print(note)
            fmodel.train()
            train.set_epoch(epoch)
            task = progress.add_task(f"{cfg.name} epoch {epoch + 1}/{tc.epochs}", total=len(train), info="", completed=st.step)
            # running sums stay on the device: no host sync per step
            loss_sum = torch.tensor(st.loss_sum, device=fabric.device, dtype=torch.float64)
            correct = torch.tensor(st.correct, device=fabric.device, dtype=torch.long)
            first_bad = torch.full((), -1, device=fabric.device, dtype=torch.long)
            step_lr = optimizer.param_groups[0]["lr"]
            for step, (x, y) in enumerate(train):
                if step < st.step:  # resumed mid-epoch: replay the order (and augmentation RNG), skip the work
                    continue
                logits = fmodel(x)
                loss = loss_fn(logits, y)
                optimizer.zero_grad(set_to_none=True)
                fabric.backward(loss)
                if tc.max_grad_norm:
                    fabric.clip_gradients(fmodel, optimizer, max_norm=tc.max_grad_norm)
                optimizer.step()
                step_lr = optimizer.param_groups[0]["lr"]  # the lr this step used (logged per epoch)
                scheduler.step()
                d = loss.detach()
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(d), step, first_bad)
                loss_sum += d.double() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                st.seen += len(y)
                st.step = step + 1
                progress.update(task, advance=1)
                now = time.perf_counter()
                if st.step < len(train) and ((every_steps and st.step % every_steps == 0) or now - last_save > every_s):
                    sums = reduced(loss_sum, correct, first_bad)
                    if sums[3]:
                        break  # never checkpoint a diverged state
                    st.loss_sum, st.correct, seen_local, st.seen = sums[0], sums[1], st.seen, sums[2]
                    st.seconds += now - t0
                    t0 = last_save = now
                    save("last")
                    st.seen = seen_local
            epoch_loss, epoch_correct, seen, diverged = reduced(loss_sum, correct, first_bad)  # the epoch's host sync
            if diverged:
                where = f"step {int(first_bad) + 1}" if int(first_bad) >= 0 else "a step on another rank"
                raise TrainingDiverged(
                    f"experiment '{cfg.name}': loss became non-finite at epoch {epoch + 1}, {where} "
                    f"(lr {tc.lr:g}); the last good checkpoint is kept in {ckpt_dir}"
                )
            st.seconds += time.perf_counter() - t0
            with fabric.autocast():  # the bare module: DDP's forward would sync buffers per call
                val_metrics = evaluate(with_tta(model, tc.tta), val, model.num_classes, fabric.device)
            row = {
                "epoch": epoch + 1,
                "train_loss": epoch_loss / seen,
                "train_acc": epoch_correct / seen,
                "val_loss": val_metrics["loss"],
                "val_acc": val_metrics["acc"],
                "lr": step_lr,
                "seconds": time.perf_counter() - epoch_start,
            }
            history.append(row)
            progress.remove_task(task)
            st.epoch, st.step, st.loss_sum, st.correct, st.seen = epoch + 1, 0, 0.0, 0, 0
            value = row[tc.early_stopping.monitor]
            if _improved(value, st.best, mode_max, tc.early_stopping.min_delta):
                st.best, st.best_epoch, st.bad_epochs = value, epoch, 0
                save("best")
            else:
                st.bad_epochs += 1
            patience = tc.early_stopping.patience
            st.stopped_early = patience is not None and st.bad_epochs >= patience
            save("last")
            if show:
                console.print(
                    f"  {cfg.name} epoch {epoch + 1:>3}/{tc.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                    f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  {row['seconds']:.1f}s"
                    + ("  *" if st.best_epoch == epoch else "")
                )
            if st.stopped_early:
                console.print(f"  early stop: no {tc.early_stopping.monitor} improvement for {st.bad_epochs} epochs")
                break
    best = st.best if st.best is not None else float("nan")
    return FitResult(history, st.best_epoch + 1, best, st.seconds, st.stopped_early, resumed_from)
