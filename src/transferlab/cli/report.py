"""``transferlab report``: the self-contained HTML report and Markdown summary of a study."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.results.compare import TESTED_METRICS
from transferlab.results.report import build_report
from transferlab.results.report.browser import Shot, check_page
from transferlab.results.trackers import log_study_artifacts


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_dir", type=Path, help="runs/<study>")
    p.add_argument("--out", type=Path, help="HTML file to write (default: runs/<study>/report.html; report.md beside it)")
    p.add_argument("--grid", type=int, default=16, help="test images in each experiment's prediction grid (default 16)")
    p.add_argument("--against", metavar="EXPERIMENT", help="test every experiment against this one (default: the best on --metric)")
    p.add_argument("--metric", choices=TESTED_METRICS,
                   help="what the tests compare (default: test_acc, for multi-label experiments test_map)")
    p.add_argument("--screenshot", type=Path, metavar="PNG",
                   help="open the report in headless Chromium, fail on console errors or broken images, save a 1400x2000 screenshot")


def run(args: argparse.Namespace, console: Console) -> int:
    out = args.out
    rep = build_report(args.study_dir, html_path=out, md_path=out.with_suffix(".md") if out else None, grid_images=args.grid,
                       metric=args.metric, against=args.against)
    console.print(f"written: {rep.html_path}, {rep.md_path}", markup=False, highlight=False)
    log_study_artifacts(args.study_dir, [rep.html_path, rep.md_path], console)  # to the study's MLflow parent run, if tracked
    if not args.screenshot:
        return 0
    check = check_page(rep.html_path, [Shot(args.screenshot)])
    console.print(f"chromium: {check.images} images, {len(check.broken_images)} broken, {len(check.errors)} errors; "
                  f"screenshot: {args.screenshot}", markup=False, highlight=False)
    for problem in check.errors + [f"image did not render: {b}" for b in check.broken_images]:
        console.print(f"  {problem}", markup=False, highlight=False)
    return 0 if check.ok else 1


COMMANDS.register(obj=Command("report", "write a self-contained HTML report and a Markdown summary of a study's runs", _arguments, run))
