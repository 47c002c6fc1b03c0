"""Training-step throughput: transferlab's engine vs a bare PyTorch loop, measured side by side.

Same model, same in-memory uint8 images, same batch size, same optimizer (AdamW) and schedule;
the bare loop is the one a notebook would write (normalise on the fly, forward, loss, backward,
step). transferlab's epoch also includes what it always does: Fabric, device-side running sums,
the non-finite check, a small validation pass and the best/last checkpoints. Rounds alternate
between the two to cancel machine noise; the printed ratio is the median over rounds.

    python benchmarks/train_step.py                 # transferlab_cnn_deep at 28 px, 6 000 images
    python benchmarks/train_step.py --backbone resnet18 --size 32 --images 4000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.fabric import Fabric
from rich.console import Console

from transferlab.config import ExperimentConfig, from_dict
from transferlab.data.prepare import Preprocess, TensorBatches
from transferlab.models import build_model
from transferlab.strategies import apply_strategy
from transferlab.training import fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="transferlab_cnn_deep")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 1, args.size, args.size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (args.images,), generator=g)
    cfg = from_dict(ExperimentConfig, {
        "name": "bench", "model": {"backbone": args.backbone},
        "train": {"epochs": 1, "batch_size": args.batch, "optimizer": "adamw", "schedule": "cosine", "progress": False, "accelerator": "cpu"},
    })

    def fresh():
        torch.manual_seed(0)
        model, _ = build_model(cfg.model, cfg.head, 10)
        apply_strategy(model, cfg.strategy)
        return model

    def transferlab_epoch() -> float:
        model = fresh()
        pre = model.preprocess()
        train = TensorBatches(x, y, args.batch, pre, shuffle=True, seed=0)
        val = TensorBatches(x[:128], y[:128], 512, pre)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            fit(model, train, val, cfg, Fabric(accelerator="cpu", devices=1), Path(d), {}, console=Console(quiet=True))
            return time.perf_counter() - t

    def bare_epoch() -> float:
        model = fresh().to(memory_format=torch.channels_last)
        pre: Preprocess = model.preprocess()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
        steps = (len(x) + args.batch - 1) // args.batch
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        loss_fn = torch.nn.CrossEntropyLoss()
        t = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        for i in range(0, len(x), args.batch):
            idx = order[i : i + args.batch]
            xb = pre(x[idx]).contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        return time.perf_counter() - t

    bare_epoch()  # warm-up (oneDNN kernels, allocator)
    rows = []
    for r in range(args.rounds):
        b, t = bare_epoch(), transferlab_epoch()
        rows.append({"round": r, "bare_img_s": len(x) / b, "transferlab_img_s": len(x) / t, "ratio": b / t})
        print(f"round {r}: bare {len(x) / b:8.0f} img/s | transferlab {len(x) / t:8.0f} img/s | ratio {b / t:.3f}", flush=True)
    ratio = statistics.median(r["ratio"] for r in rows)
    print(f"{args.backbone} {args.size}px batch {args.batch}, {args.images} images, threads {torch.get_num_threads()}: "
          f"transferlab / bare throughput = {ratio:.3f} (median of {args.rounds}; target >= 0.9)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rounds": rows, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
