"""``transferlab lr-find``: the LR finder's sweep for one experiment of a study, before (instead of) running it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.config import ConfigError, ExperimentConfig, choice_message, load_study, run_name
from transferlab.engine.lr_find import LR_RULES
from transferlab.kinds.train import find_lr

__all__ = ["pick_experiment"]


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study file")
    p.add_argument("--experiment", required=True, help="experiment name (a sweep point by its full name)")
    p.add_argument("--seed", type=int, help="which of the study's seeds (default: the first)")
    p.add_argument("--rule", choices=LR_RULES.names(), help="override train.lr_find.rule (default: the study's, valley)")
    p.add_argument("--runs-dir", default="runs", help="runs folder (default runs/); the curve goes to <runs-dir>/<study>/lr_find/<run>/")
    p.add_argument("--out", help="write lr_find.csv / .json / .png into this folder instead")


def pick_experiment(experiments: list[ExperimentConfig], name: str, seed: int | None = None) -> ExperimentConfig:
    """The experiment called ``name`` (with ``seed``, default its first); an unknown name is an error with did-you-mean."""
    named = [c for c in experiments if c.name == name]
    if not named:
        raise ConfigError(choice_message("--experiment", name, sorted({c.name for c in experiments})))
    if seed is None:
        return named[0]
    for c in named:
        if c.seed == seed:
            return c
    raise ConfigError(f"--seed {seed}: experiment '{name}' runs with seeds {', '.join(str(c.seed) for c in named)}")


def run(args: argparse.Namespace, console: Console) -> int:
    study = load_study(args.study)
    cfg = pick_experiment(study.experiments, args.experiment, args.seed)
    if args.rule:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr_find=dataclasses.replace(cfg.train.lr_find, rule=args.rule)))
    seeds = len({c.seed for c in study.experiments if c.name == cfg.name})
    out = Path(args.out) if args.out else Path(args.runs_dir) / study.name / "lr_find" / run_name(cfg, seeds)
    result = find_lr(cfg, out, console)
    console.print(f"train.lr: {result.suggestion:.3g}   (rule {result.rule}; curve: {out / 'lr_find.png'})")
    return 0


COMMANDS.register(obj=Command("lr-find", "the LR finder's sweep and suggested train.lr for one experiment of a study", _arguments, run))
