"""Issue 24: the kinds other than train on multi-label data — the one-vs-rest logistic probe, the k-NN vote of label
vectors, ensembles (soft: mean probability, hard: strict majority per label), soups and WiSE-FT by validation mAP —,
the search metric, rank and the refusals (few-shot, auto). Every metric is recomputed here with scikit-learn from the
runs' own models; thresholds are checked to come from the validation split, never the test split."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from rich.console import Console
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, hamming_loss, precision_score, recall_score

from transferlab.config import ConfigError, DataConfig, ExperimentConfig, SearchSpec, from_dict, parse_study
from transferlab.data import TensorBatches, prepare_splits
from transferlab.engine.features import STORE
from transferlab.engine.multilabel import choose_thresholds
from transferlab.engine.probes import KNNClassifier, fit_knn, fit_logistic, logme
from transferlab.rundir import load_run

QUIET = Console(quiet=True)
K = 5  # classes of the synthetic multi-label data


# --------------------------------------------------------------------------------------------
# references, written the plain way


def _reference(probs: torch.Tensor, y: torch.Tensor, thresholds: list[float]) -> dict[str, float]:
    """scikit-learn's multi-label metrics: mAP macro over the classes with a positive, micro; the rest at ``p >= t``."""
    p, t = probs.double().numpy(), y.numpy().astype(int)
    pred = (probs.float().numpy() >= np.asarray(thresholds, dtype=np.float32)).astype(int)
    has = t.sum(0) > 0
    return {
        "test_map": average_precision_score(t[:, has], p[:, has], average="macro"),
        "test_map_micro": average_precision_score(t, p, average="micro"),
        "test_f1": f1_score(t, pred, average="macro", zero_division=0),
        "test_f1_micro": f1_score(t, pred, average="micro", zero_division=0),
        "test_precision": precision_score(t, pred, average="macro", zero_division=0),
        "test_recall": recall_score(t, pred, average="macro", zero_division=0),
        "test_exact_match": accuracy_score(t, pred),
        "test_hamming": hamming_loss(t, pred),
    }


def _assert_metrics(m: dict, probs: torch.Tensor, y: torch.Tensor) -> None:
    ref = _reference(probs, y, m["thresholds"])
    for key, value in ref.items():
        assert m[key] == pytest.approx(value, abs=1e-4), key
    assert m["task"] == "multilabel" and m["test_acc"] is None and m["per_class_acc"] is None and m["confusion_matrix"] is None


def _multilabel_blobs(n: int, d: int = 8, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features that carry each label along its own direction, plus noise; every image has 1 or 2 labels."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, k, generator=g) < 0.35).float()
    y[y.sum(1) == 0, 0] = 1.0
    directions = torch.randn(k, d, generator=torch.Generator().manual_seed(99))
    return y @ directions * 2 + torch.randn(n, d, generator=g) + 3.0, y


# --------------------------------------------------------------------------------------------
# the probes on arrays


def test_one_vs_rest_logistic_probe_is_scikit_learns():
    """One L2 strength: the L-BFGS optimum on multi-hot targets is scikit-learn's OneVsRestClassifier of binary
    LogisticRegression on the same standardised features, with C = 1 / (l2 · N)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    x, y = _multilabel_blobs(300)
    xv, yv = _multilabel_blobs(120, seed=1)
    l2 = 0.01
    res = fit_logistic(x, y, xv, yv, 4, [l2], max_iter=500)
    scaler = StandardScaler().fit(x.numpy().astype(np.float64))
    sk = OneVsRestClassifier(LogisticRegression(C=1 / (l2 * len(x)), max_iter=5000, tol=1e-10)).fit(scaler.transform(x.numpy()), y.numpy())
    ours = torch.sigmoid(xv @ res.weight.T + res.bias).numpy()
    np.testing.assert_allclose(ours, sk.predict_proba(scaler.transform(xv.numpy())), atol=2e-3)


def test_logistic_probe_keeps_the_l2_with_the_best_validation_map():
    x, y = _multilabel_blobs(60, d=40)
    xv, yv = _multilabel_blobs(300, d=40, seed=1)
    grid = [1e-6, 1e-3, 0.1, 1.0, 30.0]
    res = fit_logistic(x, y, xv, yv, 4, grid, max_iter=300)
    assert res.monitor == "val_map" and sorted(r["l2"] for r in res.sweep) == grid
    assert all("val_acc" not in r for r in res.sweep)
    best = max(res.sweep, key=lambda r: (r["val_map"], -r["val_loss"]))
    assert res.l2 == best["l2"] and res.score == pytest.approx(best["val_map"])
    probs = torch.sigmoid(xv @ res.weight.T + res.bias)  # the folded standardisation gives the same scores
    assert res.score == pytest.approx(average_precision_score(yv.numpy(), probs.numpy(), average="macro"), abs=1e-5)
    loss = torch.nn.functional.binary_cross_entropy(probs.double(), yv.double())
    assert best["val_loss"] == pytest.approx(float(loss), abs=1e-4)
    with pytest.raises(AttributeError, match="val_map"):
        _ = res.val_acc


def _knn_reference(x: torch.Tensor, y: torch.Tensor, q: torch.Tensor, k: int, temperature: float) -> np.ndarray:
    """Per-class scores of DINO's weighted cosine k-NN with label vectors: exp(sim / T)-weighted mean of the k nearest
    training rows' labels (scikit-learn finds the neighbours)."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(x.double().numpy())
    dist, idx = nn.kneighbors(q.double().numpy())
    w = np.exp((1 - dist) / temperature - (1 - dist[:, :1]) / temperature)
    return ((w[:, :, None] * y.numpy()[idx]).sum(1) / w.sum(1, keepdims=True)).astype(np.float32)  # scores in float32, as a run's


def test_knn_vote_is_the_weighted_mean_of_the_neighbours_label_vectors():
    x, y = _multilabel_blobs(200)
    xq, _ = _multilabel_blobs(80, seed=3)
    for k, temperature in ((1, 0.07), (7, 0.07), (7, 1e6)):
        ours = KNNClassifier(x, y, k, 4, temperature)(xq).sigmoid().double().numpy()
        np.testing.assert_allclose(ours, _knn_reference(x, y, xq, k, temperature), atol=1e-5)


def test_knn_chooses_k_on_validation_map():
    x, y = _multilabel_blobs(300)
    xv, yv = _multilabel_blobs(150, seed=1)
    res = fit_knn(x, y, xv, yv, 4, [1, 7, 25, 1000])
    assert res.monitor == "val_map" and [int(r["k"]) for r in res.sweep] == [1, 7, 25, 300]
    for row in res.sweep:
        ref = _knn_reference(x, y, xv, int(row["k"]), 0.07)
        assert row["val_map"] == pytest.approx(average_precision_score(yv.numpy(), ref, average="macro"), abs=1e-5)
    assert res.score == max(r["val_map"] for r in res.sweep)
    assert res.k == min(int(r["k"]) for r in res.sweep if r["val_map"] == res.score)


def test_logme_of_one_hot_rows_equals_logme_of_class_indices():
    """LogME of a multi-hot matrix is the mean over its columns; one-hot rows are the multiclass labels' columns."""
    x, y = _multilabel_blobs(150)
    labels = torch.arange(150) % 3
    assert logme(x, torch.nn.functional.one_hot(labels).float()) == pytest.approx(logme(x, labels), rel=1e-9)
    informative, noise = logme(x, y), logme(torch.randn(150, 8, generator=torch.Generator().manual_seed(5)), y)
    assert informative > noise + 0.1


# --------------------------------------------------------------------------------------------
# runs: probes, ensembles and soups on the synthetic multi-label data


DEFAULTS = {
    "data": {"dataset": "synthetic", "task": "multilabel", "synthetic_classes": K, "synthetic_size": 200, "val_fraction": 0.25},
    "model": {"backbone": "test_efficientnet_gn", "weights": "scratch"},  # GroupNorm: a soup of probes recomputes no BatchNorm
    "train": {"progress": False, "accelerator": "cpu", "precision": "32-true", "eval_batch_size": 64},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One study: three logistic probes (fixed, different L2), a k-NN, soft / hard votes of the probes, a greedy soup
    and WiSE-FT between two probes. Every ``choose_thresholds`` call is recorded (where, how many rows)."""
    from transferlab.engine import multilabel
    from transferlab.kinds import ensemble, soup
    from transferlab.study import run_study

    study = parse_study({
        "study": "ml", "defaults": DEFAULTS,
        "experiments": [
            {"name": "lr_a", "kind": "logistic", "probe": {"l2": [1e-3]}},
            {"name": "lr_b", "kind": "logistic", "probe": {"l2": [0.1, 10.0]}, "train": {"threshold": "per_class"}},
            {"name": "lr_c", "kind": "logistic", "probe": {"l2": [30.0]}, "train": {"threshold": 0.4}},
            {"name": "knn", "kind": "knn", "probe": {"k": [1, 5, 20]}},
            {"name": "greedy", "kind": "soup", "soup": {"members": ["lr_a", "lr_b", "lr_c"], "method": "greedy"}},
            {"name": "wise", "kind": "soup", "soup": {"members": ["lr_a"], "interpolate": {"base": "run:lr_c", "alphas": [0.0, 0.5, 1.0]}}},
        ],
        "ensembles": [
            {"name": "soft", "members": ["lr_a", "lr_b", "lr_c"], "vote": "soft"},
            {"name": "hard", "members": ["lr_a", "lr_b", "lr_c"], "vote": "hard"},
        ],
    })
    calls = []

    def spy(where, real):
        def choose(probs, targets, mode):
            calls.append((where, len(probs)))
            return real(probs, targets, mode)
        return choose

    root = tmp_path_factory.mktemp("ml")
    STORE.clear()
    with pytest.MonkeyPatch.context() as mp:
        for module in (multilabel, ensemble, soup):  # the probes choose through engine.multilabel
            mp.setattr(module, "choose_thresholds", spy(module.__name__, module.choose_thresholds))
        result = run_study(study, root, console=QUIET)
    assert result.ok, result.failed
    return root / "ml", calls


_SPLITS: dict[str, object] = {}


def _splits(run):
    """The run's splits, prepared once per data section."""
    key = repr(run.config.data)
    if key not in _SPLITS:
        _SPLITS[key] = prepare_splits(run.config.data, run.config.seed)
    return _SPLITS[key]


def _probs(run_dir, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's own model on its ``split`` images, the plain way: sigmoid probabilities and the multi-hot targets."""
    run = load_run(run_dir)
    splits = _splits(run)
    model = run.load_model().eval()
    x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
    with torch.no_grad():
        probs = torch.cat([model(xb).float().sigmoid() for xb, _ in TensorBatches(x, y, 64, model.preprocess())])
    return probs, y


def test_thresholds_are_only_ever_chosen_on_validation_rows(runs):
    study_dir, calls = runs
    n_val, n_test = load_run(study_dir / "lr_a").record.n_val, load_run(study_dir / "lr_a").record.n_test
    assert n_val != n_test  # so the row count tells the splits apart
    where = {w for w, _ in calls}
    assert where == {"transferlab.engine.multilabel", "transferlab.kinds.ensemble", "transferlab.kinds.soup"}
    assert all(n == n_val for _, n in calls), calls


@pytest.mark.parametrize("name, mode", [("lr_a", "global"), ("lr_b", "per_class"), ("lr_c", 0.4)])
def test_logistic_run_metrics_are_scikit_learns_at_thresholds_chosen_on_val(runs, name, mode):
    study_dir, _ = runs
    run = load_run(study_dir / name)
    m = run.metrics
    assert m["monitor"] == "val_map" and m["threshold_mode"] == ("fixed" if mode == 0.4 else mode) and len(m["thresholds"]) == K
    assert m["best_val"] == m["probe"]["val_map"] == pytest.approx(max(r["val_map"] for r in run.history))
    val_probs, val_y = _probs(study_dir / name, "val")
    assert m["best_val"] == pytest.approx(average_precision_score(val_y.numpy(), val_probs.numpy(), average="macro"), abs=1e-4)
    np.testing.assert_allclose(m["thresholds"], choose_thresholds(val_probs, val_y, mode)[0], atol=1e-4)
    test_probs, test_y = _probs(study_dir / name, "test")
    _assert_metrics(m, test_probs, test_y)
    assert m["test_loss"] == pytest.approx(float(torch.nn.functional.binary_cross_entropy(test_probs.double(), test_y.double())), abs=1e-4)


def test_knn_run_metrics_are_the_reference_vote_at_thresholds_chosen_on_val(runs):
    study_dir, _ = runs
    run = load_run(study_dir / "knn")
    m = run.metrics
    assert m["monitor"] == "val_map" and m["trainable_params"] == 0
    best = max(run.history, key=lambda r: r["val_map"])
    assert m["probe"]["k"] == min(int(r["k"]) for r in run.history if r["val_map"] == best["val_map"])
    tr, va, te = (STORE.get(key, None) for key in m["feature_cache"]["keys"])  # the frozen features the vote used
    k, t = m["probe"]["k"], m["probe"]["temperature"]
    val_scores = torch.from_numpy(_knn_reference(tr.features, tr.labels, va.features, k, t))
    np.testing.assert_allclose(m["thresholds"], choose_thresholds(val_scores, va.labels, "global")[0], atol=1e-4)
    _assert_metrics(m, torch.from_numpy(_knn_reference(tr.features, tr.labels, te.features, k, t)), te.labels)


def test_soft_vote_averages_probabilities_and_chooses_thresholds_on_the_mean_val_probabilities(runs):
    study_dir, _ = runs
    m = load_run(study_dir / "soft").metrics
    members = [study_dir / n for n in ("lr_a", "lr_b", "lr_c")]
    val = [_probs(r, "val") for r in members]
    test = [_probs(r, "test") for r in members]
    mean_val = torch.stack([p for p, _ in val]).mean(0)
    # the first member chose its thresholds globally: so does the vote, on the mean validation probabilities
    assert m["threshold_mode"] == "global" and "val" in m["thresholds_chosen_on"]
    np.testing.assert_allclose(m["thresholds"], choose_thresholds(mean_val, val[0][1], "global")[0], atol=1e-4)
    mean_test = torch.stack([p for p, _ in test]).mean(0)
    _assert_metrics(m, mean_test, test[0][1])
    # its per-class calibration, as a run's: torchmetrics' binary ECE of each class, averaged
    from torchmetrics.functional.classification import binary_calibration_error

    from transferlab.engine.calibration import ECE_BINS

    ece = [float(binary_calibration_error(mean_test[:, c], test[0][1][:, c].long(), n_bins=ECE_BINS, norm="l1")) for c in range(K)]
    assert m["test_ece"] == pytest.approx(float(np.mean(ece)), abs=1e-5)
    assert [r["test_map"] for r in m["members"]] == pytest.approx([load_run(r).metrics["test_map"] for r in members], abs=1e-4)


def test_hard_vote_is_a_strict_majority_of_the_members_at_their_own_thresholds(runs):
    study_dir, _ = runs
    m = load_run(study_dir / "hard").metrics
    votes, y = [], None
    for name in ("lr_a", "lr_b", "lr_c"):
        probs, y = _probs(study_dir / name, "test")
        votes.append(probs.numpy() >= np.asarray(load_run(study_dir / name).metrics["thresholds"], dtype=np.float32))
    share = np.mean(votes, axis=0)
    majority = (share > 0.5).astype(int)  # 2 of 3 members
    assert m["threshold_mode"] == "fixed" and m["thresholds"] == pytest.approx([2 / 3] * K) and m["test_loss"] is None
    t = y.numpy().astype(int)
    assert m["test_exact_match"] == pytest.approx(accuracy_score(t, majority))
    assert m["test_hamming"] == pytest.approx(hamming_loss(t, majority))
    assert m["test_f1"] == pytest.approx(f1_score(t, majority, average="macro", zero_division=0))
    assert m["test_map"] == pytest.approx(average_precision_score(t, share, average="macro"), abs=1e-6)


def test_trained_members_vote_as_their_runs_were_tested_flip_tta_included(tmp_path):
    """Members of kind: train, one tested with flip TTA: the soft vote averages each member's probabilities as its own
    run computed them (the flip view's sigmoid averaged in) — the members' recorded test mAP is reproduced."""
    from transferlab.study import run_study

    study = parse_study({
        "study": "mlt", "defaults": {**DEFAULTS, "train": {**DEFAULTS["train"], "epochs": 1, "batch_size": 32, "lr": 0.01}},
        "experiments": [{"name": "plain"}, {"name": "flip", "train": {"tta": "flip", "lr": 0.02}}],
        "ensembles": [{"name": "soft", "members": ["plain", "flip"], "vote": "soft"}],
    })
    result = run_study(study, tmp_path, console=QUIET)
    assert result.ok, result.failed
    m = load_run(tmp_path / "mlt" / "soft").metrics
    for row in m["members"]:
        assert row["test_map"] == pytest.approx(row["recorded_test_map"], abs=1e-4), row["experiment"]
    plain, y = _probs(tmp_path / "mlt" / "plain", "test")
    flip_run = load_run(tmp_path / "mlt" / "flip")
    model = flip_run.load_model().eval()
    x = _splits(flip_run).test_x
    with torch.no_grad():
        flip = torch.cat([(model(xb).sigmoid() + model(xb.flip(-1)).sigmoid()) / 2 for xb, _ in TensorBatches(x, y, 64, model.preprocess())])
    _assert_metrics(m, (plain + flip) / 2, y)


def test_greedy_soup_ranks_members_by_validation_map(runs):
    study_dir, _ = runs
    m = load_run(study_dir / "greedy").metrics
    assert m["monitor"] == "val_map"
    rows = m["soup"]["members"]
    for row in rows:
        probs, y = _probs(row["run"], "val")
        assert row["val_map"] == pytest.approx(average_precision_score(y.numpy(), probs.numpy(), average="macro"), abs=1e-4)
    first = max(rows, key=lambda r: r["val_map"])
    assert m["soup"]["chosen"][0] == first["run"]  # greedy starts from the best member on validation mAP
    assert all("greedy_val_map" in r for r in rows if r["run"] != first["run"])
    val_probs, val_y = _probs(study_dir / "greedy", "val")
    assert m["best_val"] == pytest.approx(average_precision_score(val_y.numpy(), val_probs.numpy(), average="macro"), abs=1e-4)
    np.testing.assert_allclose(m["thresholds"], choose_thresholds(val_probs, val_y, "global")[0], atol=1e-4)
    _assert_metrics(m, *_probs(study_dir / "greedy", "test"))


def test_a_soup_of_probes_keeps_the_frozen_backbones_batchnorm_statistics(tmp_path):
    """Probes on frozen features trained only their heads: a soup of them recomputes no BatchNorm statistics of the
    backbone (the layers that trained decide, as the members' strategy says), so it scores as the average of heads."""
    from transferlab.study import run_study

    study = parse_study({
        "study": "bn", "defaults": {**DEFAULTS, "model": {"backbone": "transferlab_cnn", "weights": "scratch"}},
        "experiments": [{"name": "a", "kind": "logistic", "probe": {"l2": [1e-3]}}, {"name": "b", "kind": "logistic", "probe": {"l2": [1.0]}},
                        {"name": "ab", "kind": "soup", "soup": {"members": ["a", "b"], "method": "uniform"}}],
    })
    result = run_study(study, tmp_path, console=QUIET)
    assert result.ok, result.failed
    soup = load_run(tmp_path / "bn" / "ab").metrics
    assert soup["soup"]["batchnorm_recomputed"] == 0
    a, b = (_probs(tmp_path / "bn" / n, "val") for n in ("a", "b"))
    model = load_run(tmp_path / "bn" / "ab").load_model().eval()
    with torch.no_grad():  # the averaged head on the members' (unchanged) features: the members' mean logits
        x = _splits(load_run(tmp_path / "bn" / "ab")).val_x
        soup_probs = torch.cat([model(xb).sigmoid() for xb, _ in TensorBatches(x, a[1], 64, model.preprocess())])
    mean_logits = (torch.logit(a[0].double()) + torch.logit(b[0].double())) / 2
    np.testing.assert_allclose(soup_probs.double().numpy(), torch.sigmoid(mean_logits).numpy(), atol=1e-4)


def test_wise_ft_alpha_is_chosen_by_validation_map(runs):
    study_dir, _ = runs
    wise = load_run(study_dir / "wise")
    wf = wise.metrics["wise_ft"]
    assert [r["alpha"] for r in wf["curve"]] == [0.0, 0.5, 1.0] and all({"val_map", "test_map"} <= set(r) for r in wf["curve"])
    assert wf["chosen_alpha"] == max(wf["curve"], key=lambda r: r["val_map"])["alpha"]
    assert [r["alpha"] for r in wise.history] == [0.0, 0.5, 1.0]
    _assert_metrics(wise.metrics, *_probs(study_dir / "wise", "test"))


def test_the_report_shows_every_multilabel_kind(runs):
    """compare / the report read these runs back (the WiSE-FT curve in mAP included)."""
    from transferlab.results.report import build_report

    study_dir, _ = runs
    html = build_report(study_dir).html_path.read_text()
    assert "learning curves of wise" in html
    assert all(name in html for name in ("lr_a", "knn", "greedy", "soft", "hard"))


# --------------------------------------------------------------------------------------------
# refusals and the tools


def _cfg(**over) -> ExperimentConfig:
    raw = {"name": "x", **{k: dict(v) for k, v in DEFAULTS.items()}}
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(ExperimentConfig, raw)


def test_fewshot_refuses_multilabel_data_naming_the_kind():
    cfg = _cfg(kind="fewshot")
    with pytest.raises(ConfigError, match=r"kind.*fewshot.*does not support data.task: multilabel"):
        cfg.validate()
    for kind in ("logistic", "knn"):
        _cfg(kind=kind).validate()  # the probes accept it


def test_members_of_both_tasks_do_not_vote_together(runs, tmp_path):
    from transferlab.kinds import evaluate_ensemble, run_experiment
    from transferlab.kinds.ensemble import EnsembleError

    cfg = _cfg(kind="logistic", probe={"l2": [1.0]}, data={"task": "multiclass"})
    cfg.validate()
    run_experiment(cfg, tmp_path / "mc", console=QUIET)
    with pytest.raises(EnsembleError, match="members share data.task"):
        evaluate_ensemble([runs[0] / "lr_a", tmp_path / "mc"])


def test_a_soup_of_multilabel_members_needs_their_data_task(runs):
    study_dir, _ = runs
    cfg = _cfg(kind="soup", soup={"members": [str(study_dir / "lr_a"), str(study_dir / "lr_b")]}, data={"task": "multiclass"})
    with pytest.raises(ConfigError, match=r"lr_a is a multilabel run and the soup's data.task is multiclass"):
        cfg.validate()
    _cfg(kind="soup", soup={"members": [str(study_dir / "lr_a"), str(study_dir / "lr_b")]}).validate()


def test_a_search_of_a_multilabel_experiment_optimises_val_map():
    from transferlab.study.search import task_metric

    spec = SearchSpec(space={"train.lr": {"log_uniform": [1e-4, 1e-1]}})
    ml = task_metric(spec, _cfg())
    assert (ml.metric, ml.resolved_direction()) == ("val_map", "maximize")
    assert task_metric(dataclasses.replace(spec, metric="val_loss"), _cfg()).metric == "val_loss"
    assert task_metric(spec, _cfg(data={"task": "multiclass"})) is spec
    with pytest.raises(ConfigError, match="val_map is the macro mAP of data.task: multilabel"):
        task_metric(dataclasses.replace(spec, metric="val_map"), _cfg(data={"task": "multiclass"}))


def test_a_search_over_a_multilabel_experiment_reports_and_chooses_val_map(tmp_path):
    """End to end: each trial's per-epoch val_map goes to the pruner, its value is the run's best val_map."""
    from transferlab.study import run_study

    study = parse_study({
        "study": "mls", "defaults": {**DEFAULTS, "train": {**DEFAULTS["train"], "epochs": 2, "batch_size": 32}},
        "experiments": [{"name": "tune", "search": {"space": {"train.lr": {"log_uniform": [1e-3, 1e-1]}}, "trials": 2,
                                                    "sampler": "random", "pruner": "median"}}],
    })
    result = run_study(study, tmp_path, console=QUIET)
    assert result.ok, result.failed
    info = result.searches["tune"]
    assert (info["metric"], info["direction"]) == ("val_map", "maximize")
    for trial in info["trials"]:
        m = load_run(tmp_path / "mls" / trial["run"]).metrics
        assert m["monitor"] == "val_map" and trial["value"] == pytest.approx(m["best_val"])
    assert info["best"]["value"] == max(t["value"] for t in info["trials"])


def test_rank_scores_multilabel_data_by_validation_map():
    from transferlab.tools.rank import Candidate, print_ranking, rank_backbones

    data = DataConfig(**DEFAULTS["data"])
    result = rank_backbones(data, [Candidate("transferlab_cnn", "scratch")], ("knn", "logme"), accelerator="cpu")
    assert result.task == "multilabel" and 0 < result.rows[0].scores["knn"] <= 1
    out = io.StringIO()
    print_ranking(result, Console(file=out, width=150))
    assert "k-NN val mAP" in out.getvalue()


def test_rank_cli_takes_the_task(tmp_path, capsys):
    import json

    from transferlab.cli import main

    out = tmp_path / "rank.json"
    code = main(["rank", "--dataset", "digits_mosaic", "--task", "multilabel", "--backbones", "transferlab_cnn", "--weights", "scratch",
                 "--train-subset", "300", "--scores", "logistic,knn,logme", "--accelerator", "cpu", "--json", str(out)])
    assert code == 0 and "backbone ranking by logistic val mAP" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["task"] == "multilabel" and 0 < doc["ranking"][0]["scores"]["logistic"] <= 1


def test_auto_refuses_multilabel_data_clearly():
    from transferlab.tools.auto import resolve_data

    with pytest.raises(ConfigError, match="data.task: multilabel is not supported by transferlab auto"):
        resolve_data("synthetic", {"task": "multilabel"})
