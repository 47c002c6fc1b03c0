"""The ``transferlab`` command line: one small module per command (each registers itself), one shared parser."""

from transferlab.cli import (  # noqa: F401 - each registers its command, in the order ``--help`` lists them
    activations,
    auto,
    check_data,
    compare,
    ensemble,
    export,
    fewshot,
    listing,
    lr_find,
    plan,
    predict,
    push,
    rank,
    report,
    run,
    summary,
)
from transferlab.cli.main import build_parser, main
from transferlab.cli.run import demo_study_path

__all__ = ["build_parser", "demo_study_path", "main"]
