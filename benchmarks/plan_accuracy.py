"""Benchmark: ``transferlab plan``'s per-run estimates against the measured wall time of the same runs (issue 25 §2).

For each study given, ``dry_run`` (what ``transferlab plan`` prints) estimates every run, then every experiment runs
for real, one at a time on the ``sequential`` executor into a temporary folder, and its wall time is measured around
``run_study(only=[experiment])`` — what the user waits for: data loading, model build, training, evaluation and the
run folder, not only the loop. The table prints estimate, actual and their ratio per experiment (an experiment with
several seeds sums its runs), with the CPU flags; the target is every ratio within 0.70–1.30.

    .venv/bin/python benchmarks/plan_accuracy.py                                   # the demo study
    .venv/bin/python benchmarks/plan_accuracy.py studies/seed003_offline_fmnist.yaml studies/fewshot_fmnist.yaml
    .venv/bin/python benchmarks/plan_accuracy.py --only cnn_scratch,lite0_linear_probe

Run it on a quiet machine: the probe and the runs must see the same CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from transferlab.config import load_study
from transferlab.engine.precision import auto_precision, cpu_flags
from transferlab.rundir import read_run
from transferlab.study import run_study
from transferlab.study.dryrun import dry_run

DEMO = Path(__file__).resolve().parents[1] / "src" / "transferlab" / "studies" / "demo.yaml"
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
LOW, HIGH = 0.70, 1.30
"""Issue 25 §2: every estimate within ±30 % of the measured wall time."""


def measure(path: Path, runs_dir: Path, only: list[str] | None, console: Console) -> list[dict]:
    """Estimate every experiment of the study at ``path``, then run each and time it; one row per experiment."""
    study = load_study(path)
    t0 = time.perf_counter()
    report = dry_run(study, runs_dir, executor="sequential")
    probe_s = time.perf_counter() - t0
    if report.problems:
        raise SystemExit(f"{path}: plan reports problems, fix them first:\n  " + "\n  ".join(report.problems))
    estimates: dict[str, float] = {}
    runs_of: dict[str, list[str]] = {}
    assumed: dict[str, str] = {}
    for row in report.rows:
        exp = row.name.split("/")[0]
        estimates[exp] = estimates.get(exp, 0.0) + (row.estimate_s or 0.0)
        runs_of.setdefault(exp, []).append(row.name)
        assumed.setdefault(exp, row.assumed)  # the first run's parts (the others repeat them, or read its shared pass)
    rows = []
    for exp, estimate in estimates.items():
        if only and exp not in only:
            continue
        t = time.perf_counter()
        result = run_study(study, runs_dir, resume=True, only=[exp], executor="sequential", console=console)
        actual = time.perf_counter() - t
        if result.failed:
            raise SystemExit(f"{path}: {exp} failed: {result.failed}")
        inside = sum(read_run(runs_dir / study.name / name).record.wall_seconds or 0.0 for name in runs_of[exp])
        rows.append({"study": study.name, "experiment": exp, "runs": len(runs_of[exp]), "estimate_s": estimate,
                     "actual_s": actual, "inside_run_s": inside, "ratio": estimate / actual, "probe_s": probe_s,
                     "assumed": assumed[exp]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("studies", nargs="*", type=Path, default=[DEMO], help="study files (default: the demo study)")
    p.add_argument("--only", help="comma-separated experiment names")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--runs-dir", type=Path, help="keep the runs here (default: a temporary folder, removed)")
    args = p.parse_args()
    console = Console()
    flags = cpu_flags()
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"flags: {' '.join(f for f in SHOWN_FLAGS if f in flags) or 'none of ' + ','.join(SHOWN_FLAGS)}, "
               f"precision auto -> {auto_precision('cpu')[0]}, load average {os.getloadavg()[0]:.2f} at the start")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="plan_accuracy_") as tmp:
        for path in args.studies:
            rows += measure(path, args.runs_dir or Path(tmp), args.only.split(",") if args.only else None, console)
    table = Table(title=f"plan estimate vs measured wall time — {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    for col in ("study", "experiment", "runs", "estimate (s)", "actual (s)", "inside the run (s)", "estimate / actual", "within ±30 %"):
        table.add_column(col)
    for r in rows:
        ok = LOW <= r["ratio"] <= HIGH
        table.add_row(r["study"], r["experiment"], str(r["runs"]), f"{r['estimate_s']:.1f}", f"{r['actual_s']:.1f}",
                      f"{r['inside_run_s']:.1f}", f"{r['ratio']:.2f}", "yes" if ok else "**no**")
    console.print(table)
    for r in rows:  # what each estimate was made of: where a miss comes from
        console.print(f"  {r['experiment']}: {r['assumed']}", markup=False, highlight=False)
    console.print(machine + f"; load average {os.getloadavg()[0]:.2f} at the end")
    console.print(f"{sum(LOW <= r['ratio'] <= HIGH for r in rows)}/{len(rows)} estimates within ±30 %")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
