"""Benchmark: the wall time of one study (8 small runs) on the ``sequential``, ``local`` and ``ray`` executors.

The same study — 8 independent from-scratch runs of the built-in CNN on a Fashion-MNIST subset — runs
in one process, one executor after the other, in ``--rounds`` interleaved rounds (so the machine's
drift does not land on one executor), and the ratios to ``sequential`` are printed side by side.
``sequential`` uses all cores for one run at a time (torch's default threads); ``local`` and ``ray``
run 2 at a time with the cores split between them (1 thread each on 2 cores). On 2 CPU cores expect
little: both ways use the same 2 cores; the value is on machines with many GPUs or nodes.

    .venv/bin/python benchmarks/study_throughput.py              # 8 runs × 3 rounds (~10 min on 2 cores)
    .venv/bin/python benchmarks/study_throughput.py --rounds 1 --executors sequential,local
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def study(n_runs: int, train_subset: int, epochs: int) -> dict:
    return {
        "study": "throughput",
        "defaults": {
            "data": {"dataset": "fashion_mnist", "train_subset": train_subset, "val_fraction": 0.1, "test_subset": 2000},
            "model": {"backbone": "transferlab_cnn"},
            "train": {"epochs": epochs, "batch_size": 128, "lr": 0.003, "progress": False, "checkpoint_every_minutes": None},
        },
        "experiments": [{"name": f"run{i}", "seed": i} for i in range(n_runs)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--train-subset", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--executors", default="sequential,local,ray")
    args = ap.parse_args()

    from transferlab.config import parse_study
    from transferlab.study import run_study

    quiet = Console(quiet=True)
    executors = args.executors.split(",")
    if "ray" in executors:
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    times: dict[str, list[float]] = {e: [] for e in executors}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for ex in executors:
                t0 = time.perf_counter()
                res = run_study(parse_study(study(args.runs, args.train_subset, args.epochs)), Path(tmp) / f"{ex}{r}", console=quiet,
                                executor=ex, workers=None if ex == "sequential" else args.workers)
                times[ex].append(time.perf_counter() - t0)
                assert res.ok, res.failed
                print(f"round {r + 1}: {ex} {times[ex][-1]:.1f} s", flush=True)
    base = statistics.median(times["sequential"]) if "sequential" in times else None
    t = Table(title=f"{args.runs} runs ({args.train_subset} train images, {args.epochs} epochs each), {args.rounds} rounds, "
                    f"{os.cpu_count()} cores, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    for col in ("executor", "workers", "median wall (s)", "rounds (s)", "vs sequential"):
        t.add_column(col)
    for ex, ts in times.items():
        med = statistics.median(ts)
        t.add_row(ex, "1" if ex == "sequential" else str(args.workers), f"{med:.1f}", ", ".join(f"{v:.1f}" for v in ts),
                  f"{base / med:.2f}×" if base else "—")
    Console().print(t)


if __name__ == "__main__":
    main()
