"""``transferlab compare``: print and write the comparison table of a study's runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.results.compare import compare


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_dir", type=Path, help="runs/<study>")


def run(args: argparse.Namespace, console: Console) -> int:
    compare(args.study_dir, console=console)
    return 0


COMMANDS.register(obj=Command("compare", "print and write (CSV, Markdown) the comparison table of a study's runs", _arguments, run))
