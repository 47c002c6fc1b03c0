"""Benchmark: ``transferlab auto`` under budgets of 5, 10 and 20 minutes — how close it stays to the budget and what
accuracy it reaches, against the best row of the hand-written demo study (and fastai, when it is installed).

Datasets:

* ``fmnist`` — Fashion-MNIST, a 20 000-image training subset and the full test set (``--option``-style data keys);
* ``folder`` — PNG class folders the benchmark writes from scikit-learn's digits: a few hundred images of mixed sizes
  (so the k-fold small-data path and the mixed-size decoding run).

Candidates: the embedded EfficientNet-Lite zoo (offline). Every run goes to a fresh folder under ``--runs-dir``.

    .venv/bin/python benchmarks/auto.py                          # 3 budgets x 2 datasets: about 70 minutes of compute
    .venv/bin/python benchmarks/auto.py --budgets 5 --datasets folder
    .venv/bin/python benchmarks/auto.py --smoke                  # does it work: a 2-minute budget, tiny random backbones
    .venv/bin/python benchmarks/auto.py --json out.json          # also the rows as JSON (for RESULTS.md)

The demo comparison reads the best row of ``--demo-runs`` (default ``runs/fashion_mnist_demo``: ``transferlab demo``
first); the fastai comparison (``vision_learner(...).fine_tune()`` on the same Lite0 weights for the same wall time,
trained on auto's training pool and tested on auto's test images) runs only where ``fastai`` is importable (it is not a
dependency of transferlab: ``pip install -c constraints.txt -e ".[bench]"``) and is printed as skipped otherwise;
``--no-fastai`` leaves it out. Record each run in RESULTS.md with the machine
and the date. Target (issue 23): every row's spent time within the budget + 10 %.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

import transferlab
from transferlab.models.embedded import embedded_state_dict
from transferlab.results.compare import compare

SMOKE_CANDIDATES = "test_resnet:scratch,test_efficientnet:scratch"


def write_digits_folder(root: Path, seed: int = 0) -> Path:
    """scikit-learn's digits as PNG class folders with mixed sizes (16-48 px), 40 images per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)[:40]
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).convert("RGB")
            side = int(rng.integers(16, 49))
            img.resize((side, side), Image.BICUBIC).save(root / str(label) / f"{i}.png")
    return root


def demo_best(demo_runs: Path) -> dict[str, Any] | None:
    """The best row of the demo study (by test accuracy), or None when it has not been run."""
    if not (demo_runs / "study.yaml").is_file() and not any(demo_runs.glob("*/metrics.json")):
        return None
    rows = [r for r in compare(demo_runs, write=False) if r.get("test_acc") is not None]
    return max(rows, key=lambda r: r["test_acc"]) if rows else None


def fastai_row(final_csv: Path, seconds: float, side: int) -> dict[str, Any]:
    """fastai's ``vision_learner(...).fine_tune()`` on EfficientNet-Lite0 (the embedded weights) for about ``seconds``,
    trained on auto's training pool and tested on auto's test images (``final.csv``), at ``side`` px.

    As a fastai user would: its standard ``DataLoaders`` from the file list (``valid_pct=0.15``, its own validation
    split), ``Resize`` per item, its default head and ``fine_tune``: one frozen epoch and one unfrozen, then one more
    one-cycle schedule over the epochs that fit the rest of the time. fastai's ``to_bf16()`` autocasts on CUDA only,
    so a callback gives it the CPU bf16 autocast transferlab uses (where the CPU has bf16)."""
    if importlib.util.find_spec("fastai") is None:
        return {"skipped": "fastai is not installed (pip install -c constraints.txt -e '.[bench]' to compare)"}
    import pandas as pd
    import timm
    from fastai.callback.core import Callback
    from fastai.vision.all import ImageDataLoaders, Resize, accuracy, vision_learner  # optional: only this comparison needs it

    class CpuBf16(Callback):
        def before_batch(self) -> None:
            self.ctx = torch.autocast("cpu", dtype=torch.bfloat16)
            self.ctx.__enter__()

        def after_loss(self) -> None:
            self.ctx.__exit__(None, None, None)

    df = pd.read_csv(final_csv)
    train, test = df[df.split == "train"][["path", "label"]], df[df.split == "test"][["path", "label"]]
    t0 = time.monotonic()
    dls = ImageDataLoaders.from_df(train, path="/", fn_col="path", label_col="label", valid_pct=0.15, seed=0, item_tfms=Resize(side), bs=32)
    body = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    body.load_state_dict({k: v for k, v in embedded_state_dict().items() if not k.startswith("classifier")}, strict=False)
    bf16 = precision_name() == "bf16-mixed"
    learn = vision_learner(dls, lambda pretrained=False: body, n_out=dls.c, metrics=accuracy, pretrained=False,
                           cbs=[CpuBf16()] if bf16 else None)
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(1)
        per_epoch, epochs = (time.monotonic() - t0) / 2, 2
        more = int((seconds - (time.monotonic() - t0)) // per_epoch)
        if more > 0:
            learn.fit_one_cycle(more)
            epochs += more
        spent = time.monotonic() - t0
        test_acc = float(learn.validate(dl=learn.dls.test_dl(test, with_labels=True))[1])
        val_acc = float(learn.validate()[1])
    return {"test_acc": test_acc, "val_acc": val_acc, "spent_s": round(spent, 1), "epochs": epochs,
            "precision": "bf16-mixed" if bf16 else "32-true"}


def precision_name() -> str:
    """What ``precision: auto`` resolves to here (bf16 autocast where the CPU has native bf16)."""
    from transferlab.engine.precision import resolve_precision

    return resolve_precision("auto", "cpu")


def run_one(data: str, budget_min: float, runs: Path, options: dict[str, Any], candidates: str | None, accelerator: str) -> dict[str, Any]:
    t0 = time.monotonic()
    doc = transferlab.auto(data, budget=budget_min * 60, candidates=candidates, runs_dir=runs, options=options,
                           accelerator=accelerator, console=Console(quiet=True))
    wall = time.monotonic() - t0
    ch = doc["chosen"]
    return {"budget_s": budget_min * 60, "wall_s": round(wall, 1), "ratio": round(wall / (budget_min * 60), 3),
            "chosen": ch["model"], "val_acc": ch["val_acc"], "test_acc": ch["test_acc"], "test_acc_std": ch.get("test_acc_std"),
            "stages": doc["stages"], "validation": doc["validation"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="5,10,20", help="minutes, comma-separated (default 5,10,20)")
    p.add_argument("--datasets", default="fmnist,folder", help="fmnist, folder (default both)")
    p.add_argument("--runs-dir", type=Path, help="where the auto folders go (default: a temporary folder)")
    p.add_argument("--demo-runs", type=Path, default=Path("runs/fashion_mnist_demo"), help="the demo study's run folder")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--smoke", action="store_true", help="a 2-minute budget on the folder dataset with tiny random backbones")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--no-fastai", action="store_true", help="leave the fastai comparison out")
    args = p.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="auto_bench_") as tmp:
        runs = args.runs_dir or Path(tmp)
        folder = write_digits_folder(runs / "digits_folder")
        datasets = {"fmnist": ("fashion_mnist", {"train_subset": 20000, "image_size": 64}),
                    "folder": (str(folder), {})}
        budgets = [float(b) for b in args.budgets.split(",")]
        names = [d.strip() for d in args.datasets.split(",")]
        candidates = None
        if args.smoke:
            budgets, names, candidates = [2.0], ["folder"], SMOKE_CANDIDATES
            datasets["folder"] = (str(folder), {"image_size": 16})
        rows = []
        for name in names:
            data, options = datasets[name]
            for b in budgets:
                row = {"dataset": name, **run_one(data, b, runs / f"{name}_{b:g}m", options, candidates, args.accelerator)}
                if not args.smoke and not args.no_fastai:
                    final_csv = next((runs / f"{name}_{b:g}m").glob("*/data/final.csv"))
                    row["fastai"] = fastai_row(final_csv, row["wall_s"], 64 if name == "fmnist" else 224)
                rows.append(row)
                console.print(f"{name} {b:g} min: {row['wall_s']:.0f}s ({row['ratio']:.2f}x budget), {row['chosen']}, "
                              f"test {100 * (row['test_acc'] or 0):.2f}%", markup=False, highlight=False)
        table = Table(title=f"transferlab auto — {platform.node()} — {datetime.date.today()}")
        for col in ("dataset", "budget", "wall", "wall/budget", "chosen", "val acc", "test acc", "fastai"):
            table.add_column(col)
        for r in rows:
            fa = r.get("fastai", {})
            table.add_row(r["dataset"], f"{r['budget_s'] / 60:g} min", f"{r['wall_s']:.0f}s", f"{r['ratio']:.2f}", r["chosen"],
                          f"{100 * r['val_acc']:.2f}%", f"{100 * (r['test_acc'] or 0):.2f}%",
                          fa.get("skipped", "skipped") if "test_acc" not in fa else
                          f"{100 * fa['test_acc']:.2f}% test, {fa['epochs']} epochs, {fa['spent_s']:.0f}s")
        console.print(table)
        best = demo_best(args.demo_runs)
        console.print(f"demo study best row: {best['experiment']} {100 * best['test_acc']:.2f}%" if best
                      else f"demo study: skipped ({args.demo_runs} has no runs: `transferlab demo` first)", markup=False)
        over = [r for r in rows if r["ratio"] > 1.10]
        console.print(f"budget + 10 %: {'all rows within' if not over else f'{len(over)} row(s) over'}")
        if args.json:
            args.json.write_text(json.dumps({"machine": platform.platform(), "date": str(datetime.date.today()), "rows": rows,
                                             "demo_best": best and {"experiment": best["experiment"], "test_acc": best["test_acc"]}},
                                            indent=1, default=str))


if __name__ == "__main__":
    main()
