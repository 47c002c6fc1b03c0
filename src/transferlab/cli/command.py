"""What every ``transferlab`` subcommand is: a name, its arguments, and a function returning the exit code."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console

from transferlab.registry import Registry

__all__ = ["COMMANDS", "Command", "csv_list"]


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments`` fills its parser, ``run`` does it and returns the exit code."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Console], int]


COMMANDS: Registry[Command] = Registry("command", "transferlab <command>")


def csv_list(text: str | None) -> list[int | str] | None:
    """``"5,6,cat"`` -> ``[5, 6, "cat"]`` (class names or indices given on the command line)."""
    if not text:
        return None
    return [int(t) if t.strip().lstrip("-").isdigit() else t.strip() for t in text.split(",") if t.strip()]
