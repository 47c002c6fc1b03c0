"""The ``transferlab`` command line: one small module per command (each registers itself), one shared parser."""

from transferlab.cli import (  # noqa: F401 - each registers its command, in the order ``--help`` lists them
    run,
    compare,
    listing,
    check_data,
    report,
    predict,
    activations,
    ensemble,
    summary,
    rank,
    fewshot,
)
from transferlab.cli.main import build_parser, main
from transferlab.cli.run import demo_study_path

__all__ = ["build_parser", "demo_study_path", "main"]
