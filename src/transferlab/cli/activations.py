"""``transferlab activations``: a PNG of feature maps of chosen layers for one image, optionally Grad-CAM."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from transferlab.cli.command import COMMANDS, Command
from transferlab.tools.activations import save_activations


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/<study>/<experiment>")
    p.add_argument("image", type=Path, help="an image file (any format)")
    p.add_argument("--layers", nargs="+", metavar="NAME", help="module names, e.g. backbone.blocks.0 (default: the first and a middle stage)")
    p.add_argument("--gradcam", action="store_true", help="add the Grad-CAM overlay for the predicted class")
    p.add_argument("--gradcam-layer", default="features", help="layer for Grad-CAM (default: the backbone's final feature map)")
    p.add_argument("--max-maps", type=int, default=16, help="feature maps per layer (strongest first, default 16)")
    p.add_argument("--out", type=Path, help="PNG to write (default: <image>_activations.png)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace, console: Console) -> int:
    res = save_activations(
        args.run_dir, args.image, args.out, layers=args.layers, gradcam_layer=args.gradcam_layer if args.gradcam else None,
        max_maps=args.max_maps, checkpoint=args.checkpoint, device=args.device,
    )
    shapes = ", ".join(f"{n} {'x'.join(map(str, s[1:]))}" for n, s in res.shapes.items())
    console.print(f"predicted {res.predicted} ({100 * res.prob:.1f}%); layers: {shapes}", markup=False, highlight=False)
    console.print(f"written: {res.path}", markup=False, highlight=False)
    return 0


COMMANDS.register(obj=Command("activations", "PNG grid of feature maps of chosen layers for an image, optionally Grad-CAM", _arguments, run))
