"""Benchmark: the 10-minute Fashion-MNIST recipe against the 30-minute one, side by side in one run (issue 25 §4).

Target: ``studies/fashion_mnist_fast.yaml`` reaches >= 95.0 % test accuracy (mean over its seeds) in <= 0.4x the time
per seed of ``studies/fashion_mnist_best.yaml``, both measured here, one after the other, on a quiet machine. Each run's
time is its ``wall_seconds`` (``metrics.json``: data loading to test metrics); the ratio is the fast recipe's mean over
its seeds against the best recipe's mean over the seeds run (``--best-seeds``: one by default, ~25 minutes on 2 cores;
its accuracy is only a reference, the time is the point). Prints the CPU flags, per-run rows and the two verdicts.

    .venv/bin/python benchmarks/fmnist_speedrun.py                        # ~55 minutes on 2 cores
    .venv/bin/python benchmarks/fmnist_speedrun.py --best-seeds 0,1,2     # the best recipe's mean accuracy too
    .venv/bin/python benchmarks/fmnist_speedrun.py --fast-epochs 11       # the fast recipe, longer (the ratio says if it fits)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from rich.console import Console

from transferlab.config import load_study
from transferlab.engine.precision import auto_precision, cpu_flags
from transferlab.rundir import read_run
from transferlab.study import run_study

STUDIES = Path(__file__).resolve().parents[1] / "studies"
TARGET_ACC, TARGET_RATIO = 0.95, 0.4
"""Issue 25 §4: >= 95.0 % test accuracy, 3 seeds' mean, in <= 0.4x the best recipe's time."""


def run(path: Path, seeds: list[int] | None, runs_dir: Path, console: Console, epochs: int | None = None) -> list[dict]:
    """Run the study at ``path`` (only ``seeds`` when given; ``epochs`` instead of the file's) sequentially; one row per
    run from its ``metrics.json``."""
    study = load_study(path)
    if seeds is not None:
        study = dataclasses.replace(study, experiments=[c for c in study.experiments if c.seed in seeds])
    if epochs is not None:
        study = dataclasses.replace(study, name=f"{study.name}_e{epochs}", experiments=[
            dataclasses.replace(c, train=dataclasses.replace(c.train, epochs=epochs)) for c in study.experiments])
    result = run_study(study, runs_dir, executor="sequential", console=console)
    if result.failed:
        raise SystemExit(f"{path.name}: runs failed: {result.failed}")
    rows = []
    for cfg in study.experiments:
        runs = [r for r in (runs_dir / study.name).iterdir() if r.is_dir() and r.name.startswith(cfg.name)]
        for r in runs:
            rec = read_run(r).record
            if rec.seed == cfg.seed and rec.experiment == cfg.name:
                rows.append({"study": study.name, "run": r.name, "seed": rec.seed, "test_acc": rec.test_acc,
                             "train_s": rec.train_seconds, "wall_s": rec.wall_seconds, "best_epoch": rec.best_epoch})
    return rows


def summary(rows: list[dict]) -> tuple[float, float, float]:
    """(mean test accuracy, its sample std (0 for one run), mean wall seconds per run)."""
    accs = [r["test_acc"] for r in rows]
    return statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0, statistics.mean(r["wall_s"] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--best-seeds", default="0", help="seeds of fashion_mnist_best.yaml to run (comma-separated; default 0; '' "
                   "runs none)")
    p.add_argument("--fast", type=Path, default=STUDIES / "fashion_mnist_fast.yaml", help="the 10-minute study file")
    p.add_argument("--fast-epochs", type=int, help="train the fast study this many epochs instead of its file's")
    p.add_argument("--runs-dir", type=Path, help="keep the runs here (default: a temporary folder, removed)")
    args = p.parse_args()
    console = Console()
    flags = cpu_flags() or frozenset()
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, bf16 flags: "
               f"{' '.join(f for f in ('avx512_bf16', 'amx_bf16') if f in flags) or 'none'}, precision auto -> "
               f"{auto_precision('cpu')[0]}, load average {os.getloadavg()[0]:.2f} at the start")
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="fmnist_speedrun_") as tmp:
        runs_dir = args.runs_dir or Path(tmp)
        fast = run(args.fast, None, runs_dir, console, args.fast_epochs)
        best_seeds = [int(s) for s in args.best_seeds.split(",") if s.strip()]
        best = run(STUDIES / "fashion_mnist_best.yaml", best_seeds, runs_dir, console) if best_seeds else []
    console.print(f"fmnist speedrun — {started:%Y-%m-%d %H:%M}–{datetime.datetime.now(datetime.UTC):%H:%M} UTC; {machine}; "
                  f"load average {os.getloadavg()[0]:.2f} at the end", highlight=False)
    for r in fast + best:
        console.print(f"  {r['study']:<22} {r['run']:<28} test {100 * r['test_acc']:.2f} %  tested epoch {r['best_epoch']}  "
                      f"train {r['train_s']:.0f} s  wall {r['wall_s']:.0f} s", highlight=False)
    fa, fs, fw = summary(fast)
    if not best:  # --best-seeds "": the fast study alone (its ratio against a best run timed elsewhere is the reader's)
        console.print(f"fast: {100 * fa:.2f} ± {100 * fs:.2f} % over {len(fast)} seeds, {fw:.0f} s per seed; the best recipe not run")
        return
    ba, bs, bw = summary(best)
    console.print(f"fast: {100 * fa:.2f} ± {100 * fs:.2f} % over {len(fast)} seeds, {fw:.0f} s per seed; best: {100 * ba:.2f} "
                  f"± {100 * bs:.2f} % over {len(best)} seed(s), {bw:.0f} s per seed; time ratio fast/best {fw / bw:.2f}", highlight=False)
    console.print(f"target >= {100 * TARGET_ACC:.1f} %: {'met' if fa >= TARGET_ACC else 'missed'} ({100 * (fa - TARGET_ACC):+.2f} points); "
                  f"target <= {TARGET_RATIO}x the time: {'met' if fw / bw <= TARGET_RATIO else 'missed'} ({fw / bw:.2f}x)", highlight=False)


if __name__ == "__main__":
    main()
