"""Logistic probe (L-BFGS, L2 chosen on val), weighted cosine k-NN, LogME; their run directories."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console

from transferlab.config import ConfigError, ExperimentConfig, from_dict, parse_study
from transferlab.engine.features import STORE
from transferlab.engine.probes import KNNClassifier, fit_knn, fit_logistic, knn_topk, logme

QUIET = Console(quiet=True)


@pytest.fixture(autouse=True)
def _fresh_store():
    STORE.clear()
    yield
    STORE.clear()


def _blobs(n: int, d: int = 6, classes: int = 3, spread: float = 1.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.arange(n) % classes
    return centers[y] + spread * torch.randn(n, d, generator=g) + 5.0, y


def test_logistic_probe_solves_the_same_problem_as_scikit_learn():
    """One L2 strength: our L-BFGS optimum equals scikit-learn's multinomial LogisticRegression on the same
    (standardised) features, with C = 1 / (l2 · N)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = _blobs(300)
    xv, yv = _blobs(90, seed=1)
    l2 = 0.01
    res = fit_logistic(x, y, xv, yv, 3, [l2], max_iter=500)
    scaler = StandardScaler().fit(x.numpy().astype(np.float64))
    sk = LogisticRegression(C=1 / (l2 * len(x)), max_iter=5000, tol=1e-10).fit(scaler.transform(x.numpy()), y.numpy())
    ours = torch.softmax(xv @ res.weight.T + res.bias, 1).numpy()
    theirs = sk.predict_proba(scaler.transform(xv.numpy()))
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


def test_logistic_probe_keeps_the_l2_with_the_best_validation_accuracy():
    x, y = _blobs(60, d=40, spread=4.0)  # few samples, many noisy dimensions: regularisation matters
    xv, yv = _blobs(300, d=40, spread=4.0, seed=1)
    grid = [1e-6, 1e-3, 0.1, 1.0, 30.0]
    res = fit_logistic(x, y, xv, yv, 3, grid, max_iter=300)
    assert sorted(r["l2"] for r in res.sweep) == grid
    best = max(res.sweep, key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert res.l2 == best["l2"] and res.val_acc == pytest.approx(best["val_acc"])
    assert res.sweep[0]["train_loss"] > res.sweep[-1]["train_loss"]  # strongest first: it fits the train set least
    acc = ((xv @ res.weight.T + res.bias).argmax(1) == yv).float().mean()
    assert float(acc) == pytest.approx(res.val_acc, abs=1e-6)  # the folded standardisation gives the same predictions


def test_knn_agrees_with_scikit_learn_on_cosine_neighbours():
    from sklearn.neighbors import KNeighborsClassifier

    x, y = _blobs(200, spread=3.0)
    xq, yq = _blobs(100, spread=3.0, seed=3)
    for k in (1, 5):
        # a huge temperature makes every neighbour's vote equal: plain majority vote, as scikit-learn's
        ours = KNNClassifier(x, y, k, 3, temperature=1e6)(xq).argmax(1)
        sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(x.numpy(), y.numpy())
        agree = (ours.numpy() == sk.predict(xq.numpy())).mean()
        assert agree >= 0.98, (k, agree)  # ties between equal vote counts may break differently
    sims, idx = knn_topk(x, xq, 3)
    ref = torch.nn.functional.normalize(xq, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    torch.testing.assert_close(sims, ref.topk(3, dim=1).values)


def test_knn_chooses_k_on_validation():
    x, y = _blobs(300, spread=2.5)
    xv, yv = _blobs(150, spread=2.5, seed=1)
    res = fit_knn(x, y, xv, yv, 3, [1, 7, 25, 1000])
    assert [int(r["k"]) for r in res.sweep] == [1, 7, 25, 300]  # k beyond the training set is clamped
    assert res.val_acc == max(r["val_acc"] for r in res.sweep) > 0.7
    assert res.k == min(int(r["k"]) for r in res.sweep if r["val_acc"] == res.val_acc)


def _logme_reference(f: np.ndarray, y: np.ndarray) -> float:
    """LogME written the slow, literal way (ICML 2021, Algorithm 1): full D×D matrices per class."""
    n, d = f.shape
    ftf = f.T @ f
    eig = np.linalg.eigvalsh(ftf)
    out = []
    for c in range(y.max() + 1):
        yc = (y == c).astype(np.float64)
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            a = alpha * np.eye(d) + beta * ftf
            m = beta * np.linalg.solve(a, f.T @ yc)
            gamma = np.sum(beta * eig / (alpha + beta * eig))
            alpha_new = gamma / (m @ m + 1e-5)
            beta_new = (n - gamma) / (np.sum((yc - f @ m) ** 2) + 1e-5)
            done = abs(alpha_new / beta_new - alpha / beta) / (alpha / beta) <= 1e-3
            alpha, beta = alpha_new, beta_new
            if done:
                break
        a = alpha * np.eye(d) + beta * ftf
        m = beta * np.linalg.solve(a, f.T @ yc)
        ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.linalg.slogdet(a)[1]
              - beta / 2 * np.sum((yc - f @ m) ** 2) - alpha / 2 * m @ m - n / 2 * np.log(2 * np.pi))
        out.append(ev / n)
    return float(np.mean(out))


def test_logme_matches_the_literal_algorithm_and_prefers_informative_features():
    x, y = _blobs(200, d=8, spread=1.0)
    noise = torch.randn(200, 8, generator=torch.Generator().manual_seed(5))
    ours, ref = logme(x, y), _logme_reference(x.double().numpy(), y.numpy())
    assert ours == pytest.approx(ref, abs=0.02)  # same fixed point, reached by a different (SVD) route
    assert logme(x, y) > logme(noise, y) + 0.1
    assert math.isfinite(logme(torch.cat([x, x], 1), y))  # rank-deficient features


def _probe_study(kind_entries: list[dict], tmp_path):
    from transferlab.study import run_study

    study = parse_study({
        "study": "probes",
        "defaults": {
            "data": {"dataset": "digits", "image_size": 16, "val_fraction": 0.2},
            "model": {"backbone": "test_resnet"},
            "train": {"epochs": 2, "batch_size": 64, "progress": False, "accelerator": "cpu"},
        },
        "experiments": kind_entries,
    })
    return run_study(study, tmp_path, console=QUIET)


def test_logistic_and_knn_runs_are_ordinary_run_directories(tmp_path):
    from transferlab.data.batches import TensorBatches
    from transferlab.data.prepare import prepare_splits
    from transferlab.engine.evaluation import evaluate
    from transferlab.results.compare import collect
    from transferlab.rundir import load_run

    result = _probe_study([
        {"name": "logistic", "kind": "logistic", "probe": {"l2": [1e-3, 1e-1, 10.0]}},
        {"name": "knn", "kind": "knn", "probe": {"k": [1, 10]}},
        {"name": "head", "strategy": {"name": "linear_probe"}},
    ], tmp_path)
    assert result.ok, result.failed
    rows = {r["experiment"]: r for r in collect(tmp_path / "probes")}
    assert rows["logistic"]["strategy"] == "logistic" and rows["knn"]["strategy"] == "knn"
    for name in ("logistic", "knn"):
        m = json.loads((tmp_path / "probes" / name / "metrics.json").read_text())
        assert m["status"] == "ok" and m["test_acc"] > 0.5, (name, m["test_acc"])  # random-init features still separate digits
        assert len(m["per_class_acc"]) == 10 and np.array(m["confusion_matrix"]).sum() == m["n_test"] == 450
        assert (tmp_path / "probes" / name / "history.csv").is_file()
    logistic = load_run(tmp_path / "probes" / "logistic")
    assert logistic.metrics["probe"]["l2"] in (1e-3, 1e-1, 10.0) and len(logistic.history) == 3
    assert logistic.metrics["trainable_params"] == 10 * 96 + 10
    # the probe is saved as a normal linear head: the reloaded model reproduces the test accuracy on images, in the
    # precision the run recorded (auto: bf16 on CPUs with native bf16, where the cached features were bf16 too)
    from transferlab.engine.precision import autocast_for

    model = logistic.load_model()
    splits = prepare_splits(logistic.config.data, 0)
    with autocast_for(logistic.config.train.precision, "cpu"):
        acc = evaluate(model, TensorBatches(splits.test_x, splits.test_y, 128, model.preprocess()), 10).acc
    assert acc == pytest.approx(logistic.metrics["test_acc"], abs=1.5 / 450)  # one image may flip in bf16 (1/450 itself fails on float32 rounding)
    knn = load_run(tmp_path / "probes" / "knn")
    assert knn.metrics["probe"]["k"] in (1, 10) and knn.metrics["trainable_params"] == 0
    assert knn.metrics["feature_cache"]["sources"] == ["memory"] * 3  # the logistic probe's pass, reused


def test_probe_config_is_strict():
    base = {"name": "p", "kind": "logistic"}
    with pytest.raises(ConfigError, match=r"unknown key 'probe.l2s' \(did you mean 'l2'\?\)"):
        from_dict(ExperimentConfig, {**base, "probe": {"l2s": [1.0]}})
    with pytest.raises(ConfigError, match="'logit' is not one of"):
        from_dict(ExperimentConfig, {**base, "kind": "logit"})
    for bad, words in [({"probe": {"l2": []}}, "probe.l2"), ({"probe": {"k": [0]}}, "probe.k"),
                       ({"head": {"type": "mlp"}}, "must be linear for kind: logistic")]:
        cfg = from_dict(ExperimentConfig, {**base, **bad})
        with pytest.raises(ConfigError, match=words):
            cfg.validate()


@pytest.mark.slow
def test_logistic_probe_on_imagenet_lite0_fashion_mnist(tmp_path):
    """Real data: the embedded ImageNet EfficientNet-Lite0, 5 000 Fashion-MNIST images at 64 px."""
    from transferlab.kinds import run_experiment

    cfg = from_dict(ExperimentConfig, {
        "name": "lite0_logistic", "kind": "logistic",
        "data": {"dataset": "fashion_mnist", "train_subset": 5000, "test_subset": 2000, "image_size": 64},
        "model": {"backbone": "tf_efficientnet_lite0", "weights": "embedded"},
        "train": {"progress": False},
    })
    cfg.validate()
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert m["test_acc"] > 0.80, m["test_acc"]  # measured here: 82.9%
