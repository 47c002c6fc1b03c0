"""Multi-label runs after training (issue 24): compare and its statistics, the report, predict, export, trackers.

The study folders are written here in the formats a multi-label run writes (``metrics.json`` through ``RunMetrics``,
``predictions.json`` with N×K ``true`` / ``pred`` / ``prob`` and the thresholds, ``test_samples.safetensors``), from
seeded random label sets and scores; every expected number is computed here from those files with scikit-learn and
scipy. Predict and export use a tiny trained model whose run folder is turned into a multi-label one (its
``config.yaml`` says ``data.task: multilabel``, its ``metrics.json`` records thresholds), so the thresholds and the
sigmoid are what is tested, not the training.
"""

from __future__ import annotations

import io
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from rich.console import Console
from safetensors.torch import save_file
from scipy import stats as scipy_stats
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, hamming_loss

from report_fixtures import synthetic_class_image
from transferlab.cli import main
from transferlab.config import ExperimentConfig, from_dict
from transferlab.engine.multilabel import multilabel_scores
from transferlab.engine.tracking import RunInfo
from transferlab.files import read_json, write_json
from transferlab.kinds import run_experiment
from transferlab.results import stats
from transferlab.results.compare import CompareError, collect, compare
from transferlab.results.export import EXPORT_FORMATS, ExportError, ExportSpec, export_format_of
from transferlab.results.report import build_report
from transferlab.results.report.markdown import md_esc
from transferlab.results.trackers import MlflowOptions, MlflowTracker, TensorBoardOptions, TensorBoardTracker, WandbOptions, WandbTracker
from transferlab.rundir import RunMetrics, load_run
from transferlab.tools.inspect import load_images
from transferlab.tools.predict import predict, predictions_json

LABELS = ["cat", "dog", "car", "tree"]
N_TEST = 80


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


# --------------------------------------------------------------------------------------------
# run folders in the multi-label formats


def label_sets(rng: np.random.Generator, n: int = N_TEST, k: int = len(LABELS)) -> np.ndarray:
    """n×k 0/1 label sets, every label on at least one image."""
    true = (rng.random((n, k)) < 0.4).astype(np.int64)
    true[np.arange(k), np.arange(k)] = 1
    return true


def scores(rng: np.random.Generator, true: np.ndarray, skill: float) -> np.ndarray:
    """Sigmoid probabilities that separate the labels the better the larger ``skill``, rounded to 2 decimals (ties)."""
    logits = skill * (2 * true - 1) + rng.normal(0, 1.0, true.shape)
    return np.round(1 / (1 + np.exp(-logits)), 2)


def sklearn_map(true: np.ndarray, prob: np.ndarray) -> float:
    cols = [k for k in range(true.shape[1]) if true[:, k].any()]
    return float(np.mean([average_precision_score(true[:, k], prob[:, k]) for k in cols]))


def write_multilabel_run(study: Path, experiment: str, seed: int, true: np.ndarray, prob: np.ndarray, thresholds: list[float],
                         train_seconds: float = 10.0) -> dict:
    """A finished multi-label run folder: metrics.json (scores from scikit-learn), predictions.json and the samples."""
    pred = (prob >= np.asarray(thresholds)).astype(np.int64)
    aps = [float(average_precision_score(true[:, k], prob[:, k])) if true[:, k].any() else None for k in range(true.shape[1])]
    record = RunMetrics(
        kind="train", experiment=experiment, seed=seed, backbone="transferlab_cnn", weights="scratch", head="linear", strategy="full",
        dataset="synthetic", image_size=16, channels=3, n_train=200, n_val=50, n_test=len(true), class_names=list(LABELS),
        task="multilabel", test_map=sklearn_map(true, prob), test_map_micro=float(average_precision_score(true.ravel(), prob.ravel())),
        test_f1=float(f1_score(true, pred, average="macro", zero_division=0)),
        test_f1_micro=float(f1_score(true, pred, average="micro", zero_division=0)),
        test_exact_match=float(accuracy_score(true, pred)), test_hamming=float(hamming_loss(true, pred)), per_class_ap=aps,
        thresholds=[float(t) for t in thresholds], threshold_mode="per_class", test_loss=0.3, best_val=0.8, monitor="val_map",
        train_seconds=train_seconds, inference_images_per_s=1000.0, total_params=1000, trainable_params=1000,
    ).to_dict()
    run = study / (f"{experiment}.seed{seed}")
    run.mkdir(parents=True)
    write_json(run / "metrics.json", record)
    images = torch.from_numpy(np.ascontiguousarray(np.stack([synthetic_class_image(i % 4, seed=i).transpose(2, 0, 1) for i in range(12)])))
    save_file({"images": images, "positions": torch.arange(12, dtype=torch.int64)}, str(run / "test_samples.safetensors"))
    write_json(run / "predictions.json", {
        "task": "multilabel", "class_names": list(LABELS), "thresholds": [float(t) for t in thresholds],
        "true": true.tolist(), "pred": pred.tolist(), "prob": prob.tolist(), "true_prob": [],
        "samples": {"file": "test_samples.safetensors", "positions": list(range(12))},
    })
    return record


def write_multiclass_run(study: Path, experiment: str, seed: int, acc: float) -> None:
    run = study / f"{experiment}.seed{seed}"
    run.mkdir(parents=True)
    cm = [[int(50 * acc), 50 - int(50 * acc)], [50 - int(50 * acc), int(50 * acc)]]
    write_json(run / "metrics.json", RunMetrics(
        experiment=experiment, seed=seed, backbone="transferlab_cnn", weights="scratch", strategy="full", dataset="digits", image_size=16,
        n_train=100, n_test=100, class_names=["a", "b"], test_acc=acc, confusion_matrix=cm, per_class_acc=[acc, acc], train_seconds=5.0,
        inference_images_per_s=500.0,
    ).to_dict())


@pytest.fixture
def seeded_study(tmp_path) -> tuple[Path, dict[str, list[dict]]]:
    """Two multi-label experiments, three seeds each (the same test label sets per seed), ``good`` better than ``weak``."""
    study = tmp_path / "ml_study"
    written: dict[str, list[dict]] = {"good": [], "weak": []}
    for seed in range(3):
        rng = np.random.default_rng(seed)
        true = label_sets(rng)
        for name, skill in (("good", 2.5), ("weak", 0.8)):
            prob = scores(rng, true, skill)
            written[name].append(write_multilabel_run(study, name, seed, true, prob, [0.5, 0.45, 0.55, 0.5]))
    write_json(study / "study.json", {"study": "ml_study", "experiments": ["good", "weak"]})
    return study, written


# --------------------------------------------------------------------------------------------
# the statistics' multi-label metrics against scikit-learn (and the engine's torchmetrics scores)


def test_multilabel_metrics_match_scikit_learn_and_the_engine():
    rng = np.random.default_rng(7)
    true = label_sets(rng, 120, 5)
    true[:, 4] = 0  # a label without any positive: left out of the mAP, an F1 of 0
    prob = scores(rng, true, 1.2)  # rounded: many tied scores
    thresholds = [0.5, 0.4, 0.6, 0.5, 0.5]
    pred = (prob >= np.asarray(thresholds)).astype(np.int64)
    assert stats.mean_average_precision(true, pred, prob) == pytest.approx(sklearn_map(true, prob), abs=1e-12)
    assert stats.micro_average_precision(true, pred, prob) == pytest.approx(average_precision_score(true.ravel(), prob.ravel()), abs=1e-12)
    assert stats.per_class_average_precision(true, prob)[4] is None
    assert stats.multilabel_f1(true, pred) == pytest.approx(f1_score(true, pred, average="macro", zero_division=0), abs=1e-12)
    assert stats.exact_match(true, pred) == pytest.approx(accuracy_score(true, pred))
    assert stats.hamming_loss(true, pred) == pytest.approx(hamming_loss(true, pred))
    # what compare recomputes from predictions.json is what a run records (the engine's torchmetrics scores)
    recorded = multilabel_scores(torch.tensor(prob, dtype=torch.float32), torch.tensor(true, dtype=torch.float32), thresholds)
    assert stats.mean_average_precision(true, pred, prob) == pytest.approx(recorded["map"], abs=1e-5)
    assert stats.multilabel_f1(true, pred) == pytest.approx(recorded["f1"], abs=1e-5)
    assert stats.exact_match(true, pred) == pytest.approx(recorded["exact_match"], abs=1e-6)
    assert stats.hamming_loss(true, pred) == pytest.approx(recorded["hamming"], abs=1e-6)


# --------------------------------------------------------------------------------------------
# compare


def test_compare_ranks_multilabel_experiments_by_map_over_seeds(seeded_study):
    study, written = seeded_study
    console = quiet()
    rows = {r["experiment"]: r for r in compare(study, console=console)}
    good, weak = ([w["test_map"] for w in written[n]] for n in ("good", "weak"))
    for name, maps in (("good", good), ("weak", weak)):
        row = rows[name]
        assert row["task"] == "multilabel" and "test_acc" not in row
        assert row["test_map"] == pytest.approx(statistics.fmean(maps)) and row["test_map_std"] == pytest.approx(statistics.stdev(maps))
        assert row["test_hamming"] == pytest.approx(statistics.fmean(w["test_hamming"] for w in written[name]))
        ci = scipy_stats.t.interval(0.95, len(maps) - 1, loc=statistics.fmean(maps), scale=scipy_stats.sem(maps))
        assert (row["test_map_ci_low"], row["test_map_ci_high"]) == pytest.approx(ci)
    assert rows["good"]["mark"] == "reference" and rows["good"]["metric"] == "test_map"
    assert rows["weak"]["test"] == "paired t" and rows["weak"]["diff"] == pytest.approx(statistics.fmean(weak) - statistics.fmean(good))
    assert rows["weak"]["p_value"] == pytest.approx(scipy_stats.ttest_rel(weak, good).pvalue)
    out = console.file.getvalue()
    assert "test mAP" in out and "test acc" not in out
    md = (study / "compare.md").read_text()
    for title in ("test mAP", "micro mAP", "exact match", "Hamming loss", "thresholds"):
        assert f"| {title} |" in md or f"| {title} " in md, title
    assert "test acc" not in md and "balanced acc" not in md
    mean, std = statistics.fmean(good), statistics.stdev(good)
    assert f"{100 * mean:.2f}% ± {100 * std:.2f}" in md

    # on another multi-label metric: Hamming loss, where lower is better
    by_hamming = {r["experiment"]: r for r in collect(study, "test_hamming")}
    best = min(("good", "weak"), key=lambda n: statistics.fmean(w["test_hamming"] for w in written[n]))
    assert by_hamming[best]["mark"] == "reference" and by_hamming[best]["metric"] == "test_hamming"
    with pytest.raises(CompareError, match="multiclass metric"):
        collect(study, "test_acc")


def test_a_study_with_both_tasks_gets_a_table_per_task(seeded_study):
    study, written = seeded_study
    for seed, acc in enumerate((0.9, 0.8, 0.86)):
        write_multiclass_run(study, "digits", seed, acc)
    rows = {r["experiment"]: r for r in compare(study, console=quiet())}
    # each task is its own family: the multiclass experiment is its own reference, never tested against an mAP
    assert rows["digits"]["task"] == "multiclass" and rows["digits"]["mark"] == "reference" and rows["digits"]["metric"] == "test_acc"
    assert rows["digits"]["test_acc"] == pytest.approx(statistics.fmean((0.9, 0.8, 0.86)))
    assert rows["good"]["mark"] == "reference" and rows["weak"]["reference"] == "good" and rows["weak"]["metric"] == "test_map"
    md = (study / "compare.md").read_text()
    multi_head, single_head = md.index("## multi-label"), md.index("## multiclass")
    assert md.index("| digits |") > single_head and md.index("| good |") > multi_head
    assert (md.index("| digits |") > multi_head) == (single_head > multi_head)  # each row under its own task's heading
    # --against names an experiment of one task: the other task keeps its own best as reference
    rows = {r["experiment"]: r for r in collect(study, against="weak")}
    assert rows["weak"]["mark"] == "reference" and rows["digits"]["mark"] == "reference"
    # the report: a table, a Pareto plot and a validation overview per task; confusion for one, labels for the other
    rep = build_report(study)
    page, md = rep.html_path.read_text(), rep.md_path.read_text()
    assert 'id="comparison"' in page and 'id="comparison-multiclass"' in page
    assert 'alt="test mAP vs training time scatter plot"' in page and 'alt="test accuracy vs training time scatter plot"' in page
    assert 'alt="confusion matrix of digits"' in page and 'alt="per-class average precision of good"' in page
    assert "## Most-confused pairs" in md and "## Labels (multi-label experiments)" in md
    assert "## Pareto front (test mAP vs training time)" in md and "## Pareto front (test accuracy vs training time)" in md


def test_single_multilabel_runs_are_compared_on_the_same_test_images(tmp_path):
    study = tmp_path / "single"
    rng = np.random.default_rng(3)
    true = label_sets(rng)
    probs = {name: scores(rng, true, skill) for name, skill in (("a", 2.0), ("b", 1.0))}
    for name, prob in probs.items():
        write_multilabel_run(study, name, 0, true, prob, [0.5] * len(LABELS))
    rows = {r["experiment"]: r for r in collect(study)}
    # mAP is no per-image mean: the paired bootstrap over the test images, its difference recomputed by scikit-learn
    maps = {n: sklearn_map(true, p) for n, p in probs.items()}
    ref = max(maps, key=maps.__getitem__)
    other = "b" if ref == "a" else "a"
    assert rows[ref]["mark"] == "reference" and rows[other]["test"] == "paired bootstrap"
    assert rows[other]["diff"] == pytest.approx(maps[other] - maps[ref], abs=1e-12)
    # exact match is: McNemar's test on which images got their whole label set right
    rows = {r["experiment"]: r for r in collect(study, "test_exact_match")}
    right = {n: ((p >= 0.5).astype(int) == true).all(1) for n, p in probs.items()}
    ref = max(right, key=lambda n: right[n].mean())
    other = "b" if ref == "a" else "a"
    assert rows[other]["test"] == "McNemar mid-p" and rows[other]["diff"] == pytest.approx(right[other].mean() - right[ref].mean())


# --------------------------------------------------------------------------------------------
# the report


def test_report_shows_map_per_class_ap_cooccurrence_thresholds_and_label_grid(seeded_study):
    study, written = seeded_study
    rep = build_report(study)
    page, md = rep.html_path.read_text(), rep.md_path.read_text()
    good = [w["test_map"] for w in written["good"]]
    assert f"{100 * statistics.fmean(good):.2f}% ± {100 * statistics.stdev(good):.2f} (n=3)" in page
    assert "test mAP (mean ± std, n; 95 % CI)" in page and "test accuracy" not in page
    assert 'alt="per-class average precision of good"' in page and 'alt="label co-occurrence of good"' in page
    assert 'alt="confusion matrix of good"' not in page
    # the thresholds as recorded, every label's decisions summed over the seeds, the most-missed label
    for t in ("0.450", "0.550"):
        assert f'<td class="num">{t}</td>' in page
    preds = [read_json(r / "predictions.json") for r in sorted(study.glob("weak.seed*"))]
    true = np.concatenate([np.asarray(p["true"]) for p in preds]).astype(bool)
    pred = np.concatenate([np.asarray(p["pred"]) for p in preds]).astype(bool)
    recall = dict(zip(LABELS, (true & pred).sum(0) / true.sum(0), strict=True))
    weak = page[page.index("<h3>weak</h3>"):]
    first_missed = weak[weak.index("Most-missed labels"):].split("<td>")[1].split("</td>")[0]
    assert recall[first_missed] == min(recall.values())
    line = md[md.index("### weak"):].split("Most-missed labels (lowest recall at the thresholds): ")[1]
    assert recall[line.split(" (")[0]] == min(recall.values())
    # label co-occurrence from the true label sets: the most frequent pair named in the summary
    first = np.asarray(read_json(study / "good.seed0" / "predictions.json")["true"])
    co = first.T @ first
    pairs = sorted(((co[i, j], i, j) for i in range(4) for j in range(i + 1, 4)), key=lambda t: (-t[0], t[1], t[2]))
    c, i, j = pairs[0]
    assert f"Most frequent label pairs in the test set: {LABELS[i]} + {LABELS[j]} ({c})" in md
    # the grid: every predicted label marked right (✓) or wrong (✗), the missed ones listed
    rec = read_json(study / "good.seed0" / "predictions.json")
    t0, p0 = np.asarray(rec["true"][0]), np.asarray(rec["pred"][0])
    assert 'figure class="cell multi' in page
    for k in np.flatnonzero(p0):
        assert f"{'✓' if t0[k] else '✗'} {LABELS[k]} ({100 * rec['prob'][0][k]:.0f}%)" in page
    if (t0 & (1 - p0)).any():
        assert "missed: " + ", ".join(LABELS[k] for k in np.flatnonzero(t0 & (1 - p0))) in page
    assert "## Labels (multi-label experiments)" in md and "## Most-confused pairs" not in md


# --------------------------------------------------------------------------------------------
# predict and export: a tiny trained model in a multi-label run folder


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A trained 4-logit model whose run folder says multi-label, with thresholds that split the outside images."""
    root = tmp_path_factory.mktemp("ml_predict")
    cfg = from_dict(ExperimentConfig, {
        "name": "ml", "data": {"dataset": "synthetic", "synthetic_classes": 4, "synthetic_size": 96, "val_fraction": 0.25},
        "model": {"backbone": "transferlab_cnn", "weights": "scratch"},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": "cpu", "precision": "32-true"},
    })
    cfg.validate()
    run_dir = root / "runs" / "s" / "ml"
    assert run_experiment(cfg, run_dir, console=quiet())["status"] == "ok"
    files = []
    for k in range(4):
        files.append(root / f"img{k}.png")
        Image.fromarray(synthetic_class_image(k, seed=100 + k)).save(files[-1])
    # the probabilities predict must threshold, computed here: sigmoid of the model's logits
    run = load_run(run_dir)
    model = run.load_model().eval()
    x, _, _ = load_images(files, 3, 16)
    with torch.no_grad():
        probs = model(model.preprocess()(x)).sigmoid()
    thresholds = [float((probs[:, k].min() + probs[:, k].max()) / 2) for k in range(4)]  # some images above, some below
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    raw["data"]["task"], raw["train"]["loss"], raw["train"]["early_stopping"]["monitor"] = "multilabel", "bce", "val_map"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    metrics = read_json(run_dir / "metrics.json")
    metrics.update(task="multilabel", thresholds=thresholds, threshold_mode="per_class", test_acc=None, test_map=0.9, per_class_acc=None,
                   confusion_matrix=None, per_class_ap=[0.9, 0.8, 1.0, 0.9])
    write_json(run_dir / "metrics.json", metrics)
    return run_dir, files


def expected_labels(run_dir: Path, files: list[Path]) -> list[list[str]]:
    run = load_run(run_dir)
    model = run.load_model().eval()
    x, _, _ = load_images(files, 3, 16)
    with torch.no_grad():
        probs = model(model.preprocess()(x)).sigmoid()
    t = torch.tensor(run.record.thresholds)
    return [[name for name, on in zip(run.class_names, row.tolist(), strict=True) if on] for row in probs >= t]


def test_predict_prints_every_label_at_or_above_its_threshold(ml_run, capsys):
    run_dir, files = ml_run
    want = expected_labels(run_dir, files)
    assert any(want) and not all(len(w) == 4 for w in want)  # the thresholds split the labels
    preds = predict(run_dir, files, top_k=2)
    for p, labels in zip(preds, want, strict=True):
        assert sorted(n for n, _, _ in p.labels) == sorted(labels)
        assert [q for _, _, q in p.labels] == sorted((q for _, _, q in p.labels), reverse=True)
        assert len(p.top) == 2  # the top-k is still there
    doc = predictions_json(run_dir, preds)
    assert doc["task"] == "multilabel" and doc["thresholds"] == pytest.approx(read_json(run_dir / "metrics.json")["thresholds"])
    assert [[q["class"] for q in item["labels"]] for item in doc["images"]] == [[n for n, _, _ in p.labels] for p in preds]
    # the command line: a table of labels with probability and threshold, and the same JSON
    assert main(["predict", str(run_dir), *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert "labels at or above their thresholds" in out and "threshold" in out
    assert main(["predict", str(run_dir), *map(str, files), "--json", "-"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["task"] == "multilabel" and [[q["class"] for q in i["labels"]] for i in printed["images"]] == want


def test_exports_record_task_and_thresholds_and_predict_from_them_uses_them(ml_run, tmp_path):
    run_dir, files = ml_run
    thresholds = read_json(run_dir / "metrics.json")["thresholds"]
    want = expected_labels(run_dir, files)
    run = load_run(run_dir)
    done = []
    for name in EXPORT_FORMATS.names():
        fmt = EXPORT_FORMATS.get(name)
        try:
            fmt.check_available()
        except ExportError:  # an optional extra not installed here
            continue
        done.append(name)
        out = tmp_path / name / fmt.filename
        result = run.export(name, out)
        spec = export_format_of(result.path).read_spec(result.path)
        assert spec.task == "multilabel" and list(spec.thresholds) == pytest.approx(thresholds), name
        assert json.loads(spec.metadata()["thresholds"]) == pytest.approx(thresholds) and spec.metadata()["task"] == "multilabel"
        got = predict(result.path, files)
        assert [sorted(n for n, _, _ in p.labels) for p in got] == [sorted(w) for w in want], name
        if name == "onnx":  # the flat keys other tools read
            import onnx

            meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
            assert meta["task"] == "multilabel" and json.loads(meta["thresholds"]) == pytest.approx(thresholds)
            assert "sigmoid" in meta["output"]
        if name == "hf":
            cfg = json.loads((result.path / "config.json").read_text())
            assert cfg["problem_type"] == "multi_label_classification" and cfg["thresholds"] == pytest.approx(thresholds)
            card = (result.path / "README.md").read_text()
            assert "multi-label" in card and "multi_label_classification" in card and ".sigmoid()" in card
            assert all(f"{md_esc(c)} {t:.3f}" in card for c, t in zip(run.class_names, thresholds, strict=True))
    assert {"torchscript", "exported-program", "safetensors", "hf"} <= set(done), done  # the formats without an optional extra


def test_an_export_written_before_tasks_reads_as_multiclass():
    spec = ExportSpec(class_names=("a", "b"), image_size=16, channels=3, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    doc = json.loads(spec.to_json())
    del doc["task"], doc["thresholds"]
    old = ExportSpec.from_json(json.dumps(doc), "old.onnx")
    assert old.task == "multiclass" and old.thresholds is None and "softmax" in old.metadata()["output"]


# --------------------------------------------------------------------------------------------
# trackers: the multi-label test metrics where test_acc is logged


def multilabel_cfg() -> ExperimentConfig:
    return from_dict(ExperimentConfig, {"name": "ml", "data": {"dataset": "synthetic", "task": "multilabel"}})


def test_trackers_log_the_multilabel_test_metrics(seeded_study, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study, written = seeded_study
    metrics = written["good"][0]
    run_dir = tmp_path / "tracked" / "ml"
    run_dir.mkdir(parents=True)
    cfg = multilabel_cfg()
    assert cfg.train.loss == "bce" and cfg.train.early_stopping.monitor == "val_map"
    keys = ("test_map", "test_map_micro", "test_f1", "test_f1_micro", "test_exact_match", "test_hamming")

    tb = TensorBoardTracker(RunInfo(cfg, run_dir, quiet()), TensorBoardOptions())
    tb.start(False, None)
    tb.log_epoch({"epoch": 1, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.4, "val_map": 0.7}, 4)
    tb.finish(metrics, None)
    tb.close()
    acc = EventAccumulator(str(tb.log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    for key in keys:
        assert [e.value for e in acc.Scalars(key.replace("test_", "test/", 1))] == pytest.approx([metrics[key]]), key
    assert [e.value for e in acc.Scalars("val/map")] == pytest.approx([0.7])
    assert "test/acc" not in acc.Tags()["scalars"]

    db = tmp_path / "tracked" / "mlflow.db"
    ml = MlflowTracker(RunInfo(cfg, run_dir, quiet()), MlflowOptions(tracking_uri=f"sqlite:///{db}", log_artifacts=False))
    ml.start(False, None)
    ml.log_epoch({"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "val_map": 0.7}, 4)
    ml.finish(metrics, None)
    logged = MlflowClient(f"sqlite:///{db}").get_run(ml.run_id).data.metrics
    for key in keys:
        assert logged[key] == pytest.approx(metrics[key]), key
    assert logged["val_map"] == pytest.approx(0.7) and "test_acc" not in logged

    # W&B: what the tracker hands its run (the offline W&B service itself is tests/test_wandb.py's)
    wb = WandbTracker(RunInfo(cfg, run_dir, quiet()), WandbOptions(log_artifacts=False))
    wb.wb = recorder = WandbRecorder()
    wb.log_epoch({"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "val_map": 0.7}, 4)
    wb.finish(metrics, None)
    for key in keys:
        assert recorder.summary[key.replace("test_", "test/", 1)] == pytest.approx(metrics[key]), key
    assert recorder.rows[0]["val/map"] == pytest.approx(0.7) and "test/acc" not in recorder.summary and recorder.exit_code == 0


class WandbRecorder:
    """Stands in for a ``wandb`` run: what was logged, the summary, the exit code."""

    def __init__(self) -> None:
        self.summary: dict[str, float] = {}
        self.rows: list[dict[str, float]] = []
        self.exit_code: int | None = None

    def log(self, row: dict[str, float]) -> None:
        self.rows.append(row)

    def finish(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code


# --------------------------------------------------------------------------------------------
# end to end: a multi-label study trained here, then compare, the report, the predict: section, export and predict


def test_a_trained_multilabel_study_end_to_end(tmp_path):
    import transferlab

    outside = tmp_path / "outside"
    outside.mkdir()
    for k in range(3):
        Image.fromarray(synthetic_class_image(k, seed=200 + k)).save(outside / f"o{k}.png")
    study = {
        "study": "ml_e2e",
        "seeds": [0, 1],
        "defaults": {
            "data": {"dataset": "synthetic", "task": "multilabel", "synthetic_classes": 4, "synthetic_size": 160, "val_fraction": 0.25},
            "model": {"backbone": "transferlab_cnn", "weights": "scratch"},
            "train": {"epochs": 3, "batch_size": 32, "optimizer": "adamw", "lr": 0.003, "progress": False, "accelerator": "cpu",
                      "precision": "32-true"},
        },
        "experiments": [{"name": "global", "predict": {"images": [str(outside)]}}, {"name": "per_class", "train": {"threshold": "per_class"}}],
    }
    path = tmp_path / "ml_e2e.yaml"
    path.write_text(yaml.safe_dump(study))
    study_dir = transferlab.run_study(path, runs_dir=tmp_path / "runs", console=quiet()).runs_dir
    recorded = {r.parent.name: read_json(r) for r in sorted(study_dir.glob("*/metrics.json"))}
    assert len(recorded) == 4 and all(m["task"] == "multilabel" for m in recorded.values())

    # compare: mAP over the two seeds, paired t between the experiments
    rows = {r["experiment"]: r for r in compare(study_dir, console=quiet())}
    for name in ("global", "per_class"):
        maps = [recorded[f"{name}.seed{s}"]["test_map"] for s in (0, 1)]
        assert rows[name]["test_map"] == pytest.approx(statistics.fmean(maps)) and rows[name]["test_map_std"] == pytest.approx(statistics.stdev(maps))
        assert rows[name]["threshold_mode"] == recorded[f"{name}.seed0"]["threshold_mode"]
    assert rows["per_class"]["threshold_mode"] == "per_class"
    other = next(r for r in rows.values() if r["mark"] != "reference")
    assert other["test"] == "paired t" and other["metric"] == "test_map"

    # the report: every multi-label part, from the runs' own files
    rep = build_report(study_dir)
    page, md = rep.html_path.read_text(), rep.md_path.read_text()
    for name in ("global", "per_class"):
        assert f'alt="per-class average precision of {name}"' in page and f'alt="label co-occurrence of {name}"' in page
        assert f"### {md_esc(name)}" in md
    assert "Most-missed labels" in page and 'figure class="cell multi' in page and "validation mAP per epoch" in page

    # the predict: section labelled the outside images at the run's thresholds
    run_dir = study_dir / "global.seed0"
    doc = read_json(run_dir / "outside_predictions.json")
    assert doc["task"] == "multilabel" and doc["thresholds"] == pytest.approx(recorded["global.seed0"]["thresholds"])
    files = sorted(outside.glob("*.png"))
    want = expected_labels(run_dir, files)
    assert [[q["class"] for q in item["labels"]] for item in doc["images"]] == want

    # export (the format without an optional extra, and ONNX when installed) and predict from it: the run's labels
    for name in ("safetensors", "onnx"):
        try:
            result = load_run(run_dir).export(name, tmp_path / "export" / EXPORT_FORMATS.get(name).filename)
        except ExportError as e:
            assert name == "onnx" and "not installed" in str(e)
            continue
        spec = export_format_of(result.path).read_spec(result.path)
        assert spec.task == "multilabel" and list(spec.thresholds) == pytest.approx(recorded["global.seed0"]["thresholds"])
        assert [sorted(n for n, _, _ in p.labels) for p in predict(result.path, files)] == [sorted(w) for w in want]


def test_a_multilabel_search_reports_the_test_map_of_its_best_trial():
    from transferlab.results.search import SearchRecord, search_lines

    info = {"metric": "val_map", "direction": "maximize", "trials": [{"state": "COMPLETE"}],
            "best": {"run": "s.trial0", "value": 0.91, "params": {"train.lr": 0.01}}}
    lines = search_lines(SearchRecord("s", info, {"task": "multilabel", "test_map": 0.875, "test_acc": None}))
    assert "val_map 0.9100 on validation" in lines[1] and "test mAP 87.50% (reported, never used to choose)" in lines[1]
    assert "test accuracy" not in lines[1]


def test_activation_maps_of_a_multilabel_model_show_the_sigmoid_of_the_top_label(ml_run):
    from transferlab.tools.inspect import image_activations

    run_dir, files = ml_run
    run = load_run(run_dir)
    model = run.load_model().eval()
    x, _, _ = load_images(files[:1], 3, 16)
    with torch.no_grad():
        logits = model(model.preprocess()(x))[0]
    top = int(logits.argmax())
    res = image_activations(model, x, model.preprocess(), run.class_names, "img", gradcam_layer="features", multilabel=True)
    assert res.predicted == run.class_names[top] and res.prob == pytest.approx(float(logits[top].sigmoid()), abs=1e-6)
    assert res.gradcam is not None and res.gradcam.class_index == top and res.gradcam.prob == pytest.approx(res.prob, abs=1e-6)
