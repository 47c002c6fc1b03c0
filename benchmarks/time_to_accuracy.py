"""Benchmark: time to test accuracy — transferlab against a bare PyTorch loop, Lightning and fastai, on the same work.

Issue 25 §3. The same network (``transferlab_cnn_fast``, random init from the same seed), data (Fashion-MNIST: the
training split minus a 1 000-image validation split that only transferlab looks at — every trainer trains on the same
59 000 images — and the full 10 000-image test set), recipe (one-cycle AdamW, lr 0.006, weight decay 5e-4, batch 256,
flip + 2 px translation, label smoothing 0.1, the precision ``auto`` picks: bf16 autocast on CPUs with native bf16),
epochs and thread count, trained by

* ``transferlab`` — ``run_experiment`` on that config (data loading, checkpoints and its validation pass included);
* ``bare`` — a PyTorch loop written here the way an expert writes one for a small in-memory dataset: uint8 tensors,
  flip + translate on whole batches, autocast, no DataLoader;
* ``lightning`` — Lightning's ``Trainer`` with a plain ``DataLoader`` over a ``TensorDataset`` with torchvision
  per-image transforms (how its tutorials feed it), no checkpointing, no logger;
* ``fastai`` — ``Learner.fit_one_cycle`` on its standard ``DataLoaders`` (only where ``fastai`` is importable).

After every epoch each trainer's weights are tested on the full test set; that evaluation is *not* counted in its
clock (the clock stops for it). The table: the time each first reaches 92 % and 93 % test accuracy, its accuracy at 5
and 10 minutes (the last epoch finished by then), and its time per epoch relative to ``bare``. Target: transferlab the
fastest of the four and within 1.05x of the bare loop.

    .venv/bin/python benchmarks/time_to_accuracy.py                      # 10 epochs each, ~50 min on 2 cores
    .venv/bin/python benchmarks/time_to_accuracy.py --trainers transferlab,bare --epochs 6
    .venv/bin/python benchmarks/time_to_accuracy.py --dry                # 2 000 images, 1 epoch: does every trainer run

Run it on a quiet machine. The trainers run one after another in one process, in the order given.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from transferlab.config import ExperimentConfig
from transferlab.config.convert import from_dict
from transferlab.data.prepare import ImageSplits, prepare_splits
from transferlab.engine.loop import Callback, Loop
from transferlab.engine.precision import auto_precision, cpu_flags
from transferlab.kinds.base import run_experiment
from transferlab.models import build_model

TARGETS = (0.92, 0.93)
MARKS_S = (300.0, 600.0)
RECIPE = {"lr": 0.006, "weight_decay": 5e-4, "batch_size": 256, "label_smoothing": 0.1, "pad": 2}


def config(epochs: int, dry: bool) -> ExperimentConfig:
    """The transferlab experiment of the benchmark; every other trainer copies its recipe."""
    data = {"dataset": "fashion_mnist", "val_count": 200 if dry else 1000, "augment": ["flip", {"crop": {"padding": RECIPE["pad"]}}]}
    if dry:
        data.update(train_subset=2200, test_subset=500)
    return from_dict(ExperimentConfig, {
        "name": "tta_transferlab", "seed": 0, "data": data,
        "model": {"backbone": "transferlab_cnn_fast", "weights": "scratch"}, "strategy": {"name": "scratch"},
        "train": {"epochs": epochs, "batch_size": RECIPE["batch_size"], "optimizer": "adamw", "lr": RECIPE["lr"],
                  "weight_decay": RECIPE["weight_decay"], "schedule": "onecycle", "label_smoothing": RECIPE["label_smoothing"],
                  "progress": False, "checkpoint_every_minutes": None},
    })


# --------------------------------------------------------------------------------------------
# the clock and the per-epoch test


@dataclass
class Trace:
    """One trainer's clock: (seconds trained so far, test accuracy) after every epoch."""

    name: str
    points: list[tuple[float, float]] = field(default_factory=list)
    start: float = 0.0
    paused: float = 0.0
    note: str = ""

    def begin(self) -> None:
        self.start, self.paused = time.perf_counter(), 0.0

    def checkpoint(self, test: Callable[[], float]) -> None:
        """Stop the clock, test, restart the clock."""
        t = time.perf_counter()
        acc = test()
        self.points.append((t - self.start - self.paused, acc))
        self.paused += time.perf_counter() - t

    def first_reach(self, target: float) -> float | None:
        return next((s for s, a in self.points if a >= target), None)

    def at(self, seconds: float) -> float | None:
        done = [a for s, a in self.points if s <= seconds]
        return done[-1] if done else None

    def per_epoch(self) -> float:
        return self.points[-1][0] / len(self.points) if self.points else math.nan


@torch.inference_mode()
def test_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor],
                  precision: str) -> float:
    """Top-1 accuracy of ``model`` on uint8 images ``x`` (the same function for every trainer)."""
    was = model.training
    model.eval()
    correct = 0
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
        for i in range(0, len(y), 1000):
            correct += int((model(normalize(x[i : i + 1000])).argmax(1) == y[i : i + 1000]).sum())
    model.train(was)
    return correct / len(y)


def normalizer(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 N×C×H×W -> the float input ``model`` expects (its ``preprocess()`` mean/std)."""
    pre = model.preprocess()
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    return lambda x: (x.float() / 255 - mean) / std


def fresh_model(cfg: ExperimentConfig, classes: int) -> Any:
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg.model, cfg.head, classes)
    return model


# --------------------------------------------------------------------------------------------
# the four trainers


class EpochTest(Callback):
    """transferlab: test after every epoch with the clock stopped."""

    def __init__(self, trace: Trace, splits: ImageSplits, precision: str) -> None:
        self.trace, self.splits, self.precision = trace, splits, precision

    def on_fit_start(self, loop: Loop) -> None:
        self.norm = normalizer(loop.model)

    def on_train_epoch_end(self, loop: Loop, row: dict[str, float]) -> None:
        self.trace.checkpoint(lambda: test_accuracy(loop.model, self.splits.test_x, self.splits.test_y, self.norm, self.precision))


def run_transferlab(cfg: ExperimentConfig, splits: ImageSplits, precision: str, trace: Trace) -> None:
    with tempfile.TemporaryDirectory(prefix="tta_") as tmp:
        trace.begin()  # from here: what a user waits for (data selection, model, loop, checkpoints, validation)
        run_experiment(cfg, Path(tmp) / "run", console=Console(quiet=True), callbacks=[EpochTest(trace, splits, precision)])


def augment_batch(x: torch.Tensor, g: torch.Generator, pad: int) -> torch.Tensor:
    """Random horizontal flip and a random translation of up to ``pad`` pixels (zero fill), per image, on the batch."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy.view(-1, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
    x = padded.gather(2, rows)
    cols = (dx.view(-1, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return x.gather(3, cols)


def run_bare(cfg: ExperimentConfig, splits: ImageSplits, precision: str, trace: Trace) -> None:
    model = fresh_model(cfg, splits.num_classes)
    norm = normalizer(model)
    x, y = splits.train_x, splits.train_y
    bs, epochs = cfg.train.batch_size, cfg.train.epochs
    steps = math.ceil(len(y) / bs)
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=RECIPE["lr"], total_steps=steps * epochs)
    g = torch.Generator().manual_seed(cfg.seed)
    trace.begin()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(steps):
            idx = order[i * bs : (i + 1) * bs]
            xb = norm(augment_batch(x[idx], g, RECIPE["pad"]))
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss = F.cross_entropy(model(xb).float(), y[idx], label_smoothing=RECIPE["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        trace.checkpoint(lambda: test_accuracy(model, splits.test_x, splits.test_y, norm, precision))


def run_lightning(cfg: ExperimentConfig, splits: ImageSplits, precision: str, trace: Trace) -> None:
    import lightning as L
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    model = fresh_model(cfg, splits.num_classes)
    norm = normalizer(model)
    steps = math.ceil(len(splits.train_y) / cfg.train.batch_size) * cfg.train.epochs
    tf = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomCrop(splits.image_size, padding=RECIPE["pad"])])

    class Images(Dataset):
        def __len__(self) -> int:
            return len(splits.train_y)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return tf(splits.train_x[i]), splits.train_y[i]

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            xb, yb = batch
            return F.cross_entropy(self.model(norm(xb)).float(), yb, label_smoothing=RECIPE["label_smoothing"])

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=RECIPE["lr"], total_steps=steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def on_train_epoch_end(self) -> None:
            trace.checkpoint(lambda: test_accuracy(self.model, splits.test_x, splits.test_y, norm, precision))

    loader = DataLoader(Images(), batch_size=cfg.train.batch_size, shuffle=True, num_workers=0)
    trainer = L.Trainer(max_epochs=cfg.train.epochs, accelerator="cpu", precision="bf16-mixed" if precision == "bf16-mixed" else "32-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trace.begin()
    trainer.fit(Module(), loader)


def run_fastai(cfg: ExperimentConfig, splits: ImageSplits, precision: str, trace: Trace) -> None:
    if importlib.util.find_spec("fastai") is None:
        trace.note = "skipped: fastai is not installed (pip install -c constraints.txt -e '.[bench]')"
        return
    import fastai.callback.progress  # noqa: F401 - patches Learner.no_bar
    import fastai.callback.schedule  # noqa: F401 - patches Learner.fit_one_cycle
    from fastai.callback.core import Callback as FastaiCallback  # optional: only this trainer needs fastai
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import LabelSmoothingCrossEntropyFlat
    from fastai.optimizer import OptimWrapper
    from torch.utils.data import TensorDataset

    model = fresh_model(cfg, splits.num_classes)
    norm = normalizer(model)

    class Augment(FastaiCallback):
        def before_batch(self) -> None:
            if self.training:
                self.learn.xb = (norm(augment_batch(self.xb[0], torch.Generator().manual_seed(self.iter + 1000 * self.epoch), RECIPE["pad"])),)
            else:
                self.learn.xb = (norm(self.xb[0]),)

        def after_epoch(self) -> None:
            trace.checkpoint(lambda: test_accuracy(model, splits.test_x, splits.test_y, norm, precision))

    train = TensorDataset(splits.train_x, splits.train_y)
    dls = DataLoaders.from_dsets(train, TensorDataset(splits.val_x, splits.val_y), bs=cfg.train.batch_size, device="cpu")

    def adamw(params: Any, **kw: Any) -> OptimWrapper:
        return OptimWrapper(params, torch.optim.AdamW, lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])

    class CpuBf16(FastaiCallback):
        # fastai's to_bf16() opens autocast('cuda') (fastai/callback/fp16.py), a no-op on the CPU: the same
        # autocast the other trainers use, around forward and loss, as MixedPrecision does on CUDA.
        def before_batch(self) -> None:
            self.ctx = torch.autocast("cpu", dtype=torch.bfloat16)
            self.ctx.__enter__()

        def after_loss(self) -> None:
            self.ctx.__exit__(None, None, None)

    cbs = [Augment(), *([CpuBf16()] if precision == "bf16-mixed" else [])]
    learn = Learner(dls, model, loss_func=LabelSmoothingCrossEntropyFlat(eps=RECIPE["label_smoothing"]), opt_func=adamw, cbs=cbs)
    trace.begin()
    with learn.no_logging(), learn.no_bar():
        learn.fit_one_cycle(cfg.train.epochs, RECIPE["lr"], wd=RECIPE["weight_decay"])


TRAINERS = {"transferlab": run_transferlab, "bare": run_bare, "lightning": run_lightning, "fastai": run_fastai}


# --------------------------------------------------------------------------------------------
# the table


def fmt(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{100 * v:.2f} %" if pct else f"{v:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainers", default="transferlab,bare,lightning,fastai")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--dry", action="store_true", help="2 000 training images, 1 epoch: a smoke test, not a measurement")
    args = p.parse_args()
    epochs = 1 if args.dry else args.epochs
    cfg = config(epochs, args.dry)
    precision = auto_precision("cpu")[0]
    cfg.train.precision = precision  # every trainer in the same precision, written out (config honesty)
    splits = prepare_splits(cfg.data, cfg.seed)  # the selection every trainer trains on (transferlab re-selects the same)
    traces = []
    for name in args.trainers.split(","):
        trace = Trace(name)
        TRAINERS[name](cfg, splits, precision, trace)
        traces.append(trace)
        Console().print(f"{name}: " + (trace.note or ", ".join(f"{s:.0f}s {100 * a:.2f}%" for s, a in trace.points)))
    bare = next((t for t in traces if t.name == "bare" and t.points), None)
    flags = cpu_flags() or frozenset()
    table = Table(title=f"time to test accuracy — {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC — {epochs} epochs, "
                        f"{len(splits.train_y)} training images, {len(splits.test_y)} test")
    for col in ("trainer", *(f"s to {100 * t:.0f} %" for t in TARGETS), *(f"acc at {m / 60:.0f} min" for m in MARKS_S),
                "final acc", "s / epoch", "epoch time vs bare"):
        table.add_column(col)
    for t in traces:
        if not t.points:
            table.add_row(t.name, t.note or "no epoch finished", *[""] * 6)
            continue
        rel = f"{t.per_epoch() / bare.per_epoch():.2f}x" if bare else "—"
        table.add_row(t.name, *(fmt(t.first_reach(x)) for x in TARGETS), *(fmt(t.at(m), True) for m in MARKS_S),
                      fmt(t.points[-1][1], True), f"{t.per_epoch():.1f}", rel)
    console = Console(width=160)
    console.print(table)
    console.print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch "
                    f"{torch.__version__}; bf16 flags: {' '.join(f for f in ('avx512_bf16', 'amx_bf16') if f in flags) or 'none'}; "
                    f"precision {precision}; load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
