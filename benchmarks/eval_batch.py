"""Evaluation throughput against the evaluation batch size, per model, measured side by side in one run.

Why it exists: ``train.eval_batch_size`` sets the batch of every validation pass, the test evaluation
(whose images/s the comparison table reports as *inference img/s*), predictions and ensembles. On a
GPU larger batches are faster; on a CPU they are not always — activations of a big batch fall out of
the caches. This script measures ``transferlab.engine.evaluation.evaluate`` (the function every run uses) on
in-memory batches (``TensorBatches``, the run's own data path) for each model and batch size — the
median of interleaved rounds, after one untimed pass per shape — and prints the best batch size's
throughput relative to the current default.

    .venv/bin/python benchmarks/eval_batch.py                       # four models, batch 64/128/256/512, CPU
    .venv/bin/python benchmarks/eval_batch.py --batches 128,1024 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from transferlab.config import HeadConfig, ModelConfig, TrainConfig
from transferlab.data.batches import TensorBatches
from transferlab.engine.evaluation import evaluate
from transferlab.models.model import build_model

# (backbone, weights, image size, image channels): the built-in CNNs at Fashion-MNIST's 28 px, the embedded
# ImageNet Lite0 at the 64 px the demo uses, ResNet-18 at CIFAR's 32 px
MODELS = [
    ("transferlab_cnn", "scratch", 28, 1),
    ("transferlab_cnn_deep", "scratch", 28, 1),
    ("tf_efficientnet_lite0", "embedded", 64, 3),
    ("resnet18", "scratch", 32, 3),
]


def throughput(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device, warm: bool) -> float:
    """Images/s of one ``evaluate`` pass over ``x`` at ``batch`` (``warm``: one untimed pass first, as
    oneDNN/cuDNN set up kernels per input shape)."""
    batches = TensorBatches(x, y, batch, model.preprocess(), device=device, channels_last=True)
    if warm:
        evaluate(model, batches, 10, device)
    return evaluate(model, batches, 10, device).images_per_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="64,128,256,512", help="comma-separated evaluation batch sizes")
    ap.add_argument("--images", type=int, default=4096, help="images per timed pass (default 4096)")
    ap.add_argument("--rounds", type=int, default=5, help="timed passes per batch size, interleaved; the median is kept")
    ap.add_argument("--models", default=",".join(m[0] for m in MODELS), help="comma-separated backbones from the list above")
    ap.add_argument("--device", "--accelerator", dest="accelerator", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = ap.parse_args(argv)

    device = torch.device(args.accelerator)
    sizes = [int(b) for b in args.batches.split(",")]
    default = TrainConfig().eval_batch_size
    torch.manual_seed(0)
    rows = []
    for backbone, weights, px, chans in [m for m in MODELS if m[0] in args.models.split(",")]:
        model, _ = build_model(ModelConfig(backbone=backbone, weights=weights), HeadConfig(type="linear"), 10)
        model.to(device)
        x = torch.randint(0, 256, (args.images, chans, px, px), dtype=torch.uint8)
        y = torch.randint(0, 10, (args.images,))
        # rounds interleave the batch sizes, so a slow spell of this shared machine hits all of them alike
        runs: dict[int, list[float]] = {b: [] for b in sizes}
        for r in range(args.rounds):
            for b in sizes:
                runs[b].append(throughput(model, x, y, b, device, warm=r == 0))
        speeds = {b: statistics.median(v) for b, v in runs.items()}
        best = max(speeds, key=speeds.get)
        rows.append({"model": backbone, "px": px, "images_per_s": speeds, "best": best})
        cells = "  ".join(f"{b}: {s:7,.0f}" for b, s in speeds.items())
        rel = f"best {best} = {speeds[best] / speeds[default]:.2f}x batch {default}" if default in speeds else f"best {best}"
        print(f"{backbone:24s} {px:3d} px | {cells} img/s | {rel}", flush=True)
    print(f"device: {device}, torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"{args.images} images per pass, median of {args.rounds}; current default train.eval_batch_size = {default}")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "default": default, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
