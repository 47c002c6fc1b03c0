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


@chromium
def test_report_renders_in_headless_chromium(evil_study, tmp_path):
    rep = build_report(evil_study)
    n_img = rep.html_path.read_text().count("<img ")
    shot = tmp_path / "report.png"
    result = check_page(rep.html_path, [Shot(shot), Shot(tmp_path / "experiment.png", "section.exp")])
    assert result.errors == []  # no console error, exception, CSP violation or failed load (an unescaped name would log one)
    assert result.images == n_img > 30 and result.broken_images == []
    assert result.body_data == {"images": str(n_img), "brokenImages": "0"}  # the page's own check agrees
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1400, 2000)
        colors = im.convert("RGB").resize((70, 100)).getcolors(10000)
        assert colors is not None and len(colors) > 20  # not a blank page
    with Image.open(tmp_path / "experiment.png") as im:
        assert im.width > 600 and im.height > 400


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
