"""``transferlab ensemble``: a hard- or soft-vote ensemble of finished runs, written as a run directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.kinds.ensemble import VOTES, run_ensemble
from transferlab.results.compare import compare


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, help="run directories (each keeps its own input size and normalisation)")
    p.add_argument("--vote", choices=list(VOTES), default="hard", help="majority of predicted classes (hard, default) or mean probability (soft)")
    p.add_argument("--out", type=Path, help="run directory to write (default: <folder of the first run>/<name>)")
    p.add_argument("--name", help="experiment name in the comparison (default: ensemble_<vote>)")
    p.add_argument("--resume", action="store_true", help="keep an existing finished ensemble directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ensemble directory")
    p.add_argument("--device", default="auto", help="torch device (default: cuda when available, else cpu)")


def run(args: argparse.Namespace, console: Console) -> int:
    name = args.name or f"ensemble_{args.vote}"
    out = args.out or args.runs[0].parent / name
    run_ensemble(args.runs, out, vote=args.vote, name=name, resume=args.resume, overwrite=args.overwrite, device=args.device, console=console)
    compare(out.parent, console=console)
    return 0


COMMANDS.register(obj=Command("ensemble", "hard- or soft-vote ensemble of finished runs, evaluated and written as a run directory", _arguments, run))
