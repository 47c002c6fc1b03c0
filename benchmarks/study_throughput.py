"""Benchmark: the wall time of one study (N independent runs) on the ``sequential``, ``local`` and ``ray`` executors.

The same study — independent from-scratch runs of the built-in CNN on a Fashion-MNIST subset — runs in one
process, one executor after the other, in ``--rounds`` interleaved rounds (so the machine's drift does not land on
one executor), and the ratios to ``sequential`` are printed side by side with the CPU and its flags.
``sequential`` uses all cores for one run at a time (torch's default threads); ``local`` and ``ray`` run
``--workers`` at a time with the cores split between them (1 thread each on 2 cores). Each ``local`` study starts a
fresh pool (its workers pay the imports once per slot, as from the command line); Ray's worker processes are
started once for the whole benchmark (``ray.init`` here), which favours Ray slightly.

Two sizes (issue 25 §1's targets: ``local --workers 2`` ≥ 1.0× sequential and ≥ Ray's ratio on tiny runs; ≥ 1.15×
sequential on runs of ≥ 30 s each):

* default, *tiny*: 8 runs of 3000 images × 2 epochs (a few seconds each), where per-run overheads dominate;
* ``--long``: 4 runs of 12 000 images × 4 epochs (≥ 30 s each on 2 cores; the table shows each executor's median
  run time, so check it there and raise ``--train-subset`` / ``--epochs`` on a faster machine).

``--dry`` is a smoke test of the script itself (synthetic data, 2 tiny runs, 1 round, no download, no Ray unless
named): it checks that everything runs, not how fast. Run the real thing on a quiet machine.

    .venv/bin/python benchmarks/study_throughput.py                    # tiny runs, 3 rounds (~10 min on 2 cores)
    .venv/bin/python benchmarks/study_throughput.py --long --rounds 2  # runs of >= 30 s each
    .venv/bin/python benchmarks/study_throughput.py --rounds 1 --executors sequential,local
    .venv/bin/python benchmarks/study_throughput.py --dry --executors sequential,local
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

from transferlab.config import parse_study
from transferlab.engine.precision import auto_precision, cpu_flags
from transferlab.study import run_study

SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
"""The CPU flags that decide torch's CPU kernels and ``precision: auto`` (printed with the table)."""
SIZES = {"tiny": (8, 3000, 2), "long": (4, 12000, 4), "dry": (2, 64, 1)}
"""runs, training images, epochs."""


def study(n_runs: int, train_subset: int, epochs: int, dry: bool = False) -> dict:
    data = ({"dataset": "synthetic", "synthetic_size": train_subset, "val_fraction": 0.25} if dry else
            {"dataset": "fashion_mnist", "train_subset": train_subset, "val_fraction": 0.1, "test_subset": 2000})
    return {
        "study": "throughput",
        "defaults": {
            "data": data,
            "model": {"backbone": "transferlab_cnn"},
            "train": {"epochs": epochs, "batch_size": 16 if dry else 128, "lr": 0.003, "progress": False,
                      "checkpoint_every_minutes": None},
        },
        "experiments": [{"name": f"run{i}", "seed": i} for i in range(n_runs)],
    }


def machine() -> str:
    """CPU model, cores, the flags that matter and what ``precision: auto`` picks here."""
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = cpu_flags()
    shown = "unknown" if flags is None else " ".join(f for f in SHOWN_FLAGS if f in flags) or "none of " + ",".join(SHOWN_FLAGS)
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}; flags: {shown}; precision auto: {auto_precision('cpu')[0]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--long", action="store_true", help="runs of >= 30 s each (4 runs, 12 000 images, 4 epochs)")
    size.add_argument("--dry", action="store_true", help="smoke test: synthetic data, 2 tiny runs, 1 round")
    ap.add_argument("--runs", type=int, help="runs in the study (default: 8 tiny, 4 long)")
    ap.add_argument("--train-subset", type=int, help="training images per run (default: 3000 tiny, 12000 long)")
    ap.add_argument("--epochs", type=int, help="epochs per run (default: 2 tiny, 4 long)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; 1 with --dry)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--executors", help="comma-separated (default sequential,local,ray; sequential,local with --dry)")
    args = ap.parse_args()

    mode = "long" if args.long else "dry" if args.dry else "tiny"
    runs, subset, epochs = (a if a is not None else d for a, d in zip((args.runs, args.train_subset, args.epochs), SIZES[mode], strict=True))
    rounds = args.rounds or (1 if args.dry else 3)
    executors = (args.executors or ("sequential,local" if args.dry else "sequential,local,ray")).split(",")
    print(machine(), flush=True)
    if "ray" in executors:
        try:
            import ray
        except ImportError:
            print("ray: not installed (pip install 'transferlab[ray]'): left out", flush=True)
            executors.remove("ray")
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)

    quiet = Console(quiet=True)
    times: dict[str, list[float]] = {e: [] for e in executors}
    per_run: dict[str, list[float]] = {e: [] for e in executors}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for ex in executors:
                t0 = time.perf_counter()
                res = run_study(parse_study(study(runs, subset, epochs, args.dry)), Path(tmp) / f"{ex}{r}", console=quiet,
                                executor=ex, workers=None if ex == "sequential" else args.workers)
                times[ex].append(time.perf_counter() - t0)
                assert res.ok, res.failed
                per_run[ex] += [o.seconds for o in res.outcomes.values()]
                print(f"round {r + 1}: {ex} {times[ex][-1]:.1f} s", flush=True)
    base = statistics.median(times["sequential"]) if "sequential" in times else None
    t = Table(title=f"{mode}: {runs} runs ({subset} train images, {epochs} epochs each), {rounds} round(s)\n{machine()}")
    for col in ("executor", "workers", "median wall (s)", "rounds (s)", "median run (s)", "vs sequential"):
        t.add_column(col)
    for ex, ts in times.items():
        med = statistics.median(ts)
        t.add_row(ex, "1" if ex == "sequential" else str(args.workers), f"{med:.1f}", ", ".join(f"{v:.1f}" for v in ts),
                  f"{statistics.median(per_run[ex]):.1f}", f"{base / med:.2f}×" if base else "—")
    Console(width=200).print(t)
    if args.long and min(statistics.median(v) for v in per_run.values()) < 30:
        print("note: some executor's median run took under 30 s: raise --train-subset or --epochs for the --long target")


if __name__ == "__main__":
    main()
