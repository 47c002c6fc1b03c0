"""Every picture of the report, as PNG bytes: the plots (matplotlib) and the test images (Pillow).

Accuracy (mAP for multi-label experiments) against training time with the Pareto front, learning curves, the
validation overview, the confusion matrix, per-class accuracy (average precision), the label co-occurrence, sweep
plots, and each test image of the prediction grids;
``data_uri`` turns the bytes into what the page embeds.

matplotlib is used without pyplot (no global state, no display needed) and, like Pillow, imported
inside the functions: the command line imports the report module, and should not pay for matplotlib
when it only runs a study. Every label goes through ``mpl_label``, as names come from the user.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np

from transferlab.engine.figures import draw_confusion, draw_count_matrix
from transferlab.results.report.records import ExperimentRecord
from transferlab.results.report.stats import SweepRow, epoch_stats
from transferlab.results.report.text import metric_name

__all__ = [
    "confusion_figure",
    "cooccurrence_figure",
    "curves_figure",
    "data_uri",
    "image_png",
    "mpl_label",
    "per_class_figure",
    "scatter_figure",
    "sweep_figure",
    "val_overview_figure",
]


def mpl_label(value: Any) -> str:
    """A label for matplotlib: ``$`` escaped (no math mode), never starting with ``_`` (legend-hidden)."""
    text = str(value).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:`` URI, the only image source the page's Content-Security-Policy allows."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _png(fig: Any, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


MAX_EPOCH_TICKS = 12
"""Up to this many epochs every one is a tick; beyond, matplotlib picks integer ticks."""


def _integer_epochs(ax: Any, epochs: list[float]) -> None:
    """Epochs are integers: a tick at each epoch (a short run's axis would otherwise read 0.945 0.960 … 1.050),
    half an epoch of room on either side."""
    from matplotlib.ticker import MaxNLocator

    values = sorted({int(e) for e in epochs if e == int(e)})
    if values and len(values) <= MAX_EPOCH_TICKS:
        ax.set_xticks(values)
        ax.set_xlim(values[0] - 0.5, values[-1] + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _outside_legend(fig: Any, ax: Any, where: str = "right", fontsize: int = 8, ncols: int = 1) -> None:
    """The legend outside the axes (``right``: beside them, ``below``: under them), where it hides no data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        loc = "outside right upper" if where == "right" else "outside lower center"
        fig.legend(handles, labels, loc=loc, fontsize=fontsize, ncols=ncols, frameon=False)


# --------------------------------------------------------------------------------------------
# the study: accuracy vs time, validation accuracy of every experiment


MARKERS = {"reference": "*", "better": "^", "worse": "v", "not distinguishable": "o", "no test": "o"}
"""The marker of a point in the accuracy-vs-time plot: how its experiment compares with the reference."""


def _ci_err(row: dict[str, Any], key: str, scale: float = 1.0) -> Any:
    """Asymmetric error bar (below, above) of ``key``'s 95 % interval; ``None`` for one run."""
    if row.get(f"{key}_ci_low") is None:
        return None
    mean = row[key]
    return [[scale * (mean - row[f"{key}_ci_low"])], [scale * (row[f"{key}_ci_high"] - mean)]]


def _mark_label(row: dict[str, Any]) -> str:
    mark = row.get("mark")
    if mark in (None, "no test"):
        return ""
    if mark == "reference":
        return " (reference)"
    return f" ({mark}, p={row['p_adjusted']:.2g})"


def scatter_figure(exps: list[ExperimentRecord], front: list[int], key: str = "test_acc") -> bytes:
    """Test accuracy (``key``: ``test_map`` for multi-label experiments) against training time, error bars its 95 % interval
    over seeds (time: ± std), the marker how each compares with the reference (★ reference, ▲ better, ▼ worse, ● not
    distinguishable), the Pareto front ``front`` drawn."""
    fig = _figure(8, 5.5)
    ax = fig.add_subplot()
    name = metric_name(key)
    times = [e.row["train_seconds"] for e in exps]
    accs = [100 * e.row[key] for e in exps]
    for k, (e, t, a) in enumerate(zip(exps, times, accs, strict=True)):
        ax.errorbar(
            # time: ± std (its interval over two or three seeds reaches below zero and is not what is compared)
            t, a, xerr=e.row["train_seconds_std"] if e.row.get("n_seeds", 0) > 1 else None, yerr=_ci_err(e.row, key, 100),
            fmt=MARKERS.get(e.row.get("mark", ""), "o"), color=e.color, ms=12 if e.row.get("mark") == "reference" else 8,
            capsize=3, label=mpl_label(e.name + _mark_label(e.row)),
        )
        # labels alternate above and below their point: fewer overlaps
        ax.annotate(mpl_label(e.name), (t, a), textcoords="offset points", xytext=(6, 6 if k % 2 == 0 else -13), fontsize=8)
    if front:
        fx, fy = [times[i] for i in front], [accs[i] for i in front]
        ax.plot(fx, fy, "--", color="0.3", drawstyle="steps-post", lw=1.2, label="Pareto front")
        ax.scatter(fx, fy, s=260, facecolors="none", edgecolors="0.3", lw=1.2)
    if len(times) > 1 and min(times) > 0 and max(times) / min(times) > 20:
        ax.set_xscale("log")  # a cached-feature probe next to full fine-tuning spans orders of magnitude
    ax.margins(x=0.18, y=0.12)  # room for the labels
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(f"test {name} (%)")
    ax.set_title(f"test {name} vs training time (error bars: {name} 95 % CI, time ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    if len(exps) <= 12:  # beyond that the legend would be longer than the plot; the annotations still name the points
        _outside_legend(fig, ax, "below", ncols=2)
    return _png(fig)


def val_overview_figure(exps: list[ExperimentRecord], key: str = "val_acc") -> bytes | None:
    """Validation accuracy (``key``: ``val_map`` for multi-label experiments) per epoch of every experiment in one plot;
    ``None`` when none has a history."""
    fig = _figure(8, 4)
    ax = fig.add_subplot()
    name = metric_name(key)
    epochs: list[float] = []
    for e in exps:
        ep, mean, _ = epoch_stats([r for r in e.ok_runs if r.history], key)
        if ep:
            ax.plot(ep, [100 * m for m in mean], marker="o", ms=4, color=e.color, label=mpl_label(e.name))
            epochs += ep
    if not epochs:
        return None
    _integer_epochs(ax, epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {name} (%)")
    ax.set_title(f"validation {name} per epoch, all experiments", fontsize=10)
    ax.grid(alpha=0.3)
    if len(exps) <= 15:
        _outside_legend(fig, ax, "below", ncols=3)
    return _png(fig)


# --------------------------------------------------------------------------------------------
# one experiment: learning curves, confusion matrix, per-class accuracy, test images


def curves_figure(e: ExperimentRecord) -> bytes | None:
    """Train/val loss and accuracy (mAP for multi-label) per epoch (mean ± std band over seeds); ``None`` without a history."""
    runs = [r for r in e.ok_runs if r.history]
    if not runs:
        return None
    if any("wise_ft" in r.metrics for r in runs):  # kind: soup with interpolate: a curve over alpha, not epochs
        return wise_ft_figure(e.name, runs)
    probe_epochs = {r.metrics["lp_ft"]["probe_epochs"] for r in runs if "lp_ft" in r.metrics}
    fig = _figure(6.2, 3.0)
    axes = fig.subplots(1, 2)
    score = e.headline.removeprefix("test_")  # acc, or map: the history's columns
    for ax, metric, label in ((axes[0], "loss", "loss"), (axes[1], score, metric_name(e.headline))):
        epochs: list[float] = []
        for split, style, color in (("train", "-", "C0"), ("val", "--", "C1")):
            ep, mean, std = epoch_stats(runs, f"{split}_{metric}")
            if not ep:
                continue
            epochs += ep
            ax.plot(ep, mean, style, marker="o", ms=4 if len(ep) > 1 else 6, label=split, color=color)
            if len(runs) > 1:
                ax.fill_between(ep, np.subtract(mean, std), np.add(mean, std), alpha=0.2, color=color)
            if len(ep) == 1:  # a single epoch is a point: it says its value
                ax.annotate(f"{split} {mean[0]:.3g}", (ep[0], mean[0]), textcoords="offset points",
                            xytext=(8, 4 if split == "train" else -10), fontsize=7, color=color)
                ax.margins(y=0.2)  # room for the labels
        for probe in probe_epochs:  # strategy lp_ft: where the probe phase ends and everything trains
            ax.axvline(probe + 0.5, color="0.5", ls=":", lw=1)
            ax.annotate("probe | fine-tune", (probe + 0.5, 1), xycoords=("data", "axes fraction"), xytext=(0, -10),
                        textcoords="offset points", ha="center", fontsize=6, color="0.4")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        _integer_epochs(ax, epochs)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=7, frameon=False)
    seeds = f" — mean ± std over {len(runs)} seeds" if len(runs) > 1 else ""
    fig.suptitle(mpl_label(e.name) + seeds, fontsize=10)
    return _png(fig)


def wise_ft_figure(name: str, runs: list[Any]) -> bytes:
    """WiSE-FT (``kind: soup`` with ``interpolate``): validation and test accuracy (multi-label: mAP) against alpha per
    run, the alpha chosen on validation marked."""
    fig = _figure(4.6, 3.0)
    ax = fig.subplots()
    score = "acc"
    for i, r in enumerate(runs):
        w = r.metrics["wise_ft"]
        alphas = [row["alpha"] for row in w["curve"]]
        score = "map" if "val_map" in w["curve"][0] else "acc"  # the curve of a multi-label soup is in mAP
        suffix = f" (seed {r.seed})" if len(runs) > 1 else ""
        ax.plot(alphas, [row[f"val_{score}"] for row in w["curve"]], "--", marker="o", ms=4, color=f"C{2 * i + 1}", label=f"val{suffix}")
        ax.plot(alphas, [row[f"test_{score}"] for row in w["curve"]], "-", marker="o", ms=4, color=f"C{2 * i}", label=f"test{suffix}")
        ax.axvline(w["chosen_alpha"], color="0.5", ls=":", lw=1)
    ax.set_xlabel("alpha (0: base run, 1: fine-tuned soup)")
    ax.set_ylabel("mAP" if score == "map" else "accuracy")
    ax.grid(alpha=0.3)
    _outside_legend(fig, ax)
    fig.suptitle(f"{mpl_label(name)}: WiSE-FT (dotted: alpha chosen on val)", fontsize=10)
    return _png(fig)


def confusion_figure(cm: np.ndarray, names: list[str], title: str) -> bytes:
    """The confusion matrix coloured by share of the true class; counts written in when it is small."""
    n = len(cm)
    side = min(max(4.0, 0.38 * n + 1.8), 14)
    fig = _figure(side + 1, side)
    ax = fig.add_subplot()
    im = draw_confusion(ax, cm, [mpl_label(c) for c in names])
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    ax.set_title(mpl_label(title), fontsize=10)
    return _png(fig)


def per_class_figure(mean: np.ndarray, std: np.ndarray, names: list[str], title: str, xlabel: str = "test accuracy (%)") -> bytes:
    """Per-class test accuracy (or average precision: ``xlabel``) as horizontal bars, with ± std over seeds when there
    are several; a NaN (a class without test positives) has no bar."""
    n = len(mean)
    fig = _figure(5, min(max(3.0, 0.28 * n + 1.2), 14))
    ax = fig.add_subplot()
    y = np.arange(n)
    ax.barh(y, np.nan_to_num(100 * mean), xerr=100 * std if np.nan_to_num(std).any() else None, color="C2", capsize=2)
    if n <= 40:
        ax.set_yticks(y, [mpl_label(c) for c in names], fontsize=8)
    ax.invert_yaxis()  # first class on top, as in the confusion matrix
    ax.set_xlim(0, 100)
    ax.set_xlabel(xlabel)
    ax.set_title(mpl_label(title), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def cooccurrence_figure(counts: np.ndarray, names: list[str], title: str) -> bytes:
    """Label co-occurrence: cell (i, j) coloured by the share of the images with label i that also have label j (the
    diagonal: all of them), counts written in when it is small."""
    n = len(counts)
    side = min(max(4.0, 0.38 * n + 1.8), 14)
    fig = _figure(side + 1, side)
    ax = fig.add_subplot()
    own = np.diag(counts)[:, None]
    share = np.divide(counts, own, out=np.zeros(counts.shape, dtype=float), where=own > 0)
    im = draw_count_matrix(ax, counts, share, [mpl_label(c) for c in names], "Purples", "also has label", "test images with label")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the row label's images")
    ax.set_title(mpl_label(title), fontsize=10)
    return _png(fig)


def reliability_figure(before: dict[str, list[float]], after: dict[str, list[float]] | None, title: str) -> bytes:
    """Reliability diagram: accuracy against mean confidence per confidence bin (bars: share of the images), the
    diagonal is perfect calibration; with temperature scaling the calibrated bins beside them."""
    fig = _figure(4.6, 4.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
    n_bins = len(before["count"])
    edges = np.linspace(0, 1, n_bins + 1)
    ax.bar(edges[:-1], np.asarray(before["count"]) / max(sum(before["count"]), 1), width=1 / n_bins, align="edge",
           color="0.85", label="share of images")
    for rel, color, label in ((before, "C0", "test"), (after, "C3", "after temperature scaling")):
        if rel is None:
            continue
        count = np.asarray(rel["count"], dtype=float)
        keep = count > 0
        conf, acc = np.asarray(rel["confidence"])[keep] / count[keep], np.asarray(rel["correct"])[keep] / count[keep]
        ax.plot(conf, acc, marker="o", ms=4, color=color, label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (top class probability)", ylabel="accuracy")
    ax.set_title(mpl_label(title), fontsize=10)
    _outside_legend(fig, ax, "below", fontsize=7, ncols=2)
    return _png(fig)


def image_png(img: Any, min_side: int = 64) -> bytes:
    """uint8 C×H×W tensor/array -> PNG, upscaled (nearest) to at least ``min_side`` pixels."""
    from PIL import Image

    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    pil = Image.fromarray(np.ascontiguousarray(arr))
    scale = max(1, math.ceil(min_side / max(pil.size)))
    if scale > 1:  # nearest: a 16-pixel image stays sharp instead of being blurred by the browser
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# sweeps


def _is_numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def sweep_figure(group: str, rows: list[SweepRow]) -> tuple[bytes, str]:
    """Accuracy against the swept value of one sweep, and that value's key.

    The x axis is the first numeric swept key (else the first key, as categories); every combination of
    the other keys is its own series.
    """
    keys = list(rows[0].values)
    numeric = [k for k in keys if _is_numeric([r.values.get(k) for r in rows])]
    xkey = numeric[0] if numeric else keys[0]
    others = [k for k in keys if k != xkey]
    series: dict[str, list[SweepRow]] = {}
    for r in rows:
        series.setdefault(", ".join(f"{k}={r.values.get(k)}" for k in others), []).append(r)
    is_num = _is_numeric([r.values.get(xkey) for r in rows])
    cats = list(dict.fromkeys(str(r.values.get(xkey)) for r in rows))

    def x(r: SweepRow) -> Any:
        return r.values.get(xkey) if is_num else cats.index(str(r.values.get(xkey)))

    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    for si, (label, rs) in enumerate(series.items()):
        _sweep_series(ax, sorted(rs, key=x), x, f"{label}: " if label else "", f"C{si % 10}")
    if not is_num:
        ax.set_xticks(range(len(cats)), [mpl_label(c) for c in cats], rotation=30, ha="right")
    name = metric_name(rows[0].metric)
    ax.set_xlabel(mpl_label(xkey))
    ax.set_ylabel(f"{name} (%)")
    ax.set_title(mpl_label(f"{group}: {name} vs {xkey}"), fontsize=10)
    ax.grid(alpha=0.3)
    _outside_legend(fig, ax, "below", ncols=3)
    return _png(fig), xkey


def _sweep_series(ax: Any, rows: list[SweepRow], x: Any, prefix: str, color: str) -> None:
    """One series of a sweep plot: test accuracy (mAP) with error bars, final train and best val accuracy (mAP)."""
    xs = [x(r) for r in rows]
    name = metric_name(rows[0].metric)
    ax.errorbar(xs, [100 * r.score for r in rows], yerr=[100 * r.score_std for r in rows], fmt="-o", color=color,
                capsize=3, label=mpl_label(prefix + f"test {name}"))
    train = [(xv, r.train_score) for xv, r in zip(xs, rows, strict=True) if r.train_score is not None]
    if train:
        ax.plot([xv for xv, _ in train], [100 * v for _, v in train], ":s", color=color, ms=4,
                label=mpl_label(prefix + f"final train {name}"))
    val = [(xv, r.best_val) for xv, r in zip(xs, rows, strict=True) if r.best_val is not None]
    if val:
        ax.plot([xv for xv, _ in val], [100 * v for _, v in val], "--^", color=color, ms=4, alpha=0.7,
                label=mpl_label(prefix + f"best val {name}"))
