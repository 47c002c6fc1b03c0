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

__all__ = ["METRICS_FILE", "SCHEMA_VERSION", "RunMetrics", "code_version"]

METRICS_FILE = "metrics.json"
SCHEMA_VERSION = 2
"""2: ``kind`` and ``schema_version`` always present, every field always written. 1: before (no version)."""


@dataclass
class RunMetrics:
    """One run's result: status, what ran on which data, test metrics, training facts, timings, provenance."""

    status: str = "ok"
    """``ok`` or ``failed`` (with ``error``)."""
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
    test_acc: float | None = None
    test_top5: float | None = None
    test_loss: float | None = None
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

    def training_cost_seconds(self) -> float:
        """What training cost: the loop's time plus, when features were cached, the one backbone pass."""
        cache = self.feature_cache or {}
        return float(self.train_seconds or 0.0) + (float(cache.get("pass_seconds", 0.0)) if cache.get("used") else 0.0)

    def to_dict(self) -> dict[str, Any]:
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
        return cls(**known, extra=extra)


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
