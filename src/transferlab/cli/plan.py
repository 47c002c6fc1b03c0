"""``transferlab plan``: check a study and estimate every run without training (``run --dry-run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.cli.run import scaling_arguments
from transferlab.files import write_json
from transferlab.study.dryrun import dry_run, print_plan


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", type=Path, help="study YAML file")
    p.add_argument("--runs-dir", default="runs", help="where the runs would go (default: runs/)")
    p.add_argument("--only", nargs="+", metavar="EXPERIMENT", help="plan only these experiments")
    p.add_argument("--no-probe", action="store_true", help="skip the measured probes (no time estimates; seconds instead of minutes)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the plan as JSON")
    scaling_arguments(p)


def run(args: argparse.Namespace, console: Console) -> int:
    report = dry_run(args.study, args.runs_dir, args.executor, args.workers, probe=not args.no_probe, only=args.only)
    print_plan(report, console)
    if args.json:
        write_json(args.json, report.to_dict())
    return 0


COMMANDS.register(obj=Command("plan", "check a study and estimate every run (data, weights, dependencies, time) without training",
                              _arguments, run))
