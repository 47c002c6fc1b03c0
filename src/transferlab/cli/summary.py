"""``transferlab summary``: per-stage output shape, parameters (trainable / frozen) and FLOPs of a backbone or run."""

from __future__ import annotations

import argparse

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.config import HeadConfig, StrategyConfig, TruncateConfig
from transferlab.models.heads import HEADS
from transferlab.tools.summary import model_summary


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a timm backbone name (e.g. resnet50) or a run directory")
    p.add_argument("--input-size", type=int, help="square input side (default: the run's image size or the backbone's pretrained size)")
    p.add_argument("--strategy", help="strategy whose trainable/frozen split is shown (default: finetune, or the run's)")
    p.add_argument("--stages", type=int, help="freeze_first: stem + first N stages frozen")
    p.add_argument("--children", type=int, help="freeze_first: first N children frozen")
    p.add_argument("--params", type=int, help="freeze_first: first N parameter tensors frozen")
    p.add_argument("--epoch", type=int, default=0, help="epoch of the run's gradual-unfreezing schedule (default 0)")
    p.add_argument("--truncate-stages", type=int, help="truncate after the first N stages")
    p.add_argument("--truncate-after", help="truncate after this module (e.g. layer2.2)")
    p.add_argument("--head", choices=HEADS.names(), help="head type (default: linear, or the run's)")
    p.add_argument("--num-classes", type=int, help="classes of the head (default: 1000, or the run's)")
    p.add_argument("--depth", type=int, default=1, help="1: one row per stage (default); 2: one row per block")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")


def run(args: argparse.Namespace, console: Console) -> int:
    freeze = {k: getattr(args, k) for k in ("stages", "children", "params") if getattr(args, k) is not None}
    strategy = StrategyConfig(name=args.strategy or ("freeze_first" if freeze else "finetune"), **freeze) if (args.strategy or freeze) else None
    truncate = None
    if args.truncate_stages is not None or args.truncate_after:
        truncate = TruncateConfig(stages=args.truncate_stages, after=args.truncate_after)
    summary = model_summary(
        args.target, input_size=args.input_size, strategy=strategy, head=HeadConfig(type=args.head) if args.head else None,
        truncate=truncate, num_classes=args.num_classes, epoch=args.epoch, depth=args.depth,
    )
    if args.markdown:
        print(summary.to_markdown(), end="")
    else:
        console.print(summary.rich_table())
    return 0


COMMANDS.register(obj=Command("summary", "per-stage output shape, parameters (trainable/frozen) and FLOPs of a backbone or a run", _arguments, run))
