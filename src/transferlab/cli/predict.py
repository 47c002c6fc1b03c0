"""``transferlab predict``: the top-k classes of any image files with a run's model (or its exported file); a multi-label
model prints every label whose probability reaches its threshold."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from transferlab.cli.command import COMMANDS, Command
from transferlab.files import write_json
from transferlab.rundir import load_run
from transferlab.tools.predict import ImagePrediction, is_onnx_file, predict, predictions_json


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/<study>/<experiment>, or a file (hf: folder) from transferlab export")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5; a multi-label model: every label above its threshold instead)")
    p.add_argument("--json", dest="json_out", help="write the predictions as JSON to this file ('-': print JSON instead of the table)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint of a run (default best)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def run(args: argparse.Namespace, console: Console) -> int:
    run_ = args.run_dir if is_onnx_file(args.run_dir) else load_run(args.run_dir)
    preds = predict(run_, args.images, top_k=args.top_k, checkpoint=args.checkpoint, device=args.device)
    doc = predictions_json(run_, preds, args.checkpoint)
    if args.json_out == "-":
        print(json.dumps(doc, indent=2))
        return 1 if any(p.error for p in preds) else 0
    table = _labels_table(doc, preds) if doc.get("task") == "multilabel" else _top_table(doc, preds, args.top_k)
    console.print(table, markup=False)
    if args.json_out:
        write_json(Path(args.json_out), doc)
        console.print(f"written: {args.json_out}", markup=False, highlight=False)
    return 1 if any(p.error for p in preds) else 0


def _top_table(doc: dict[str, Any], preds: list[ImagePrediction], top_k: int) -> Table:
    """Multiclass: the top-k classes of each image with their (softmax) probabilities."""
    table = Table(title=f"{doc['experiment']}: top {min(top_k, len(doc['class_names']))}")
    for col in ("image", "rank", "class", "probability"):
        table.add_column(col, justify="right" if col in ("rank", "probability") else "left")
    for p in preds:  # Text cells: file and class names are shown as they are, never as markup
        if p.error:
            table.add_row(Text(p.file), "", Text("error: " + p.error, style="red"), "")
        for rank, (name, _, prob) in enumerate(p.top, 1):
            table.add_row(Text(p.file if rank == 1 else ""), str(rank), Text(name), f"{100 * prob:.2f}%")
    return table


def _labels_table(doc: dict[str, Any], preds: list[ImagePrediction]) -> Table:
    """Multi-label: every label of each image whose (sigmoid) probability is at least its threshold, with both; an image
    without any says so and names its most probable label."""
    thresholds = doc["thresholds"]
    table = Table(title=f"{doc['experiment']}: labels at or above their thresholds (chosen on validation)")
    for col in ("image", "label", "probability", "threshold"):
        table.add_column(col, justify="right" if col in ("probability", "threshold") else "left")
    for p in preds:  # Text cells: file and class names are shown as they are, never as markup
        if p.error:
            table.add_row(Text(p.file), Text("error: " + p.error, style="red"), "", "")
            continue
        for n, (name, index, prob) in enumerate(p.labels, 1):
            table.add_row(Text(p.file if n == 1 else ""), Text(name), f"{100 * prob:.2f}%", f"{100 * thresholds[index]:.2f}%")
        if not p.labels and p.top:
            name, index, prob = p.top[0]
            table.add_row(Text(p.file), Text(f"(no label; most probable: {name})", style="dim"), f"{100 * prob:.2f}%",
                          f"{100 * thresholds[index]:.2f}%")
    return table


COMMANDS.register(obj=Command("predict", "top-k classes (multi-label: labels above their thresholds) of image files with a run's model",
                              _arguments, run))
