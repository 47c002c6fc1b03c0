"""Speed of transferlab's two data paths on small (28-32 px) images, measured side by side in one run.

* in memory: the images decoded once into a uint8 tensor, batches augmented and normalised on the
  training device (``TensorBatches``);
* PIL: a torch DataLoader over ``ImageDataset`` — each image turned into a PIL image, augmented with
  torchvision ``transforms.v2``, collated, normalised (``LoaderBatches``) — the way the notebooks
  transferlab replaces fed CIFAR/Fashion-MNIST to their models.

Both run the same augmentation names (default: the CIFAR recipe ``flip`` + ``crop``) over the same
images; the script prints each path's epoch time and images/s and the ratio. ``--train`` also times
a training epoch of ``transferlab_cnn`` on each path (data + forward + backward).

    .venv/bin/python benchmarks/data_path.py                           # Fashion-MNIST if installed, else synthetic 32 px RGB
    .venv/bin/python benchmarks/data_path.py --dataset synthetic --size 32 --images 50000 --workers 1 --train
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from transferlab.config import DataConfig
from transferlab.data.batches import LoaderBatches, Preprocess, TensorBatches, default_num_workers
from transferlab.data.sources import load_dataset


def images(dataset: str, root: str | None, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(uint8 N×C×H×W, labels, description) — a real dataset's training images, or random ones."""
    if dataset == "auto":
        dataset = "fashion_mnist" if Path("/usr/share/datasets/fashion-mnist").is_dir() or root else "synthetic"
    if dataset == "synthetic":
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        return x, torch.randint(0, 10, (n,), generator=g), f"synthetic RGB {size} px"
    raw = load_dataset(DataConfig(dataset=dataset, root=root))
    x, y = raw.train_x[:n], raw.train_y[:n]
    assert isinstance(x, torch.Tensor), "use an in-memory dataset (fashion_mnist, mnist, cifar10, digits)"
    return x, y, f"{dataset} {x.shape[1]}x{x.shape[2]}x{x.shape[3]}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_epochs(batches: Iterable, epochs: int, device: torch.device, step=None) -> list[float]:  # noqa: ANN001
    """Seconds per epoch of iterating ``batches`` (and running ``step`` on each batch)."""
    times = []
    for epoch in range(epochs):
        batches.set_epoch(epoch)  # type: ignore[attr-defined]
        sync(device)
        t0 = time.perf_counter()
        for x, y in batches:
            if step is not None:
                step(x, y)
            else:
                x.sum()  # touch the batch, as a model would
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def make_step(model: torch.nn.Module, device: torch.device):  # noqa: ANN201
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="auto", help="auto | synthetic | fashion_mnist | mnist | cifar10 | digits")
    p.add_argument("--root", default=None, help="data.root for the dataset")
    p.add_argument("--images", type=int, default=20000, help="images per epoch")
    p.add_argument("--size", type=int, default=32, help="image side for --dataset synthetic")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--augment", default='["flip", "crop"]', help="data.augment as JSON, e.g. '[\"flip\", {\"rotate\": 15}]'")
    p.add_argument("--workers", type=int, default=None, help=f"DataLoader workers of the PIL path (default {default_num_workers()})")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per path; the first (warm-up) is not counted when > 1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train", action="store_true", help="also time training epochs of transferlab_cnn on both paths")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = p.parse_args()

    device = torch.device(args.device)
    augment = json.loads(args.augment)
    workers = default_num_workers() if args.workers is None else args.workers
    x, y, what = images(args.dataset, args.root, args.images, args.size)
    n = len(x)
    channels = x.shape[1]
    pre = Preprocess((0.5,) * channels, (0.5,) * channels, in_chans=channels)
    common = dict(preprocess=pre, device=device, shuffle=True, augment=augment, seed=0, channels_last=True)
    paths = {
        "in-memory (TensorBatches)": lambda: TensorBatches(x, y, args.batch_size, **common),
        f"PIL DataLoader ({workers} worker{'s' if workers != 1 else ''})": (
            lambda: LoaderBatches(x, y, args.batch_size, num_workers=workers, **common)
        ),
    }
    print(
        f"data path benchmark: {what}, {n:,} images/epoch, batch {args.batch_size}, augment {augment}, device {device}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    results: dict[str, dict[str, float]] = {}
    modes = [("data only", None)] + ([("train step", "train")] if args.train else [])
    for mode, kind in modes:
        print(f"\n{mode}:")
        print(f"  {'path':<34} {'s/epoch':>9} {'images/s':>10}")
        for name, build in paths.items():
            step = None
            if kind == "train":
                import timm

                import transferlab.models  # noqa: F401 - registers transferlab_cnn with timm

                torch.manual_seed(0)
                model = timm.create_model("transferlab_cnn", num_classes=10, in_chans=channels).to(device).to(memory_format=torch.channels_last)
                step = make_step(model, device)
            batches = build()
            times = time_epochs(batches, args.epochs, device, step)
            counted = times[1:] if len(times) > 1 else times
            sec = statistics.median(counted)
            results[f"{mode}/{name}"] = {"seconds_per_epoch": sec, "images_per_s": n / sec}
            print(f"  {name:<34} {sec:>9.3f} {n / sec:>10,.0f}")
            del batches
        fast, slow = (results[f"{mode}/{name}"]["seconds_per_epoch"] for name in paths)
        ratio = slow / fast
        results[f"{mode}/ratio"] = {"in_memory_over_pil": ratio}
        print(f"  speed ratio, in-memory / PIL: {ratio:.1f}x  (target >= 3x)")
    if args.json:
        setup = vars(args) | {"json": str(args.json), "what": what, "workers": workers}
        args.json.write_text(json.dumps({"setup": setup, "results": results}, indent=2))


if __name__ == "__main__":
    main()
