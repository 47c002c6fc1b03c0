"""The Markdown summary of the report: the numbers of the HTML page without its plots.

Header, comparison table (best values in bold), Pareto front, sweep tables, most-confused pairs and
failed runs; it points to the HTML file for the plots. Every user-supplied string goes through
``md_esc``, so a name cannot break a table or turn into markup.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from transferlab.files import read_json
from transferlab.results.compare import ci_text, seeds_hint, versus_text
from transferlab.results.report.auto import auto_candidates, auto_stages, auto_summary, read_auto
from transferlab.results.report.outside import outside_table
from transferlab.results.report.records import ExperimentRecord, StudyRecord
from transferlab.results.report.stats import (
    SweepRow,
    best_flags,
    confused_pairs,
    lr_find_curves,
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
    pct,
    rate_text,
    secs,
    status_text,
    study_facts,
    sweep_acc_text,
    time_text,
)
from transferlab.results.search import read_searches, search_lines

__all__ = ["md_esc", "summary"]

COMPARISON_HEAD = [
    "| experiment | backbone | weights | strategy | precision | image size | trainable params | test accuracy (mean ± std, n) "
    "| 95 % CI | vs reference | p (Holm) | balanced accuracy | macro F1 | ECE | training time (s) | inference img/s | status |",
    "|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
]


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
        lines += ["## Most-confused pairs", ""] + [line for e in ok for line in pairs(e)]
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
    for head, rows in (auto_candidates(doc), auto_stages(doc)):
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
    """The comparison table, one row per experiment, the best value of each marked column in bold."""
    best = best_flags(study.experiments)
    ref = next((e.name for e in study.experiments if e.row.get("mark") == "reference"), None)
    head = COMPARISON_HEAD[0].replace("vs reference", f"vs {md_esc(ref)}") if ref else COMPARISON_HEAD[0]
    legend = legend_text(study)
    lines = ["## Comparison", "", "Best value of each column in **bold** (ECE: lowest). " + md_esc(legend), "", head, COMPARISON_HEAD[1]]
    lines += [comparison_row(e, best) for e in study.experiments]
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
    """The experiments on the Pareto front of test accuracy against training time."""
    lines = ["## Pareto front (test accuracy vs training time)", ""]
    for e in (ok[i] for i in study_front(ok)):
        lines.append(f"- {md_esc(e.name)}: {pct(e.row['test_acc'])} in {secs(e.row['train_seconds'])} s")
    lines.append("")
    return lines


def sweeps(groups: dict[str, list[SweepRow]]) -> list[str]:
    """One table per sweep: the swept values and the accuracies of each point."""
    lines = ["## Sweeps", ""]
    for group, rows in groups.items():
        keys = list(rows[0].values)
        lines += [
            f"### {md_esc(group)}",
            "",
            "| " + " | ".join(md_esc(k) for k in keys) + " | test accuracy | final train accuracy | best val accuracy | n |",
            "|" + "---|" * (len(keys) + 4),
        ]
        for r in rows:
            vals = " | ".join(md_esc(r.values.get(k)) for k in keys)
            lines.append(f"| {vals} | {sweep_acc_text(r)} | {pct(r.train_acc)} | {pct(r.best_val_acc)} | {r.n} |")
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
