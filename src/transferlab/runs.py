"""One experiment, end to end, into its run directory; and reading a run back.

A run directory ``runs/<study>/<run>/`` holds everything needed to trust and reuse a result::

    config.yaml          the fully resolved ExperimentConfig
    metrics.json         test metrics, timings, parameter counts, weights source, code version, status
    history.csv          per-epoch train/val loss and accuracy, learning rate, seconds
    selection.json       the dataset indices of train / val / test (same seed => same indices)
    checkpoints/         best.safetensors, last.safetensors (+ .json copies of their metadata)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from transferlab.config import ExperimentConfig, config_from_yaml_text
from transferlab.distributed import RoundRobin, SliceOfGlobalBatch, fabric_kwargs, leave_process_group_at_exit, world
from transferlab.data.prepare import ImageSplits, make_batches, prepare_splits
from transferlab.evaluation import evaluate, with_tta
from transferlab.models.model import TransferModel, build_model, count_params
from transferlab.strategies import apply_strategy
from transferlab.training.checkpoint import load_model_weights

METRICS_FILE = "metrics.json"


class RunError(RuntimeError):
    """A run directory is missing, incomplete or in use. The message names the folder."""


def code_version() -> dict[str, str]:
    """transferlab's version and, when running from a git checkout, the commit (``+dirty`` if modified)."""
    from transferlab import __version__

    info = {"transferlab": __version__, "torch": torch.__version__}
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=src, capture_output=True, text=True, timeout=5)
            info["git_commit"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def make_fabric(cfg: ExperimentConfig):  # noqa: ANN201 - lightning type
    """A Fabric for this process: one device, or DDP over the ``torchrun`` world (see ``distributed``)."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=cfg.train.accelerator, precision=cfg.train.precision, **fabric_kwargs())
    fabric.launch()  # joins the process group under torchrun; nothing to do for a single process
    if world()[1] > 1:
        leave_process_group_at_exit()  # a gloo rank that exits without leaving is aborted at teardown
    return fabric


def run_experiment(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    splits: ImageSplits | None = None,
) -> dict[str, Any]:
    """Prepare data, build the model, apply the strategy, train, test; write the run directory.

    ``resume=True`` skips a finished run and continues an interrupted one from its newest valid
    checkpoint. Without it, an existing run directory is an error unless ``overwrite=True``.
    Returns the metrics dict that is also written to ``metrics.json``.
    """
    console = console or Console()
    run_dir = Path(run_dir)
    rank, _ = world()
    if rank != 0:  # under torchrun only rank 0 prints, locks and writes
        console = Console(quiet=True)
    with run_lock(run_dir) if rank == 0 else contextlib.nullcontext():
        if cfg.kind != "train":  # logistic / knn probes and few-shot episodes on cached features
            from transferlab.probes import run_feature_experiment

            return run_feature_experiment(cfg, run_dir, resume, overwrite, console, splits)
        return _run_experiment_locked(cfg, run_dir, resume, overwrite, console, splits)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (``.<name>.lock`` beside it) while writing it.

    A second process that tries to write the same run directory is refused with a clear message.
    The lock is an OS file lock (``flock``), so a killed process never leaves a stale lock behind.
    """
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir.parent / f".{run_dir.name}.lock"
    with open(lock_path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): run unlocked
            pass
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunError(f"run directory {run_dir} is being written by another process ({holder}); wait for it or use another --runs-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        yield


def _run_experiment_locked(
    cfg: ExperimentConfig, run_dir: Path, resume: bool, overwrite: bool, console: Console, splits: ImageSplits | None
) -> dict[str, Any]:
    metrics_path = run_dir / METRICS_FILE
    wall0 = time.perf_counter()
    fabric = make_fabric(cfg)
    writer = fabric.is_global_zero  # every rank reads the run directory before rank 0 changes it
    if run_dir.exists() and any(run_dir.iterdir()):
        if resume and metrics_path.exists() and json.loads(metrics_path.read_text()).get("status") == "ok":
            console.print(f"[dim]{cfg.name}: already finished in {run_dir}, skipped[/]")
            return json.loads(metrics_path.read_text())
        if not resume and not overwrite:
            raise RunError(f"run directory {run_dir} already exists: pass --resume to continue it or --overwrite to replace it")
        replace = overwrite and not resume
    else:
        replace = False
    fabric.barrier()  # every rank has decided from the same view of the folder; now rank 0 may change it
    if replace and writer:
        import shutil

        shutil.rmtree(run_dir)
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    fabric.seed_everything(cfg.seed, verbose=False)

    t0 = time.perf_counter()
    splits = splits if splits is not None else prepare_splits(cfg.data, cfg.seed)
    data_seconds = time.perf_counter() - t0
    if writer:
        _write_json(run_dir / "selection.json", splits.selection_record())

    model, weights_report = build_model(cfg.model, cfg.head, splits.num_classes)
    apply_strategy(model, cfg.strategy)
    total_params, trainable_params = count_params(model)
    preprocess = model.preprocess()
    device = fabric.device
    batches = dict(preprocess=preprocess, device=device, channels_last=cfg.model.channels_last)
    batches["num_workers"] = cfg.data.num_workers  # in-memory TensorBatches, or the PIL DataLoader path (data.in_memory)
    train = make_batches(splits, "train", cfg.train.batch_size, shuffle=True, augment=cfg.data.augment, seed=cfg.seed, **batches)
    val = make_batches(splits, "val", cfg.train.eval_batch_size, **batches)
    test = make_batches(splits, "test", cfg.train.eval_batch_size, **batches)
    if fabric.world_size > 1:  # each rank trains on its slice of every global batch, evaluates every N-th batch
        train = SliceOfGlobalBatch(train, fabric.global_rank, fabric.world_size)
        val = RoundRobin(val, fabric.global_rank, fabric.world_size)
        test = RoundRobin(test, fabric.global_rank, fabric.world_size)

    meta = {"config": cfg.to_dict(), "class_names": splits.class_names, "code_version": code_version()}
    console.print(
        f"[bold]{cfg.name}[/] seed {cfg.seed}: {cfg.model.backbone} ({cfg.model.weights}) + {cfg.head.type} head, "
        f"strategy {cfg.strategy.name}, {trainable_params:,}/{total_params:,} params trainable, "
        f"{len(splits.train_y)}/{len(splits.val_y)}/{len(splits.test_y)} train/val/test images on {device}"
    )
    if weights_report is not None and weights_report.dropped:
        console.print(f"  weights: {weights_report.describe()}")

    from transferlab.features import cached_training, default_cache_dir
    from transferlab.training.engine import fit

    # a frozen prefix runs once: the loop then trains the rest on cached features (train.cache)
    cached = cached_training(model, splits, cfg, fabric, batches, default_cache_dir(run_dir), console)
    fit_model, train, val = cached.apply(model, train, val)
    result = fit(fit_model, train, val, cfg, fabric, run_dir / "checkpoints", meta, resume=resume, console=console)
    if writer:
        _write_history(run_dir / "history.csv", result.history)
    fabric.barrier()  # rank 0 has written the checkpoints every rank now reads

    best_path = run_dir / "checkpoints" / "best.safetensors"
    load_model_weights(model, best_path if best_path.exists() else run_dir / "checkpoints" / "last.safetensors")
    from transferlab.predict import PredictionRecorder, save_test_predictions

    tested = with_tta(model, cfg.train.tta)
    recorder = PredictionRecorder(tested) if fabric.world_size == 1 else None  # per-image test predictions (report)
    with fabric.autocast():
        test_metrics = evaluate(
            tested if recorder is None else recorder, test if recorder is None else recorder.batches(test), splits.num_classes, device
        )
    metrics: dict[str, Any] = {
        "status": "ok",
        **run_identity(cfg, splits),
        "strategy": cfg.strategy.name,
        "test_acc": test_metrics["acc"],
        "test_top5": test_metrics.get("top5"),
        "test_loss": test_metrics["loss"],
        "per_class_acc": test_metrics["per_class_acc"],
        "confusion_matrix": test_metrics["confusion_matrix"],
        "best_epoch": result.best_epoch,
        "best_val": result.best_metric,
        "monitor": cfg.train.early_stopping.monitor,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "train_seconds": result.train_seconds,
        "data_seconds": data_seconds,
        "wall_seconds": time.perf_counter() - wall0,
        "inference_images_per_s": test_metrics["images_per_s"],
        "total_params": total_params,
        "trainable_params": trainable_params,
        "weights_source": weights_report.describe() if weights_report else "random init",
        "device": str(device),
        "resumed_from": result.resumed_from,
        "notes": cfg.notes,
        "code_version": meta["code_version"],
    }
    metrics["world_size"] = fabric.world_size
    metrics["feature_cache"] = cached.summary(result.train_seconds)  # used or why not; pass vs head seconds
    if writer and recorder is not None:
        save_test_predictions(run_dir, recorder, splits, cfg.seed)  # predictions.json, test_samples.safetensors
    if writer:
        _write_json(metrics_path, metrics)
    console.print(
        f"  [green]{cfg.name}[/]: test acc {metrics['test_acc']:.4f}, trained {metrics['train_seconds']:.1f}s, "
        f"inference {metrics['inference_images_per_s']:.0f} img/s -> {run_dir}"
    )
    return metrics


def run_identity(cfg: ExperimentConfig, splits: ImageSplits) -> dict[str, Any]:
    """The fields every ``metrics.json`` starts with: which experiment ran, with what, on which data."""
    return {
        "experiment": cfg.name,
        "seed": cfg.seed,
        "backbone": cfg.model.backbone,
        "weights": cfg.model.weights,
        "head": cfg.head.type,
        "dataset": cfg.data.dataset,
        "image_size": int(splits.train_x.shape[-1]),
        "channels": int(splits.train_x.shape[1]),
        "n_train": len(splits.train_y),
        "n_val": len(splits.val_y),
        "n_test": len(splits.test_y),
        "skipped_bad_images": len(splits.skipped),
        "class_names": splits.class_names,
    }


def write_failure(run_dir: Path, cfg: ExperimentConfig, error: BaseException) -> dict[str, Any]:
    """Record a failed experiment so the comparison and the report show it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = {
        "status": "failed",
        "experiment": cfg.name,
        "seed": cfg.seed,
        "backbone": cfg.model.backbone,
        "weights": cfg.model.weights,
        "strategy": cfg.strategy.name,
        "error": f"{type(error).__name__}: {error}",
        "code_version": code_version(),
    }
    _write_json(run_dir / METRICS_FILE, metrics)
    return metrics


# --------------------------------------------------------------------------------------------
# reading runs back


@dataclass
class Run:
    """A finished run directory: its config, metrics, history, and its model on demand."""

    path: Path
    config: ExperimentConfig
    metrics: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return self.metrics.get("class_names") or []

    @cached_property
    def history(self) -> list[dict[str, float]]:
        path = self.path / "history.csv"
        if not path.exists():
            return []
        with open(path) as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def load_model(self, checkpoint: str = "best") -> TransferModel:
        """Rebuild the model and load the ``best`` (or ``last``) checkpoint strictly. No download happens."""
        model_cfg = dataclasses.replace(self.config.model, weights="scratch")
        model, _ = build_model(model_cfg, self.config.head, len(self.class_names))
        load_model_weights(model, self.path / "checkpoints" / f"{checkpoint}.safetensors")
        return model.eval()


def load_run(path: str | Path) -> Run:
    """Read a run directory written by transferlab."""
    path = Path(path)
    cfg_path, metrics_path = path / "config.yaml", path / METRICS_FILE
    if not cfg_path.is_file():
        raise RunError(f"{path} is not a transferlab run directory (no config.yaml)")
    if not metrics_path.is_file():
        raise RunError(f"{path}: run not finished (no {METRICS_FILE}); continue it with --resume")
    return Run(path, config_from_yaml_text(cfg_path.read_text(), str(cfg_path)), json.loads(metrics_path.read_text()))
