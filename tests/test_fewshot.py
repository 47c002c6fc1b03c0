"""Few-shot episodes with Prototypical Networks: sampling, accuracy, confidence interval, errors, runs, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from transferlab.cli import main
from transferlab.config import ConfigError, ExperimentConfig, from_dict
from transferlab.engine.episodes import FewShotError, FewShotResult, protonet_accuracy, resolve_classes, sample_episodes
from transferlab.engine.features import STORE
from transferlab.kinds import run_experiment
from transferlab.rundir import load_run

QUIET = Console(quiet=True)


@pytest.fixture(autouse=True)
def _fresh_store():
    STORE.clear()
    yield
    STORE.clear()


def test_episodes_are_seeded_distinct_and_from_the_chosen_classes():
    labels = torch.arange(200) % 8
    ep = sample_episodes(labels, [1, 3, 4, 6, 7], ways=3, shots=2, queries=4, episodes=50, seed=0)
    assert ep.shape == (50, 3, 6)
    for e in ep:
        assert len(set(e.flatten().tolist())) == 18  # no image twice in an episode
        cls = labels[e]  # ways × (shots + queries)
        assert (cls == cls[:, :1]).all()  # one class per row
        assert len(set(cls[:, 0].tolist())) == 3 and set(cls[:, 0].tolist()) <= {1, 3, 4, 6, 7}
    assert torch.equal(ep, sample_episodes(labels, [1, 3, 4, 6, 7], 3, 2, 4, 50, seed=0))
    assert not torch.equal(ep, sample_episodes(labels, [1, 3, 4, 6, 7], 3, 2, 4, 50, seed=1))
    used = set(labels[ep[:, :, 0]].flatten().tolist())
    assert used == {1, 3, 4, 6, 7}  # every chosen class shows up over 50 episodes


def test_too_few_images_or_classes_is_a_clear_error():
    labels = torch.tensor([0] * 30 + [1] * 12 + [2] * 30)
    with pytest.raises(FewShotError, match=r"class 'shirt' has only 12 images in the test split, fewer than "
                                           r"fewshot.shots \+ fewshot.queries = 5 \+ 15 = 20"):
        sample_episodes(labels, [0, 1, 2], 2, 5, 15, 10, 0, ["coat", "shirt", "bag"], "test")
    with pytest.raises(FewShotError, match="fewshot.ways=4 but only 3 classes"):
        sample_episodes(labels, [0, 1, 2], 4, 1, 1, 10, 0)
    with pytest.raises(ConfigError, match=r"fewshot.classes\[1\]: no class named 'hat'"):
        resolve_classes(["coat", "hat"], ["coat", "shirt"], "fewshot.classes")
    assert resolve_classes(["shirt", 0], ["coat", "shirt"], "fewshot.classes") == [1, 0]


def _loop_protonet(features: torch.Tensor, episodes: torch.Tensor, shots: int, distance: str) -> torch.Tensor:
    """The obvious per-episode, per-query implementation."""
    accs = []
    for ep in episodes:
        protos = [features[row[:shots]].mean(0) for row in ep]
        if distance == "cosine":
            protos = [torch.nn.functional.normalize(features[row[:shots]], dim=1).mean(0) for row in ep]
        right = total = 0
        for w, row in enumerate(ep):
            for q in row[shots:]:
                f = features[q]
                if distance == "euclidean":
                    scores = [-float(((f - p) ** 2).sum()) for p in protos]
                else:
                    scores = [float(torch.nn.functional.cosine_similarity(f, p, dim=0)) for p in protos]
                right += int(max(range(len(scores)), key=scores.__getitem__) == w)
                total += 1
        accs.append(right / total)
    return torch.tensor(accs)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_protonet_accuracy_matches_the_obvious_loop(distance):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 6
    features = torch.randn(120, 16, generator=g) + 0.8 * torch.nn.functional.one_hot(labels, 16).float()
    ep = sample_episodes(labels, list(range(6)), 4, 3, 5, 20, seed=2)
    torch.testing.assert_close(protonet_accuracy(features, ep, 3, distance, chunk=7), _loop_protonet(features, ep, 3, distance))


def test_confidence_interval_and_separable_features():
    res = FewShotResult.of(torch.tensor([0.5, 0.7, 0.6, 0.8]))
    assert res.mean == pytest.approx(0.65) and res.ci95 == pytest.approx(1.96 * 0.129099 / 2, rel=1e-4)
    labels = torch.arange(300) % 10
    features = 10 * torch.nn.functional.one_hot(labels, 10).float() + 0.1 * torch.randn(300, 10)
    ep = sample_episodes(labels, list(range(10)), 5, 5, 15, 600, seed=0)
    for d in ("euclidean", "cosine"):
        r = FewShotResult.of(protonet_accuracy(features, ep, 5, d))
        assert r.mean == 1.0 and r.ci95 == 0.0 and r.episodes == 600


def test_600_five_way_five_shot_episodes_on_lite0_sized_features():
    # batched over episodes (no Python loop per episode); how fast is a benchmark's business, not a timed test's
    labels = torch.arange(2000) % 10
    features = torch.randn(2000, 1280)  # EfficientNet-Lite0's pooled width
    ep = sample_episodes(labels, list(range(10)), 5, 5, 15, 600, seed=0)
    acc = protonet_accuracy(features, ep, 5, "euclidean")
    assert len(acc) == 600 and bool(((acc >= 0) & (acc <= 1)).all())


def _fewshot_cfg(**fewshot) -> ExperimentConfig:
    cfg = from_dict(ExperimentConfig, {
        "name": "fs", "kind": "fewshot",
        "data": {"dataset": "digits", "image_size": 16, "val_fraction": 0.2},
        "model": {"backbone": "test_resnet"},
        "train": {"progress": False, "accelerator": "cpu", "lr": 1e-3},
        "fewshot": {"episodes": 200, **fewshot},
    })
    cfg.validate()
    return cfg


def test_fewshot_run_directory(tmp_path):
    m = run_experiment(_fewshot_cfg(classes=[5, 6, 7, 8, 9], distance="cosine"), tmp_path / "fs", console=QUIET)
    assert m["status"] == "ok" and m["strategy"] == "protonet" and 0.3 < m["test_acc"] <= 1.0
    fs = m["fewshot"]
    assert fs["classes"] == ["5", "6", "7", "8", "9"] and fs["episodes"] == 200
    assert m["test_acc"] == fs["results"]["cosine"]["mean"] and m["test_acc_ci95"] == fs["results"]["cosine"]["ci95"] > 0
    assert fs["results"]["euclidean"]["episodes"] == 200
    assert [a is None for a in m["per_class_acc"]] == [True] * 5 + [False] * 5  # only novel classes were queried
    assert "5-way 5-shot ProtoNet (cosine), 200 episodes" in m["notes"]
    from transferlab.results.compare import collect

    (row,) = collect(tmp_path)
    assert row["test_acc"] == m["test_acc"] and row["strategy"] == "protonet"


def test_episodic_finetuning_trains_the_backbone_not_the_head(tmp_path):
    import contextlib
    import copy

    from transferlab.data.prepare import prepare_splits
    from transferlab.engine.episodes import episodic_finetune
    from transferlab.models.model import build_model
    from transferlab.strategies import apply_strategy

    cfg = _fewshot_cfg(classes=[5, 6, 7, 8, 9], finetune_episodes=40)
    splits = prepare_splits(cfg.data, 0)
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, cfg.head, 10)
    apply_strategy(model, cfg.strategy)
    before = copy.deepcopy(model.state_dict())
    cpu = torch.device("cpu")
    rows = episodic_finetune(model, splits.train_x, splits.train_y, [0, 1, 2, 3, 4], cfg, cpu, contextlib.nullcontext, splits.class_names)
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"backbone"}  # the head plays no part in ProtoNet episodes
    first, last = sum(r["loss"] for r in rows[:10]) / 10, sum(r["loss"] for r in rows[-10:]) / 10
    assert last < first, (first, last)

    m = run_experiment(_fewshot_cfg(classes=[5, 6, 7, 8, 9], finetune_episodes=3), tmp_path / "ft", console=QUIET)
    run = load_run(tmp_path / "ft")
    assert m["fewshot"]["finetune_classes"] == ["0", "1", "2", "3", "4"] and m["strategy"] == "protonet+finetune"
    assert len(run.history) == 3 and (tmp_path / "ft" / "checkpoints" / "best.safetensors").is_file()
    bad = _fewshot_cfg(finetune_episodes=2)
    bad.strategy.name = "linear_probe"
    with pytest.raises(ConfigError, match="leaves no backbone parameter trainable"):
        run_experiment(bad, tmp_path / "bad", console=QUIET)


def test_fewshot_cli_on_a_backbone_and_on_an_earlier_run(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    assert main(["fewshot", "test_resnet:scratch", "--dataset", "digits", "--image-size", "16", "--episodes", "100",
                 "--runs-dir", runs, "--accelerator", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "5-way 5-shot accuracy" in out and "95% CI" in out
    m = json.loads((tmp_path / "runs" / "fewshot" / "test_resnet_5way5shot" / "metrics.json").read_text())
    assert m["fewshot"]["episodes"] == 100 and m["n_train"] == 0

    # a backbone trained on digits 0-4, evaluated on the novel classes 5-9
    base = from_dict(ExperimentConfig, {
        "name": "base", "data": {"dataset": "digits", "image_size": 16, "classes": [0, 1, 2, 3, 4]},
        "model": {"backbone": "test_resnet"}, "strategy": {"name": "scratch"},
        "train": {"epochs": 1, "progress": False, "accelerator": "cpu"},
    })
    run_experiment(base, tmp_path / "runs" / "s" / "base", console=QUIET)
    assert main(["fewshot", str(tmp_path / "runs" / "s" / "base"), "--classes", "5,6,7,8,9", "--ways", "3", "--shots", "1",
                 "--episodes", "60", "--runs-dir", runs, "--accelerator", "cpu"]) == 0
    run = load_run(tmp_path / "runs" / "fewshot" / "base_3way1shot")
    assert run.config.model.weights == f"run:{tmp_path / 'runs' / 's' / 'base'}"
    assert run.metrics["fewshot"]["classes"] == ["5", "6", "7", "8", "9"] and run.metrics["fewshot"]["shots"] == 1
    # too many queries for the digits test split (45 images per class) is an error naming the class
    assert main(["fewshot", "test_resnet:scratch", "--dataset", "digits", "--queries", "50", "--runs-dir", runs,
                 "--name", "toomany", "--accelerator", "cpu"]) == 2
    assert "has only 45 images in the test split" in capsys.readouterr().out.replace("\n", "")


STUDIES = __import__("pathlib").Path(__file__).resolve().parents[1] / "studies"


def test_seed_few_data_rows_are_ordinary_studies_with_selections():
    from transferlab.config import load_study

    cifar = {c.name: c for c in load_study(STUDIES / "seed000_few_data.yaml").experiments}
    assert cifar["resnet50_10pct"].data.train_subset == 0.1  # row 0e
    assert cifar["resnet50_50_per_class"].data.k_per_class == 60 and cifar["resnet50_50_per_class"].data.val_count == 100  # 0f
    g = cifar["protonet_on_0e_cifar100"]  # 0g
    assert g.kind == "fewshot" and g.model.weights == "run:resnet50_10pct" and g.data.dataset == "cifar100"
    h = cifar["resnet50_imagenet_augment"]  # 0h
    assert h.model.weights == "imagenet" and h.data.augment and h.data.k_per_class == 60
    fm = {c.name: c for c in load_study(STUDIES / "fewshot_fmnist.yaml").experiments}
    assert {c.kind for c in fm.values()} == {"train", "logistic", "knn", "fewshot"}
    assert fm["protonet_novel_5to9"].model.weights == "run:source_0to4_10pct"


@pytest.mark.slow
def test_fewshot_fmnist_study_runs_end_to_end(tmp_path):
    """The offline few-data study on real Fashion-MNIST (about 10 minutes on 2 cores)."""
    from transferlab.study import run_study

    result = run_study(STUDIES / "fewshot_fmnist.yaml", tmp_path, console=QUIET)
    assert result.ok, result.failed
    m = {n: json.loads((tmp_path / "fewshot_fmnist" / n / "metrics.json").read_text()) for n in result.finished}
    assert m["lite0_logistic_50"]["test_acc"] > 0.7 and m["lite0_knn_50"]["test_acc"] > 0.65
    assert m["lite0_mlp_head_50"]["feature_cache"]["sources"] == ["memory", "memory"]  # the probes' pass, reused
    assert m["lite0_protonet_5to9"]["test_acc"] > 0.5 and m["protonet_novel_5to9"]["test_acc"] > 0.3  # chance: 0.2
