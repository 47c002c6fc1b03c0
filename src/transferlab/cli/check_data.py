"""``transferlab check-data``: every data problem of a study, folder, CSV or dataset at once."""

from __future__ import annotations

import argparse

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.data.check import check_path


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="study YAML file, image folder, path,label CSV file, or a dataset name (e.g. cifar10)")
    p.add_argument("--root", help="data.root for a dataset name")
    p.add_argument("--no-decode", action="store_true", help="read only the image headers, not the pixels (faster, misses truncated files)")


def run(args: argparse.Namespace, console: Console) -> int:
    reports = check_path(args.target, root=args.root, decode=not args.no_decode)
    for report in reports:
        console.print(report.format(), markup=False, highlight=False, soft_wrap=True)
    return 0 if all(r.ok for r in reports) else 1


COMMANDS.register(obj=Command("check-data", "scan a study's data, an image folder, a CSV or a dataset and list every problem", _arguments, run))
