"""The comparison table of a study: one row per experiment, mean ± std over seeds."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

COLUMNS = [
    ("experiment", "experiment"),
    ("strategy", "strategy"),
    ("backbone", "backbone"),
    ("weights", "weights"),
    ("test_acc", "test acc"),
    ("n_seeds", "seeds"),
    ("train_seconds", "train time (s)"),
    ("inference_images_per_s", "inference img/s"),
    ("trainable_params", "trainable params"),
    ("data", "data"),
    ("status", "status"),
]


def training_cost_seconds(metrics: dict[str, Any]) -> float:
    """What training cost: the loop's time plus, when features were cached, the one backbone pass."""
    cache = metrics.get("feature_cache") or {}
    return float(metrics["train_seconds"]) + (float(cache.get("pass_seconds", 0.0)) if cache.get("used") else 0.0)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(study_dir: str | Path) -> list[dict[str, Any]]:
    """Read every ``metrics.json`` under ``study_dir`` and aggregate the seeds of each experiment."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise FileNotFoundError(f"no such study directory: {study_dir}")
    groups: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(study_dir.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        groups.setdefault(m["experiment"], []).append(m)
    if not groups:
        raise FileNotFoundError(f"{study_dir} holds no runs (no */metrics.json); run the study first")
    order_file = study_dir / "study.json"
    order = json.loads(order_file.read_text())["experiments"] if order_file.exists() else []
    names = sorted(groups, key=lambda n: (order.index(n) if n in order else len(order), n))
    rows = []
    for name in names:
        runs = groups[name]
        ok = [r for r in runs if r.get("status") == "ok"]
        first = ok[0] if ok else runs[0]
        row: dict[str, Any] = {
            "experiment": name,
            "strategy": first.get("strategy"),
            "backbone": first.get("backbone"),
            "weights": first.get("weights"),
            "n_seeds": len(ok),
            "status": "ok" if len(ok) == len(runs) else f"{len(runs) - len(ok)} failed: {[r for r in runs if r.get('status') != 'ok'][0].get('error', '')[:120]}",
        }
        if ok:
            for key in ("test_acc", "inference_images_per_s"):
                row[key], row[f"{key}_std"] = _mean_std([r[key] for r in ok])
            row["train_seconds"], row["train_seconds_std"] = _mean_std([training_cost_seconds(r) for r in ok])
            row["trainable_params"] = first["trainable_params"]
            row["total_params"] = first["total_params"]
            row["data"] = f"{first['dataset']} {first['n_train']} train, {first['image_size']}px"
            if first.get("notes"):
                row["data"] += f"; {first['notes']}"
        rows.append(row)
    return rows


def _fmt(row: dict[str, Any], key: str) -> str:
    if key not in row or row[key] is None:
        return "—"
    v = row[key]
    if key == "test_acc":
        s = f"{100 * v:.2f}%"
        return s + (f" ± {100 * row['test_acc_std']:.2f}" if row.get("n_seeds", 0) > 1 else "")
    if key == "train_seconds":
        return f"{v:.1f}" + (f" ± {row['train_seconds_std']:.1f}" if row.get("n_seeds", 0) > 1 else "")
    if key == "inference_images_per_s":
        return f"{v:,.0f}"
    if key == "trainable_params":
        return f"{v:,}"
    return str(v)


def compare(study_dir: str | Path, console: Console | None = None, write: bool = True) -> list[dict[str, Any]]:
    """Print the comparison table of ``study_dir`` and write ``compare.csv`` and ``compare.md`` there."""
    console = console or Console()
    study_dir = Path(study_dir)
    rows = collect(study_dir)
    table = Table(title=f"study {study_dir.name}")
    for _, title in COLUMNS:
        table.add_column(title, justify="right" if title.endswith(("acc", "(s)", "img/s", "params", "seeds")) else "left")
    for row in rows:
        table.add_row(*[_fmt(row, k) for k, _ in COLUMNS])
    console.print(table)
    if write:
        with open(study_dir / "compare.csv", "w", newline="") as f:
            keys = sorted({k for r in rows for k in r}, key=lambda k: [c for c, _ in COLUMNS].index(k) if k in dict(COLUMNS) else 99)
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        md = ["| " + " | ".join(t for _, t in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        md += ["| " + " | ".join(_fmt(r, k).replace("|", "\\|") for k, _ in COLUMNS) + " |" for r in rows]
        (study_dir / "compare.md").write_text("\n".join(md) + "\n")
        console.print(f"written: {study_dir / 'compare.csv'}, {study_dir / 'compare.md'}")
    return rows
