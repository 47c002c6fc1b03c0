"""``transferlab fewshot``: N-way K-shot ProtoNet episodes on a run's (or a backbone's) frozen features."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command, csv_list
from transferlab.config import DataConfig, ExperimentConfig, FewShotConfig, ModelConfig, TrainConfig
from transferlab.kinds import run_experiment
from transferlab.rundir import load_run

__all__ = ["fewshot_config"]


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a run directory (its backbone and data), or backbone[:weights], e.g. tf_efficientnet_lite0:embedded")
    p.add_argument("--dataset", help="data.dataset (default: the run's, else fashion_mnist)")
    p.add_argument("--root", help="data.root")
    p.add_argument("--image-size", type=int, help="data.image_size (default: the run's)")
    p.add_argument("--classes", help="comma-separated dataset classes (names or indices) the episodes are drawn from, e.g. novel classes")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split the episodes come from (default test)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=15, help="query images per class and episode (default 15)")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--distance", default="euclidean", choices=["euclidean", "cosine"], help="reported as test acc; the other is shown too")
    p.add_argument("--finetune-episodes", type=int, default=0, help="episodic ProtoNet fine-tuning of the backbone first (train split)")
    p.add_argument("--finetune-classes", help="comma-separated classes of the fine-tuning episodes (default: the others)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (adamw; default 1e-4)")
    p.add_argument("--runs-dir", default="runs", help="where run directories go (default runs/)")
    p.add_argument("--study", default="fewshot", help="study folder under --runs-dir (default fewshot)")
    p.add_argument("--name", help="experiment name (default: <backbone or run>_<ways>way<shots>shot)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")


def fewshot_config(args: argparse.Namespace) -> ExperimentConfig:
    """The ``kind: fewshot`` experiment the ``transferlab fewshot`` arguments describe (validated)."""
    target = Path(args.target)
    if (target / "config.yaml").is_file():
        run = load_run(target)
        model = dataclasses.replace(run.config.model, weights=f"run:{target}")
        data = dataclasses.replace(run.config.data, augment=[], train_subset=None, test_subset=None, k_per_class=None, val_count=None)
        default_name = target.name
    else:
        backbone, _, weights = args.target.partition(":")
        model = ModelConfig(backbone=backbone, weights=weights or "imagenet")
        data = DataConfig(dataset=args.dataset or "fashion_mnist")
        default_name = backbone
    if args.dataset:
        data.dataset = args.dataset
    if args.root:
        data.root = args.root
    if args.image_size:
        data.image_size = args.image_size
    if args.classes:
        data.classes = None  # --classes names the dataset's classes: episodes come from exactly those
    fewshot = FewShotConfig(
        ways=args.ways, shots=args.shots, queries=args.queries, episodes=args.episodes, distance=args.distance, split=args.split,
        classes=csv_list(args.classes), finetune_episodes=args.finetune_episodes, finetune_classes=csv_list(args.finetune_classes),
    )
    if args.split == "test" and not args.finetune_episodes:  # the training split is not used: load 2 images per class of it
        data.k_per_class, data.val_fraction = 2, 0.5
    cfg = ExperimentConfig(
        name=args.name or f"{default_name}_{args.ways}way{args.shots}shot", seed=args.seed, data=data, model=model, kind="fewshot",
        fewshot=fewshot, train=TrainConfig(lr=args.lr, accelerator=args.accelerator, progress=False),
    )
    cfg.validate()
    return cfg


def run(args: argparse.Namespace, console: Console) -> int:
    cfg = fewshot_config(args)
    run_experiment(cfg, Path(args.runs_dir) / args.study / cfg.name, overwrite=args.overwrite, console=console)
    return 0


COMMANDS.register(obj=Command("fewshot", "N-way K-shot Prototypical-Network episodes on frozen features; writes a run directory", _arguments, run))
