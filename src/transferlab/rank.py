"""Rank candidate backbones for a dataset before any fine-tuning (``transferlab rank``).

Every candidate's frozen pooled features of a small stratified subset are computed once; then cheap
transferability scores say which backbone will likely transfer best:

* ``logme``    — LogME (You et al., 2021): log marginal evidence of a Bayesian linear model from the
  training features to the labels (``transferlab.probes.logme``);
* ``knn``      — validation accuracy of weighted cosine k-NN fitted on the training features (k chosen
  on val);
* ``logistic`` — validation accuracy of the L-BFGS logistic probe (L2 chosen on val; the slowest).

Higher is better for all three. Candidates are sorted by the first score asked for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from transferlab.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, ProbeConfig, TrainConfig

__all__ = ["SCORES", "Candidate", "RankResult", "RankRow", "parse_candidates", "print_ranking", "rank_backbones"]

SCORES = ("logme", "knn", "logistic")


@dataclass(frozen=True)
class Candidate:
    """A backbone and its weights source (``model.backbone`` / ``model.weights``)."""

    backbone: str
    weights: str

    def __str__(self) -> str:
        return f"{self.backbone}:{self.weights}"


def parse_candidates(spec: str | list[str], default_weights: str = "imagenet") -> list[Candidate]:
    """``"resnet18,tf_efficientnet_lite0:embedded"`` -> candidates; ``name:weights`` overrides ``default_weights``
    (``weights`` is anything ``model.weights`` accepts: scratch, imagenet, embedded, file:<path>)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if len(items) < 1:
        raise ConfigError("--backbones: give at least one backbone, e.g. resnet18,tf_efficientnet_lite0:embedded")
    out = []
    for item in items:
        name, _, weights = item.partition(":")
        cand = Candidate(name, weights or default_weights)
        if cand in out:
            raise ConfigError(f"--backbones: {cand} is listed twice")
        out.append(cand)
    return out


@dataclass
class RankRow:
    """One candidate's scores, best k, feature width and the time it took (features + scores)."""

    candidate: Candidate
    scores: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    feature_dim: int = 0
    feature_seconds: float = 0.0
    seconds: float = 0.0


@dataclass
class RankResult:
    """Candidates sorted best first by ``by``; sizes of the subsets used; total time."""

    rows: list[RankRow]
    by: str
    scores: list[str]
    n_train: int
    n_val: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "scores": self.scores,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "seconds": self.seconds,
            "ranking": [
                {"rank": i + 1, "backbone": r.candidate.backbone, "weights": r.candidate.weights, "scores": r.scores,
                 "details": r.details, "feature_dim": r.feature_dim, "feature_seconds": r.feature_seconds, "seconds": r.seconds}
                for i, r in enumerate(self.rows)
            ],
        }


def rank_backbones(
    data: DataConfig,
    candidates: list[Candidate],
    scores: list[str] | tuple[str, ...] = ("logme", "knn"),
    seed: int = 0,
    accelerator: str = "auto",
    precision: str = "32-true",
    batch_size: int = 256,
    probe: ProbeConfig | None = None,
    console: Console | None = None,
) -> RankResult:
    """Score every candidate on ``data`` (its train/val selection) without fine-tuning; best first.

    The data is prepared once (seeded, stratified); each backbone's features are computed once, in
    memory, and shared by the scores.
    """
    from transferlab.data.prepare import prepare_splits
    from transferlab.features import frozen_features, state_hash
    from transferlab.models.model import build_model
    from transferlab.probes import fit_knn, fit_logistic, logme
    from transferlab.runs import make_fabric
    from transferlab.strategies import linear_probe

    console = console or Console(quiet=True)
    scores = list(scores)
    bad = [s for s in scores if s not in SCORES]
    if bad or not scores:
        raise ConfigError(f"unknown score(s) {', '.join(bad) or '(none given)'}; available: {', '.join(SCORES)}")
    probe = probe or ProbeConfig()
    t_all = time.perf_counter()
    splits = prepare_splits(data, seed)
    rows = []
    for cand in candidates:
        t0 = time.perf_counter()
        cfg = ExperimentConfig(
            name=f"rank:{cand}", seed=seed, data=data, model=ModelConfig(backbone=cand.backbone, weights=cand.weights),
            train=TrainConfig(eval_batch_size=batch_size, accelerator=accelerator, precision=precision, progress=False),
        )
        fabric = make_fabric(cfg)
        model, _ = build_model(cfg.model, cfg.head, splits.num_classes)
        linear_probe(model, cfg.strategy)
        model.to(fabric.device).eval()
        device = fabric.device
        kw = dict(preprocess=model.preprocess(), device=device, channels_last=cfg.model.channels_last, num_workers=data.num_workers)
        weights = state_hash(model.backbone)
        tr, s1 = frozen_features(model, splits, "train", cfg, device, kw, None, fabric.autocast, weights=weights)
        va, s2 = frozen_features(model, splits, "val", cfg, device, kw, None, fabric.autocast, weights=weights)
        row = RankRow(cand, {}, feature_dim=int(tr.features[0].numel()), feature_seconds=s1 + s2)
        for score in scores:
            if score == "logme":
                row.scores["logme"] = logme(tr.features, tr.labels)
            elif score == "knn":
                res = fit_knn(tr.features, tr.labels, va.features, va.labels, splits.num_classes, probe.k, probe.temperature, device)
                row.scores["knn"], row.details["knn_k"] = res.val_acc, res.k
            else:
                res_l = fit_logistic(tr.features, tr.labels, va.features, va.labels, splits.num_classes, probe.l2, probe.max_iter, device)
                row.scores["logistic"], row.details["logistic_l2"] = res_l.val_acc, res_l.l2
        row.seconds = time.perf_counter() - t0
        console.print(f"  {cand}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.scores.items()) + f" ({row.seconds:.1f}s)")
        rows.append(row)
    by = scores[0]
    rows.sort(key=lambda r: r.scores[by], reverse=True)
    return RankResult(rows, by, scores, len(splits.train_y), len(splits.val_y), time.perf_counter() - t_all)


def print_ranking(result: RankResult, console: Console, title: str = "") -> None:
    """The ranking as a table, best first, with each candidate's time and the total time."""
    names = {"logme": "LogME", "knn": "k-NN val acc", "logistic": "logistic val acc"}
    table = Table(title=title or f"backbone ranking by {names[result.by]} ({result.n_train} train / {result.n_val} val images)")
    table.add_column("rank", justify="right")
    table.add_column("backbone")
    table.add_column("weights")
    for s in result.scores:
        table.add_column(names[s], justify="right")
    table.add_column("feature dim", justify="right")
    table.add_column("time (s)", justify="right")
    for i, r in enumerate(result.rows):
        cells = []
        for s in result.scores:
            v = r.scores[s]
            if s == "logme":
                cells.append(f"{v:.4f}")
            elif s == "knn":
                cells.append(f"{100 * v:.2f}% (k={r.details['knn_k']})")
            else:
                cells.append(f"{100 * v:.2f}% (l2={r.details['logistic_l2']:g})")
        table.add_row(str(i + 1), r.candidate.backbone, r.candidate.weights, *cells, str(r.feature_dim), f"{r.seconds:.1f}")
    console.print(table)
    console.print(f"ranked {len(result.rows)} backbones in {result.seconds:.1f}s (data preparation included)")


# --------------------------------------------------------------------------------------------
# the CLI: ``transferlab rank`` and ``transferlab fewshot``


def _csv_list(text: str | None) -> list[int | str] | None:
    if not text:
        return None
    return [int(t) if t.strip().lstrip("-").isdigit() else t.strip() for t in text.split(",") if t.strip()]


def add_parsers(sub: Any) -> None:
    """Add the ``rank`` and ``fewshot`` subcommands to the ``transferlab`` parser."""
    from pathlib import Path

    p = sub.add_parser("rank", help="rank backbones for a dataset before fine-tuning (LogME, k-NN, logistic probe on a subset)")
    p.add_argument("--dataset", required=True, help="data.dataset, e.g. fashion_mnist, cifar10, digits")
    p.add_argument("--backbones", required=True, help="comma-separated backbone[:weights], e.g. resnet18,tf_efficientnet_lite0:embedded")
    p.add_argument("--weights", default="imagenet", help="weights of backbones given without ':weights' (default imagenet)")
    p.add_argument("--root", help="data.root")
    p.add_argument("--image-size", type=int, help="data.image_size (default: the dataset's native size)")
    p.add_argument("--train-subset", type=float, default=2000, help="training images scored (count > 1 or fraction <= 1; default 2000)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="of those, held out for the k-NN / logistic validation scores (default 0.2)")
    p.add_argument("--classes", help="comma-separated class names or indices (data.classes)")
    p.add_argument("--scores", default="logme,knn", help=f"comma-separated, the first one ranks: {', '.join(SCORES)} (default logme,knn)")
    p.add_argument("--batch-size", type=int, default=256, help="feature extraction batch size (default 256)")
    p.add_argument("--accelerator", default="auto", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", type=Path, help="also write the ranking as JSON to this file")

    p = sub.add_parser("fewshot", help="N-way K-shot Prototypical-Network episodes on frozen features; writes a run directory")
    p.add_argument("target", help="a run directory (its backbone and data), or backbone[:weights], e.g. tf_efficientnet_lite0:embedded")
    p.add_argument("--dataset", help="data.dataset (default: the run's, else fashion_mnist)")
    p.add_argument("--root", help="data.root")
    p.add_argument("--image-size", type=int, help="data.image_size (default: the run's)")
    p.add_argument("--classes", help="comma-separated dataset classes (names or indices) the episodes are drawn from, e.g. novel classes")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split the episodes come from (default test)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=15, help="query images per class and episode (default 15)")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--distance", default="euclidean", choices=["euclidean", "cosine"], help="reported as test acc; the other is shown too")
    p.add_argument("--finetune-episodes", type=int, default=0, help="episodic ProtoNet fine-tuning of the backbone first (train split)")
    p.add_argument("--finetune-classes", help="comma-separated classes of the fine-tuning episodes (default: the others)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (adamw; default 1e-4)")
    p.add_argument("--runs-dir", default="runs", help="where run directories go (default runs/)")
    p.add_argument("--study", default="fewshot", help="study folder under --runs-dir (default fewshot)")
    p.add_argument("--name", help="experiment name (default: <backbone or run>_<ways>way<shots>shot)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")


def fewshot_config(args: Any) -> ExperimentConfig:
    """The ``kind: fewshot`` experiment the ``transferlab fewshot`` arguments describe (validated)."""
    import dataclasses
    from pathlib import Path

    from transferlab.config import FewShotConfig
    from transferlab.runs import load_run

    target = Path(args.target)
    if (target / "config.yaml").is_file():
        run = load_run(target)
        model = dataclasses.replace(run.config.model, weights=f"run:{target}")
        data = dataclasses.replace(run.config.data, augment=[], train_subset=None, test_subset=None, k_per_class=None, val_count=None)
        default_name = target.name
    else:
        backbone, _, weights = args.target.partition(":")
        model = ModelConfig(backbone=backbone, weights=weights or "imagenet")
        data = DataConfig(dataset=args.dataset or "fashion_mnist")
        default_name = backbone
    if args.dataset:
        data.dataset = args.dataset
    if args.root:
        data.root = args.root
    if args.image_size:
        data.image_size = args.image_size
    if args.classes:
        data.classes = None  # --classes names the dataset's classes: episodes come from exactly those
    fewshot = FewShotConfig(
        ways=args.ways, shots=args.shots, queries=args.queries, episodes=args.episodes, distance=args.distance, split=args.split,
        classes=_csv_list(args.classes), finetune_episodes=args.finetune_episodes, finetune_classes=_csv_list(args.finetune_classes),
    )
    if args.split == "test" and not args.finetune_episodes:  # the training split is not used: load 2 images per class of it
        data.k_per_class, data.val_fraction = 2, 0.5
    cfg = ExperimentConfig(
        name=args.name or f"{default_name}_{args.ways}way{args.shots}shot", seed=args.seed, data=data, model=model, kind="fewshot",
        fewshot=fewshot, train=TrainConfig(lr=args.lr, accelerator=args.accelerator, progress=False),
    )
    cfg.validate()
    return cfg


def run_command(args: Any, console: Console) -> int:
    """Run ``transferlab rank`` or ``transferlab fewshot``; returns the exit code."""
    import json
    from pathlib import Path

    if args.command == "rank":
        data = DataConfig(
            dataset=args.dataset, root=args.root, image_size=args.image_size, train_subset=args.train_subset,
            val_fraction=args.val_fraction, classes=_csv_list(args.classes),
        )
        probe_cfg = ExperimentConfig(name="rank", data=data)
        probe_cfg.validate()
        scores = [s.strip() for s in args.scores.split(",") if s.strip()]
        result = rank_backbones(
            data, parse_candidates(args.backbones, args.weights), scores, seed=args.seed, accelerator=args.accelerator,
            batch_size=args.batch_size, console=console,
        )
        print_ranking(result, console)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result.to_dict(), indent=2))
            console.print(f"written: {args.json_out}", markup=False, highlight=False)
        return 0
    if args.command == "fewshot":
        from transferlab.runs import run_experiment

        cfg = fewshot_config(args)
        run_dir = Path(args.runs_dir) / args.study / cfg.name
        run_experiment(cfg, run_dir, overwrite=args.overwrite, console=console)
        return 0
    raise AssertionError(args.command)
