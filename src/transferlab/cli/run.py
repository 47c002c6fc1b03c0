"""``transferlab run`` and ``transferlab demo``: run a study, print the comparison, write the report."""

from __future__ import annotations

import argparse
import dataclasses
from importlib import resources
from pathlib import Path

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.config import ExecutorConfig, load_study, parse_executor
from transferlab.config.tracking import with_tracking
from transferlab.engine.distributed import world
from transferlab.results.compare import compare
from transferlab.results.report import build_report
from transferlab.results.trackers import log_study_artifacts
from transferlab.study import EXECUTORS, run_study
from transferlab.study.dryrun import dry_run, print_plan

__all__ = ["demo_study_path"]


def demo_study_path() -> Path:
    """The demo study shipped inside the package."""
    return Path(str(resources.files("transferlab") / "studies" / "demo.yaml"))


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs/)")
    p.add_argument("--resume", action="store_true", help="skip finished runs, continue interrupted ones from their last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete and redo existing run directories")
    p.add_argument("--only", nargs="+", metavar="EXPERIMENT", help="run only these experiments of the study")
    scaling_arguments(p)
    p.add_argument("--search-storage", metavar="URL", help="Optuna storage of the study's searches (default: sqlite in the runs folder; "
                   "a database URL, or journal:<file> on a cluster filesystem)")
    p.add_argument("--dry-run", action="store_true", help="check and estimate every run without training (same as transferlab plan)")
    p.add_argument("--track", action="append", default=[], metavar="NAME",
                   help="also log every run to this tracker: tensorboard, mlflow (repeat for both; adds to the study's tracking:)")
    p.add_argument("--no-report", action="store_true", help="do not write report.html / report.md (transferlab report) afterwards")


def scaling_arguments(p: argparse.ArgumentParser) -> None:
    """``--executor`` and its options (``run``, ``demo``, ``plan``)."""
    p.add_argument("--executor", choices=EXECUTORS.names(), help="where the runs execute (default: the study's executor:, else sequential)")
    p.add_argument("--workers", type=int, metavar="N", help="runs at the same time (local: worker processes; ray/slurm: in flight)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads per run (default: the cores split over the workers)")
    p.add_argument("--retries", type=int, metavar="N", help="retries of a run whose worker died (default 2)")
    p.add_argument("--ray-address", metavar="ADDR", help="ray.init(address=...): 'auto' joins a running cluster (default: start a local one)")
    p.add_argument("--slurm-partition", metavar="NAME", help="Slurm partition of every job")
    p.add_argument("--slurm-time", type=int, metavar="MIN", help="Slurm time limit per job, minutes")
    p.add_argument("--slurm-gpus", type=int, metavar="N", help="GPUs per Slurm job (default: the experiment's resources.gpus)")


def _executor(args: argparse.Namespace) -> ExecutorConfig | str | None:
    """The executor the command line asks for: a name, or the study's with --retries / --ray-address / --slurm-* set."""
    overrides = {k: v for k, v in (("retries", args.retries), ("ray_address", args.ray_address)) if v is not None}
    slurm = {k: v for k, v in (("partition", args.slurm_partition), ("time_min", args.slurm_time), ("gpus_per_node", args.slurm_gpus))
             if v is not None}
    if not overrides and not slurm:
        return args.executor
    study_exec = load_study(args.study).executor if getattr(args, "study", None) else ExecutorConfig()
    base = dataclasses.asdict(study_exec)
    if args.executor:
        base["name"] = args.executor
    base.update(overrides)
    base["slurm"] = {**base["slurm"], **slurm}
    return parse_executor(base, "--executor")


def _study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", type=Path, help="study YAML file")
    _run_arguments(p)


def run(args: argparse.Namespace, console: Console) -> int:
    study = args.study if args.command == "run" else demo_study_path()
    if world()[0] != 0:  # torchrun: the other ranks train silently; rank 0 reports
        console = Console(quiet=True)
    study = with_tracking(load_study(study), args.track) if args.track else study
    if args.dry_run:
        print_plan(dry_run(study, args.runs_dir, _executor(args), args.workers, only=args.only), console)
        return 0
    result = run_study(study, args.runs_dir, resume=args.resume, overwrite=args.overwrite, only=args.only, console=console,
                       executor=_executor(args), workers=args.workers, threads=args.threads, search_storage=args.search_storage)
    if world()[0] != 0:
        return 1 if result.failed else 0
    compare(result.runs_dir, console=console)
    console.print(f"results: {result.runs_dir}/ (config.yaml, metrics.json, history.csv, checkpoints/ per run)")
    if not args.no_report:
        try:
            rep = build_report(result.runs_dir)
            console.print(f"report: {rep.html_path} (summary: {rep.md_path.name})", markup=False, highlight=False)
            log_study_artifacts(result.runs_dir, [rep.html_path, rep.md_path], console)  # to the study's MLflow parent run, if tracked
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
