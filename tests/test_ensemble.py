"""Voting ensembles: the vote and its tie rules by hand, and ensembles of real runs with different
backbones, input sizes and normalisations — as a study entry, through the API and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from transferlab.config import ConfigError, parse_study
from transferlab.data import TensorBatches, prepare_splits
from transferlab.kinds import run_experiment
from transferlab.kinds.ensemble import EnsembleError, combine_votes, evaluate_ensemble, run_ensemble
from transferlab.results.compare import collect
from transferlab.rundir import load_run
from transferlab.study import run_study

QUIET = Console(quiet=True)

# three fixed predictors (members) x six images x three classes
FIXED = torch.tensor(
    [
        [[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.5, 0.25, 0.25], [0.1, 0.1, 0.8]],
        [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.6, 0.2], [0.3, 0.4, 0.3], [0.25, 0.5, 0.25], [0.2, 0.2, 0.6]],
        [[0.2, 0.5, 0.3], [0.3, 0.2, 0.5], [0.1, 0.35, 0.55], [0.3, 0.45, 0.25], [0.25, 0.25, 0.5], [0.3, 0.3, 0.4]],
    ]
)


def test_hard_vote_of_three_fixed_predictors_is_the_hand_computed_answer():
    # votes per image:      (0,0,1)  (2,1,2)  (0,1,2)      (0,1,1)  (0,1,2)          (2,2,2)
    # majority / tie-break:  0        2        tie -> sums  1        tie, equal sums   2
    #                                          0.8/1.25/0.95 -> 1    1.0/1.0/1.0 -> lowest index 0
    preds, ties = combine_votes(FIXED, "hard")
    assert preds.tolist() == [0, 2, 1, 1, 0, 2]
    assert ties == 2


def test_soft_vote_of_the_same_predictors():
    # summed probabilities: img3 (1.5, 0.9, 0.6) -> 0 although two members vote 1; img4 all 1.0 -> 0
    preds, ties = combine_votes(FIXED, "soft")
    assert preds.tolist() == [0, 2, 1, 0, 0, 2]
    assert ties == 1
    with pytest.raises(ValueError, match="unknown vote 'median'"):
        combine_votes(FIXED, "median")


STUDY = {
    "study": "ens",
    "defaults": {
        "data": {"dataset": "synthetic", "synthetic_size": 128, "val_fraction": 0.25},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": "cpu", "eval_batch_size": 40},
    },
    "experiments": [  # different backbones, input sizes and normalisations
        {"name": "cnn16", "model": {"backbone": "transferlab_cnn"}, "train": {"epochs": 2}},
        {"name": "r18_32", "data": {"image_size": 32}, "model": {"backbone": "resnet18"}, "strategy": {"name": "finetune"}},
        {"name": "lite0_24", "data": {"image_size": 24}, "model": {"backbone": "tf_efficientnet_lite0"}},
    ],
    "ensembles": [
        {"name": "vote_hard", "members": ["cnn16", "r18_32", "lite0_24"], "vote": "hard"},
        {"name": "vote_soft", "members": ["cnn16", "r18_32", "lite0_24"], "vote": "soft", "notes": "mean probability"},
    ],
}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = run_study(parse_study(STUDY), runs, console=QUIET)
    assert result.ok, result.failed
    assert result.finished == ["cnn16", "r18_32", "lite0_24", "vote_hard", "vote_soft"]
    return runs / "ens"


def _independent_probs(run_dir):
    """A member's test probabilities computed the plain way: its own splits, batches, preprocessing and precision
    (``auto`` is bf16 on CPUs with native bf16: the run recorded what it resolved to)."""
    from transferlab.engine.precision import autocast_for

    run = load_run(run_dir)
    splits = prepare_splits(run.config.data, run.config.seed)
    model = run.load_model()
    batches = TensorBatches(splits.test_x, splits.test_y, 16, model.preprocess())
    with torch.no_grad(), autocast_for(run.config.train.precision, "cpu"):
        return torch.cat([model(x).float().softmax(1) for x, _ in batches]), splits.test_y


@pytest.mark.parametrize("vote", ["hard", "soft"])
def test_ensemble_of_runs_is_a_run_with_the_votes_of_its_members(study_dir, vote):
    m = json.loads((study_dir / f"vote_{vote}" / "metrics.json").read_text())
    assert m["status"] == "ok" and m["kind"] == "ensemble" and m["experiment"] == f"vote_{vote}" and m["vote"] == vote
    names = ["cnn16", "r18_32", "lite0_24"]
    assert [r["experiment"] for r in m["members"]] == names
    assert [r["image_size"] for r in m["members"]] == [16, 32, 24]
    assert m["members"][0]["normalization"] != m["members"][1]["normalization"] != m["members"][2]["normalization"]
    for r in m["members"]:  # each member, with its own preprocessing, scores exactly what its run recorded
        assert r["test_acc"] == r["recorded_test_acc"]
    probs, y = zip(*[_independent_probs(study_dir / n) for n in names], strict=True)
    preds, ties = combine_votes(torch.stack(probs), vote)
    assert m["test_acc"] == pytest.approx(float((preds == y[0]).double().mean()), abs=1e-9)
    cm = torch.tensor(m["confusion_matrix"])
    assert cm.sum() == m["n_test"] == len(y[0]) and torch.equal(cm.diagonal(), torch.bincount(y[0][preds == y[0]], minlength=4))
    assert len(m["per_class_acc"]) == 4 and m["inference_images_per_s"] > 0 and m["vote_ties"] == ties
    assert "lowest class index" in m["tie_rule"]
    assert (m["test_top5"] is None) and (m["test_loss"] is None) == (vote == "hard")
    assert (study_dir / f"vote_{vote}" / "ensemble.yaml").is_file()
    if vote == "hard":  # votes, no probability: nothing to calibrate
        assert m.get("test_ece") is None and "calibration" not in m
    else:  # the mean probability's calibration, against torchmetrics / the definitions directly
        from torchmetrics.classification import MulticlassCalibrationError

        mean = torch.stack(probs).mean(0)
        assert m["test_ece"] == pytest.approx(float(MulticlassCalibrationError(4, n_bins=15)(mean, y[0])), abs=1e-4)  # bf16: batch 16 vs 40
        assert m["test_nll"] == pytest.approx(float(-mean.gather(1, y[0][:, None]).log().mean()), abs=1e-4)
        brier = float(((mean - torch.nn.functional.one_hot(y[0], 4)) ** 2).sum(1).mean())
        assert m["test_brier"] == pytest.approx(brier, abs=1e-4)
        assert sum(m["calibration"]["reliability"]["count"]) == m["n_test"]


def test_compare_lists_ensembles_beside_their_members(study_dir):
    rows = {r["experiment"]: r for r in collect(study_dir)}
    assert list(rows) == ["cnn16", "r18_32", "lite0_24", "vote_hard", "vote_soft"]
    assert rows["vote_soft"]["status"] == "ok" and rows["vote_soft"]["strategy"] == "soft vote"
    assert rows["vote_hard"]["backbone"] == "transferlab_cnn+resnet18+tf_efficientnet_lite0"
    assert rows["vote_hard"]["trainable_params"] == 0
    assert "mean probability" in rows["vote_soft"]["data"]


def test_cli_ensemble_writes_a_run_directory(study_dir, tmp_path):
    from transferlab.cli import main

    out = tmp_path / "e"
    assert main(["ensemble", str(study_dir / "cnn16"), str(study_dir / "lite0_24"), "--vote", "soft", "--out", str(out), "--name", "pair"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["experiment"] == "pair" and len(m["members"]) == 2
    assert main(["ensemble", str(study_dir / "cnn16"), str(study_dir / "lite0_24"), "--out", str(out)]) == 2  # exists: refused
    # --resume keeps the finished ensemble only when it is the one asked for (here: soft vote, named pair)
    assert main(["ensemble", str(study_dir / "cnn16"), str(study_dir / "lite0_24"), "--out", str(out), "--resume"]) == 2
    same = ["--vote", "soft", "--name", "pair", "--resume"]
    assert main(["ensemble", str(study_dir / "cnn16"), str(study_dir / "lite0_24"), "--out", str(out), *same]) == 0


def test_members_must_share_classes_and_test_images(study_dir, make_cfg, tmp_path):
    other_classes = make_cfg(name="swapped", data={"classes": [1, 0, 2, 3]}, train={"epochs": 1})
    run_experiment(other_classes, tmp_path / "swapped", console=QUIET)
    with pytest.raises(EnsembleError, match=r"swapped: class names differ.*expected \['class_0', 'class_1'"):
        evaluate_ensemble([study_dir / "cnn16", tmp_path / "swapped"])
    fewer = make_cfg(name="fewer", data={"test_subset": 32}, train={"epochs": 1})
    run_experiment(fewer, tmp_path / "fewer", console=QUIET)
    with pytest.raises(EnsembleError, match=r"fewer: tested on other images .*32 test images vs synthetic, 64"):
        evaluate_ensemble([study_dir / "cnn16", tmp_path / "fewer"])
    with pytest.raises(EnsembleError, match="not a finished single-model run"):
        evaluate_ensemble([study_dir / "cnn16", study_dir / "vote_hard"])


def test_study_ensemble_entries_are_checked():
    bad = {**STUDY, "ensembles": [{"name": "e", "members": ["cnn16", "r81"]}]}
    with pytest.raises(ConfigError, match=r"ensembles\[0\].members\[1\]='r81' is not an experiment of this study"):
        parse_study(bad)
    with pytest.raises(ConfigError, match="at least 2 members"):
        parse_study({**STUDY, "ensembles": [{"name": "e", "members": ["cnn16"]}]})
    with pytest.raises(ConfigError, match=r"ensembles\[0\].vote: 'majority' is not one of 'hard', 'soft'"):
        parse_study({**STUDY, "ensembles": [{"name": "e", "members": ["cnn16", "r18_32"], "vote": "majority"}]})
    with pytest.raises(ConfigError, match="already used"):
        parse_study({**STUDY, "ensembles": [{"name": "cnn16", "members": ["cnn16", "r18_32"]}]})


def test_run_ensemble_api_returns_the_metrics(study_dir, tmp_path):
    m = run_ensemble([study_dir / "cnn16", study_dir / "r18_32", study_dir / "cnn16"], tmp_path / "x", vote="hard", console=QUIET)
    # two identical members always outvote the third
    assert m["test_acc"] == m["members"][0]["test_acc"]
