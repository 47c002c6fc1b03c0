"""The report's "auto" section: what ``transferlab auto`` chose and why, read from ``auto.json`` in the study folder.

``transferlab auto`` writes ``auto.json`` into its ``final`` study folder; the report of that folder shows the
candidates and their scores, who was dropped at which stage and why, the chosen model with its test accuracy, and the
planned vs spent time per stage. Text only (the HTML and Markdown builders lay it out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferlab.files import read_json

__all__ = ["AUTO_FILE", "auto_candidates", "auto_final", "auto_stages", "auto_summary", "auto_tables", "read_auto"]

AUTO_FILE = "auto.json"


def read_auto(study_dir: Path) -> dict[str, Any] | None:
    """``auto.json`` of the study folder, or None (not an auto study, or unreadable)."""
    path = Path(study_dir) / AUTO_FILE
    if not path.is_file():
        return None
    try:
        doc = read_json(path)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "chosen" in doc else None


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def auto_summary(doc: dict[str, Any]) -> list[str]:
    """Sentences: the chosen model, its test accuracy, how validation was done, the budget."""
    ch = doc["chosen"]
    std = f" ± {100 * ch['test_acc_std']:.2f}" if ch.get("test_acc_std") is not None else ""
    lines = [f"chosen: {ch['model']} (validation accuracy {pct(ch.get('val_acc'))}); test accuracy {pct(ch.get('test_acc'))}{std} "
             f"over {ch.get('test_runs') or 0} run(s) — the only model that saw the test split",
             f"validation: {doc.get('validation', '?')}; {doc.get('sizes', {}).get('pool', '?')} training and "
             f"{doc.get('sizes', {}).get('test', '?')} test images",
             f"budget {doc.get('budget_s', 0):.0f}s, spent {doc.get('spent_s', 0):.0f}s"]
    ens = doc.get("ensemble") or {}
    if ens.get("why") or ens.get("skipped"):
        lines.append(f"ensemble: {ens.get('why') or 'skipped (' + str(ens['skipped']) + ')'}")
    lines += [f"note: {n}" for n in doc.get("plan_notes", [])]
    return lines


def auto_candidates(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per candidate: LogME, k-NN, its models' validation accuracy, where it was dropped and why."""
    header = ["candidate", "LogME", "k-NN val", "models (validation accuracy)", "dropped"]
    ranking = {r["candidate"]: r for r in doc.get("ranking", [])}
    dropped: dict[str, list[str]] = {}
    for d in doc.get("dropped", []):  # every drop, in order: an arm dropped at one rung, the candidate at a later stage
        dropped.setdefault(d["candidate"], []).append(f"{d['stage']}: {d['why']}")
    rows = []
    for c in [c["candidate"] for c in doc.get("candidates", [])]:
        r = ranking.get(c, {})
        models = ", ".join(f"{k.removeprefix(c + '.')} {pct(m.get('val_acc'))}" for k, m in doc.get("models", {}).items()
                           if m.get("candidate") == c)
        rows.append([c, f"{r['logme']:.4f}" if "logme" in r else "—", pct(r.get("knn")), models or "—", "; ".join(dropped.get(c, []))])
    return header, rows


def auto_stages(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Planned vs spent seconds per stage."""
    return ["stage", "planned (s)", "spent (s)"], [[name, f"{s['planned_s']:.0f}", f"{s['spent_s']:.0f}"]
                                                   for name, s in doc.get("stages", {}).items()]


def auto_final(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The final choice: the best single model, the soft vote and the soup, each kept or with why it was not."""
    fc = doc.get("final_choice") or {}
    if not fc:
        return ["final option", "outcome"], []
    rows = [[fc["chosen"], "chosen"]] + [[name, why] for name, why in fc.get("why_not", {}).items()]
    return ["final option", "outcome"], rows


def auto_tables(doc: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    """The section's tables, in order: candidates, the final choice (when recorded), the time per stage."""
    final = auto_final(doc)
    return [auto_candidates(doc), *([final] if final[1] else []), auto_stages(doc)]
