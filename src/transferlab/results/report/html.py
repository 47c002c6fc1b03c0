"""The HTML page of the report: one self-contained file, its sections, styles, sorting script and escaping.

``sections`` builds the page's sections from the study (each an id, a title for the navigation bar and
its HTML lines), ``page`` puts them together. The plots are PNGs embedded as ``data:`` URIs, the styles
and the small sorting script are inline, and a Content-Security-Policy forbids loading anything else,
so the file opens anywhere without a network. Every user-supplied string (experiment and class names,
paths, errors) goes through ``esc``.
"""

from __future__ import annotations

import datetime
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferlab.results import stats
from transferlab.results.compare import TASK_TITLES, cell_text, seeds_hint, task_groups, versus_text
from transferlab.results.report import figures
from transferlab.results.report.auto import auto_summary, auto_tables, read_auto
from transferlab.results.report.outside import activation_images, outside_predictions, outside_table
from transferlab.results.report.records import ExperimentRecord, StudyRecord
from transferlab.results.report.stats import (
    LabelRow,
    SweepRow,
    best_flags,
    confused_pairs,
    cooccurrence,
    label_rows,
    lr_find_curves,
    missed_labels,
    per_class_accuracy,
    per_class_ap,
    study_front,
    summed_confusion,
    summed_reliability,
    sweep_groups,
)
from transferlab.results.report.text import (
    MISSING,
    acc_text,
    balance_text,
    class_label,
    ece_text,
    error_text,
    int_text,
    interval_text,
    labels_text,
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
from transferlab.results.search import SearchRecord, read_searches, search_lines
from transferlab.rundir import RunError, TestPredictions, load_test_predictions

__all__ = ["CSP", "Section", "esc", "page", "sections"]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
main{max-width:1280px;margin:0 auto;padding:1.5rem 2rem 4rem}
h1{font-size:1.7rem;margin:.2rem 0}h2{margin-top:2.4rem;border-bottom:2px solid #d8dde5;padding-bottom:.3rem}
h3{margin:1.6rem 0 .5rem}.meta{color:#555;font-size:.92rem}.meta code{font-size:.85rem}
nav{position:sticky;top:0;background:#1d2430;padding:.5rem 2rem;z-index:2}nav a{color:#e7ebf2;margin-right:1.2rem;text-decoration:none;font-size:.92rem}
table{border-collapse:collapse;background:#fff;font-size:.9rem;margin:.6rem 0}
th,td{border:1px solid #d8dde5;padding:.35rem .6rem;text-align:left;vertical-align:top}
th{background:#eef1f5}table.sortable th{cursor:pointer;user-select:none}
table.sortable th::after{content:" \\2195";color:#999}table.sortable th[data-dir=asc]::after{content:" \\2191"}table.sortable th[data-dir=desc]::after{content:" \\2193"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.best{background:#e3f4e1;font-weight:600}td.best::before{content:"\\2605 ";color:#2e7d32}
.scroll{overflow-x:auto}tr.failed td{background:#fdecea}td .err{max-width:26rem}.err{color:#b3261e;white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.82rem}
img.plot{max-width:100%;background:#fff;border:1px solid #d8dde5;margin:.4rem 0}
.row{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
.grid{display:flex;flex-wrap:wrap;gap:.5rem}
figure.cell{margin:0;padding:4px;background:#fff;border:3px solid #6aa56a;border-radius:4px;width:104px;font-size:.72rem;text-align:center}
figure.cell.wrong{border-color:#d33}figure.cell img{width:96px;height:96px;image-rendering:pixelated;display:block}
figure.cell figcaption{overflow-wrap:anywhere}figure.cell .mark{font-weight:700;color:#d33}
figure.cell.multi{width:150px}figure.cell .right{color:#2e7d32}figure.cell .false{color:#d33}figure.cell .missed{color:#8a5a00}
.exp{background:#fff;border:1px solid #d8dde5;border-radius:6px;padding:.4rem 1rem 1rem;margin:1rem 0}
.note{color:#666;font-style:italic}
td .ci{display:block;color:#555;font-size:.8rem}td.mark{white-space:nowrap}td.mark .test{display:block;color:#666;font-size:.78rem}
td.better{color:#1b5e20;font-weight:600}td.worse{color:#b3261e}td.same{color:#555}td.reference{font-weight:600}
ul.hints{font-size:.9rem;color:#333}td.wrap{max-width:16rem;overflow-wrap:anywhere}
"""  # noqa: E501 - written into the page as it stands: one line per group of rules

# Sorts every table.sortable by the clicked column (numerically when both cells parse, by ``data-sort``
# when a cell has one), and records on <body> how many images there are and how many did not decode,
# which the headless-browser check reads.
JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var dir = th.dataset.dir === "desc" ? "asc" : "desc";
      table.querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = dir;
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var key = function (r) { var c = r.cells[col]; return c.dataset.sort !== undefined ? c.dataset.sort : c.textContent; };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        return dir === "asc" ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.dataset.images = String(imgs.length);
  document.body.dataset.brokenImages = String(broken.length);
});
"""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
"""Inline styles and script, ``data:`` images, nothing else: the page cannot load from the network."""

COMPARISON_HEAD = [
    "experiment", "backbone", "strategy", "test accuracy (mean ± std, n; 95 % CI)", "vs reference", "balanced accuracy",
    "macro F1", "ECE", "training time (s)", "inference img/s", "trainable params", "weights", "precision", "image size", "status",
]
"""The results first (so a narrow window shows the conclusions), what ran after them."""
ERROR_PREVIEW = 160
"""Characters of the first error shown in the comparison table (in full under "Failed runs")."""


def esc(value: Any) -> str:
    """HTML-escape any value (quotes included)."""
    return html.escape(str(value), quote=True)


def img(png: bytes, alt: str, cls: str = "plot") -> str:
    """An ``<img>`` with the PNG embedded."""
    return f'<img class="{cls}" src="{figures.data_uri(png)}" alt="{esc(alt)}">'


@dataclass
class Section:
    """One section of the page: its anchor id, its title in the navigation bar, and its HTML lines."""

    id: str
    title: str
    lines: list[str]


def sections(study: StudyRecord, grid_images: int, grid_wrong: int) -> list[Section]:
    """The page's sections, in order; those with nothing to show are left out."""
    out = [Section("comparison", "Comparison", comparison(study))]
    if (doc := read_auto(study.path)) is not None:
        out.insert(0, Section("auto", "Auto", auto_section(doc)))
    ok = study.ok_experiments
    groups = sweep_groups(study.experiments)
    if ok:
        out.append(Section("pareto", _pareto_title(ok), pareto(ok)))
    if groups:
        out.append(Section("sweeps", "Sweeps", sweeps(groups)))
    if ok:
        out.append(Section("curves", "Learning curves", curves(ok)))
        if lines := outside(ok):
            out.append(Section("outside", "Outside images", lines))
        what = "confusion matrix, per-class accuracy, predictions"
        if any(e.multilabel for e in ok):  # multi-label experiments show labels, not classes
            what = "per-class accuracy / average precision, labels, predictions"
        lines = [f'<h2 id="experiments">Per experiment: {what}</h2>']
        lines += [line for e in ok for line in experiment(e, grid_images, grid_wrong)]
        out.append(Section("experiments", "Per experiment", lines))
    if found := read_searches(study.path):
        out.append(Section("search", "Search", search_section(found)))
    if study.failed_runs:
        out.append(Section("failed", "Failed runs", failures(study)))
    return out


def auto_section(doc: dict[str, Any]) -> list[str]:
    """``transferlab auto``: the chosen model, the candidates (scores, where each was dropped and why), time per stage."""
    lines = ['<h2 id="auto">Auto: how this model was chosen</h2><ul>' + "".join(f"<li>{esc(t)}</li>" for t in auto_summary(doc)) + "</ul>"]
    for head, rows in auto_tables(doc):
        lines.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"
                     + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</tbody></table>")
    return lines


def search_section(found: list[SearchRecord]) -> list[str]:
    """Per search: the best trial (chosen on validation) and its test accuracy, then Optuna's three plots."""
    lines = ['<h2 id="search">Search</h2>']
    for rec in found:
        lines.append(f"<h3>{esc(rec.experiment)}</h3><ul>" + "".join(f"<li>{esc(t)}</li>" for t in search_lines(rec)) + "</ul>")
        titles = {"history": "optimization history", "importances": "parameter importances", "parallel": "parallel coordinates"}
        lines += [img(png, f"{rec.experiment}: {titles.get(name, name)}") for name, png in rec.figures.items()]
    return lines


def page(study: StudyRecord, parts: list[Section]) -> str:
    """The whole HTML document: head (CSP, styles), navigation bar, header, sections, script."""
    nav = "<nav>" + "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in parts) + "</nav>"
    body = header(study) + [line for s in parts for line in s.lines]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(study.name)} — transferlab report</title><style>{CSS}</style></head>\n"
        f"<body>{nav}<main>\n" + "\n".join(body) + f"\n</main><script>{JS}</script></body></html>\n"
    )


def header(study: StudyRecord) -> list[str]:
    """Title, the study's facts, where its runs and study file are, when the page was generated."""
    lines = [f"<h1>Study report: {esc(study.name)}</h1>", '<p class="meta">' + esc(" · ".join(study_facts(study))) + "<br>"]
    lines.append(f"runs: <code>{esc(study.path.resolve())}</code>")
    if study.source:
        lines.append(f"<br>study file: <code>{esc(study.source)}</code>")
    lines.append(f"<br>generated {esc(datetime.datetime.now().isoformat(timespec='seconds'))}</p>")
    return lines


# --------------------------------------------------------------------------------------------
# the comparison table


MULTILABEL_HEAD = [
    "experiment", "backbone", "strategy", "test mAP (mean ± std, n; 95 % CI)", "vs reference", "micro mAP", "F1 (at the thresholds)",
    "exact match", "Hamming loss", "thresholds", "training time (s)", "inference img/s", "trainable params", "weights", "precision",
    "image size", "status",
]
"""The comparison table of multi-label experiments: their scores in place of the accuracies."""


def comparison(study: StudyRecord) -> list[str]:
    """The sortable comparison table, one row per experiment, best values marked, each row tested against the
    reference; below it, how many seeds would resolve the differences that are not distinguishable. A study with
    both tasks gets a table per task (each with its own reference: an mAP is never compared with an accuracy)."""
    best = best_flags(study.experiments)
    groups = task_groups([e.row for e in study.experiments])
    lines = ['<h2 id="comparison">Comparison</h2>']
    for n, (task, idx) in enumerate(groups.items()):
        exps = [study.experiments[i] for i in idx]
        if set(groups) != {"multiclass"}:
            lines.append(f"<h3>{esc(TASK_TITLES[task])}</h3>")
        lines += _task_table(exps, best, task, "comparison" if n == 0 else f"comparison-{task}")
    hints = [h for h in (seeds_hint(e.row) for e in study.experiments) if h]
    if hints:
        lines.append('<ul class="hints" id="seeds-needed">' + "".join(f"<li>{esc(h)}</li>" for h in hints) + "</ul>")
    return lines


def _task_table(exps: list[ExperimentRecord], best: dict[str, set[str]], task: str, table_id: str) -> list[str]:
    """The comparison table of the experiments of one task, with its legend."""
    ref = next((e.name for e in exps if e.row.get("mark") == "reference"), None)
    heads = MULTILABEL_HEAD if task == "multilabel" else COMPARISON_HEAD
    head = "".join(f"<th>{esc(f'vs {ref}' if h == 'vs reference' and ref else h)}</th>" for h in heads)
    table = [f'<div class="scroll"><table class="sortable" id="{esc(table_id)}"><thead><tr>{head}</tr></thead><tbody>']
    table += [comparison_row(e, best) for e in exps]
    table.append("</tbody></table></div>")
    if task == "multilabel":
        marks = ("highest mAP, micro mAP, F1, exact match and throughput; lowest Hamming loss, shortest training time, fewest "
                 "trainable parameters). F1, exact match and Hamming loss are at the thresholds chosen on validation")
    else:
        marks = ("highest accuracy, balanced accuracy, macro F1 and throughput; lowest ECE, shortest training time, fewest "
                 "trainable parameters)")
    return [
        f'<p class="meta">Click a column to sort. ★ marks the best value of a column ({marks}. '
        "Metrics and time: mean ± std over the seeds that finished (n). " + esc(legend_text(exps)) + "</p>",
        "\n".join(table),
    ]


MARK_CLASS = {"better": "better", "worse": "worse", "not distinguishable": "same", "reference": "reference"}


def comparison_row(e: ExperimentRecord, best: dict[str, set[str]]) -> str:
    """One experiment's row; numeric cells carry their value in ``data-sort`` (a missing one sorts last)."""
    r = e.row

    def num(key: str, text: str, sort_value: Any, extra: str = "") -> str:
        cls = "num best" if e.name in best.get(key, set()) else "num"
        sv = "-Infinity" if sort_value is None else repr(float(sort_value))
        return f'<td class="{cls}" data-sort="{esc(sv)}">{esc(text)}{extra}</td>'

    err = ""
    if e.failed_runs:
        first_err = error_text(e.failed_runs[0])
        short = first_err if len(first_err) <= ERROR_PREVIEW else first_err[: ERROR_PREVIEW - 3] + "..."
        err = f'<div class="err">{esc(short)}</div>'  # in full under "Failed runs"
    key = e.headline
    ci = f'<span class="ci">{esc(interval_text(r))}</span>' if r.get(key) is not None else ""
    if e.multilabel:
        scores = [num(k, cell_text(r, k), r.get(k)) for k in ("test_map_micro", "test_f1", "test_exact_match", "test_hamming")]
        scores.append(f"<td>{esc(r.get('threshold_mode') or MISSING)}</td>")
    else:
        scores = [
            num("test_balanced_acc", balance_text(r, "test_balanced_acc"), r.get("test_balanced_acc")),
            num("test_macro_f1", balance_text(r, "test_macro_f1"), r.get("test_macro_f1")),
            num("test_ece", ece_text(r), r.get("test_ece")),
        ]
    cells = [
        f"<td>{esc(e.name)}</td>",
        f"<td>{esc(r.get('backbone'))}</td>",
        f"<td>{esc(r.get('strategy'))}</td>",
        num(key, acc_text(r), r.get(key), ci),
        versus_cell(r),
        *scores,
        num("train_seconds", time_text(r), r.get("train_seconds")),
        num("inference_images_per_s", rate_text(r.get("inference_images_per_s")), r.get("inference_images_per_s")),
        num("trainable_params", int_text(r.get("trainable_params")), r.get("trainable_params")),
        f'<td class="wrap">{esc(r.get("weights"))}</td>',
        f"<td>{esc(r.get('precision') or MISSING)}</td>",
        num("image_size", f"{r['image_size']} px" if r.get("image_size") else MISSING, r.get("image_size")),
        f"<td>{esc(status_text(e))}{err}</td>",
    ]
    cls = ' class="failed"' if e.failed_runs else ""
    return f"<tr{cls}>" + "".join(cells) + "</tr>"


def versus_cell(r: dict[str, Any]) -> str:
    """The row against the reference: the mark and the Holm-adjusted p, the test below; sorts by adjusted p."""
    mark = r.get("mark")
    if mark is None:
        return f'<td class="mark" data-sort="Infinity">{MISSING}</td>'
    text = versus_text(r, short=True)
    test = f'<span class="test">{esc(r["test"])}, n={r["test_n"]}</span>' if r.get("test") else ""
    sort = -1.0 if mark == "reference" else r.get("p_adjusted", 2.0)
    return f'<td class="mark {MARK_CLASS.get(mark, "")}" data-sort="{sort!r}">{esc(text)}{test}</td>'


# --------------------------------------------------------------------------------------------
# the study's plots: accuracy vs time, sweeps, learning curves


def _pareto_title(ok: list[ExperimentRecord]) -> str:
    """``Accuracy vs time``, ``mAP vs time`` or both (a study with both tasks)."""
    names = dict.fromkeys(metric_name(e.headline) for e in ok)
    return " / ".join(n.capitalize() if n == "accuracy" else n for n in names) + " vs time"


def pareto(ok: list[ExperimentRecord]) -> list[str]:
    """Accuracy (mAP for multi-label experiments; a plot per task) against training time, and the experiments on the
    Pareto front."""
    lines = [f'<h2 id="pareto">{esc(_pareto_title(ok))}</h2>'.replace(" time<", " training time<")]
    for idx in task_groups([e.row for e in ok]).values():
        exps = [ok[i] for i in idx if ok[i].row.get(ok[i].headline) is not None]  # a kind may not record the score
        if not exps:
            continue
        key = exps[0].headline
        name = metric_name(key)
        front = study_front(exps, key)
        items = "".join(f"<li>{esc(e.name)}: {pct(e.row[key])} in {secs(e.row['train_seconds'])} s</li>" for e in (exps[i] for i in front))
        better = "more accurate" if key == "test_acc" else f"higher in {name}"
        lines += [
            img(figures.scatter_figure(exps, front, key), f"test {name} vs training time scatter plot"),
            f"<p>Pareto front (no other experiment is both faster and {better}):</p><ul>{items}</ul>",
        ]
    return lines


def sweeps(groups: dict[str, list[SweepRow]]) -> list[str]:
    """For each sweep: accuracy against the swept value, and a sortable table of its points."""
    lines = ['<h2 id="sweeps">Sweeps</h2>']
    for group, rows in groups.items():
        png, xkey = figures.sweep_figure(group, rows)
        keys = list(rows[0].values)
        name = metric_name(rows[0].metric)
        th = "".join(f"<th>{esc(k)}</th>" for k in keys)
        lines += [
            f"<h3>{esc(group)}</h3>",
            img(png, f"{group}: {name} vs {xkey}"),
            f'<table class="sortable"><thead><tr>{th}<th>test {esc(name)}</th><th>final train {esc(name)}</th>'
            f"<th>best val {esc(name)}</th><th>n</th></tr></thead><tbody>",
        ]
        for r in rows:
            vals = "".join(f"<td>{esc(r.values.get(k))}</td>" for k in keys)
            lines.append(
                f'<tr>{vals}<td class="num" data-sort="{r.score!r}">{esc(sweep_acc_text(r))}</td>'
                f'<td class="num">{esc(pct(r.train_score))}</td><td class="num">{esc(pct(r.best_val))}</td>'
                f'<td class="num">{r.n}</td></tr>'
            )
        lines.append("</tbody></table>")
    return lines


def curves(ok: list[ExperimentRecord]) -> list[str]:
    """Validation accuracy of all experiments in one plot, then each experiment's learning curves."""
    lines = ['<h2 id="curves">Learning curves</h2>']
    for idx in task_groups([e.row for e in ok]).values():  # one plot per task: an mAP is not an accuracy
        exps = [ok[i] for i in idx]
        key = "val_" + exps[0].headline.removeprefix("test_")
        overview = figures.val_overview_figure(exps, key)
        if overview:
            lines.append(img(overview, f"validation {metric_name(key)} per epoch of all experiments"))
    lines.append('<div class="row">')
    for e in ok:
        png = figures.curves_figure(e)
        lines.append(img(png, f"learning curves of {e.name}") if png else f'<p class="note">{esc(e.name)}: no history.csv</p>')
    lines.append("</div>")
    return lines


# --------------------------------------------------------------------------------------------
# per experiment: confusion matrix, per-class accuracy, confused pairs, test predictions


def experiment(e: ExperimentRecord, grid_images: int, grid_wrong: int) -> list[str]:
    """One experiment's box: what it is, its confusion and per-class plots, pairs, a prediction grid (multi-label:
    ``multilabel_experiment``)."""
    names = e.class_names
    n_ok = len(e.ok_runs)
    over = f" (summed over {n_ok} seeds)" if n_ok > 1 else ""
    lines = [
        f'<section class="exp"><h3>{esc(e.name)}</h3>',
        f'<p class="meta">{esc(e.row.get("backbone"))} · {esc(e.row.get("weights"))} · {esc(e.row.get("strategy"))} · '
        f"test {esc(metric_name(e.headline))} {esc(acc_text(e.row))}</p>",
    ]
    if e.multilabel:
        return lines + multilabel_experiment(e, over, grid_images, grid_wrong) + outside_images(e) + ["</section>"]
    cm = summed_confusion(e)
    pcs = per_class_accuracy(e)
    lines.append('<div class="row">')
    if cm is not None:
        png = figures.confusion_figure(cm, names, f"{e.name}: confusion matrix{over}")
        lines.append(img(png, f"confusion matrix of {e.name}"))
    if pcs is not None:
        png = figures.per_class_figure(pcs[0], pcs[1], names, f"{e.name}: per-class accuracy")
        lines.append(img(png, f"per-class accuracy of {e.name}"))
    lines.append("</div>")
    lines += calibration(e, over)
    if cm is not None:
        lines.append(pairs_table(cm, names, over))
    lines += predictions(e, names, grid_images, grid_wrong)
    lines += outside_images(e)
    lines.append("</section>")
    return lines


def calibration(e: ExperimentRecord, over: str) -> list[str]:
    """The reliability diagram (before and after temperature scaling) and the LR-finder curves of one experiment."""
    lines = ['<div class="row">']
    before = summed_reliability(e)
    if before is not None:
        png = figures.reliability_figure(before, summed_reliability(e, calibrated=True), f"{e.name}: reliability{over}")
        lines.append(img(png, f"reliability diagram of {e.name}"))
    for run, path in lr_find_curves(e):
        lines.append(f'<img class="plot" src="{figures.data_uri(path.read_bytes())}" alt="{esc(f"LR finder curve of {run}")}">')
    lines.append("</div>")
    if len(lines) == 2:
        return []
    r = e.row
    if r.get("test_ece") is not None:
        nll, brier = r.get("test_nll"), r.get("test_brier")
        extra = f", NLL {nll:.3f}, Brier {brier:.3f}" if nll is not None and brier is not None else ""
        lines.append(f'<p class="meta">calibration of the test predictions: ECE (15 bins, L1) {esc(ece_text(r))}{esc(extra)}</p>')
    return lines


def pairs_table(cm: Any, names: list[str], over: str) -> str:
    """The most-confused (true, predicted) pairs, or a note that nothing was misclassified."""
    pairs = confused_pairs(cm)
    if not pairs:
        return "<p>No test image was misclassified.</p>"
    rows = "".join(
        f"<tr><td>{esc(class_label(names, t))}</td><td>{esc(class_label(names, p))}</td>"
        f'<td class="num">{c}</td><td class="num">{100 * s:.1f}%</td></tr>'
        for t, p, c, s in pairs
    )
    return (
        f"<h4>Most-confused pairs{esc(over)}</h4><table><thead><tr><th>true</th><th>predicted as</th><th>count</th>"
        f"<th>share of the true class</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def multilabel_experiment(e: ExperimentRecord, over: str, grid_images: int, grid_wrong: int) -> list[str]:
    """A multi-label experiment's plots and tables: per-class AP, label co-occurrence, one row per label (thresholds,
    recall, precision), the most-missed labels, and the grid of test images with every predicted label."""
    names = e.class_names
    lines = ['<div class="row">']
    aps = per_class_ap(e)
    if aps is not None:
        png = figures.per_class_figure(aps[0], aps[1], names, f"{e.name}: per-class average precision", "test average precision (%)")
        lines.append(img(png, f"per-class average precision of {e.name}"))
    co = cooccurrence(e)
    if co is not None:
        lines.append(img(figures.cooccurrence_figure(co, names, f"{e.name}: label co-occurrence (test set)"), f"label co-occurrence of {e.name}"))
    lines.append("</div>")
    rows = label_rows(e)
    if rows:
        lines += [label_table(rows, over), missed_table(missed_labels(rows), over)]
    return lines + predictions(e, names, grid_images, grid_wrong)


def _num(v: float | None, percent: bool = True) -> str:
    return MISSING if v is None else f"{100 * v:.1f}%" if percent else f"{v:.3f}"


def label_table(rows: list[LabelRow], over: str) -> str:
    """Per label: its threshold (chosen on validation), test AP, test positives, predicted, recall, precision, F1."""
    body = "".join(
        f"<tr><td>{esc(r.name)}</td><td class=\"num\">{esc(thresholds_text(r))}</td>"
        f'<td class="num">{esc(_num(r.ap) + (f" ± {100 * r.ap_std:.1f}" if r.ap is not None and r.ap_std else ""))}</td>'
        f'<td class="num">{r.positives}</td><td class="num">{r.predicted}</td><td class="num">{esc(_num(r.recall))}</td>'
        f'<td class="num">{esc(_num(r.precision))}</td><td class="num">{esc(_num(r.f1, percent=False))}</td></tr>'
        for r in rows
    )
    return (
        f'<h4>Per label: thresholds (chosen on validation) and test decisions{esc(over)}</h4><div class="scroll">'
        '<table class="sortable labels"><thead><tr><th>label</th><th>threshold</th><th>test AP</th><th>test positives</th>'
        f"<th>predicted</th><th>recall</th><th>precision</th><th>F1</th></tr></thead><tbody>{body}</tbody></table></div>"
    )


def missed_table(rows: list[LabelRow], over: str) -> str:
    """The most-missed labels: lowest recall at their thresholds (then lowest AP)."""
    if not rows:
        return "<p>No label was missed on a test image.</p>"
    body = "".join(
        f'<tr><td>{esc(r.name)}</td><td class="num">{r.missed} of {r.positives}</td><td class="num">{esc(_num(r.recall))}</td>'
        f'<td class="num">{esc(_num(r.ap))}</td><td class="num">{esc(thresholds_text(r))}</td></tr>'
        for r in rows
    )
    return (
        f"<h4>Most-missed labels{esc(over)}</h4><table class=\"missed\"><thead><tr><th>label</th><th>missed</th><th>recall</th>"
        f"<th>test AP</th><th>threshold</th></tr></thead><tbody>{body}</tbody></table>"
    )


def predictions(e: ExperimentRecord, names: list[str], grid_images: int, grid_wrong: int) -> list[str]:
    """The test-image grid of the experiment's first finished run (or why there is none)."""
    run = e.ok_runs[0]
    try:
        preds = load_test_predictions(run.path)
    except RunError as err:
        preds, note = None, str(err)
    else:
        note = f"{run.path.name}: no predictions.json (run written by an older transferlab, or a multi-process run)"
    seed_note = f" — seed {run.seed}" if len(e.ok_runs) > 1 else ""
    return [
        f"<h4>Test predictions{esc(seed_note)}</h4>",
        grid(preds, names, grid_images, grid_wrong) if preds is not None else f'<p class="note">{esc(note)}</p>',
    ]


def grid(preds: TestPredictions, names: list[str], n_grid: int, n_wrong: int) -> str:
    """The first ``n_grid`` stored test images, then up to ``n_wrong`` misclassified ones not shown yet (multi-label:
    an image is wrong unless its predicted label set is exactly the true one)."""
    if preds.images is None or not preds.positions:
        return '<p class="note">no test images stored with this run\'s predictions</p>'
    multi = preds.true.ndim == 2
    right = stats.per_image_correct(preds.true, preds.pred)
    cell = multilabel_cell if multi else grid_cell
    items = list(zip(preds.positions, preds.images, strict=False))  # as stored; a short list is not this page's problem
    shown = items[:n_grid]
    shown_pos = {p for p, _ in shown}
    wrong = [(p, im) for p, im in items if not right[p] and p not in shown_pos][:n_wrong]
    n_bad = sum(1 for p, _ in shown if not right[p])
    what = "not exactly the true label set" if multi else "misclassified"
    out = [f"<p>{len(shown)} random test images ({n_bad} {what}, marked red):</p>", '<div class="grid">']
    out += [cell(preds, names, p, im) for p, im in shown]
    out.append("</div>")
    if wrong:
        out += [f"<p>more test images {'with a wrong label set' if multi else 'misclassified'} ({len(wrong)}):</p>", '<div class="grid">']
        out += [cell(preds, names, p, im) for p, im in wrong]
        out.append("</div>")
    return "\n".join(out)


def multilabel_cell(preds: TestPredictions, names: list[str], pos: int, image: Any) -> str:
    """One test image of a multi-label run: every predicted label with its probability, ✓ when the image has it and ✗
    when not, then the labels it has that were missed; red unless the predicted set is exactly the true one."""
    true, pred, prob = preds.true[pos].astype(bool), preds.pred[pos].astype(bool), preds.prob[pos]
    ok = bool((true == pred).all())
    order = sorted((int(k) for k in pred.nonzero()[0]), key=lambda k: -float(prob[k]))
    said = "".join(
        f'<span class="{"right" if true[k] else "false"}">{"✓" if true[k] else "✗"} {esc(class_label(names, k))} '
        f"({100 * float(prob[k]):.0f}%)</span><br>" for k in order
    ) or "predicted: none<br>"
    missed = (true & ~pred).nonzero()[0]
    miss = f'<span class="missed">missed: {esc(labels_text(names, missed))}</span>' if len(missed) else ""
    alt = f"test image {pos}: predicted {labels_text(names, order)}, true {labels_text(names, true.nonzero()[0])}"
    return (
        f'<figure class="cell multi{"" if ok else " wrong"}">{img(figures.image_png(image), alt, "")}'
        f"<figcaption>{said}{miss}</figcaption></figure>"
    )


def grid_cell(preds: TestPredictions, names: list[str], pos: int, image: Any) -> str:
    """One test image with its predicted label (and probability) and its true label; red when wrong."""
    t, p, prob = int(preds.true[pos]), int(preds.pred[pos]), float(preds.prob[pos])
    ok = t == p
    mark = "" if ok else '<span class="mark">✗ wrong</span><br>'
    alt = f"test image {pos}: predicted {class_label(names, p)}, true {class_label(names, t)}"
    return (
        f'<figure class="cell{"" if ok else " wrong"}">{img(figures.image_png(image), alt, "")}'
        f"<figcaption>{mark}pred: {esc(class_label(names, p))} ({100 * prob:.0f}%)<br>"
        f"true: {esc(class_label(names, t))}</figcaption></figure>"
    )


# --------------------------------------------------------------------------------------------
# outside images: the experiments' predict: and activations: sections


def outside(ok: list[ExperimentRecord]) -> list[str]:
    """One row per outside image, one column per experiment with ``predict:``: its top class (seed 003's table)."""
    files, cells = outside_table(ok)
    if not files:
        return []
    names = [e.name for e in ok if e.name in cells]
    head = "<th>image</th>" + "".join(f"<th>{esc(n)}</th>" for n in names)
    rows = [
        f'<tr><td title="{esc(f)}">{esc(Path(f).name)}</td>'
        + "".join(f"<td>{esc(cells[n].get(f, '—'))}</td>" for n in names) + "</tr>"
        for f in files
    ]
    return [
        '<h2 id="outside">Predictions on outside images</h2>',
        "<p class=\"meta\">Top class (probability) of every image file the experiments' <code>predict:</code> sections name, "
        "from each experiment's first finished run; the images got each run's own size and normalisation.</p>",
        f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>',
    ]


def outside_images(e: ExperimentRecord) -> list[str]:
    """The experiment's grid of outside images with their predictions, then its activation maps."""
    lines = []
    found = outside_predictions(e)
    if found is not None:
        lines.append(f"<h4>Outside images — {esc(found.run)}</h4>")
        if found.problem:
            lines.append(f'<p class="err">{esc(found.problem)}</p>')
        elif found.png is not None:
            lines.append(img(found.png, f"predictions of {e.name} on outside images"))
        lines += [f'<p class="err">{esc(f)}: {esc(err)}</p>' for f, err in found.errors.items()]
    for a in activation_images(e):
        if a.png is None:
            lines.append(f'<p class="err">activations of {esc(a.file)}: {esc(a.error)}</p>')
            continue
        caption = f"{a.file}: {', '.join(a.layers)} → {a.predicted} ({100 * (a.prob or 0):.1f}%)"
        lines += [f'<h4>Activation maps — {esc(caption)}</h4>', img(a.png, f"activation maps of {e.name} for {a.file}")]
    return lines


# --------------------------------------------------------------------------------------------
# failures


def failures(study: StudyRecord) -> list[str]:
    """Every failed run with its full error."""
    lines = ['<h2 id="failed">Failed runs</h2><table><thead><tr><th>run</th><th>error</th></tr></thead><tbody>']
    for r in study.failed_runs:
        lines.append(f'<tr class="failed"><td>{esc(r.path.name)}</td><td class="err">{esc(error_text(r))}</td></tr>')
    lines.append("</tbody></table>")
    return lines
