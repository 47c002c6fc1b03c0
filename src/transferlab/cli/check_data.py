"""``transferlab check-data``: every data problem of a study, folder, CSV or dataset at once."""

from __future__ import annotations

import argparse

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.data.check import check_path


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="study YAML file, image folder, CSV or JSON-lines list, or a dataset name (e.g. cifar10)")
    p.add_argument("--root", help="data.root for a dataset name")
    p.add_argument("--task", choices=["multiclass", "multilabel"],
                   help="data.task of a folder, list or dataset name (default: a list as its header says, a dataset as it declares)")
    p.add_argument("--label-sep", default=";", help="data.label_sep: the character between the labels of a path,labels list")
    p.add_argument("--no-decode", action="store_true", help="read only the image headers, not the pixels (faster, misses truncated files)")


def run(args: argparse.Namespace, console: Console) -> int:
    reports = check_path(args.target, root=args.root, decode=not args.no_decode, task=args.task, label_sep=args.label_sep)
    for report in reports:
        console.print(report.format(), markup=False, highlight=False, soft_wrap=True)
    return 0 if all(r.ok for r in reports) else 1


COMMANDS.register(obj=Command("check-data", "scan a study's data, an image folder, a CSV or a dataset and list every problem", _arguments, run))
