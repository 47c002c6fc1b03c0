"""The Markdown summary of the report: the numbers of the HTML page without its plots.

Header, comparison table (best values in bold; a table per task when a study has both), Pareto front,
sweep tables, most-confused pairs (multi-label experiments: the per-label thresholds and decisions, the
most-missed labels and the most frequent label pairs) and failed runs; it points to the HTML file for
the plots. Every user-supplied string goes through ``md_esc``, so a name cannot break a table or turn
into markup.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from transferlab.files import read_json
from transferlab.results.compare import TASK_TITLES, cell_text, ci_text, seeds_hint, task_groups, versus_text
from transferlab.results.report.auto import auto_summary, auto_tables, read_auto
from transferlab.results.report.outside import outside_table
from transferlab.results.report.records import ExperimentRecord, StudyRecord
from transferlab.results.report.stats import (
    SweepRow,
    best_flags,
    confused_pairs,
    cooccurrence,
    label_rows,
    lr_find_curves,
    missed_labels,
    study_front,
    summed_confusion,
    sweep_groups,
)
from transferlab.results.report.text import (
    acc_text,
    balance_text,
    class_label,
    ece_text,
    error_text,
    int_text,
    legend_text,
    metric_name,
    pct,
    rate_text,
    secs,
    status_text,
    study_facts,
    sweep_acc_text,
    thresholds_text,
    time_text,
)
from transferlab.results.search import read_searches, search_lines

__all__ = ["md_esc", "summary"]

COMPARISON_HEAD = [
    "| experiment | backbone | weights | strategy | precision | image size | trainable params | test accuracy (mean ± std, n) "
    "| 95 % CI | vs reference | p (Holm) | balanced accuracy | macro F1 | ECE | training time (s) | inference img/s | status |",
    "|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
]
MULTILABEL_HEAD = [
    "| experiment | backbone | weights | strategy | precision | image size | trainable params | test mAP (mean ± std, n) "
    "| 95 % CI | vs reference | p (Holm) | micro mAP | F1 | exact match | Hamming loss | thresholds | training time (s) "
    "| inference img/s | status |",
    "|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
]
"""Multi-label experiments: their scores (F1, exact match, Hamming loss at the thresholds chosen on validation)."""
COMMON_PAIRS = 5
"""Most frequent label pairs of the test set listed per multi-label experiment."""


def md_esc(value: Any) -> str:
    """Escape a value for a Markdown table cell or line: HTML specials, Markdown punctuation, newlines."""
    text = html.escape(str(value), quote=False)
    for ch in "\\`*_[]|#":
        text = text.replace(ch, "\\" + ch)
    return " ".join(text.split())


def summary(study: StudyRecord, html_name: str) -> str:
    """The whole Markdown file; ``html_name`` is the HTML report it points to."""
    ok = study.ok_experiments
    groups = sweep_groups(study.experiments)
    lines = header(study, html_name) + auto_section(study.path) + comparison(study)
    if ok:
        lines += pareto(ok)
    if groups:
        lines += sweeps(groups)
    if ok:
        lines += outside(ok)
        lines += lr_finder(ok)
        if single := [e for e in ok if not e.multilabel]:
            lines += ["## Most-confused pairs", ""] + [line for e in single for line in pairs(e)]
        if multi := [e for e in ok if e.multilabel]:
            lines += ["## Labels (multi-label experiments)", ""] + [line for e in multi for line in labels(e)]
    for rec in read_searches(study.path):
        lines += [f"## Search: {md_esc(rec.experiment)}", ""] + [f"- {md_esc(t)}" for t in search_lines(rec)] + [""]
    if study.failed_runs:
        lines += failures(study)
    return "\n".join(lines).rstrip() + "\n"


def auto_section(study_dir: Path) -> list[str]:
    """``transferlab auto`` (``auto.json`` in the study folder): the choice, the candidates, time per stage."""
    doc = read_auto(study_dir)
    if doc is None:
        return []
    lines = ["## Auto: how this model was chosen", ""] + [f"- {md_esc(t)}" for t in auto_summary(doc)] + [""]
    for head, rows in auto_tables(doc):
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(md_esc(c) for c in r) + " |" for r in rows] + [""]
    return lines


def header(study: StudyRecord, html_name: str) -> list[str]:
    """Title, the study's facts, where the runs are and which file has the plots."""
    return [
        f"# Study report: {md_esc(study.name)}",
        "",
        md_esc(" · ".join(study_facts(study))),
        "",
        f"Runs: {md_esc(study.path.resolve())} — full report with plots: {md_esc(html_name)}",
        "",
    ]


def comparison(study: StudyRecord) -> list[str]:
    """The comparison table, one row per experiment, the best value of each marked column in bold; a table per task
    (each with its own reference) when the study has both."""
    best = best_flags(study.experiments)
    groups = task_groups([e.row for e in study.experiments])
    lines = ["## Comparison", ""]
    for task, idx in groups.items():
        exps = [study.experiments[i] for i in idx]
        ref = next((e.name for e in exps if e.row.get("mark") == "reference"), None)
        heads = MULTILABEL_HEAD if task == "multilabel" else COMPARISON_HEAD
        head = heads[0].replace("vs reference", f"vs {md_esc(ref)}") if ref else heads[0]
        lowest = "Hamming loss" if task == "multilabel" else "ECE"
        if set(groups) != {"multiclass"}:
            lines += [f"### {md_esc(TASK_TITLES[task])}", ""]
        lines += [f"Best value of each column in **bold** ({lowest}: lowest). " + md_esc(legend_text(exps)), "", head, heads[1]]
        lines += [comparison_row(e, best) for e in exps]
        lines.append("")
    hints = [h for h in (seeds_hint(e.row) for e in study.experiments) if h]
    if hints:
        lines += [f"- {md_esc(h)}" for h in hints] + [""]
    return lines


def comparison_row(e: ExperimentRecord, best: dict[str, set[str]]) -> str:
    r = e.row

    def b(key: str, text: str) -> str:
        return f"**{md_esc(text)}**" if e.name in best.get(key, set()) else md_esc(text)

    size = f"{r['image_size']} px" if r.get("image_size") else "—"
    p_adj = f"{r['p_adjusted']:.3g}" if r.get("p_adjusted") is not None else "—"
    if e.multilabel:
        scores = " | ".join(b(k, cell_text(r, k)) for k in ("test_map_micro", "test_f1", "test_exact_match", "test_hamming"))
        return (
            f"| {md_esc(e.name)} | {md_esc(r.get('backbone'))} | {md_esc(r.get('weights'))} | {md_esc(r.get('strategy'))} | "
            f"{md_esc(r.get('precision') or '—')} | {size} | {b('trainable_params', int_text(r.get('trainable_params')))} | "
            f"{b('test_map', acc_text(r))} | {md_esc(ci_text(r, 'test_map'))} | {md_esc(versus_text(r))} | {p_adj} | {scores} | "
            f"{md_esc(r.get('threshold_mode') or '—')} | {b('train_seconds', time_text(r))} | "
            f"{b('inference_images_per_s', rate_text(r.get('inference_images_per_s')))} | {md_esc(status_text(e))} |"
        )
    return (
        f"| {md_esc(e.name)} | {md_esc(r.get('backbone'))} | {md_esc(r.get('weights'))} | {md_esc(r.get('strategy'))} | "
        f"{md_esc(r.get('precision') or '—')} | {size} | "
        f"{b('trainable_params', int_text(r.get('trainable_params')))} | {b('test_acc', acc_text(r))} | "
        f"{md_esc(ci_text(r))} | {md_esc(versus_text(r))} | {p_adj} | "
        f"{b('test_balanced_acc', balance_text(r, 'test_balanced_acc'))} | {b('test_macro_f1', balance_text(r, 'test_macro_f1'))} | "
        f"{b('test_ece', ece_text(r))} | "
        f"{b('train_seconds', time_text(r))} | {b('inference_images_per_s', rate_text(r.get('inference_images_per_s')))} | "
        f"{md_esc(status_text(e))} |"
    )


def pareto(ok: list[ExperimentRecord]) -> list[str]:
    """The experiments on the Pareto front of test accuracy (mAP for multi-label experiments) against training time,
    per task."""
    lines = []
    for idx in task_groups([e.row for e in ok]).values():
        exps = [ok[i] for i in idx if ok[i].row.get(ok[i].headline) is not None]  # a kind may not record the score
        if not exps:
            continue
        key = exps[0].headline
        lines += [f"## Pareto front (test {metric_name(key)} vs training time)", ""]
        for e in (exps[i] for i in study_front(exps, key)):
            lines.append(f"- {md_esc(e.name)}: {pct(e.row[key])} in {secs(e.row['train_seconds'])} s")
        lines.append("")
    return lines


def sweeps(groups: dict[str, list[SweepRow]]) -> list[str]:
    """One table per sweep: the swept values and the accuracies of each point."""
    lines = ["## Sweeps", ""]
    for group, rows in groups.items():
        keys = list(rows[0].values)
        name = metric_name(rows[0].metric)
        lines += [
            f"### {md_esc(group)}",
            "",
            "| " + " | ".join(md_esc(k) for k in keys) + f" | test {name} | final train {name} | best val {name} | n |",
            "|" + "---|" * (len(keys) + 4),
        ]
        for r in rows:
            vals = " | ".join(md_esc(r.values.get(k)) for k in keys)
            lines.append(f"| {vals} | {sweep_acc_text(r)} | {pct(r.train_score)} | {pct(r.best_val)} | {r.n} |")
        lines.append("")
    return lines


def pairs(e: ExperimentRecord) -> list[str]:
    """One experiment's most-confused pairs (nothing when it recorded no confusion matrix)."""
    lines = [f"### {md_esc(e.name)}", ""]
    cm = summed_confusion(e)
    if cm is not None:
        found = confused_pairs(cm)
        if found:
            names = e.class_names
            lines += ["| true | predicted as | count | share of the true class |", "|---|---|---:|---:|"]
            for t, p, c, s in found:
                lines.append(f"| {md_esc(class_label(names, t))} | {md_esc(class_label(names, p))} | {c} | {100 * s:.1f}% |")
        else:
            lines.append("No test image was misclassified.")
    lines.append("")
    return lines


def _share(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def labels(e: ExperimentRecord) -> list[str]:
    """One multi-label experiment: test mAP ± std, per label its threshold (chosen on validation), AP and decisions,
    the most-missed labels, the most frequent label pairs of the test set."""
    n = len(e.ok_runs)
    over = f" (summed over {n} seeds)" if n > 1 else ""
    lines = [f"### {md_esc(e.name)}", "", f"Test mAP {md_esc(acc_text(e.row))}; thresholds: {md_esc(e.row.get('threshold_mode') or '—')}.", ""]
    rows = label_rows(e)
    if not rows:
        return lines + ["No test predictions recorded (predictions.json).", ""]
    lines += [f"| label | threshold | test AP | test positives{over} | predicted | recall | precision |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {md_esc(r.name)} | {thresholds_text(r)} | {_share(r.ap)} | {r.positives} | {r.predicted} | {_share(r.recall)} | "
              f"{_share(r.precision)} |" for r in rows]
    missed = missed_labels(rows)
    lines += ["", "Most-missed labels (lowest recall at the thresholds): "
              + (", ".join(f"{md_esc(r.name)} ({r.missed} of {r.positives} missed, AP {_share(r.ap)})" for r in missed) or "none"), ""]
    co = cooccurrence(e)
    if co is not None:
        names = e.class_names
        found = sorted(((int(co[i, j]), i, j) for i in range(len(co)) for j in range(i + 1, len(co)) if co[i, j] > 0),
                       key=lambda t: (-t[0], t[1], t[2]))
        text = ", ".join(f"{md_esc(class_label(names, i))} + {md_esc(class_label(names, j))} ({c})" for c, i, j in found[:COMMON_PAIRS])
        lines += [f"Most frequent label pairs in the test set: {text or 'no image has two labels'}.", ""]
    return lines


def outside(ok: list[ExperimentRecord]) -> list[str]:
    """The top class of every outside image (rows) per experiment with ``predict:`` (columns); nothing without any."""
    files, cells = outside_table(ok)
    if not files:
        return []
    names = [e.name for e in ok if e.name in cells]
    lines = ["## Predictions on outside images", "", "| image | " + " | ".join(md_esc(n) for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for f in files:
        lines.append(f"| {md_esc(Path(f).name)} | " + " | ".join(md_esc(cells[n].get(f, "—")) for n in names) + " |")
    return lines + [""]


def lr_finder(ok: list[ExperimentRecord]) -> list[str]:
    """The LR finder's suggestion of every run that has a curve (``train.lr: find`` or ``transferlab lr-find``)."""
    found = [(run, path) for e in ok for run, path in lr_find_curves(e)]
    if not found:
        return []
    lines = ["## LR finder", ""]
    for run, path in found:
        record = read_json(path.with_suffix(".json")) if path.with_suffix(".json").is_file() else {}
        what = f"{record['suggestion']:.3g} ({record.get('rule', '?')})" if "suggestion" in record else "—"
        lines.append(f"- {md_esc(run)}: suggested lr {md_esc(what)} — curve {md_esc(path)}")
    return lines + [""]


def failures(study: StudyRecord) -> list[str]:
    """Every failed run with its error."""
    return ["## Failed runs", ""] + [f"- {md_esc(r.path.name)}: {md_esc(error_text(r))}" for r in study.failed_runs] + [""]
