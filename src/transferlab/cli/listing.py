"""``transferlab list``: every registry — what a study file can name."""

from __future__ import annotations

import argparse

import timm
from rich.console import Console
from rich.markup import escape

from transferlab.cli.command import COMMANDS, Command
from transferlab.registry import REGISTRIES


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true", help="one line per entry, with what it is")


def run(args: argparse.Namespace, console: Console) -> int:
    for what, registry in REGISTRIES.items():
        if what == "command":
            continue
        title = f"{what} ({registry.doc})" if registry.doc else what
        if args.verbose:
            console.print(f"[bold]{escape(title)}[/]")
            for name, doc in registry.describe():
                console.print(f"  {escape(name):<24} {escape(doc)}", highlight=False)
        else:
            console.print(f"[bold]{escape(what)}[/]: {escape(', '.join(registry.names()))}", highlight=False)
    builtin = ", ".join(timm.list_models("transferlab_*"))
    console.print(f"[bold]built-in backbones[/]: {builtin} (plus every timm model name: timm.list_models())", highlight=False)
    return 0


COMMANDS.register(obj=Command("list", "list every registry: datasets, augmentations, heads, weight sources, strategies, ...", _arguments, run))
