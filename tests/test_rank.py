"""Backbone ranking before fine-tuning: candidates, scores, the ImageNet-vs-random sanity check, the CLI."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from transferlab.cli import main
from transferlab.config import ConfigError, DataConfig
from transferlab.engine.features import STORE
from transferlab.tools.rank import Candidate, parse_candidates, rank_backbones

QUIET = Console(quiet=True)


@pytest.fixture(autouse=True)
def _fresh_store():
    STORE.clear()
    yield
    STORE.clear()


def test_parse_candidates():
    assert parse_candidates("resnet18, tf_efficientnet_lite0:embedded,x:file:/w.safetensors", "scratch") == [
        Candidate("resnet18", "scratch"), Candidate("tf_efficientnet_lite0", "embedded"), Candidate("x", "file:/w.safetensors"),
    ]
    with pytest.raises(ConfigError, match="listed twice"):
        parse_candidates("resnet18,resnet18:imagenet")
    with pytest.raises(ConfigError, match="at least one backbone"):
        parse_candidates(" , ")


def test_imagenet_lite0_ranks_above_the_same_architecture_with_random_weights():
    """A task where one candidate is clearly better: Fashion-MNIST at 64 px, 300 images, no fine-tuning."""
    data = DataConfig(dataset="fashion_mnist", train_subset=300, val_fraction=0.25, test_subset=20, image_size=64)
    cands = parse_candidates("tf_efficientnet_lite0:scratch,tf_efficientnet_lite0:embedded")
    result = rank_backbones(data, cands, ["logme", "knn"], accelerator="cpu")
    assert [r.candidate.weights for r in result.rows] == ["embedded", "scratch"], [r.scores for r in result.rows]
    assert result.n_train == 225 and result.n_val == 75 and result.seconds > 0
    assert all(r.seconds > 0 and r.feature_dim == 1280 for r in result.rows)
    best, worst = result.rows
    # both scores agree, LogME by a wide margin
    assert best.scores["logme"] > worst.scores["logme"] + 0.03 and best.scores["knn"] > worst.scores["knn"]


def test_rank_cli_prints_the_ranking_and_writes_json(tmp_path, capsys):
    out = tmp_path / "rank.json"
    code = main(["rank", "--dataset", "digits", "--image-size", "16", "--backbones", "test_resnet,test_efficientnet",
                 "--weights", "scratch", "--train-subset", "400", "--scores", "knn,logme,logistic", "--accelerator", "cpu",
                 "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "backbone ranking by k-NN val acc (320 train / 80 val images)" in text and "ranked 2 backbones in" in text
    doc = json.loads(out.read_text())
    assert doc["by"] == "knn" and [r["rank"] for r in doc["ranking"]] == [1, 2]
    knn = [r["scores"]["knn"] for r in doc["ranking"]]
    assert knn == sorted(knn, reverse=True)
    assert {r["backbone"] for r in doc["ranking"]} == {"test_resnet", "test_efficientnet"}
    assert all(set(r["scores"]) == {"knn", "logme", "logistic"} and r["seconds"] > 0 for r in doc["ranking"])
    assert main(["rank", "--dataset", "digits", "--backbones", "test_resnet", "--scores", "leep"]) == 2
    assert "unknown score(s) leep" in capsys.readouterr().out
