"""Export parity per model family and format: max |Δlogit| and top-1 agreement of each exported file,
run by its own runtime, against the transferlab model — the figures ``benchmarks/RESULTS.md`` records.

Why it exists: every ``transferlab export`` checks its own file, but the tests export each family to
ONNX and each torch format once; this script runs every (family, format) pair on trained models and
real images, so the tolerance the check states (``transferlab.results.export.Tolerance``) can be
compared with what the runtimes actually differ by. It trains one small run per family (a stratified
subset, a couple of epochs: the point is realistic logits, not accuracy), exports each to every format
with ``Run.export`` — the parity check is on the run's recorded test samples — and prints one row per pair.

    .venv/bin/python benchmarks/export_parity.py                      # Fashion-MNIST, all families and formats
    .venv/bin/python benchmarks/export_parity.py --dataset digits --formats onnx,torchscript
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml

import transferlab
from transferlab.files import write_json, write_text
from transferlab.results.export import EXPORT_FORMATS, ONNX_OPSET, Tolerance

# (experiment, what it is): one per family the issue names
FAMILIES = [
    ({"name": "cnn", "model": {"backbone": "transferlab_cnn"}, "train": {"epochs": 2}}, "built-in CNN, 28 px"),
    (
        {"name": "cnn_conv_head", "model": {"backbone": "transferlab_cnn"}, "head": {"type": "conv", "hidden": 128}, "train": {"epochs": 2}},
        "built-in CNN + conv head",
    ),
    ({"name": "resnet18", "data": {"image_size": 32}, "model": {"backbone": "resnet18"}}, "timm ResNet-18, scratch, 32 px"),
    (
        {"name": "resnet18_truncated", "data": {"image_size": 32}, "model": {"backbone": "resnet18", "truncate": {"stages": 2}}},
        "ResNet-18 truncated after layer2",
    ),
    (
        {"name": "lite0_probe", "data": {"image_size": 64}, "model": {"backbone": "tf_efficientnet_lite0", "weights": "embedded"},
         "strategy": {"name": "linear_probe"}},
        "EfficientNet-Lite0, ImageNet (embedded), linear probe, 64 px",
    ),
]


def study(dataset: str, train_subset: int) -> dict:
    data = {"dataset": dataset, "train_subset": train_subset, "val_fraction": 0.1}
    if dataset != "digits":
        data["test_subset"] = 1000
    return {
        "study": "export_parity",
        "defaults": {"data": data, "train": {"epochs": 1, "batch_size": 64, "lr": 0.003, "progress": False, "accelerator": "cpu"}},
        "experiments": [f for f, _ in FAMILIES],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist (default) or digits (quicker)")
    ap.add_argument("--train-subset", type=int, default=3000, help="training images per run (default 3000)")
    ap.add_argument("--formats", default="onnx,torchscript,exported-program,safetensors", help="comma-separated export formats")
    ap.add_argument("--runs-dir", type=Path, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for f in formats:
        EXPORT_FORMATS.get(f).check_available()
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="export_parity_"))
    study_file = runs_dir / "export_parity.yaml"
    write_text(study_file, yaml.safe_dump(study(args.dataset, args.train_subset), sort_keys=False))

    start = time.perf_counter()
    result = transferlab.run_study(study_file, runs_dir=runs_dir)
    print(f"trained {len(result.finished)} runs in {time.perf_counter() - start:.0f} s ({args.dataset}); exporting ...")
    tol = Tolerance()
    print(f"\ntorch {torch.__version__}, {platform.processor() or platform.machine()}, ONNX opset {ONNX_OPSET}; "
          f"tolerance: max |Δlogit| ≤ {tol.atol:g} + {tol.rtol:g} × max |logit|; top-1 on every sample (near-ties counted)\n")
    print("| family | format | samples | top-1 agreement | max \\|Δlogit\\| | max \\|logit\\| | allowed | export s | parity |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for family, what in FAMILIES:
        run = transferlab.load_run(result.runs_dir / family["name"])
        for fmt in formats:
            out = runs_dir / "exports" / family["name"] / EXPORT_FORMATS.get(fmt).filename
            exported = run.export(fmt, out)  # raises on a failed check: a failure is not a figure
            p = exported.parity
            rows.append({"family": family["name"], "what": what, "export_seconds": exported.seconds, **p.to_dict()})
            agree = f"{100 * p.top1_agreement:.1f}% ({p.n - p.top1_disagreements}/{p.n})"
            print(f"| {family['name']} ({what}) | {fmt} | {p.n} | {agree} | {p.max_abs_logit_diff:.1e} | {p.max_abs_logit:.2f} "
                  f"| {p.allowed:.1e} | {exported.seconds:.1f} | {'ok' if p.ok else 'FAILED'} |", flush=True)
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
