"""The study report: one self-contained HTML file and a Markdown summary, from a study's run directories.

``transferlab report runs/<study>`` (or ``build_report``) reads every run folder of the study —
``metrics.json``, ``config.yaml``, ``history.csv``, ``predictions.json`` and ``test_samples.safetensors`` —
and writes ``report.html`` and ``report.md`` into the study folder:

* the comparison table (``transferlab.compare.collect``: mean ± std over seeds), sortable, the best value
  of each column marked;
* test accuracy against training time, with the Pareto front;
* learning curves (train/val loss and accuracy per epoch) of every experiment;
* confusion matrix, per-class accuracy and the most-confused pairs of every experiment;
* a grid of test images with predicted and true labels, wrong ones marked;
* for sweeps, the metrics against the swept value;
* failed runs with their error.

Every number comes from the run folders. Plots are PNGs embedded as ``data:`` URIs, the styles and the
small sorting script are inline, and a Content-Security-Policy forbids loading anything else, so the file
opens anywhere without a network. Every user-supplied string (experiment and class names, paths, errors)
is HTML-escaped (and ``$`` is escaped in plot labels, where matplotlib would read it as math).
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.config import SweepPoint
from transferlab.files import write_text
from transferlab.results.compare import experiment_row
from transferlab.rundir import Run, RunError, TestPredictions, load_test_predictions
from transferlab.rundir import read_study as read_runs

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
GRID_IMAGES = 16
"""Test images in each experiment's prediction grid (seed 001 shows 16) ..."""
GRID_WRONG = 8
"""... followed by up to this many misclassified ones."""
CONFUSED_PAIRS = 5
"""Most-confused (true, predicted) pairs listed per experiment."""


class ReportError(ValueError):
    """The study folder cannot be reported on. The message names the folder or file."""


# --------------------------------------------------------------------------------------------
# reading the study folder


@dataclass
class ExperimentRecord:
    """All runs (seeds) of one experiment and its row of the comparison table."""

    name: str
    runs: list[Run]
    row: dict[str, Any]
    color: str = "C0"

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def failed_runs(self) -> list[Run]:
        return [r for r in self.runs if not r.ok]

    @property
    def sweep(self) -> SweepPoint | None:
        for r in self.runs:
            if r.config is not None and r.config.sweep is not None:
                return r.config.sweep
        return None

    @property
    def class_names(self) -> list[str]:
        for r in self.ok_runs:
            if r.metrics.get("class_names"):
                return [str(c) for c in r.metrics["class_names"]]
        return []


@dataclass
class StudyRecord:
    """A study folder read back: name, where it came from, and its experiments in study order."""

    path: Path
    name: str
    source: str | None
    experiments: list[ExperimentRecord] = field(default_factory=list)

    @property
    def ok_experiments(self) -> list[ExperimentRecord]:
        return [e for e in self.experiments if e.ok_runs]


def read_study(study_dir: str | Path) -> StudyRecord:
    """Every run folder of ``study_dir`` (``*/metrics.json``), grouped by experiment in study order."""
    try:
        study = read_runs(study_dir)
    except (FileNotFoundError, RunError) as e:
        raise ReportError(str(e)) from None
    record = StudyRecord(study.path, study.name, study.source)
    palette = [f"C{i}" for i in range(10)]
    for i, exp in enumerate(study.experiments):
        record.experiments.append(ExperimentRecord(exp.name, exp.runs, experiment_row(exp), palette[i % len(palette)]))
    return record


# --------------------------------------------------------------------------------------------
# formatting helpers


def esc(value: Any) -> str:
    """HTML-escape any value (quotes included)."""
    return html.escape(str(value), quote=True)


def md_esc(value: Any) -> str:
    """Escape a value for a Markdown table cell or line: HTML specials, Markdown punctuation, newlines."""
    text = html.escape(str(value), quote=False)
    for ch in "\\`*_[]|#":
        text = text.replace(ch, "\\" + ch)
    return " ".join(text.split())


def _mpl(value: Any) -> str:
    """A label for matplotlib: ``$`` escaped (no math mode), never starting with ``_`` (legend-hidden)."""
    text = str(value).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _pct(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}%"


def _acc_text(row: dict[str, Any]) -> str:
    if row.get("test_acc") is None:
        return "—"
    n = row.get("n_seeds", 0)
    std = f" ± {100 * row['test_acc_std']:.2f}" if n > 1 else ""
    return f"{100 * row['test_acc']:.2f}%{std} (n={n})"


def _secs(v: float) -> str:
    """Seconds with a precision that suits their size (0.04, 3.21, 45.2, 612)."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _time_text(row: dict[str, Any]) -> str:
    if row.get("train_seconds") is None:
        return "—"
    n = row.get("n_seeds", 0)
    std = f" ± {_secs(row['train_seconds_std'])}" if n > 1 else ""
    return f"{_secs(row['train_seconds'])}{std}"


def _int_text(v: Any) -> str:
    return "—" if v is None else f"{int(v):,}"


def _rate_text(v: Any) -> str:
    return "—" if v is None else f"{v:,.0f}"


def _status_text(e: ExperimentRecord) -> str:
    failed = e.failed_runs
    if not failed:
        return "ok"
    if not e.ok_runs:
        return "failed"
    return f"{len(failed)} of {len(e.runs)} runs failed"


# --------------------------------------------------------------------------------------------
# figures (matplotlib without pyplot: no global state, no display needed)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _png(fig: Any, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" src="{_data_uri(png)}" alt="{esc(alt)}">'


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower or equal time and higher or equal accuracy
    (one of them strictly). ``points`` are (time, accuracy). Returned sorted by time."""
    front = []
    for i, (t, a) in enumerate(points):
        dominated = any(t2 <= t and a2 >= a and (t2 < t or a2 > a) for j, (t2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _scatter_figure(exps: list[ExperimentRecord], front: list[int]) -> bytes:
    fig = _figure(8, 5)
    ax = fig.add_subplot()
    times = [e.row["train_seconds"] for e in exps]
    accs = [100 * e.row["test_acc"] for e in exps]
    for k, (e, t, a) in enumerate(zip(exps, times, accs)):
        multi = e.row.get("n_seeds", 0) > 1
        ax.errorbar(
            t, a, xerr=e.row["train_seconds_std"] if multi else None, yerr=100 * e.row["test_acc_std"] if multi else None,
            fmt="o", color=e.color, ms=8, capsize=3, label=_mpl(e.name),
        )
        ax.annotate(_mpl(e.name), (t, a), textcoords="offset points", xytext=(6, 6 if k % 2 == 0 else -13), fontsize=8)  # alternate: fewer overlaps
    if front:
        fx, fy = [times[i] for i in front], [accs[i] for i in front]
        ax.plot(fx, fy, "--", color="0.3", drawstyle="steps-post", lw=1.2, label="Pareto front")
        ax.scatter(fx, fy, s=220, facecolors="none", edgecolors="0.3", lw=1.2)
    if len(times) > 1 and min(times) > 0 and max(times) / min(times) > 20:
        ax.set_xscale("log")
    ax.margins(x=0.18, y=0.12)  # room for the labels
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy vs training time (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if len(exps) <= 12:
        ax.legend(fontsize=8, loc="best")
    return _png(fig)


def _epoch_stats(runs: list[Run], key: str) -> tuple[list[float], list[float], list[float]]:
    """Per epoch: epochs, mean and std of ``key`` over the runs that have that epoch."""
    by_epoch: dict[float, list[float]] = {}
    for r in runs:
        for row in r.history:
            v = row.get(key, math.nan)
            if not math.isnan(v):
                by_epoch.setdefault(row.get("epoch", math.nan), []).append(v)
    epochs = sorted(k for k in by_epoch if not math.isnan(k))
    means = [statistics.fmean(by_epoch[e]) for e in epochs]
    stds = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
    return epochs, means, stds


def _curves_figure(e: ExperimentRecord) -> bytes | None:
    runs = [r for r in e.ok_runs if r.history]
    if not runs:
        return None
    from matplotlib.ticker import MaxNLocator

    fig = _figure(6.2, 2.7)
    axes = fig.subplots(1, 2)
    for ax, metric, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        for split, style in (("train", "-"), ("val", "--")):
            ep, mean, std = _epoch_stats(runs, f"{split}_{metric}")
            if not ep:
                continue
            ax.plot(ep, mean, style, marker="o", ms=3, label=f"{split} {label}", color="C0" if split == "train" else "C1")
            if len(runs) > 1:
                ax.fill_between(ep, np.subtract(mean, std), np.add(mean, std), alpha=0.2, color="C0" if split == "train" else "C1")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    seeds = f" — mean ± std over {len(runs)} seeds" if len(runs) > 1 else ""
    fig.suptitle(_mpl(e.name) + seeds, fontsize=10)
    return _png(fig)


def _val_overview_figure(exps: list[ExperimentRecord]) -> bytes | None:
    fig = _figure(8, 4)
    ax = fig.add_subplot()
    drawn = False
    for e in exps:
        ep, mean, _ = _epoch_stats([r for r in e.ok_runs if r.history], "val_acc")
        if ep:
            ax.plot(ep, [100 * m for m in mean], marker="o", ms=3, color=e.color, label=_mpl(e.name))
            drawn = True
    if not drawn:
        return None
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("validation accuracy per epoch, all experiments")
    ax.grid(alpha=0.3)
    if len(exps) <= 15:
        ax.legend(fontsize=8)
    return _png(fig)


def _confusion(e: ExperimentRecord) -> np.ndarray | None:
    mats = [np.asarray(r.metrics["confusion_matrix"], dtype=np.int64) for r in e.ok_runs if r.metrics.get("confusion_matrix")]
    if not mats or len({m.shape for m in mats}) != 1:
        return None
    return np.sum(mats, axis=0)


def _confusion_figure(cm: np.ndarray, names: list[str], title: str) -> bytes:
    n = len(cm)
    side = min(max(4.0, 0.38 * n + 1.8), 14)
    fig = _figure(side + 1, side)
    ax = fig.add_subplot()
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    if n <= 40:
        labels = [_mpl(c) for c in names]
        ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def _per_class(e: ExperimentRecord) -> tuple[np.ndarray, np.ndarray] | None:
    vals = [r.metrics["per_class_acc"] for r in e.ok_runs if r.metrics.get("per_class_acc")]
    if not vals or len({len(v) for v in vals}) != 1:
        return None
    arr = np.asarray(vals, dtype=float)
    return arr.mean(0), (arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(arr.shape[1]))


def _per_class_figure(mean: np.ndarray, std: np.ndarray, names: list[str], title: str) -> bytes:
    n = len(mean)
    fig = _figure(5, min(max(3.0, 0.28 * n + 1.2), 14))
    ax = fig.add_subplot()
    y = np.arange(n)
    ax.barh(y, 100 * mean, xerr=100 * std if std.any() else None, color="C2", capsize=2)
    if n <= 40:
        ax.set_yticks(y, [_mpl(c) for c in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def confused_pairs(cm: np.ndarray, k: int = CONFUSED_PAIRS) -> list[tuple[int, int, int, float]]:
    """The ``k`` largest off-diagonal cells: (true, predicted, count, share of the true class)."""
    rows = cm.sum(1)
    cells = [(int(cm[i, j]), i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [(i, j, c, c / rows[i] if rows[i] else 0.0) for c, i, j in cells[:k]]


def _image_png(img: Any, min_side: int = 64) -> bytes:
    """uint8 C×H×W tensor/array -> PNG, upscaled (nearest) to at least ``min_side`` pixels."""
    from PIL import Image

    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    pil = Image.fromarray(np.ascontiguousarray(arr))
    scale = max(1, math.ceil(min_side / max(pil.size)))
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _sweep_numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _final(run: Run, key: str) -> float | None:
    vals = [row[key] for row in run.history if not math.isnan(row.get(key, math.nan))]
    return vals[-1] if vals else None


def _sweep_rows(exps: list[ExperimentRecord]) -> list[dict[str, Any]]:
    out = []
    for e in exps:
        sw = e.sweep
        if sw is None or not e.ok_runs:
            continue
        accs = [r.metrics["test_acc"] for r in e.ok_runs]
        trains = [v for v in (_final(r, "train_acc") for r in e.ok_runs) if v is not None]
        vals = [r.metrics.get("best_val") for r in e.ok_runs if r.metrics.get("monitor") == "val_acc" and r.metrics.get("best_val") is not None]
        out.append(
            {
                "experiment": e,
                "values": sw.values,
                "test_acc": statistics.fmean(accs),
                "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "train_acc": statistics.fmean(trains) if trains else None,
                "best_val_acc": statistics.fmean(vals) if vals else None,
                "n": len(accs),
            }
        )
    return out


def _sweep_figure(group: str, rows: list[dict[str, Any]]) -> tuple[bytes, str]:
    keys = list(rows[0]["values"])
    numeric = [k for k in keys if _sweep_numeric([r["values"].get(k) for r in rows])]
    xkey = numeric[0] if numeric else keys[0]
    others = [k for k in keys if k != xkey]
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = ", ".join(f"{k}={r['values'].get(k)}" for k in others)
        series.setdefault(label, []).append(r)
    xs_all = [r["values"].get(xkey) for r in rows]
    is_num = _sweep_numeric(xs_all)
    cats = list(dict.fromkeys(map(str, xs_all)))
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    for si, (label, rs) in enumerate(series.items()):
        rs = sorted(rs, key=lambda r: r["values"].get(xkey) if is_num else cats.index(str(r["values"].get(xkey))))
        xs = [r["values"].get(xkey) if is_num else cats.index(str(r["values"].get(xkey))) for r in rs]
        prefix = f"{label}: " if label else ""
        color = f"C{si % 10}"
        ax.errorbar(xs, [100 * r["test_acc"] for r in rs], yerr=[100 * r["test_acc_std"] for r in rs], fmt="-o", color=color,
                    capsize=3, label=_mpl(prefix + "test accuracy"))
        train = [(x, r["train_acc"]) for x, r in zip(xs, rs) if r["train_acc"] is not None]
        if train:
            ax.plot([x for x, _ in train], [100 * v for _, v in train], ":s", color=color, ms=4, label=_mpl(prefix + "final train accuracy"))
        val = [(x, r["best_val_acc"]) for x, r in zip(xs, rs) if r["best_val_acc"] is not None]
        if val:
            ax.plot([x for x, _ in val], [100 * v for _, v in val], "--^", color=color, ms=4, alpha=0.7, label=_mpl(prefix + "best val accuracy"))
    if not is_num:
        ax.set_xticks(range(len(cats)), [_mpl(c) for c in cats], rotation=30, ha="right")
    ax.set_xlabel(_mpl(xkey))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(_mpl(f"{group}: accuracy vs {xkey}"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig), xkey


# --------------------------------------------------------------------------------------------
# the HTML page

_CSS = """
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
.exp{background:#fff;border:1px solid #d8dde5;border-radius:6px;padding:.4rem 1rem 1rem;margin:1rem 0}
.note{color:#666;font-style:italic}
"""

_JS = """
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

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _best_flags(exps: list[ExperimentRecord]) -> dict[str, set[str]]:
    """For each marked column, the experiments holding its best value (ties all marked)."""
    rules = {"test_acc": max, "train_seconds": min, "inference_images_per_s": max, "trainable_params": min}
    out: dict[str, set[str]] = {}
    ok = [e for e in exps if e.row.get("test_acc") is not None]
    for key, pick in rules.items():
        vals = [e.row[key] for e in ok if e.row.get(key) is not None]
        if len(vals) < 2:
            out[key] = set()
            continue
        best = pick(vals)
        out[key] = {e.name for e in ok if e.row.get(key) == best}
    return out


def _table_html(study: StudyRecord, best: dict[str, set[str]]) -> str:
    head = [
        "experiment", "backbone", "weights", "strategy", "trainable params", "test accuracy (mean ± std, n)",
        "training time (s)", "inference img/s", "status",
    ]
    lines = ['<div class="scroll"><table class="sortable" id="comparison"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for e in study.experiments:
        r = e.row

        def num(key: str, text: str, sort_value: Any, e: ExperimentRecord = e) -> str:
            cls = "num best" if e.name in best.get(key, set()) else "num"
            sv = "-Infinity" if sort_value is None else repr(float(sort_value))
            return f'<td class="{cls}" data-sort="{esc(sv)}">{esc(text)}</td>'

        status = _status_text(e)
        err = ""
        if e.failed_runs:
            first_err = str(e.failed_runs[0].record.error or "no error recorded")
            short = first_err if len(first_err) <= 160 else first_err[:157] + "..."
            err = f'<div class="err">{esc(short)}</div>'  # in full under "Failed runs"
        cells = [
            f"<td>{esc(e.name)}</td>",
            f"<td>{esc(r.get('backbone'))}</td>",
            f"<td>{esc(r.get('weights'))}</td>",
            f"<td>{esc(r.get('strategy'))}</td>",
            num("trainable_params", _int_text(r.get("trainable_params")), r.get("trainable_params")),
            num("test_acc", _acc_text(r), r.get("test_acc")),
            num("train_seconds", _time_text(r), r.get("train_seconds")),
            num("inference_images_per_s", _rate_text(r.get("inference_images_per_s")), r.get("inference_images_per_s")),
            f"<td>{esc(status)}{err}</td>",
        ]
        cls = ' class="failed"' if e.failed_runs else ""
        lines.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    lines.append("</tbody></table></div>")
    return "\n".join(lines)


def _grid_html(preds: TestPredictions, names: list[str], n_grid: int, n_wrong: int) -> str:
    if preds.images is None or not preds.positions:
        return '<p class="note">no test images stored with this run\'s predictions</p>'
    items = list(zip(preds.positions, preds.images))
    shown = items[:n_grid]
    shown_pos = {p for p, _ in shown}
    wrong = [(p, img) for p, img in items if preds.true[p] != preds.pred[p] and p not in shown_pos][:n_wrong]

    def label(i: int) -> str:
        return names[i] if 0 <= i < len(names) else str(i)

    def cell(pos: int, img: Any) -> str:
        t, p, prob = int(preds.true[pos]), int(preds.pred[pos]), float(preds.prob[pos])
        ok = t == p
        mark = "" if ok else '<span class="mark">✗ wrong</span><br>'
        alt = f"test image {pos}: predicted {label(p)}, true {label(t)}"
        return (
            f'<figure class="cell{"" if ok else " wrong"}">{_img(_image_png(img), alt, "")}'
            f"<figcaption>{mark}pred: {esc(label(p))} ({100 * prob:.0f}%)<br>true: {esc(label(t))}</figcaption></figure>"
        )

    n_bad = sum(1 for p, _ in shown if preds.true[p] != preds.pred[p])
    out = [f"<p>{len(shown)} random test images ({n_bad} misclassified, marked red):</p>", '<div class="grid">']
    out += [cell(p, img) for p, img in shown]
    out.append("</div>")
    if wrong:
        out += [f"<p>more misclassified test images ({len(wrong)}):</p>", '<div class="grid">']
        out += [cell(p, img) for p, img in wrong]
        out.append("</div>")
    return "\n".join(out)


@dataclass
class Report:
    """What ``build_report`` wrote."""

    html_path: Path
    md_path: Path
    sections: list[str]


def build_report(
    study_dir: str | Path,
    html_path: str | Path | None = None,
    md_path: str | Path | None = None,
    grid_images: int = GRID_IMAGES,
    grid_wrong: int = GRID_WRONG,
) -> Report:
    """Write the HTML report and the Markdown summary of ``study_dir`` (default: inside it)."""
    study_dir = Path(study_dir)
    study = read_study(study_dir)
    html_path = Path(html_path) if html_path else study_dir / REPORT_HTML
    md_path = Path(md_path) if md_path else study_dir / REPORT_MD
    ok = study.ok_experiments
    best = _best_flags(study.experiments)
    n_runs = sum(len(e.runs) for e in study.experiments)
    n_failed = sum(len(e.failed_runs) for e in study.experiments)
    md: list[str] = [f"# Study report: {md_esc(study.name)}", ""]
    body: list[str] = []
    sections: list[tuple[str, str]] = []

    # header
    first = next((r.metrics for e in ok for r in e.ok_runs), {})
    datasets = sorted({f"{r.metrics.get('dataset')}" for e in ok for r in e.ok_runs})
    devices = sorted({str(r.metrics.get("device")) for e in ok for r in e.ok_runs if r.metrics.get("device")})
    version = first.get("code_version", {})
    meta = [
        f"{len(study.experiments)} experiments, {n_runs} runs ({n_failed} failed)",
        "dataset: " + ", ".join(datasets) if datasets else "",
        "device: " + ", ".join(devices) if devices else "",
        "transferlab " + str(version.get("transferlab", "?")) + (f", commit {version['git_commit']}" if version.get("git_commit") else ""),
    ]
    meta = [m for m in meta if m]
    header = [f"<h1>Study report: {esc(study.name)}</h1>", '<p class="meta">' + esc(" · ".join(meta)) + "<br>"]
    header.append(f"runs: <code>{esc(study_dir.resolve())}</code>")
    if study.source:
        header.append(f"<br>study file: <code>{esc(study.source)}</code>")
    header.append(f"<br>generated {esc(datetime.datetime.now().isoformat(timespec='seconds'))}</p>")
    body += header
    md += [md_esc(" · ".join(meta)), "", f"Runs: {md_esc(study_dir.resolve())} — full report with plots: {md_esc(html_path.name)}", ""]

    # comparison table
    sections.append(("comparison", "Comparison"))
    body += ['<h2 id="comparison">Comparison</h2>',
             '<p class="meta">Click a column to sort. ★ marks the best value of a column (highest accuracy and throughput, '
             "shortest training time, fewest trainable parameters). Accuracy and time: mean ± std over the seeds that finished (n).</p>",
             _table_html(study, best)]
    md += ["## Comparison", "", "Best value of each column in **bold**.", "",
           "| experiment | backbone | weights | strategy | trainable params | test accuracy (mean ± std, n) | training time (s) | inference img/s | status |",
           "|---|---|---|---|---:|---:|---:|---:|---|"]
    for e in study.experiments:
        r = e.row

        def b(key: str, text: str, e: ExperimentRecord = e) -> str:
            return f"**{md_esc(text)}**" if e.name in best.get(key, set()) else md_esc(text)

        md.append(
            f"| {md_esc(e.name)} | {md_esc(r.get('backbone'))} | {md_esc(r.get('weights'))} | {md_esc(r.get('strategy'))} | "
            f"{b('trainable_params', _int_text(r.get('trainable_params')))} | {b('test_acc', _acc_text(r))} | "
            f"{b('train_seconds', _time_text(r))} | {b('inference_images_per_s', _rate_text(r.get('inference_images_per_s')))} | "
            f"{md_esc(_status_text(e))} |"
        )
    md.append("")

    # accuracy vs time
    if ok:
        sections.append(("pareto", "Accuracy vs time"))
        points = [(e.row["train_seconds"], e.row["test_acc"]) for e in ok]
        front = pareto_front(points)
        body += ['<h2 id="pareto">Accuracy vs training time</h2>', _img(_scatter_figure(ok, front), "test accuracy vs training time scatter plot")]
        items = "".join(f"<li>{esc(ok[i].name)}: {_pct(ok[i].row['test_acc'])} in {_secs(ok[i].row['train_seconds'])} s</li>" for i in front)
        body.append(f"<p>Pareto front (no other experiment is both faster and more accurate):</p><ul>{items}</ul>")
        md += ["## Pareto front (test accuracy vs training time)", ""]
        md += [f"- {md_esc(ok[i].name)}: {_pct(ok[i].row['test_acc'])} in {_secs(ok[i].row['train_seconds'])} s" for i in front]
        md.append("")

    # sweeps
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in _sweep_rows(study.experiments):
        groups.setdefault(row["experiment"].sweep.group, []).append(row)
    if groups:
        sections.append(("sweeps", "Sweeps"))
        body.append('<h2 id="sweeps">Sweeps</h2>')
        md += ["## Sweeps", ""]
        for group, rows in groups.items():
            png, xkey = _sweep_figure(group, rows)
            keys = list(rows[0]["values"])
            body += [f"<h3>{esc(group)}</h3>", _img(png, f"{group}: accuracy vs {xkey}")]
            th = "".join(f"<th>{esc(k)}</th>" for k in keys)
            body.append(f'<table class="sortable"><thead><tr>{th}<th>test accuracy</th><th>final train accuracy</th><th>best val accuracy</th><th>n</th></tr></thead><tbody>')
            md += [f"### {md_esc(group)}", "", "| " + " | ".join(md_esc(k) for k in keys) + " | test accuracy | final train accuracy | best val accuracy | n |",
                   "|" + "---|" * (len(keys) + 4)]
            for r in rows:
                acc = f"{_pct(r['test_acc'])}" + (f" ± {100 * r['test_acc_std']:.2f}" if r["n"] > 1 else "")
                vals = "".join(f"<td>{esc(r['values'].get(k))}</td>" for k in keys)
                body.append(f'<tr>{vals}<td class="num" data-sort="{r["test_acc"]!r}">{esc(acc)}</td><td class="num">{esc(_pct(r["train_acc"]))}</td>'
                            f'<td class="num">{esc(_pct(r["best_val_acc"]))}</td><td class="num">{r["n"]}</td></tr>')
                md.append("| " + " | ".join(md_esc(r["values"].get(k)) for k in keys) + f" | {acc} | {_pct(r['train_acc'])} | {_pct(r['best_val_acc'])} | {r['n']} |")
            body.append("</tbody></table>")
            md.append("")

    # learning curves
    if ok:
        sections.append(("curves", "Learning curves"))
        body.append('<h2 id="curves">Learning curves</h2>')
        overview = _val_overview_figure(ok)
        if overview:
            body.append(_img(overview, "validation accuracy per epoch of all experiments"))
        body.append('<div class="row">')
        for e in ok:
            png = _curves_figure(e)
            body.append(_img(png, f"learning curves of {e.name}") if png else f'<p class="note">{esc(e.name)}: no history.csv</p>')
        body.append("</div>")

    # per experiment: confusion, per-class, confused pairs, predictions
    if ok:
        sections.append(("experiments", "Per experiment"))
        body.append('<h2 id="experiments">Per experiment: confusion matrix, per-class accuracy, predictions</h2>')
        md += ["## Most-confused pairs", ""]
        for e in ok:
            names = e.class_names
            n_ok = len(e.ok_runs)
            over = f" (summed over {n_ok} seeds)" if n_ok > 1 else ""
            body.append(f'<section class="exp"><h3>{esc(e.name)}</h3>')
            body.append(f'<p class="meta">{esc(e.row.get("backbone"))} · {esc(e.row.get("weights"))} · {esc(e.row.get("strategy"))} · '
                        f"test accuracy {esc(_acc_text(e.row))}</p>")
            cm = _confusion(e)
            pcs = _per_class(e)
            body.append('<div class="row">')
            if cm is not None:
                body.append(_img(_confusion_figure(cm, names, _mpl(f"{e.name}: confusion matrix{over}")), f"confusion matrix of {e.name}"))
            if pcs is not None:
                body.append(_img(_per_class_figure(pcs[0], pcs[1], names, _mpl(f"{e.name}: per-class accuracy")), f"per-class accuracy of {e.name}"))
            body.append("</div>")
            md += [f"### {md_esc(e.name)}", ""]
            if cm is not None:
                pairs = confused_pairs(cm)
                if pairs:
                    label = lambda i: names[i] if i < len(names) else str(i)  # noqa: E731
                    rows_html = "".join(
                        f'<tr><td>{esc(label(t))}</td><td>{esc(label(p))}</td><td class="num">{c}</td><td class="num">{100 * s:.1f}%</td></tr>'
                        for t, p, c, s in pairs
                    )
                    body.append(f"<h4>Most-confused pairs{esc(over)}</h4><table><thead><tr><th>true</th><th>predicted as</th><th>count</th>"
                                f"<th>share of the true class</th></tr></thead><tbody>{rows_html}</tbody></table>")
                    md += ["| true | predicted as | count | share of the true class |", "|---|---|---:|---:|"]
                    md += [f"| {md_esc(label(t))} | {md_esc(label(p))} | {c} | {100 * s:.1f}% |" for t, p, c, s in pairs]
                else:
                    body.append("<p>No test image was misclassified.</p>")
                    md.append("No test image was misclassified.")
            md.append("")
            run = e.ok_runs[0]
            try:
                preds = load_test_predictions(run.path)
            except RunError as err:
                preds, note = None, str(err)
            else:
                note = f"{run.path.name}: no predictions.json (run written by an older transferlab, or a multi-process run)"
            seed_note = f" — seed {run.seed}" if n_ok > 1 else ""
            body.append(f"<h4>Test predictions{esc(seed_note)}</h4>")
            body.append(_grid_html(preds, names, grid_images, grid_wrong) if preds is not None else f'<p class="note">{esc(note)}</p>')
            body.append("</section>")

    # failures
    failed = [(e, r) for e in study.experiments for r in e.failed_runs]
    if failed:
        sections.append(("failed", "Failed runs"))
        body.append('<h2 id="failed">Failed runs</h2><table><thead><tr><th>run</th><th>error</th></tr></thead><tbody>')
        md += ["## Failed runs", ""]
        for e, r in failed:
            error = r.record.error or "no error recorded"
            body.append(f'<tr class="failed"><td>{esc(r.path.name)}</td><td class="err">{esc(error)}</td></tr>')
            md.append(f"- {md_esc(r.path.name)}: {md_esc(error)}")
        body.append("</tbody></table>")
        md.append("")

    nav = "<nav>" + "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in sections) + "</nav>"
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(study.name)} — transferlab report</title><style>{_CSS}</style></head>\n"
        f"<body>{nav}<main>\n" + "\n".join(body) + f"\n</main><script>{_JS}</script></body></html>\n"
    )
    html_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(html_path, page)
    write_text(md_path, "\n".join(md).rstrip() + "\n")
    return Report(html_path, md_path, [sid for sid, _ in sections])
