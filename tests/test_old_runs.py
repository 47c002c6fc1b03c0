"""Run folders written by an older transferlab stay readable by today's public API.

``tests/fixtures/runs_v1/v1_study`` was written once by transferlab 0.1.0 (see the README there) and is
never regenerated. Every expected value here is read straight from the fixture's own files, and every
test works on a copy in ``tmp_path``: nothing may write into ``tests/fixtures``.
"""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import transferlab
from transferlab.results.report import build_report

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "runs_v1" / "v1_study"
WRITTEN_BY_TESTS = ("compare.csv", "compare.md", "report.html", "report.md")


@pytest.fixture
def study_dir(tmp_path: Path) -> Path:
    dst = tmp_path / FIXTURE.name
    shutil.copytree(FIXTURE, dst)
    return dst


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _run_dirs(study: Path) -> list[Path]:
    """Every run folder of the study: the folders with a metrics.json (ok, failed, ensemble)."""
    return sorted(p.parent for p in study.glob("*/metrics.json"))


def _ok_config_runs(study: Path) -> list[Path]:
    """The run folders load_run must read: a config.yaml and status ok."""
    return [d for d in _run_dirs(study) if (d / "config.yaml").is_file() and _json(d / "metrics.json").get("status") == "ok"]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fixture_holds_every_kind_of_run(study_dir):
    runs = _run_dirs(study_dir)
    metrics = {d.name: _json(d / "metrics.json") for d in runs}
    kinds = {d.name: yaml.safe_load((d / "config.yaml").read_text())["kind"] for d in _ok_config_runs(study_dir)}
    assert {"train", "logistic", "knn", "fewshot"} <= set(kinds.values())
    per_experiment: dict[str, int] = {}
    for name, kind in kinds.items():
        if kind == "train":
            per_experiment[metrics[name]["experiment"]] = per_experiment.get(metrics[name]["experiment"], 0) + 1
    assert max(per_experiment.values()) >= 2 and len(per_experiment) >= 2  # a seed sweep, and a second train experiment
    assert any((d / "ensemble.yaml").is_file() and metrics[d.name].get("kind") == "ensemble" for d in runs)
    assert any(m["status"] != "ok" for m in metrics.values())
    assert not any((FIXTURE / name).exists() for name in WRITTEN_BY_TESTS)  # the fixture itself stays as written


def test_load_run_gives_the_recorded_config_metrics_and_history(study_dir):
    dirs = _ok_config_runs(study_dir)
    assert len(dirs) >= 6
    for d in dirs:
        run = transferlab.load_run(d)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        metrics = _json(d / "metrics.json")
        assert (run.config.name, run.config.seed, run.config.kind) == (cfg["name"], cfg["seed"], cfg["kind"]), d.name
        assert run.config.name == metrics["experiment"] and run.config.seed == metrics["seed"], d.name
        assert run.config.model.backbone == cfg["model"]["backbone"] and run.config.model.weights == cfg["model"]["weights"], d.name
        assert run.config.data.dataset == cfg["data"]["dataset"] and run.config.head.type == cfg["head"]["type"], d.name
        assert run.config.strategy.name == cfg["strategy"]["name"] and run.config.train.epochs == cfg["train"]["epochs"], d.name
        for key, value in metrics.items():  # everything recorded is there, unchanged (new derived keys are allowed)
            assert run.metrics[key] == value, (d.name, key)
        assert run.class_names == metrics["class_names"], d.name

        history = d / "history.csv"
        expected = [{k: float(v) for k, v in row.items()} for row in _csv_rows(history)] if history.is_file() else []
        assert len(run.history) == len(expected), d.name
        for got, want in zip(run.history, expected, strict=True):
            assert set(got) == set(want), d.name
            assert got == pytest.approx(want), d.name


def test_load_model_rebuilds_the_recorded_models(study_dir):
    loaded_train = 0
    for d in _ok_config_runs(study_dir):
        if not (d / "checkpoints" / "best.safetensors").is_file():
            continue
        run = transferlab.load_run(d)
        metrics = _json(d / "metrics.json")
        n_classes = len(metrics["class_names"])
        model = run.load_model()
        size, channels = metrics["image_size"], metrics["channels"]
        with torch.no_grad():
            out = model(torch.zeros(2, channels, size, size))
            assert out.shape == (2, n_classes) and torch.isfinite(out).all(), d.name
            out = model(model.preprocess()(torch.zeros(2, channels, size, size, dtype=torch.uint8)))
            assert out.shape == (2, n_classes) and torch.isfinite(out).all(), d.name

        samples, predictions = d / "test_samples.safetensors", d / "predictions.json"
        if samples.is_file() and predictions.is_file():  # the weights are the recorded ones: same predictions
            tensors, recorded = load_file(samples), _json(predictions)
            with torch.no_grad():
                probs = model(model.preprocess()(tensors["images"])).softmax(1)
            for pos, p in zip(tensors["positions"].tolist(), probs, strict=True):
                top2 = p.topk(2).values
                if top2[0] - top2[1] > 1e-4:
                    assert int(p.argmax()) == recorded["pred"][pos], (d.name, pos)
                assert float(p.max()) == pytest.approx(recorded["prob"][pos], abs=2e-3), (d.name, pos)
        if run.config.kind == "train":
            loaded_train += 1
    assert loaded_train >= 2


def test_compare_gives_a_row_per_experiment_and_writes_compare_csv(study_dir):
    metrics = [_json(d / "metrics.json") for d in _run_dirs(study_dir)]
    by_experiment: dict[str, list[dict]] = {}
    for m in metrics:
        by_experiment.setdefault(m["experiment"], []).append(m)
    ensembles = {_json(d / "metrics.json")["experiment"] for d in _run_dirs(study_dir) if (d / "ensemble.yaml").is_file()}
    failed = {name for name, ms in by_experiment.items() if any(m["status"] != "ok" for m in ms)}
    assert ensembles and failed

    rows = transferlab.compare(study_dir, write=True)
    names = [r["experiment"] for r in rows]
    assert sorted(names) == sorted(by_experiment)  # one row per experiment, ensembles and failures included
    order = _json(study_dir / "study.json")["experiments"]
    assert [n for n in names if n in order] == [n for n in order if n in names]  # in the study's order
    rows_by_name = {r["experiment"]: r for r in rows}
    for name, ms in by_experiment.items():
        row = rows_by_name[name]
        ok = [m for m in ms if m["status"] == "ok"]
        if name in failed:
            assert row["status"] != "ok" and "failed" in row["status"], row
        else:
            assert row["status"] == "ok", row
        assert row["n_seeds"] == len(ok), row
        if ok:
            assert row["test_acc"] == pytest.approx(statistics.fmean(m["test_acc"] for m in ok)), row
            assert row["trainable_params"] == ok[0]["trainable_params"], row
    for name in ensembles:
        assert rows_by_name[name]["status"] == "ok"

    written = _csv_rows(study_dir / "compare.csv")
    assert [r["experiment"] for r in written] == names
    assert [r["status"] for r in written] == [str(r["status"]) for r in rows]
    assert not (FIXTURE / "compare.csv").exists()


def test_build_report_writes_html_naming_every_experiment(study_dir):
    report = build_report(study_dir)
    page_path = Path(report.html_path)
    assert page_path.is_file() and page_path.parent == study_dir
    assert Path(report.md_path).is_file()
    page = page_path.read_text(encoding="utf-8")
    runs = [_json(d / "metrics.json") for d in _run_dirs(study_dir)]
    for name in {m["experiment"] for m in runs}:
        assert re.search(r">\s*" + re.escape(html.escape(name)) + r"\s*<", page), f"{name} not in the report"
    for m in runs:
        if m["status"] != "ok":
            assert html.escape(m["error"]) in page, m["experiment"]
    assert not (FIXTURE / "report.html").exists()
