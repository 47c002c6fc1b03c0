"""The metrics schema: what ``metrics.json`` holds, written and read only through ``RunMetrics``.

Every run of every kind writes the same fields (``None`` where a field does not apply to the kind),
plus kind-specific sections kept in ``extra`` and written at the top level beside them (``probe``,
``fewshot`` and ``test_acc_ci95``, ``vote`` / ``vote_ties`` / ``tie_rule`` / ``members``). ``kind`` is
always present. Files written before the schema had a version (``schema_version`` 1) are read too:
their kind is inferred the way that version wrote it.
"""

from __future__ import annotations

import dataclasses
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from transferlab.rundir.layout import METRICS_FILE

__all__ = ["HEADLINE", "METRICS_FILE", "SCHEMA_VERSION", "RunMetrics", "balanced_scores", "code_version"]

HEADLINE = {"multiclass": "test_acc", "multilabel": "test_map"}
"""Per task, the ``metrics.json`` field that ranks runs (compare, report, search, auto); higher is better for both."""

SCHEMA_VERSION = 2
"""2: ``kind`` and ``schema_version`` always present, every field always written. 1: before (no version)."""


@dataclass
class RunMetrics:
    """One run's result: status, what ran on which data, test metrics, training facts, timings, provenance."""

    status: str = "ok"
    """``ok``; or ``failed`` / ``skipped`` (a dependency did not finish) / ``pruned`` (a search stopped the trial), with ``error``."""
    kind: str = "train"
    experiment: str | None = None
    seed: int | None = None
    backbone: str | None = None
    weights: str | None = None
    head: str | None = None
    strategy: str | None = None
    """How the model was adapted, as the comparison table shows it: the strategy of a ``train`` run,
    the probe (``logistic`` / ``knn``), ``protonet[+finetune]``, or ``<vote> vote`` of an ensemble."""
    dataset: str | None = None
    image_size: int | None = None
    channels: int | None = None
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    skipped_bad_images: int | None = None
    class_names: list[str] = field(default_factory=list)
    task: str = "multiclass"
    """``multiclass`` (one label per image: the accuracy fields) or ``multilabel`` (``data.task``: the ``test_map`` …
    fields; ``test_acc`` / ``test_top5`` / ``per_class_acc`` / ``confusion_matrix`` are ``None``)."""
    test_acc: float | None = None
    test_top5: float | None = None
    test_loss: float | None = None
    test_balanced_acc: float | None = None
    """Mean per-class recall over the classes with test images (scikit-learn's ``balanced_accuracy_score``);
    derived from ``confusion_matrix``, so every kind that records one has it."""
    test_macro_f1: float | None = None
    """Unweighted mean F1 over the classes that occur or are predicted (scikit-learn's ``f1_score(average='macro')``)."""
    test_ece: float | None = None
    """Expected calibration error of the test predictions: torchmetrics' ``MulticlassCalibrationError``, 15 equal-width
    bins of the top-label confidence, L1 norm (``transferlab.engine.calibration``). ``None`` in runs written before it."""
    test_nll: float | None = None
    """Mean negative log-likelihood of the true class on the test split."""
    test_brier: float | None = None
    """Multiclass Brier score on the test split: mean over images of sum_k (p_k - [y = k])^2 (0 … 2)."""
    test_ece_calibrated: float | None = None
    """With ``train.calibrate: temperature``: the test ECE after dividing the logits by ``temperature``."""
    temperature: float | None = None
    """With ``train.calibrate: temperature``: the T > 0 fitted on the validation logits (NLL, L-BFGS)."""
    tested_weights: str | None = None
    """``kind: train``: which weights the test metrics are of — ``raw`` (as trained) or ``ema`` (``train.ema``)."""
    test_map: float | None = None
    """Multi-label: macro mean average precision over the classes with a test positive (torchmetrics
    ``MultilabelAveragePrecision(average="macro")``, threshold-free) — the task's headline metric."""
    test_map_micro: float | None = None
    """Multi-label: micro mAP (every image-label pair pooled)."""
    test_f1: float | None = None
    """Multi-label: macro F1 at ``thresholds`` (chosen on validation)."""
    test_f1_micro: float | None = None
    test_precision: float | None = None
    """Multi-label: macro precision at ``thresholds``."""
    test_recall: float | None = None
    """Multi-label: macro recall at ``thresholds``."""
    test_exact_match: float | None = None
    """Multi-label: share of test images whose predicted label set equals the true set (subset accuracy)."""
    test_hamming: float | None = None
    """Multi-label: Hamming loss, the share of wrong image-label decisions (0 is perfect)."""
    per_class_ap: list[float | None] | None = None
    """Multi-label: average precision of each class on test (``None`` for a class with no test positive)."""
    thresholds: list[float] | None = None
    """Multi-label: the probability threshold of each class (``train.threshold``), chosen on validation."""
    threshold_mode: str | None = None
    """Multi-label: how ``thresholds`` were set: ``global`` / ``per_class`` (best F1 on validation) or ``fixed``."""
    per_class_acc: list[float | None] | None = None
    confusion_matrix: list[list[int]] | None = None
    best_epoch: int | None = None
    best_val: float | None = None
    monitor: str | None = None
    epochs_run: int | None = None
    stopped_early: bool | None = None
    train_seconds: float | None = None
    data_seconds: float | None = None
    wall_seconds: float | None = None
    inference_images_per_s: float | None = None
    total_params: int | None = None
    trainable_params: int | None = None
    weights_source: str | None = None
    device: str | None = None
    world_size: int | None = None
    resumed_from: str | None = None
    notes: str = ""
    feature_cache: dict[str, Any] | None = None
    error: str | None = None
    code_version: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    """Kind-specific sections, written at the top level of ``metrics.json``."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def headline(self) -> str:
        """The field that ranks runs of this task: ``test_map`` (multi-label) or ``test_acc``."""
        return HEADLINE[self.task]

    def training_cost_seconds(self) -> float:
        """What training cost: the loop's time plus, when features were cached, the one backbone pass."""
        cache = self.feature_cache or {}
        return float(self.train_seconds or 0.0) + (float(cache.get("pass_seconds", 0.0)) if cache.get("used") else 0.0)

    def add(self, *parts: dict[str, Any]) -> RunMetrics:
        """Set the fields of each part (a mapping of schema field names; ``extra`` is merged, not replaced) and
        return self: a kind builds its result from parts — identity, test, fit, timings — not field by field.
        A key that is no schema field is a programming error, named."""
        names = {f.name for f in dataclasses.fields(self)}
        for part in parts:
            unknown = sorted(set(part) - names)
            if unknown:
                raise ValueError(f"not RunMetrics fields: {unknown}")  # programming error
            for key, value in part.items():
                if key == "extra":
                    self.extra.update(value)
                else:
                    setattr(self, key, value)
        return self

    def fill_derived(self) -> RunMetrics:
        """Set ``test_balanced_acc`` / ``test_macro_f1`` from the confusion matrix where they are unset (returns self)."""
        if self.confusion_matrix and (self.test_balanced_acc is None or self.test_macro_f1 is None):
            balanced, f1 = balanced_scores(self.confusion_matrix)
            self.test_balanced_acc = balanced if self.test_balanced_acc is None else self.test_balanced_acc
            self.test_macro_f1 = f1 if self.test_macro_f1 is None else self.test_macro_f1
        return self

    def to_dict(self) -> dict[str, Any]:
        self.fill_derived()
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        clash = set(out) & set(self.extra)
        if clash:
            raise ValueError(f"metrics extra sections shadow schema fields: {sorted(clash)}")  # programming error
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunMetrics:
        """Read a ``metrics.json`` mapping of any schema version; unknown keys go to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names}
        if "schema_version" not in raw:  # version 1: no kind on train runs, strategy doubling as the kind
            known["schema_version"] = 1
            known.setdefault("kind", _v1_kind(raw))
        known["class_names"] = known.get("class_names") or []
        known["notes"] = known.get("notes") or ""
        known["code_version"] = known.get("code_version") or {}
        return cls(**known, extra=extra).fill_derived()  # runs written before these scores existed get them too


def balanced_scores(confusion: list[list[int]]) -> tuple[float | None, float | None]:
    """(balanced accuracy, macro F1) of a confusion matrix (rows: true class), as scikit-learn defines them.

    Balanced accuracy averages the recall of the classes that have test images; macro F1 averages
    2·tp / (2·tp + fp + fn) over the classes that occur or are predicted (an F1 of 0 where tp = 0).
    """
    n = len(confusion)
    rows = [sum(r) for r in confusion]
    cols = [sum(confusion[i][j] for i in range(n)) for j in range(n)]
    recalls = [confusion[c][c] / rows[c] for c in range(n) if rows[c] > 0]
    f1s = [2 * confusion[c][c] / (rows[c] + cols[c]) for c in range(n) if rows[c] + cols[c] > 0]
    return (sum(recalls) / len(recalls) if recalls else None), (sum(f1s) / len(f1s) if f1s else None)


def _v1_kind(raw: dict[str, Any]) -> str:
    strategy = str(raw.get("strategy") or "")
    if "vote" in raw or strategy.endswith(" vote"):
        return "ensemble"
    if strategy in ("logistic", "knn"):
        return strategy
    if strategy.startswith("protonet"):
        return "fewshot"
    return "train"


def code_version() -> dict[str, str]:
    """transferlab's version and, when running from a git checkout, the commit (``+dirty`` if modified)."""
    try:
        version = metadata.version("transferlab")
    except metadata.PackageNotFoundError:
        version = "unknown"
    info = {"transferlab": version, "torch": torch.__version__}
    src = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=src, capture_output=True, text=True, timeout=5)
            info["git_commit"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info
