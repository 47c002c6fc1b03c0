"""``transferlab run`` and ``transferlab demo``: run a study, print the comparison, write the report."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.engine.distributed import world
from transferlab.results.compare import compare
from transferlab.results.report import build_report
from transferlab.study import run_study

__all__ = ["demo_study_path"]


def demo_study_path() -> Path:
    """The demo study shipped inside the package."""
    return Path(str(resources.files("transferlab") / "studies" / "demo.yaml"))


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs/)")
    p.add_argument("--resume", action="store_true", help="skip finished runs, continue interrupted ones from their last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete and redo existing run directories")
    p.add_argument("--only", nargs="+", metavar="EXPERIMENT", help="run only these experiments of the study")
    p.add_argument("--no-report", action="store_true", help="do not write report.html / report.md (transferlab report) afterwards")


def _study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", type=Path, help="study YAML file")
    _run_arguments(p)


def run(args: argparse.Namespace, console: Console) -> int:
    study = args.study if args.command == "run" else demo_study_path()
    if world()[0] != 0:  # torchrun: the other ranks train silently; rank 0 reports
        console = Console(quiet=True)
    result = run_study(study, args.runs_dir, resume=args.resume, overwrite=args.overwrite, only=args.only, console=console)
    if world()[0] != 0:
        return 1 if result.failed else 0
    compare(result.runs_dir, console=console)
    console.print(f"results: {result.runs_dir}/ (config.yaml, metrics.json, history.csv, checkpoints/ per run)")
    if not args.no_report:
        try:
            rep = build_report(result.runs_dir)
            console.print(f"report: {rep.html_path} (summary: {rep.md_path.name})", markup=False, highlight=False)
        except Exception as e:  # noqa: BLE001 - the runs are done; a report problem must not hide them
            console.print(f"note: could not write the report ({type(e).__name__}: {e}); try `transferlab report {result.runs_dir}`",
                          markup=False, highlight=False)
    if result.failed:
        console.print(f"[red]{len(result.failed)} experiment(s) failed:[/]")
        for name, err in result.failed.items():
            console.print(f"  {name}: {err}", markup=False, highlight=False)
        return 1
    return 0


COMMANDS.register(obj=Command("run", "run every experiment of a study file, then print the comparison", _study_arguments, run))
COMMANDS.register(obj=Command("demo", "run the bundled Fashion-MNIST demo study (about 10 minutes on 2 CPU cores)", _run_arguments, run))
