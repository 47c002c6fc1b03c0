"""``transferlab compare``: print and write the comparison table of a study's runs, with its statistics."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.results.compare import TESTED_METRICS, compare


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_dir", type=Path, help="runs/<study>")
    p.add_argument("--against", metavar="EXPERIMENT",
                   help="test every experiment against this one (default: the best on --metric)")
    p.add_argument("--metric", choices=TESTED_METRICS,
                   help="what the tests compare (default: test_acc, for multi-label experiments test_map; test_ece and test_hamming: "
                        "lower is better)")
    p.add_argument("--wide", action="store_true", help="every column in full (default: a table that fits 120 columns)")


def run(args: argparse.Namespace, console: Console) -> int:
    compare(args.study_dir, console=console, metric=args.metric, against=args.against, wide=args.wide)
    return 0


COMMANDS.register(obj=Command(
    "compare", "print and write (CSV, Markdown) the comparison table of a study's runs: 95 % intervals, tests against the best "
    "(or --against) experiment", _arguments, run))
