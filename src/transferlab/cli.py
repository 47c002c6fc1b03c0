"""The ``transferlab`` command: ``run``, ``compare``, ``demo``, ``list``."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from rich.console import Console


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs/)")
    p.add_argument("--resume", action="store_true", help="skip finished runs, continue interrupted ones from their last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete and redo existing run directories")
    p.add_argument("--only", nargs="+", metavar="EXPERIMENT", help="run only these experiments of the study")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab", description="Run, compare and reuse transfer-learning experiments.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run every experiment of a study file, then print the comparison")
    p.add_argument("study", type=Path, help="study YAML file")
    _add_run_args(p)

    p = sub.add_parser("demo", help="run the bundled Fashion-MNIST demo study (about 10 minutes on 2 CPU cores)")
    _add_run_args(p)

    p = sub.add_parser("compare", help="print and write (CSV, Markdown) the comparison table of a study's runs")
    p.add_argument("study_dir", type=Path, help="runs/<study>")

    p = sub.add_parser("list", help="list registered datasets, strategies and built-in backbones")
    return parser


def demo_study_path() -> Path:
    """The demo study shipped inside the package."""
    return Path(str(resources.files("transferlab") / "studies" / "demo.yaml"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=200)  # logs and CI: don't squeeze tables
    from transferlab.config import ConfigError

    try:
        if args.command in ("run", "demo"):
            from transferlab.compare import compare
            from transferlab.study import run_study

            study = args.study if args.command == "run" else demo_study_path()
            result = run_study(study, args.runs_dir, resume=args.resume, overwrite=args.overwrite, only=args.only, console=console)
            compare(result.runs_dir, console=console)
            console.print(f"results: {result.runs_dir}/ (config.yaml, metrics.json, history.csv, checkpoints/ per run)")
            if result.failed:
                console.print(f"[red]{len(result.failed)} experiment(s) failed:[/]")
                for name, err in result.failed.items():
                    console.print(f"  {name}: {err}")
                return 1
            return 0
        if args.command == "compare":
            from transferlab.compare import compare

            compare(args.study_dir, console=console)
            return 0
        if args.command == "list":
            import transferlab.models  # noqa: F401 - registers the built-in CNNs
            from transferlab.data import DATASETS
            from transferlab.strategies import STRATEGIES

            console.print("datasets:   " + ", ".join(sorted(DATASETS)))
            console.print("strategies: " + ", ".join(STRATEGIES))
            console.print("built-in backbones: transferlab_cnn, transferlab_cnn_deep (plus every timm model name)")
            console.print("weights:    scratch, imagenet, embedded (tf_efficientnet_lite0), file:<path>")
            return 0
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
