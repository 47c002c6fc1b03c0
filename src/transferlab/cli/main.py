"""The ``transferlab`` command: one parser over every registered subcommand, and what an error prints.

A user error (bad config, missing file, a run directory in use, ...) prints one line naming it and
exits 2; Ctrl-C prints which experiment was interrupted and the checkpoint ``--resume`` continues
from, and exits 130 (the shell's code for SIGINT) — never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape

from transferlab.cli.command import COMMANDS
from transferlab.config import ConfigError
from transferlab.study import Interrupted

__all__ = ["build_parser", "main"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab", description="Run, compare and reuse transfer-learning experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=200)  # logs and CI: don't squeeze tables
    try:
        return COMMANDS.get(args.command).run(args, console)
    except Interrupted as e:
        console.print(f"[yellow]{escape(e.describe())}[/]", soft_wrap=True)  # one line, however long the paths
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted: transferlab {escape(args.command)}[/]", soft_wrap=True)
        return EXIT_INTERRUPTED
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)  # paths and key lists stay unbroken
        return EXIT_ERROR
