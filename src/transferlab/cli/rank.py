"""``transferlab rank``: rank candidate backbones for a dataset before any fine-tuning."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command, csv_list
from transferlab.config import DataConfig, ExperimentConfig
from transferlab.files import write_json
from transferlab.tools.rank import SCORES, parse_candidates, print_ranking, rank_backbones


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="data.dataset, e.g. fashion_mnist, cifar10, digits")
    p.add_argument("--backbones", required=True, help="comma-separated backbone[:weights], e.g. resnet18,tf_efficientnet_lite0:embedded")
    p.add_argument("--weights", default="imagenet", help="weights of backbones given without ':weights' (default imagenet)")
    p.add_argument("--root", help="data.root")
    p.add_argument("--image-size", type=int, help="data.image_size (default: the dataset's native size)")
    p.add_argument("--train-subset", type=float, default=2000, help="training images scored (count > 1 or fraction <= 1; default 2000)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="of those, held out for the k-NN / logistic validation scores (default 0.2)")
    p.add_argument("--classes", help="comma-separated class names or indices (data.classes)")
    p.add_argument("--task", choices=("multiclass", "multilabel"), default="multiclass",
                   help="data.task: multilabel scores by validation mAP (default multiclass)")
    p.add_argument("--scores", default="logme,knn", help=f"comma-separated, the first one ranks: {', '.join(SCORES.names())} (default logme,knn)")
    p.add_argument("--batch-size", type=int, default=256, help="feature extraction batch size (default 256)")
    p.add_argument("--accelerator", default="auto", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", type=Path, help="also write the ranking as JSON to this file")


def run(args: argparse.Namespace, console: Console) -> int:
    data = DataConfig(
        dataset=args.dataset, root=args.root, image_size=args.image_size, train_subset=args.train_subset,
        val_fraction=args.val_fraction, classes=csv_list(args.classes), task=args.task,
    )
    ExperimentConfig(name="rank", data=data).validate()
    scores = [s.strip() for s in args.scores.split(",") if s.strip()]
    result = rank_backbones(
        data, parse_candidates(args.backbones, args.weights), scores, seed=args.seed, accelerator=args.accelerator,
        batch_size=args.batch_size, console=console,
    )
    print_ranking(result, console)
    if args.json_out:
        write_json(Path(args.json_out), result.to_dict())
        console.print(f"written: {args.json_out}", markup=False, highlight=False)
    return 0


COMMANDS.register(obj=Command("rank", "rank backbones for a dataset before fine-tuning (LogME, k-NN, logistic probe on a subset)", _arguments, run))
