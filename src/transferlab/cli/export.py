"""``transferlab export``: a run's model as ONNX / TorchScript / ExportedProgram / safetensors, parity-checked."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.results.export import EXPORT_FORMATS, export_format
from transferlab.rundir import load_run


def _arguments(p: argparse.ArgumentParser) -> None:
    formats = ", ".join(f"{name} ({f.help})" for name, f in EXPORT_FORMATS.items())
    p.add_argument("run_dir", type=Path, help="a finished run directory, e.g. runs/<study>/<experiment>")
    p.add_argument("--format", default="onnx", help=f"one or more formats, comma-separated (default onnx): {formats}")
    p.add_argument("--out", type=Path, help="the file (hf: the folder) to write (default <run>/export/model.<ext>); a folder with several formats")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint (default best)")
    p.add_argument("--json", action="store_true", help="print the parity reports as JSON instead of one line each")


def run(args: argparse.Namespace, console: Console) -> int:
    names = [n.strip() for n in args.format.split(",") if n.strip()]
    if not names:
        raise ValueError("--format: name at least one format")
    formats = [export_format(n) for n in names]  # unknown names and missing extras fail before any work
    run_ = load_run(args.run_dir)
    if len(formats) > 1 and args.out is not None and args.out.suffix:
        raise ValueError(f"--out {args.out}: with several formats --out is the folder they are written to")
    reports = []
    for fmt in formats:
        out = args.out
        # several formats: --out is the folder they go to; one: an existing folder is where a one-file format goes,
        # but for a folder format (hf) it is the export itself (re-exporting into it, or into an empty folder)
        if out is not None and (len(formats) > 1 or (out.is_dir() and not fmt.folder)):
            out = out / fmt.filename
        result = run_.export(fmt, out, checkpoint=args.checkpoint)
        reports.append(result.parity.to_dict())
        if not args.json:
            console.print(f"written: {', '.join(map(str, result.files))} ({result.seconds:.1f} s)", markup=False, highlight=False)
            console.print(result.parity.describe(), markup=False, highlight=False, soft_wrap=True)
            console.print(f"parity report: {result.report_path}", markup=False, highlight=False)
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    return 0


COMMANDS.register(obj=Command("export", "a run's model as ONNX, TorchScript, torch.export or safetensors, parity-checked", _arguments, run))
