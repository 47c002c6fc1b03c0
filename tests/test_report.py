"""The HTML study report and its Markdown summary: every section, numbers from the runs, escaping,
and a real render in headless Chromium (no console errors, every image decodes, a screenshot)."""

from __future__ import annotations

import html
import json
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from report_fixtures import tiny_study_dir
from transferlab.cli import main
from transferlab.results.report import ReportError, build_report, confused_pairs, pareto_front
from transferlab.results.report.browser import Shot, check_page, find_chromium


@pytest.fixture(scope="session")
def study_dir(tmp_path_factory) -> Path:
    return tiny_study_dir(tmp_path_factory.mktemp("report_study"))


@pytest.fixture(scope="module")
def report(study_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    return build_report(study_dir, html_path=out, md_path=out.with_suffix(".md"))


def _metrics(study_dir: Path, run: str) -> dict:
    return json.loads((study_dir / run / "metrics.json").read_text())


def _row(page: str, experiment: str) -> str:
    m = re.search(r"<tr[^>]*><td>" + re.escape(html.escape(experiment)) + r"</td>(.*?)</tr>", page, re.S)
    assert m, f"no table row for {experiment}"
    return m.group(1)


def test_report_has_every_section_with_the_runs_numbers(report, study_dir):
    page = report.html_path.read_text()
    assert report.sections == ["comparison", "pareto", "sweeps", "curves", "experiments", "failed"]
    for sid in report.sections:
        assert f'id="{sid}"' in page and f'href="#{sid}"' in page

    accs = [_metrics(study_dir, f"scratch.seed{s}")["test_acc"] for s in (0, 1)]
    row = _row(page, "scratch")
    mean, std = statistics.fmean(accs), statistics.stdev(accs)
    assert f"{100 * mean:.2f}% ± {100 * std:.2f} (n=2)" in row
    m = _metrics(study_dir, "dropout@head.dropout=0.3")
    row = _row(page, "dropout@head.dropout=0.3")
    assert f"{100 * m['test_acc']:.2f}% (n=1)" in row and f"{m['trainable_params']:,}" in row
    assert f"{m['inference_images_per_s']:,.0f}" in row

    # the best value of each column is marked, and it is the best one
    best_acc = max([mean] + [_metrics(study_dir, f"dropout@head.dropout={d}")["test_acc"] for d in ("0.1", "0.3")])
    marked = re.findall(r'<td class="num best" data-sort="([^"]+)">[^<]*%', page)
    assert marked and all(float(v) == pytest.approx(best_acc) for v in marked)
    fewest = min(_metrics(study_dir, r)["trainable_params"] for r in ("scratch.seed0", "dropout@head.dropout=0.1"))
    assert f'<td class="num best" data-sort="{float(fewest)!r}">{fewest:,}</td>' in page

    # the failed experiment: a row with its error, and the failures section
    failed = _row(page, "broken")
    error = _metrics(study_dir, "broken")["error"]
    assert "failed" in failed and "nonexistent" in failed
    assert html.escape(error) in page.split('id="failed"')[1]

    # per experiment: confusion matrix + per-class plots, pairs or "no mistakes", a prediction grid
    section = page.split('id="experiments"')[1]
    assert section.count("<section") == 3  # scratch, two sweep points (broken has no results)
    assert section.count('class="cell') >= 3 * 16
    # the grid shows each image's recorded prediction: the numbers of predictions.json
    preds = json.loads((study_dir / "scratch.seed0" / "predictions.json").read_text())
    pos = preds["samples"]["positions"][0]
    names = preds["class_names"]
    first = re.search(r'<figure class="cell[^"]*">.*?<figcaption>(.*?)</figcaption>', section, re.S).group(1)
    assert f"pred: {names[preds['pred'][pos]]} ({100 * preds['prob'][pos]:.0f}%)" in first and f"true: {names[preds['true'][pos]]}" in first

    # sweep: a plot and one table row per point, with its test accuracy
    sweeps = page.split('id="sweeps"')[1].split('id="curves"')[0]
    assert "<h3>dropout</h3>" in sweeps and sweeps.count("<img") == 1
    for d in ("0.1", "0.3"):
        acc = _metrics(study_dir, f"dropout@head.dropout={d}")["test_acc"]
        assert re.search(rf"<tr><td>{d}</td><td[^>]*>{100 * acc:.2f}%</td>", sweeps)

    # everything is embedded: no reference to another file or the network
    assert not re.search(r'(src|href)="(?!data:image/png;base64,|#)', page)
    assert "Content-Security-Policy" in page


def test_markdown_summary(report, study_dir):
    md = report.md_path.read_text()
    assert md.startswith("# Study report: tiny\\_report")
    m = _metrics(study_dir, "dropout@head.dropout=0.1")
    assert "| dropout@head.dropout=0.1 | transferlab\\_cnn | scratch | finetune |" in md
    assert f"{100 * m['test_acc']:.2f}% (n=1)" in md
    assert "## Pareto front" in md and "## Sweeps" in md and "## Most-confused pairs" in md
    assert "## Failed runs" in md and "- broken: WeightsError" in md
    assert "<b>" not in md and "&lt;b&gt;" in md  # the HTML in the error path is escaped


def test_pareto_front_and_confused_pairs():
    pts = [(10.0, 0.80), (5.0, 0.70), (20.0, 0.90), (12.0, 0.75), (5.0, 0.60), (20.0, 0.85)]
    assert pareto_front(pts) == [1, 0, 2]  # (12, .75) loses to (10, .80); (5, .60) to (5, .70); (20, .85) to (20, .90)
    cm = np.array([[50, 3, 0], [9, 40, 1], [0, 9, 41]])
    assert confused_pairs(cm, 2) == [(1, 0, 9, 0.18), (2, 1, 9, 0.18)]
    assert confused_pairs(np.eye(3, dtype=int) * 5) == []


EVIL_CLASS = '<img src=x onerror="console.error(\'class-xss\')">'
EVIL_EXPERIMENT = "exp <script>console.error('exp-xss')</script>"


@pytest.fixture(scope="module")
def evil_study(study_dir, tmp_path_factory) -> Path:
    """A copy of the study whose class names, an experiment name and an error carry HTML."""
    out = tmp_path_factory.mktemp("evil") / "evil_study"
    shutil.copytree(study_dir, out, ignore=shutil.ignore_patterns("checkpoints"))
    for run in ("scratch.seed0", "scratch.seed1"):
        for name in ("metrics.json", "predictions.json"):
            d = json.loads((out / run / name).read_text())
            d["class_names"] = [EVIL_CLASS, "a & b", "$x^2$ <i>", "_hidden"]
            if name == "metrics.json":
                d["experiment"] = EVIL_EXPERIMENT
            (out / run / name).write_text(json.dumps(d))
    m = json.loads((out / "broken" / "metrics.json").read_text())
    m["error"] = "RuntimeError: <script>console.error('err-xss')</script>"
    (out / "broken" / "metrics.json").write_text(json.dumps(m))
    for run, epochs in (("dropout@head.dropout=0.1", 1), ("dropout@head.dropout=0.3", 2)):  # short runs: integer epoch ticks
        history = (out / run / "history.csv").read_text().splitlines()
        (out / run / "history.csv").write_text("\n".join(history[: epochs + 1]) + "\n")
    return out


def test_user_strings_are_escaped(evil_study):
    rep = build_report(evil_study)
    page = rep.html_path.read_text()
    for raw in (EVIL_CLASS, EVIL_EXPERIMENT, "<script>console.error('err-xss')</script>", "<i>"):
        assert raw not in page
    assert html.escape(EVIL_CLASS) in page and html.escape(EVIL_EXPERIMENT) in page
    assert page.count("<script>") == 1  # the report's own sorting script only
    md = rep.md_path.read_text()
    assert "<script>" not in md and "<img" not in md


chromium = pytest.mark.skipif(
    find_chromium() is None, reason="no chromium binary: install Debian's 'chromium' (scripts/setup.sh does as root) to run this test"
)


SHOTS = [  # (file, selector): the page's top, the comparison table, the plots the issue-28 fixes are about
    ("report.png", None),
    ("comparison.png", "div.scroll"),  # the first one holds the comparison table
    ("pareto.png", 'img[alt="test accuracy vs training time scatter plot"]'),
    ("curves.png", 'img[alt="learning curves of dropout@head.dropout=0.1"]'),
    ("curves2.png", 'img[alt="learning curves of dropout@head.dropout=0.3"]'),
    ("experiment.png", "section.exp"),
]


@chromium
@pytest.mark.parametrize("width", [1400, 900])
def test_report_renders_in_headless_chromium(evil_study, tmp_path, width):
    rep = build_report(evil_study)
    n_img = rep.html_path.read_text().count("<img ")
    result = check_page(rep.html_path, [Shot(tmp_path / f"{width}_{name}", sel) for name, sel in SHOTS], width=width)
    assert result.errors == []  # no console error, exception, CSP violation or failed load (an unescaped name would log one)
    assert result.images == n_img > 30 and result.broken_images == []
    assert result.body_data == {"images": str(n_img), "brokenImages": "0"}  # the page's own check agrees
    from PIL import Image

    with Image.open(tmp_path / f"{width}_report.png") as im:
        assert im.size == (width, 2000)
        colors = im.convert("RGB").resize((70, 100)).getcolors(10000)
        assert colors is not None and len(colors) > 20  # not a blank page
    with Image.open(tmp_path / f"{width}_experiment.png") as im:
        assert im.width > 600 and im.height > 400
    with Image.open(tmp_path / f"{width}_comparison.png") as im:
        assert im.width <= width  # the table scrolls inside its box instead of widening the page


def test_short_runs_get_integer_epoch_ticks_and_legends_outside(evil_study):
    """The learning curves of a one- and a two-epoch run: ticks at whole epochs only, the legend outside the axes."""
    from matplotlib.figure import Figure

    from transferlab.results.report import figures
    from transferlab.results.report.records import read_study

    seen = {}
    original = Figure.savefig

    def spy(fig, *args, **kwargs):  # look at the figure just before it becomes PNG bytes
        axes = fig.get_axes()
        seen["ticks"] = [list(ax.get_xticks()) for ax in axes]
        seen["legends"] = [ax.get_legend() for ax in axes]
        seen["figure_legends"] = len(fig.legends)
        return original(fig, *args, **kwargs)

    study = read_study(evil_study)
    exps = {e.name: e for e in study.experiments}
    Figure.savefig = spy
    try:
        for name, epochs in (("dropout@head.dropout=0.1", [1]), ("dropout@head.dropout=0.3", [1, 2])):
            assert figures.curves_figure(exps[name]) is not None
            assert seen["ticks"] == [epochs, epochs] and seen["legends"] == [None, None] and seen["figure_legends"] == 1
        figures.scatter_figure(study.ok_experiments, [0])
        assert seen["legends"] == [None] and seen["figure_legends"] == 1
    finally:
        Figure.savefig = original


@chromium
def test_the_chromium_check_catches_broken_pages(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<html><body><img src="missing.png" alt="gone"><script>console.error("boom"); nope();</script></body></html>')
    result = check_page(page)
    assert not result.ok and result.broken_images == ["gone"]
    assert any("boom" in e for e in result.errors) and any("nope" in e for e in result.errors)
    assert any("missing.png" in e for e in result.errors)


def test_report_cli(study_dir, tmp_path, capsys):
    out = tmp_path / "r" / "study.html"
    assert main(["report", str(study_dir), "--out", str(out), "--grid", "4"]) == 0
    assert out.is_file() and out.with_suffix(".md").is_file()
    assert "written:" in capsys.readouterr().out
    section = out.read_text().split('id="experiments"')[1]
    assert "4 random test images" in section
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such study directory" in capsys.readouterr().out
    with pytest.raises(ReportError, match="holds no runs"):
        build_report(tmp_path / "r")


# --------------------------------------------------------------------------------------------
# statistics in the comparison (issue 28): studies derived from the tiny study's run folders, each run's
# test predictions shifted (a prediction moved to the next class is wrong) to a known large and a known
# null difference


def _derived_study(template: Path, out: Path, runs: dict[str, tuple[str, int, list[int]]]) -> Path:
    """Copies of the run folder ``template``: run name -> (experiment, seed, test positions made wrong); metrics.json's
    test accuracy, balanced accuracy and macro F1 recomputed from the shifted predictions."""
    from transferlab.results import stats

    out.mkdir(parents=True)
    for name, (experiment, seed, wrong) in runs.items():
        shutil.copytree(template, out / name, ignore=shutil.ignore_patterns("checkpoints"))
        preds = json.loads((out / name / "predictions.json").read_text())
        true = np.asarray(preds["true"])
        pred = true.copy()
        pred[wrong] = (true[wrong] + 1) % len(preds["class_names"])
        preds["pred"] = pred.tolist()
        (out / name / "predictions.json").write_text(json.dumps(preds))
        m = json.loads((out / name / "metrics.json").read_text())
        m.update(experiment=experiment, seed=seed, test_acc=stats.accuracy(true, pred),
                 test_balanced_acc=stats.balanced_accuracy(true, pred), test_macro_f1=stats.macro_f1(true, pred))
        (out / name / "metrics.json").write_text(json.dumps(m))
    order = list(dict.fromkeys(e for e, _, _ in runs.values()))
    (out / "study.json").write_text(json.dumps({"study": out.name, "experiments": order}))
    return out


BASE_WRONG = [2, 4, 3, 5, 1]  # wrong test images of each seed (of 48)
LARGE_EXTRA = [12, 11, 13, 12, 10]  # about 12 more wrong: 24 points worse
NULL_SHIFT = [1, -1, 0, 1, 0]  # a seed-to-seed wobble around the base


@pytest.fixture(scope="module")
def seeds_study(study_dir, tmp_path_factory) -> Path:
    """Three experiments over the same five seeds: ``base``, ``large`` (about 12 more wrong images per seed), ``null``."""
    runs = {}
    for s, k in enumerate(BASE_WRONG):
        runs[f"base.seed{s}"] = ("base", s, list(range(k)))
        runs[f"large.seed{s}"] = ("large", s, list(range(k + LARGE_EXTRA[s])))
        runs[f"null.seed{s}"] = ("null", s, list(range(k + NULL_SHIFT[s])))
    return _derived_study(study_dir / "scratch.seed0", tmp_path_factory.mktemp("stats") / "seeds_study", runs)


@pytest.fixture(scope="module")
def single_study(study_dir, tmp_path_factory) -> Path:
    """Single runs on the same 48 test images: ``base`` (4 wrong), ``large`` (the same 4 and 20 more), ``null``
    (4 other images wrong)."""
    runs = {"base": ("base", 0, [0, 1, 2, 3]), "large": ("large", 0, list(range(24))), "null": ("null", 0, [40, 41, 42, 43])}
    return _derived_study(study_dir / "scratch.seed0", tmp_path_factory.mktemp("stats") / "single_study", runs)


def _acc(wrong: list[int]) -> list[float]:
    return [1 - k / 48 for k in wrong]


def test_paired_t_over_seeds_finds_the_large_difference_and_not_the_null(seeds_study):
    from scipy import stats as sps
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.power import TTestPower

    from transferlab.results.compare import collect

    rows = {r["experiment"]: r for r in collect(seeds_study, against="base")}
    base = _acc(BASE_WRONG)
    large = _acc([k + e for k, e in zip(BASE_WRONG, LARGE_EXTRA, strict=True)])
    null = _acc([k + d for k, d in zip(BASE_WRONG, NULL_SHIFT, strict=True)])
    # each experiment's 95 % interval is Student's t over its five seeds
    low, high = sps.t.interval(0.95, 4, loc=np.mean(base), scale=sps.sem(base))
    assert rows["base"]["ci_method"] == "t" and (rows["base"]["test_acc_ci_low"], rows["base"]["test_acc_ci_high"]) == pytest.approx((low, high))
    assert rows["base"]["mark"] == "reference"
    p_large, p_null = sps.ttest_rel(large, base).pvalue, sps.ttest_rel(null, base).pvalue
    adjusted = multipletests([p_large, p_null], method="holm")[1]
    assert rows["large"]["test"] == rows["null"]["test"] == "paired t" and rows["large"]["test_n"] == 5
    assert rows["large"]["p_value"] == pytest.approx(p_large) and rows["null"]["p_value"] == pytest.approx(p_null)
    assert [rows["large"]["p_adjusted"], rows["null"]["p_adjusted"]] == pytest.approx(list(adjusted))
    assert rows["large"]["mark"] == "worse" and rows["large"]["diff"] == pytest.approx(-np.mean(LARGE_EXTRA) / 48)
    assert rows["null"]["mark"] == "not distinguishable"
    # the hint: paired runs needed for 80 % power at the observed paired spread, at the strictest Holm level (5 % / 2)
    d = np.subtract(null, base)
    expected = TTestPower().solve_power(abs(d.mean()) / d.std(ddof=1), nobs=None, alpha=0.025, power=0.8)
    assert rows["null"]["seeds_needed"] == int(np.ceil(expected))
    # the default reference is the best row; the others are worse or not distinguishable, never better
    rows = {r["experiment"]: r for r in collect(seeds_study)}
    best = max(rows.values(), key=lambda r: r["test_acc"])
    assert best["mark"] == "reference" and rows["large"]["mark"] == "worse"


def test_single_runs_get_mcnemar_on_their_test_predictions(single_study):
    from scipy import stats as sps
    from statsmodels.stats.contingency_tables import mcnemar

    from transferlab.results.compare import collect

    rows = {r["experiment"]: r for r in collect(single_study, against="base")}
    # large vs base: 20 images right for base only, none the other way
    exact = mcnemar([[24, 0], [20, 4]], exact=True).pvalue
    assert rows["large"]["test"] == "McNemar mid-p" and rows["large"]["test_n"] == 48
    assert rows["large"]["p_value"] == pytest.approx(exact - sps.binom.pmf(0, 20, 0.5))
    assert rows["large"]["mark"] == "worse"
    assert rows["null"]["p_value"] == 1.0 and rows["null"]["mark"] == "not distinguishable"  # 4 against 4
    assert rows["null"].get("seeds_needed") is None  # one run each: no seed spread to estimate from
    for r in rows.values():
        assert "test_acc_ci_low" not in r
    # balanced accuracy: a paired bootstrap over the same test images
    rows = {r["experiment"]: r for r in collect(single_study, metric="test_balanced_acc", against="base")}
    assert rows["large"]["test"] == "paired bootstrap" and rows["large"]["mark"] == "worse"
    assert rows["null"]["mark"] == "not distinguishable"


def test_compare_cli_table_fits_120_columns_and_writes_the_statistics(seeds_study, single_study, capsys):
    import csv
    import io

    from rich.console import Console

    from transferlab.results.compare import compare

    console = Console(width=200, record=True)
    rows = compare(seeds_study, console=console, against="null")
    text = console.export_text()
    table = text.split("95 % CI of the mean")[0].splitlines()
    assert max(len(line) for line in text.split("written:")[0].splitlines()) <= 120  # all but the paths written
    assert len([line for line in table if line.startswith(("base", "large", "null"))]) == 3  # one line per experiment
    assert "vs null" in text and "● reference" in text and "▼ worse p" in text
    assert "about 169 seeds per experiment would\n    resolve a difference this size" in text  # the hint, wrapped at 120
    written = list(csv.DictReader(io.StringIO((seeds_study / "compare.csv").read_text())))
    for col in ("test_acc_ci_low", "test_acc_ci_high", "p_value", "p_adjusted", "mark", "reference", "test"):
        assert col in written[0]
    assert [w["mark"] for w in written] == [r["mark"] for r in rows]
    md = (seeds_study / "compare.md").read_text()
    assert "| 95 % CI | vs reference |" in md and "p (Holm)" in md and "synthetic" in md  # the data column is in the file

    # a single run: no interval; --wide shows the data column; --against an unknown experiment is an error
    assert main(["compare", str(single_study), "--wide"]) == 0
    out = capsys.readouterr().out
    assert "one run: no interval" in out and "synthetic" in out
    assert main(["compare", str(single_study), "--against", "nope"]) == 2
    assert "no such experiment" in capsys.readouterr().out


def test_report_shows_intervals_marks_and_hints(seeds_study, single_study):
    rep = build_report(seeds_study, against="base")
    page = rep.html_path.read_text()
    head = page.split('<table class="sortable" id="comparison">')[1].split("</thead>")[0]
    for col in ("precision", "image size", "vs base", "95 % CI"):
        assert col in head
    assert "95 % CI" in _row(page, "large") and "worse" in _row(page, "large") and "paired t" in _row(page, "large")
    assert 'class="mark same"' in _row(page, "null") and 'id="seeds-needed"' in page
    md = rep.md_path.read_text()
    assert "| vs base |" in md and "▼ worse" in md
    assert main(["report", str(seeds_study), "--against", "null", "--metric", "test_macro_f1", "--grid", "2"]) == 0
    assert "vs null" in (seeds_study / "report.md").read_text()
    page = build_report(single_study).html_path.read_text()
    assert "one run: no interval" in _row(page, "base") and "McNemar mid-p" in page


def test_best_marks_cover_balanced_accuracy_f1_and_ece_lowest(study_dir, report):
    page = report.html_path.read_text()
    eces = {name: _metrics(study_dir, run)["test_ece"] for name, run in
            (("dropout@head.dropout=0.1", "dropout@head.dropout=0.1"), ("dropout@head.dropout=0.3", "dropout@head.dropout=0.3"))}
    seeds = [_metrics(study_dir, f"scratch.seed{s}")["test_ece"] for s in (0, 1)]
    eces["scratch"] = statistics.fmean(seeds)
    lowest = min(eces, key=eces.get)
    cells = re.findall(r'<td class="num( best)?" data-sort="[^"]+">(\d\.\d{3}(?: ± \d\.\d{3})?)</td>', _row(page, lowest))
    assert any(best and text.startswith(f"{eces[lowest]:.3f}") for best, text in cells)
    for name in eces:
        row = _row(page, name)
        assert ("16 px" in row) and ("bf16" in row or "32" in row or "16-mixed" in row)
