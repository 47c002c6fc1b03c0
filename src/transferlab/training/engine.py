"""The training loop, on Lightning Fabric. Readable in one screen on purpose.

Per epoch: shuffle + augment (seeded by epoch, see ``TensorBatches``), forward, loss, backward,
step, schedule; evaluate on val; save ``best`` (when the monitored metric improved) and ``last``
checkpoints; stop early when patience runs out. Loss sums and the non-finite check stay on the
device, so the hot loop never waits for the host (one sync per epoch).
"""

from __future__ import annotations

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
from transferlab.evaluation import evaluate
from transferlab.models.model import TransferModel
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


def _resume_state(ckpt_dir: Path, console: Console) -> tuple[Path, tuple] | None:
    """The newest loadable checkpoint among last/best; corrupt ones are reported and skipped."""
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
        found.append((loaded[1]["epoch"], path, loaded))
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
    """Train ``model`` (already strategy-applied) and write best/last checkpoints into ``ckpt_dir``."""
    console = console or Console()
    tc = cfg.train
    optimizer = make_optimizer(model.parameters(), tc)
    fmodel, optimizer = fabric.setup(model, optimizer)
    scheduler = make_scheduler(optimizer, tc, len(train))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    mode_max = tc.early_stopping.monitor == "val_acc"

    history: list[dict[str, float]] = []
    start_epoch, best, best_epoch, bad_epochs, spent = 0, None, -1, 0, 0.0
    resumed_from = None
    if resume and (found := _resume_state(ckpt_dir, console)):
        path, (state, ck_meta, opt_state, rng) = found
        model.load_state_dict(state, strict=True)
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(ck_meta["scheduler"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        t = ck_meta["trainer"]
        start_epoch, best, best_epoch, bad_epochs, spent = t["epoch"] + 1, t["best"], t["best_epoch"], t["bad_epochs"], t["seconds"]
        history = ck_meta["history"]
        resumed_from = str(path)
        console.print(f"resumed from {path} (epoch {t['epoch'] + 1} done)")

    def save(kind: str, epoch: int) -> None:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and fabric.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(fabric.device)
        trainer = {"epoch": epoch, "best": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs, "seconds": spent}
        full = {**meta, "kind": kind, "epoch": epoch, "trainer": trainer, "history": history, "scheduler": scheduler.state_dict()}
        json.dumps(full)  # fail here, loudly, if anything is not JSON
        save_checkpoint(ckpt_dir / f"{kind}.safetensors", model.state_dict(), full, optimizer.state_dict(), rng)

    stopped_early = False
    show = tc.progress and fabric.is_global_zero
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, disable=not show, transient=True) as progress:
        for epoch in range(start_epoch, tc.epochs):
            t0 = time.perf_counter()
            fmodel.train()
            train.set_epoch(epoch)
            task = progress.add_task(f"{cfg.name} epoch {epoch + 1}/{tc.epochs}", total=len(train), info="")
            loss_sum = torch.zeros((), device=fabric.device, dtype=torch.float64)
            correct = torch.zeros((), device=fabric.device, dtype=torch.long)
            first_bad = torch.full((), -1, device=fabric.device, dtype=torch.long)
            seen = 0
            for step, (x, y) in enumerate(train):
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
                seen += len(y)
                progress.update(task, advance=1)
            if (bad := int(first_bad)) >= 0:  # the epoch's one host sync for the loss
                raise TrainingDiverged(
                    f"experiment '{cfg.name}': loss became non-finite at epoch {epoch + 1}, step {bad + 1} "
                    f"(lr {tc.lr:g}); the last good checkpoint is kept in {ckpt_dir}"
                )
            spent += time.perf_counter() - t0
            val_metrics = evaluate(fmodel, val, model.num_classes, fabric.device)
            row = {
                "epoch": epoch + 1,
                "train_loss": float(loss_sum) / seen,
                "train_acc": float(correct) / seen,
                "val_loss": val_metrics["loss"],
                "val_acc": val_metrics["acc"],
                "lr": step_lr,
                "seconds": time.perf_counter() - t0,
            }
            history.append(row)
            progress.remove_task(task)
            value = row[tc.early_stopping.monitor]
            if _improved(value, best, mode_max, tc.early_stopping.min_delta):
                best, best_epoch, bad_epochs = value, epoch, 0
                save("best", epoch)
            else:
                bad_epochs += 1
            save("last", epoch)
            if show:
                console.print(
                    f"  {cfg.name} epoch {epoch + 1:>3}/{tc.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                    f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  {row['seconds']:.1f}s"
                    + ("  *" if best_epoch == epoch else "")
                )
            if tc.early_stopping.patience is not None and bad_epochs >= tc.early_stopping.patience:
                stopped_early = True
                console.print(f"  early stop: no {tc.early_stopping.monitor} improvement for {bad_epochs} epochs")
                break
    return FitResult(history, best_epoch + 1, best if best is not None else float("nan"), spent, stopped_early, resumed_from)
