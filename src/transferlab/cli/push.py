"""``transferlab push``: a run's model to a Hugging Face Hub repo (the ``export --format hf`` folder, uploaded)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.results.export.hf import push_hf


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a finished run directory, e.g. runs/<study>/<experiment>")
    p.add_argument("--repo", required=True, help="hub repo id, owner/name (created if it does not exist)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint (default best)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--token", help="hub token (default: HF_TOKEN or the `hf auth login` token)")
    p.add_argument("--message", help="commit message (default: 'transferlab export of <experiment>')")


def run(args: argparse.Namespace, console: Console) -> int:
    url = push_hf(args.run_dir, args.repo, checkpoint=args.checkpoint, private=args.private, token=args.token, message=args.message)
    console.print(f"pushed {args.run_dir} to {url}", markup=False, highlight=False)
    return 0


COMMANDS.register(obj=Command("push", "upload a run's model to a Hugging Face Hub repo (the export --format hf folder)", _arguments, run))
