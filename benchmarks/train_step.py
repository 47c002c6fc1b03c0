"""Training-step throughput: transferlab's engine vs a bare PyTorch loop, measured side by side.

Same model, same in-memory uint8 images, same batch size, same optimizer (AdamW) and schedule;
the bare loop is the one a notebook would write (normalise on the fly, forward, loss, backward,
step). transferlab's epoch also includes what it always does: Fabric, device-side running sums,
the non-finite check, a small validation pass and the best/last checkpoints. Rounds alternate
between the two to cancel machine noise; the printed ratio is the median over rounds.

    python benchmarks/train_step.py                 # transferlab_cnn_deep at 28 px, 6 000 images
    python benchmarks/train_step.py --backbone resnet18 --size 32 --images 4000
    python benchmarks/train_step.py --variants bf16-mixed,compile   # also: transferlab with these vs fp32 eager
    python benchmarks/train_step.py --device cuda --images 30000 --batch 256   # on a GPU (benchmarks/gpu.sh)

``--variants`` measures transferlab's own training settings against its fp32 eager default: each
variant trains 2 epochs; the second epoch's time is the steady-state figure, the first epoch's extra
time is the one-off cost (oneDNN kernel selection, torch.compile's compilation).
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
from transferlab.data.batches import Preprocess, TensorBatches
from transferlab.engine import fit
from transferlab.models import build_model
from transferlab.strategies import apply_strategy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="transferlab_cnn_deep")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="", help="comma-separated: bf16-mixed, compile, compile+bf16-mixed")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where both loops train (the images live there)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 1, args.size, args.size), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, 10, (args.images,), generator=g).to(device)
    cfg = from_dict(ExperimentConfig, {
        "name": "bench", "model": {"backbone": args.backbone},
        "train": {"epochs": 1, "batch_size": args.batch, "optimizer": "adamw", "schedule": "cosine", "progress": False, "accelerator": device.type,
                  # fp32 like the bare loop (the default `auto` is bf16 on some machines; --variants measures bf16)
                  "precision": "32-true"},
    })

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # CUDA runs asynchronously: stop the clock when the GPU is done

    def fresh():
        torch.manual_seed(0)
        model, _ = build_model(cfg.model, cfg.head, 10)
        apply_strategy(model, cfg.strategy)
        return model

    def transferlab_fit(c: ExperimentConfig = cfg) -> tuple[float, list[float]]:
        """Wall time of ``fit`` and the seconds of each epoch (from its history)."""
        model = fresh()
        pre = model.preprocess()
        train = TensorBatches(x, y, args.batch, pre, device=device, shuffle=True, seed=0, channels_last=True)
        val = TensorBatches(x[:128], y[:128], 512, pre, device=device, channels_last=True)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            fabric = Fabric(accelerator=device.type, devices=1, precision=c.train.precision)
            result = fit(model, train, val, c, fabric, Path(d), {}, console=Console(quiet=True))
            sync()
            return time.perf_counter() - t, [row["seconds"] for row in result.history]

    def transferlab_epoch() -> float:
        return transferlab_fit()[0]

    def bare_epoch() -> float:
        model = fresh().to(device, memory_format=torch.channels_last)
        pre: Preprocess = model.preprocess()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
        steps = (len(x) + args.batch - 1) // args.batch
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        loss_fn = torch.nn.CrossEntropyLoss()
        sync()
        t = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).to(device)
        for i in range(0, len(x), args.batch):
            idx = order[i : i + args.batch]
            xb = pre(x[idx]).contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        sync()
        return time.perf_counter() - t

    bare_epoch()  # warm-up (oneDNN kernels, allocator)
    rows = []
    for r in range(args.rounds):
        b, t = bare_epoch(), transferlab_epoch()
        rows.append({"round": r, "bare_img_s": len(x) / b, "transferlab_img_s": len(x) / t, "ratio": b / t})
        print(f"round {r}: bare {len(x) / b:8.0f} img/s | transferlab {len(x) / t:8.0f} img/s | ratio {b / t:.3f}", flush=True)
    ratio = statistics.median(r["ratio"] for r in rows)
    on = "" if device.type == "cpu" else f", {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}"
    print(f"{args.backbone} {args.size}px batch {args.batch}, {args.images} images, threads {torch.get_num_threads()}{on}: "
          f"transferlab / bare throughput = {ratio:.3f} (median of {args.rounds}; target >= 0.9)")
    variants = _measure_variants(args, cfg, transferlab_fit) if args.variants else {}
    if args.json:
        out = {"args": vars(args) | {"json": str(args.json)}, "rounds": rows, "ratio": ratio, "variants": variants}
        args.json.write_text(json.dumps(out, indent=2))


def _measure_variants(args: argparse.Namespace, cfg: ExperimentConfig, transferlab_fit) -> dict:  # noqa: ANN001
    """transferlab under other training settings vs its fp32 eager default, rounds alternating."""
    import dataclasses

    def settings(name: str) -> ExperimentConfig:
        parts = set(name.split("+"))
        unknown = parts - {"fp32", "bf16-mixed", "compile"}
        if unknown:
            raise SystemExit(f"--variants: unknown {sorted(unknown)}; use bf16-mixed, compile or compile+bf16-mixed")
        train = dataclasses.replace(cfg.train, epochs=2, precision="bf16-mixed" if "bf16-mixed" in parts else "32-true",
                                    compile="compile" in parts)
        return dataclasses.replace(cfg, train=train)

    names = ["fp32"] + [v.strip() for v in args.variants.split(",") if v.strip()]
    per: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            if "compile" in n:
                import torch._dynamo

                torch._dynamo.reset()  # every round pays (and shows) the compilation again
            per[n].append(transferlab_fit(settings(n))[1])
        print(f"round {r}: " + " | ".join(f"{n} {args.images / per[n][-1][1]:6.0f} img/s" for n in names), flush=True)
    base = statistics.median(e[1] for e in per["fp32"])
    out = {}
    print(f"\n{'variant':<22}{'img/s (epoch 2)':>16}{'vs fp32 eager':>15}{'one-off cost (s)':>18}")
    for n in names:
        steady = statistics.median(e[1] for e in per[n])
        warm = statistics.median(e[0] - e[1] for e in per[n])
        out[n] = {"steady_epoch_s": steady, "img_s": args.images / steady, "speedup": base / steady, "one_off_s": warm}
        print(f"{n:<22}{args.images / steady:>16.0f}{base / steady:>14.2f}x{warm:>18.1f}")
    return out


if __name__ == "__main__":
    main()
