"""The ``transferlab`` command: ``run``, ``compare``, ``demo``, ``list``, ``check-data``, ``report``, ``predict``,
``activations``, ``ensemble``, ``summary``, ``rank``, ``fewshot``."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs/)")
    p.add_argument("--resume", action="store_true", help="skip finished runs, continue interrupted ones from their last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete and redo existing run directories")
    p.add_argument("--only", nargs="+", metavar="EXPERIMENT", help="run only these experiments of the study")
    p.add_argument("--no-report", action="store_true", help="do not write report.html / report.md (transferlab report) afterwards")


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

    p = sub.add_parser("check-data", help="scan a study's data, an image folder, a CSV or a dataset and list every problem")
    p.add_argument("target", help="study YAML file, image folder, path,label CSV file, or a dataset name (e.g. cifar10)")
    p.add_argument("--root", help="data.root for a dataset name")
    p.add_argument("--no-decode", action="store_true", help="read only the image headers, not the pixels (faster, misses truncated files)")
    _add_report_args(sub)
    _add_surgery_args(sub)
    from transferlab.rank import add_parsers as _add_feature_args  # rank, fewshot (transferlab.rank)

    _add_feature_args(sub)
    return parser


def _add_surgery_args(sub: argparse._SubParsersAction) -> None:
    """``ensemble`` and ``summary`` (transferlab.ensemble / .summary)."""
    p = sub.add_parser("ensemble", help="hard- or soft-vote ensemble of finished runs, evaluated and written as a run directory")
    p.add_argument("runs", nargs="+", type=Path, help="run directories (each keeps its own input size and normalisation)")
    p.add_argument("--vote", choices=["hard", "soft"], default="hard", help="majority of predicted classes (hard, default) or mean probability (soft)")
    p.add_argument("--out", type=Path, help="run directory to write (default: <folder of the first run>/<name>)")
    p.add_argument("--name", help="experiment name in the comparison (default: ensemble_<vote>)")
    p.add_argument("--resume", action="store_true", help="keep an existing finished ensemble directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ensemble directory")
    p.add_argument("--device", default="auto", help="torch device (default: cuda when available, else cpu)")

    p = sub.add_parser("summary", help="per-stage output shape, parameters (trainable/frozen) and FLOPs of a backbone or a run")
    p.add_argument("target", help="a timm backbone name (e.g. resnet50) or a run directory")
    p.add_argument("--input-size", type=int, help="square input side (default: the run's image size or the backbone's pretrained size)")
    p.add_argument("--strategy", help="strategy whose trainable/frozen split is shown (default: finetune, or the run's)")
    p.add_argument("--stages", type=int, help="freeze_first: stem + first N stages frozen")
    p.add_argument("--children", type=int, help="freeze_first: first N children frozen")
    p.add_argument("--params", type=int, help="freeze_first: first N parameter tensors frozen")
    p.add_argument("--epoch", type=int, default=0, help="epoch of the run's gradual-unfreezing schedule (default 0)")
    p.add_argument("--truncate-stages", type=int, help="truncate after the first N stages")
    p.add_argument("--truncate-after", help="truncate after this module (e.g. layer2.2)")
    p.add_argument("--head", choices=["linear", "mlp", "conv"], help="head type (default: linear, or the run's)")
    p.add_argument("--num-classes", type=int, help="classes of the head (default: 1000, or the run's)")
    p.add_argument("--depth", type=int, default=1, help="1: one row per stage (default); 2: one row per block")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")


def _run_surgery_command(args: argparse.Namespace, console: Console) -> int:
    """``ensemble`` and ``summary``; returns the exit code."""
    if args.command == "ensemble":
        from transferlab.compare import compare
        from transferlab.ensemble import run_ensemble

        name = args.name or f"ensemble_{args.vote}"
        out = args.out or args.runs[0].parent / name
        run_ensemble(args.runs, out, vote=args.vote, name=name, resume=args.resume, overwrite=args.overwrite, device=args.device, console=console)
        compare(out.parent, console=console)
        return 0
    if args.command == "summary":
        from transferlab.config import HeadConfig, StrategyConfig, TruncateConfig
        from transferlab.summary import model_summary

        freeze = {k: getattr(args, k) for k in ("stages", "children", "params") if getattr(args, k) is not None}
        strategy = StrategyConfig(name=args.strategy or ("freeze_first" if freeze else "finetune"), **freeze) if (args.strategy or freeze) else None
        truncate = None
        if args.truncate_stages is not None or args.truncate_after:
            truncate = TruncateConfig(stages=args.truncate_stages, after=args.truncate_after)
        summary = model_summary(
            args.target, input_size=args.input_size, strategy=strategy, head=HeadConfig(type=args.head) if args.head else None,
            truncate=truncate, num_classes=args.num_classes, epoch=args.epoch, depth=args.depth,
        )
        if args.markdown:
            print(summary.to_markdown(), end="")
        else:
            console.print(summary.rich_table())
        return 0
    raise AssertionError(args.command)


def _add_report_args(sub: argparse._SubParsersAction) -> None:
    """``report``, ``predict`` and ``activations`` (transferlab.report / .predict / .activations)."""
    p = sub.add_parser("report", help="write a self-contained HTML report and a Markdown summary of a study's runs")
    p.add_argument("study_dir", type=Path, help="runs/<study>")
    p.add_argument("--out", type=Path, help="HTML file to write (default: runs/<study>/report.html; report.md beside it)")
    p.add_argument("--grid", type=int, default=16, help="test images in each experiment's prediction grid (default 16)")
    p.add_argument("--screenshot", type=Path, metavar="PNG",
                   help="open the report in headless Chromium, fail on console errors or broken images, save a 1400x2000 screenshot")

    p = sub.add_parser("predict", help="top-k classes of image files (any format) with a run's model")
    p.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/<study>/<experiment>")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", dest="json_out", help="write the predictions as JSON to this file ('-': print JSON instead of the table)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint (default best)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")

    p = sub.add_parser("activations", help="PNG grid of feature maps of chosen layers for an image, optionally Grad-CAM")
    p.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/<study>/<experiment>")
    p.add_argument("image", type=Path, help="an image file (any format)")
    p.add_argument("--layers", nargs="+", metavar="NAME", help="module names, e.g. backbone.blocks.0 (default: the first and a middle stage)")
    p.add_argument("--gradcam", action="store_true", help="add the Grad-CAM overlay for the predicted class")
    p.add_argument("--gradcam-layer", default="features", help="layer for Grad-CAM (default: the backbone's final feature map)")
    p.add_argument("--max-maps", type=int, default=16, help="feature maps per layer (strongest first, default 16)")
    p.add_argument("--out", type=Path, help="PNG to write (default: <image>_activations.png)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--device", default="cpu")


def _run_report_command(args: argparse.Namespace, console: Console) -> int:
    """``report``, ``predict``, ``activations``; returns the exit code."""
    if args.command == "report":
        from transferlab.report import build_report

        out = args.out
        rep = build_report(args.study_dir, html_path=out, md_path=out.with_suffix(".md") if out else None, grid_images=args.grid)
        console.print(f"written: {rep.html_path}, {rep.md_path}", markup=False, highlight=False)
        if args.screenshot:
            from transferlab.report.browser import Shot, check_page

            check = check_page(rep.html_path, [Shot(args.screenshot)])
            console.print(f"chromium: {check.images} images, {len(check.broken_images)} broken, {len(check.errors)} errors; "
                          f"screenshot: {args.screenshot}", markup=False, highlight=False)
            for problem in check.errors + [f"image did not render: {b}" for b in check.broken_images]:
                console.print(f"  {problem}", markup=False, highlight=False)
            return 0 if check.ok else 1
        return 0
    if args.command == "predict":
        import json

        from rich.table import Table
        from rich.text import Text

        from transferlab.predict import predict, predictions_json
        from transferlab.runs import load_run

        run = load_run(args.run_dir)
        preds = predict(run, args.images, top_k=args.top_k, checkpoint=args.checkpoint, device=args.device)
        doc = predictions_json(run, preds, args.checkpoint)
        if args.json_out == "-":
            print(json.dumps(doc, indent=2))
        else:
            table = Table(title=f"{run.config.name}: top {min(args.top_k, len(run.class_names))}")
            for col in ("image", "rank", "class", "probability"):
                table.add_column(col, justify="right" if col in ("rank", "probability") else "left")
            for p in preds:  # Text cells: file and class names are shown as they are, never as markup
                if p.error:
                    table.add_row(Text(p.file), "", Text("error: " + p.error, style="red"), "")
                for rank, (name, _, prob) in enumerate(p.top, 1):
                    table.add_row(Text(p.file if rank == 1 else ""), str(rank), Text(name), f"{100 * prob:.2f}%")
            console.print(table, markup=False)
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(doc, indent=2))
                console.print(f"written: {args.json_out}", markup=False, highlight=False)
        return 1 if any(p.error for p in preds) else 0
    if args.command == "activations":
        from transferlab.activations import save_activations

        res = save_activations(
            args.run_dir, args.image, args.out, layers=args.layers, gradcam_layer=args.gradcam_layer if args.gradcam else None,
            max_maps=args.max_maps, checkpoint=args.checkpoint, device=args.device,
        )
        shapes = ", ".join(f"{n} {'x'.join(map(str, s[1:]))}" for n, s in res.shapes.items())
        console.print(f"predicted {res.predicted} ({100 * res.prob:.1f}%); layers: {shapes}", markup=False, highlight=False)
        console.print(f"written: {res.path}", markup=False, highlight=False)
        return 0
    raise AssertionError(args.command)


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
            from transferlab.distributed import world

            if world()[0] != 0:  # torchrun: the other ranks train silently; rank 0 reports
                console = Console(quiet=True)
            result = run_study(study, args.runs_dir, resume=args.resume, overwrite=args.overwrite, only=args.only, console=console)
            if world()[0] != 0:
                return 1 if result.failed else 0
            compare(result.runs_dir, console=console)
            console.print(f"results: {result.runs_dir}/ (config.yaml, metrics.json, history.csv, checkpoints/ per run)")
            if not args.no_report:
                from transferlab.report import build_report

                try:
                    rep = build_report(result.runs_dir)
                    console.print(f"report: {rep.html_path} (summary: {rep.md_path.name})", markup=False, highlight=False)
                except Exception as e:  # noqa: BLE001 - the runs are done; a report problem must not hide them
                    console.print(f"note: could not write the report ({type(e).__name__}: {e}); try `transferlab report {result.runs_dir}`",
                                  markup=False, highlight=False)
            if result.failed:
                console.print(f"[red]{len(result.failed)} experiment(s) failed:[/]")
                for name, err in result.failed.items():
                    console.print(f"  {name}: {err}")
                return 1
            return 0
        if args.command in ("report", "predict", "activations"):
            return _run_report_command(args, console)
        if args.command in ("ensemble", "summary"):
            return _run_surgery_command(args, console)
        if args.command in ("rank", "fewshot"):
            from transferlab.rank import run_command

            return run_command(args, console)
        if args.command == "compare":
            from transferlab.compare import compare

            compare(args.study_dir, console=console)
            return 0
        if args.command == "check-data":
            from transferlab.data.check import check_path

            reports = check_path(args.target, root=args.root, decode=not args.no_decode)
            for report in reports:
                console.print(report.format(), markup=False, highlight=False, soft_wrap=True)
            return 0 if all(r.ok for r in reports) else 1
        if args.command == "list":
            import transferlab.models  # noqa: F401 - registers the built-in CNNs
            from transferlab.data import DATASETS
            from transferlab.strategies import STRATEGIES

            console.print("datasets:   " + ", ".join(sorted(DATASETS)))
            console.print("strategies: " + ", ".join(STRATEGIES))
            console.print("built-in backbones: transferlab_cnn, transferlab_cnn_deep (plus every timm model name)")
            console.print("weights:    scratch, imagenet, embedded (tf_efficientnet_lite0), file:<path>, run:<run dir>")
            return 0
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
