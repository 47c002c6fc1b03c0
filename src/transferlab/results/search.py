"""The searches of a study as compare and the report show them: the best trial (chosen on validation) with its test metrics, and Optuna's plots.

Reads ``<study>/search/<experiment>/search.json`` and the PNGs beside it, written by
``transferlab.study.search.SearchDriver.summary`` when a study with ``search:`` ran.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SearchRecord", "read_searches", "search_lines"]


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


@dataclass
class SearchRecord:
    experiment: str
    info: dict[str, Any]
    best_test: dict[str, Any] = field(default_factory=dict)
    """The best trial's ``metrics.json``: its test metrics are the search's reported result."""
    figures: dict[str, bytes] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.info.get("trials", []):
            out[t["state"]] = out.get(t["state"], 0) + 1
        return out


def read_searches(study_dir: Path) -> list[SearchRecord]:
    """Every search of the study folder (none when it has no ``search/``); unreadable files are skipped."""
    out = []
    for path in sorted((study_dir / "search").glob("*/search.json")):
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        rec = SearchRecord(str(info.get("experiment", path.parent.name)), info)
        best = info.get("best")
        if best and (study_dir / best["run"] / "metrics.json").is_file():
            try:
                rec.best_test = json.loads((study_dir / best["run"] / "metrics.json").read_text(encoding="utf-8"))
            except ValueError:
                pass
        for name in info.get("figures", []):
            if (path.parent / name).is_file():
                rec.figures[name.removesuffix(".png")] = (path.parent / name).read_bytes()
        out.append(rec)
    return out


def search_lines(rec: SearchRecord) -> list[str]:
    """Plain-text facts of one search (the HTML and Markdown pages format them)."""
    info, best = rec.info, rec.info.get("best")
    counts = ", ".join(f"{n} {s}" for s, n in rec.counts.items())
    lines = [f"{len(info.get('trials', []))} trials ({counts}); sampler {info.get('sampler')}, pruner {info.get('pruner')}, "
             f"metric {info.get('metric')} ({info.get('direction')})"]
    if best:
        multi = rec.best_test.get("task") == "multilabel"  # its test score is the mAP (rundir.metrics.HEADLINE)
        score = f"test mAP {_pct(rec.best_test.get('test_map'))}" if multi else f"test accuracy {_pct(rec.best_test.get('test_acc'))}"
        lines.append(f"best trial: {best['run']} — {info.get('metric')} {best['value']:.4f} on validation (the choice); "
                     f"{score} (reported, never used to choose)")
        lines.append("settings: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items()))
    else:
        lines.append("no trial completed")
    return lines
