"""``kind: soup`` — model soups (Wortsman et al. 2022) and WiSE-FT over finished runs of one architecture.

The members are finished runs with the same model (backbone, head, strategy: the same state-dict keys and shapes)
and the same class names; the soup evaluates on its own data section's splits, which must be the members' (their
``selection.json`` has the same validation and test images), so nothing is chosen on images a member trained on.

* ``uniform`` — the mean of every member's weights.
* ``greedy`` — the members sorted by validation accuracy (best first); each joins the soup only if the soup's
  validation accuracy strictly improves (Wortsman et al. 2022, recipe 1).
* ``interpolate: {base: run:<x>, alphas: [...]}`` (WiSE-FT) — ``(1 − a)·base + a·soup`` for every alpha; the alpha
  with the best validation accuracy is kept (ties: the first in ``alphas``). BatchNorm statistics are interpolated
  with the weights (alpha 0 and 1 are the two models exactly) and, where BatchNorm layers trained, also recomputed;
  each alpha keeps the better of the two on validation (``bn`` in the curve). The curve (val, and test for the
  report) is in ``metrics.json`` (``wise_ft``) and ``history.csv`` (a row per alpha).

Multi-label members (``data.task: multilabel``; the soup's data section says so too) are ranked, kept and
interpolated by the validation macro mAP instead of the accuracy (``val_map``), and the soup's thresholds
(``train.threshold``) are chosen on its validation probabilities, then used on test.

Where the model has BatchNorm layers that trained, their statistics are recomputed on the training images for
every candidate soup (averaged weights do not match averaged statistics; a member alone keeps its own); which trained is the members' strategy's
BatchNorm rule (``trained_parts``: a probe on frozen features, ``kind: logistic``, trained none of them). What is averaged is each member's
model as ``load_run`` gives it: a LoRA run's adapters merged into its layers (averaging lora_A and lora_B apart would
average no member's update), an adapter-only checkpoint completed with its base weights. Floating-point tensors are
averaged; integer buffers come from the first member. The soup's weights are its ``checkpoints/best.safetensors`` and its
``config.yaml`` holds the members' model, head and strategy, so ``load_run``, ``predict`` and ``export`` work on it.
``soup.fingerprints`` records a hash of every checkpoint averaged: a member deleted or changed afterwards makes
``--resume`` report it instead of reusing the soup.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from transferlab.config import ExperimentConfig
from transferlab.config.kinds import KindUses
from transferlab.data.batches import make_batches
from transferlab.engine.costs import Cost
from transferlab.engine.evaluation import Evaluation, evaluate
from transferlab.engine.multilabel import MultilabelEvaluation, choose_thresholds, evaluate_multilabel, multilabel_predictions
from transferlab.engine.predictions import PredictionRecorder, save_test_predictions
from transferlab.engine.swa import recompute_batchnorm
from transferlab.files import save_checkpoint
from transferlab.kinds.base import KINDS, Kind, RunContext
from transferlab.kinds.common import base_metrics, batch_kwargs, multilabel_test_part, prepare, test_part
from transferlab.models.adapters import merge_adapters
from transferlab.models.model import BN_TYPES, TransferModel
from transferlab.rundir import Run, RunError, RunMetrics, code_version, load_run
from transferlab.rundir.layout import HISTORY_FILE, checkpoint_path
from transferlab.strategies import apply_strategy, apply_strategy_at_epoch, has_schedule, linear_probe

__all__ = ["SoupError", "SoupKind", "average_states", "curve_choice", "fingerprint", "greedy_order", "greedy_soup", "interpolate_states",
           "trained_parts"]


class SoupError(RunError):
    """Members that cannot be averaged (other architecture, other classes, other splits, missing). Names the runs."""


def _path(ref: str) -> Path:
    return Path(ref[len("run:"):] if ref.startswith("run:") else ref).expanduser()


def trained_parts(run: Run) -> Callable[[TransferModel, Any], Any]:
    """The strategy that says what of a member trained: its own for a run that trains (with a trainability schedule:
    the set of its last epoch), ``linear_probe`` for a probe on frozen features (``kind: logistic``: only its head
    trained; its backbone's BatchNorm statistics are the pretrained ones). The members are averaged merged
    (``_merged_state``), so LoRA's adapters, added by the strategy to say what trained, are folded away again."""
    assert run.config is not None
    if not run.config.uses.training:
        return linear_probe
    last = max((run.record.epochs_run or 1) - 1, 0) if has_schedule(run.config.strategy) else None

    def rule(model: TransferModel, cfg: Any) -> None:
        if last is None:
            apply_strategy(model, cfg)
        else:
            apply_strategy_at_epoch(model, cfg, last)
        merge_adapters(model)  # fresh adapters (lora_B = 0) folded away: the plain layers the merged members load into

    return rule


def _checkpoint(run_dir: Path) -> Path:
    best = checkpoint_path(run_dir, "best")
    return best if best.is_file() else checkpoint_path(run_dir, "last")


def fingerprint(run_dir: Path) -> str:
    """sha256 of the checkpoint a soup averages from ``run_dir`` (``best``, else ``last``); a missing one is a ``SoupError``."""
    path = _checkpoint(run_dir)
    if not path.is_file():
        what = "does not exist (deleted?)" if not run_dir.exists() else "has no checkpoint"
        raise SoupError(f"soup member {run_dir} {what}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# weights


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors (in float32, cast back); other tensors from the first state."""
    first = states[0]
    out = {}
    for k, v in first.items():
        if v.is_floating_point():
            out[k] = (sum(s[k].float() for s in states) / len(states)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def interpolate_states(base: dict[str, torch.Tensor], top: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: ``(1 − alpha)·base + alpha·top`` for floating-point tensors; other tensors from ``top``."""
    return {k: ((1 - alpha) * base[k].float() + alpha * v.float()).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in top.items()}


def greedy_order(val_accs: Sequence[float]) -> list[int]:
    """Member indices by validation accuracy, best first (ties: the order given)."""
    return sorted(range(len(val_accs)), key=lambda i: -val_accs[i])


# --------------------------------------------------------------------------------------------
# members


def _members(cfg: ExperimentConfig, strict: bool) -> list[Run]:
    """The member runs, checked to be finished, of one architecture and one class set. Without ``strict`` (a study
    being validated, its members not made yet) missing folders are skipped."""
    refs = list(cfg.soup.members) + ([cfg.soup.interpolate.base] if cfg.soup.interpolate else [])
    runs = []
    for ref in refs:
        path = _path(ref)
        if not path.is_dir():
            if strict:
                raise SoupError(f"experiment '{cfg.name}': soup member {ref!r}: no run directory {path}")
            continue
        try:
            run = load_run(path)
        except RunError as e:
            raise SoupError(f"experiment '{cfg.name}': soup member {path}: not a finished run ({e})") from None
        if not run.ok or run.config is None or not run.config.uses.model or run.record.kind == "ensemble":
            raise SoupError(f"experiment '{cfg.name}': soup member {path}: not a finished single-model run "
                            f"(status {run.record.status!r}, kind {run.record.kind!r})")
        runs.append(run)
    if runs:
        _same_model(cfg, runs)
    return runs


def _same_model(cfg: ExperimentConfig, runs: Sequence[Run]) -> None:
    first = runs[0]
    assert first.config is not None
    for r in runs:
        if r.record.task != cfg.data.task:
            raise SoupError(f"experiment '{cfg.name}': soup member {r.path} is a {r.record.task} run and the soup's data.task is "
                            f"{cfg.data.task}: give the soup its members' data section")
    want = (first.config.model.backbone, first.config.head.type, first.config.strategy.name, first.class_names)
    for r in runs[1:]:
        assert r.config is not None
        got = (r.config.model.backbone, r.config.head.type, r.config.strategy.name, r.class_names)
        if got[:2] != want[:2]:
            raise SoupError(f"experiment '{cfg.name}': soup members of different architectures: {first.path} is "
                            f"{want[0]} + {want[1]} head, {r.path} is {got[0]} + {got[1]} head")
        if got[3] != want[3]:
            raise SoupError(f"experiment '{cfg.name}': soup members with different classes: {first.path} has {want[3][:10]}, "
                            f"{r.path} has {got[3][:10]}")


def _merged_state(run: Run) -> dict[str, torch.Tensor]:
    """A member's weights as its model computes them (``Run.load_model()``: LoRA merged, an adapter-only checkpoint completed)."""
    return {k: v.detach().clone() for k, v in run.load_model().state_dict().items()}


def _states(cfg: ExperimentConfig, runs: Sequence[Run]) -> list[dict[str, torch.Tensor]]:
    """The members' weights as their models compute (``_merged_state``), checked to have the same keys and shapes (else:
    different architectures, named)."""
    states = [_merged_state(r) for r in runs]
    ref = {k: tuple(v.shape) for k, v in states[0].items()}
    for r, s in zip(runs[1:], states[1:], strict=True):
        got = {k: tuple(v.shape) for k, v in s.items()}
        if got != ref:
            diff = sorted(set(got) ^ set(ref)) or sorted(k for k in ref if ref[k] != got[k])
            raise SoupError(f"experiment '{cfg.name}': {r.path} has other weights than {runs[0].path} (e.g. {diff[:3]}): "
                            "a soup needs one architecture (same backbone, head, truncation and strategy modules)")
    return states


# --------------------------------------------------------------------------------------------
# the kind


class SoupKind(Kind):
    """Weight averaging of finished runs (uniform / greedy soup) and WiSE-FT interpolation."""

    name = "soup"
    uses = KindUses(data=True, model=True, folds=False, multilabel=True)  # evaluates on its own splits; its weights are exported

    def check(self, cfg: ExperimentConfig) -> None:
        sp = cfg.soup
        need = 1 if sp.interpolate is not None else 2
        if len(sp.members) < need:
            raise cfg.error(f"soup.members={sp.members!r} must list at least {need} run{'s' if need > 1 else ''}"
                            + ("" if need == 1 else " (one member: use soup.interpolate for WiSE-FT)"))
        if sp.fingerprints and set(sp.fingerprints) - {str(_path(m)) for m in [*sp.members, *([sp.interpolate.base] if sp.interpolate else [])]}:
            raise cfg.error("soup.fingerprints is recorded by the run, not written by hand")
        try:
            _members(cfg, strict=False)
        except SoupError as e:
            raise cfg.error(str(e).split(": ", 1)[1]) from None

    def estimate(self, cfg: ExperimentConfig, n_train: int, n_val: int, n_test: int, cost: Cost | None) -> float:
        """Forward passes only: every member on val; each candidate soup (greedy: one per further member; uniform: one)
        and each WiSE-FT alpha with a BatchNorm pass over the training images and a val pass (alphas: test too)."""
        if cost is None:
            return 0.0
        sp, members = cfg.soup, len(cfg.soup.members)
        candidates = members - 1 if sp.method == "greedy" else 1
        alphas = len(sp.interpolate.alphas) if sp.interpolate is not None else 0
        images = members * n_val + (candidates + 1) * (n_train + n_val) + alphas * (n_train + n_val + n_test) + n_test
        return images * cost.forward

    def snapshot(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """The config with the members' model, head and strategy (what the soup's weights are) and the fingerprint of
        every member's checkpoint (``missing`` for a member not there): a changed or deleted member makes ``--resume``
        refuse the recorded soup. Lenient, because a study computes it before its members have run; ``run`` is strict."""
        try:
            runs = _members(cfg, strict=False)
        except SoupError:
            runs = []  # a member not finished yet: run() says so when the soup runs
        refs = list(cfg.soup.members) + ([cfg.soup.interpolate.base] if cfg.soup.interpolate else [])
        prints = {}
        for ref in refs:
            try:
                prints[str(_path(ref))] = fingerprint(_path(ref))
            except SoupError:
                prints[str(_path(ref))] = "missing"
        soup = dataclasses.replace(cfg.soup, fingerprints=prints)
        first = runs[0].config if runs else None
        if first is None:
            return dataclasses.replace(cfg, soup=soup).to_dict()
        return dataclasses.replace(cfg, model=first.model, head=first.head, strategy=first.strategy, soup=soup).to_dict()

    def run(self, cfg: ExperimentConfig, ctx: RunContext) -> RunMetrics:
        wall0 = time.perf_counter()
        runs = _members(cfg, strict=True)
        members, base = (runs[:-1], runs[-1]) if cfg.soup.interpolate else (runs, None)
        first = members[0].config
        assert first is not None
        cfg = dataclasses.replace(cfg, model=first.model, head=first.head, strategy=first.strategy)
        states = _states(cfg, runs)
        ctx.model = members[0].load_model()  # the members' architecture and normalisation; weights replaced below
        p = prepare(cfg, ctx, trained_parts(members[0]), single_process=True)  # which BatchNorm layers trained
        _same_splits(cfg, p.splits.indices, runs)
        model, dev = p.model.to(p.fabric.device), p.fabric.device
        kwargs = batch_kwargs(model, cfg, dev)
        train, val, test = (make_batches(p.splits, s, cfg.train.eval_batch_size, **kwargs) for s in ("train", "val", "test"))
        score = _Scorer(model, train, val, p.splits.num_classes, dev, p.fabric.autocast, cfg.multilabel)
        ctx.console.print(f"[bold]{cfg.name}[/]: {cfg.soup.method} soup of {len(members)} {first.model.backbone} runs"
                          + (f", WiSE-FT from {base.path.name}" if base else "") + f" on {dev}")
        state, chosen, member_rows = _soup(cfg, score, members, states[:len(members)], ctx)
        curve: list[dict[str, float]] = []
        if base is not None:
            state, curve = _wise_ft(cfg, score, states[-1], state, test, ctx)
        model.load_state_dict(state, strict=True)
        ev_val = score(state, recompute=cfg.soup.method == "uniform" and base is None)  # the others' statistics are settled
        with p.fabric.autocast():
            tested, predictions = _test(cfg, model, ev_val, test, p.splits.num_classes, dev)
        meta = {"config": ctx.snapshot, "class_names": p.splits.class_names, "code_version": code_version(), "kind": "best",
                "soup": {"method": cfg.soup.method, "members": [str(r.path) for r in chosen]}}
        save_checkpoint(ctx.rundir.checkpoints / "best.safetensors", model.state_dict(), meta)
        save_test_predictions(ctx.rundir.path, predictions, p.splits, cfg.seed)
        if curve:
            ctx.rundir.write_rows(HISTORY_FILE, curve)
        m = base_metrics(cfg, p.splits, None, dev).add(tested, {
            "strategy": f"{cfg.soup.method} soup" + (" + WiSE-FT" if base else ""), "weights": f"soup of {len(chosen)} runs",
            "best_val": score.value(ev_val), "monitor": score.monitor, "epochs_run": 0, "data_seconds": p.data_seconds,
            "train_seconds": float(sum(r.record.training_cost_seconds() for r in runs)),
            "total_params": sum(q.numel() for q in model.parameters()), "trainable_params": 0,
            "wall_seconds": time.perf_counter() - wall0,
            "extra": {"soup": {"method": cfg.soup.method, "members": member_rows, "chosen": [str(r.path) for r in chosen],
                               "batchnorm_recomputed": score.bn_layers, score.monitor: score.value(ev_val)},
                      "checkpoint_bytes": (ctx.rundir.checkpoints / "best.safetensors").stat().st_size,
                      **({"wise_ft": {"base": str(base.path), "alphas": cfg.soup.interpolate.alphas if cfg.soup.interpolate else [],
                                      "chosen_alpha": curve_choice(curve)["alpha"], "chosen_on": "val", "curve": curve}} if base else {})},
        })
        m.weights_source = f"{cfg.soup.method} soup of " + ", ".join(r.path.name for r in chosen)
        ctx.console.print(f"  [green]{cfg.name}[/]: {'test mAP' if m.task == 'multilabel' else 'test acc'} {getattr(m, m.headline):.4f} (val "
                          f"{score.value(ev_val):.4f}; members " + ", ".join(f"{r[score.monitor]:.4f}" for r in member_rows)
                          + f" val) -> {ctx.rundir.path}")
        return m


def _test(cfg: ExperimentConfig, model: TransferModel, ev_val: Evaluation | MultilabelEvaluation, test: Any, num_classes: int,
          device: torch.device) -> tuple[dict[str, Any], Any]:
    """The soup's test fields of ``metrics.json`` and what ``predictions.json`` is written from. Multi-label: the
    thresholds are chosen on the soup's validation probabilities (``ev_val``), then the test split is scored at them."""
    if isinstance(ev_val, MultilabelEvaluation):
        thresholds, mode = choose_thresholds(ev_val.probs, ev_val.targets, cfg.train.threshold)
        ev = evaluate_multilabel(model, test, num_classes, device, thresholds)
        return multilabel_test_part(ev, mode), multilabel_predictions(ev.probs, ev.targets, thresholds)
    recorder = PredictionRecorder(model)
    return test_part(evaluate(recorder, recorder.batches(test), num_classes, device)), recorder


def _same_splits(cfg: ExperimentConfig, indices: dict[str, Any], runs: Sequence[Run]) -> None:
    """Every member was selected, validated and tested on the soup's splits (no member trained on its val images)."""
    for r in runs:
        sel = r.selection
        for split in ("val", "test"):
            if split in sel and [int(i) for i in sel[split]] != [int(i) for i in indices.get(split, [])]:
                raise SoupError(f"experiment '{cfg.name}': soup member {r.path} has another {split} split than the soup "
                                f"({len(sel[split])} vs {len(indices.get(split, []))} images): give the soup the members' "
                                "data section and seed")


class _Scorer:
    """Validation evaluation of a candidate state: loaded into the model, BatchNorm recomputed on the training images.
    ``value`` is what candidates are ranked by: the accuracy, or (multi-label) the macro mAP — ``monitor`` names it."""

    def __init__(self, model: TransferModel, train: Any, val: Any, num_classes: int, device: torch.device, autocast: Any,
                 multilabel: bool = False) -> None:
        self.model, self.train, self.val, self.num_classes, self.device, self.autocast = model, train, val, num_classes, device, autocast
        self.multilabel, self.monitor = multilabel, "val_map" if multilabel else "val_acc"
        self.bn_layers = 0

    @functools.cached_property
    def recomputes(self) -> bool:
        """Whether recomputing changes anything: some BatchNorm layer trains (the members' strategy's rule, as
        ``recompute_batchnorm`` asks it: in train mode, a frozen BatchNorm stays in eval mode)."""
        self.model.train()
        found = any(isinstance(m, BN_TYPES) and m.training and m.track_running_stats for m in self.model.modules())
        self.model.eval()
        return found

    def __call__(self, state: dict[str, torch.Tensor], recompute: bool = True) -> Evaluation | MultilabelEvaluation:
        self.model.load_state_dict(state, strict=True)
        if recompute:
            self.bn_layers = len(recompute_batchnorm(self.model, self.train, self.device, self.autocast))
            state.update({k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()})  # keep the statistics
        self.model.eval()
        return self.evaluate(self.val)

    def evaluate(self, batches: Any) -> Evaluation | MultilabelEvaluation:
        """The model as it is now, on ``batches``."""
        with self.autocast():
            if self.multilabel:
                return evaluate_multilabel(self.model, batches, self.num_classes, self.device)
            return evaluate(self.model, batches, self.num_classes, self.device)

    def value(self, ev: Evaluation | MultilabelEvaluation) -> float:
        return ev.map if isinstance(ev, MultilabelEvaluation) else ev.acc


def greedy_soup(states: Sequence[dict[str, torch.Tensor]], val_accs: Sequence[float],
                score: Callable[[dict[str, torch.Tensor]], float]) -> tuple[list[int], dict[str, torch.Tensor], dict[int, float]]:
    """Wortsman et al.'s greedy soup: start from the best member on val; try the others in order of validation
    accuracy and keep each whose addition makes ``score`` (the uniform average's validation accuracy) strictly higher.
    Returns (kept member indices, the soup's state, the score of every tried addition by member index)."""
    order = greedy_order(val_accs)
    kept, best, state, tried = [order[0]], val_accs[order[0]], dict(states[order[0]]), {}
    for i in order[1:]:
        candidate = average_states([states[j] for j in [*kept, i]])
        tried[i] = acc = score(candidate)
        if acc > best:
            kept, best, state = [*kept, i], acc, candidate
    return kept, state, tried


def _soup(cfg: ExperimentConfig, score: _Scorer, members: Sequence[Run], states: list[dict[str, torch.Tensor]],
          ctx: RunContext) -> tuple[dict[str, torch.Tensor], list[Run], list[dict[str, Any]]]:
    """(the soup's state, the members in it, a row per member with its own validation accuracy — multi-label: mAP)."""
    accs = [score.value(score(dict(s), recompute=False)) for s in states]  # each member as it was trained
    rows = [{"run": str(r.path), "experiment": r.record.experiment, score.monitor: a,
             f"recorded_{r.record.headline}": getattr(r.record, r.record.headline)} for r, a in zip(members, accs, strict=True)]
    if cfg.soup.method == "uniform":
        return average_states(states), list(members), rows
    kept, state, tried = greedy_soup(states, accs, lambda st: score.value(score(st)))
    for i, row in enumerate(rows):
        row["in_soup"] = i in kept
        if i in tried:
            row[f"greedy_{score.monitor}"] = tried[i]
            ctx.console.print(f"  greedy: {members[i].path.name} (val {accs[i]:.4f}) -> soup val {tried[i]:.4f}, "
                              f"{'kept' if i in kept else 'left out'}")
    return state, [members[i] for i in kept], rows


def _wise_ft(cfg: ExperimentConfig, score: _Scorer, base: dict[str, torch.Tensor], top: dict[str, torch.Tensor], test: Any,
             ctx: RunContext) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """WiSE-FT: every alpha's state scored on val (and on test, for the curve only); the best alpha on val wins.

    BatchNorm statistics, two ways per alpha, the better on validation kept: interpolated with the weights (alpha 0
    and 1 are then exactly the two models — recomputing them made alpha 0 a probe head on features it never saw:
    26 % instead of the probe's 85 %, RESULTS §14) and, where BatchNorm layers trained, recomputed on the training
    images (what an interpolated network's activations need in between)."""
    assert cfg.soup.interpolate is not None
    curve, states = [], []
    key = score.monitor
    for alpha in cfg.soup.interpolate.alphas:
        state = interpolate_states(base, top, alpha)
        ev, row = score(state, recompute=False), {"alpha": alpha, "bn": "interpolated"}
        row[f"{key}_interpolated_bn"] = score.value(ev)
        if score.recomputes:
            again = dict(state)  # the scorer writes the recomputed statistics into the dict it is given
            ev_again = score(again)
            row[f"{key}_recomputed_bn"] = score.value(ev_again)
            if score.value(ev_again) > score.value(ev):
                state, ev, row["bn"] = again, ev_again, "recomputed"
            else:
                score.model.load_state_dict(state, strict=True)  # the test pass below sees the state kept
        on_test = score.value(score.evaluate(test))  # the report's curve only: never chosen on
        curve.append({**row, "val_loss": ev.loss, key: score.value(ev), key.replace("val_", "test_"): on_test})
        states.append(state)
    chosen = curve_choice(curve)
    tried = ", ".join(f"{r['alpha']}: {r[key]:.3f}" for r in curve)
    ctx.console.print(f"  WiSE-FT: alpha {chosen['alpha']} (val {chosen[key]:.4f}, BatchNorm statistics {chosen['bn']}) of {tried}")
    return states[curve.index(chosen)], curve


def curve_choice(curve: Sequence[dict[str, float]]) -> dict[str, float]:
    """The WiSE-FT row with the best validation accuracy — multi-label: macro mAP (``val_map``) — the first of equals;
    never the test score."""
    key = "val_map" if "val_map" in curve[0] else "val_acc"
    return max(curve, key=lambda r: r[key])


KINDS.register("soup", SoupKind())
