"""The decisions of ``transferlab auto`` that need no model: how to fine-tune, and which final candidate to keep.

Pure functions over measured (or, in tests, given) costs and validation scores, so each rule can be read and tested
on its own; ``transferlab.tools.auto`` measures, runs and records.

**How to fine-tune** (``choose_finetune``). Three methods: LP-FT (``strategy: lp_ft``, a linear-probe phase on cached
features, then everything trains), a full fine-tune (``strategy: finetune``) and LoRA (``strategy: lora``, the ``peft``
extra). Their costs per run come from the throughput probe: LP-FT's and the full fine-tune's training steps are the
same measured step (after LP-FT's probe phase everything trains; the probe phase is one backbone pass, counted as one epoch), LoRA's step is
measured on its own (the frozen weights get no gradient and the optimiser holds the adapters only). The planner tries,
for the most candidates first (as before: the backbone is the larger lever, and the probes only rank it roughly):

1. **every method as an arm** of the successive halving (each candidate × method is one arm of the first rung), when
   the first rung fits at least ``ARMS_MIN_EPOCHS`` epochs. Validation then decides the method for this dataset
   instead of a prior; below that many epochs the arms' ranking says little (LP-FT at 2 epochs trains the backbone
   for one), so the time goes to one method instead;
2. **LP-FT alone**, at the most epochs that fit — the prior: it costs less than a full fine-tune of as many epochs
   (its first epoch is one forward pass) and Kumar et al. 2022 measured it as accurate in distribution and more
   robust out of it. A full fine-tune alone is therefore never chosen; it runs as an arm;
3. **LoRA alone**, when not even a 2-epoch LP-FT run fits but a LoRA run (cheaper steps) does;
4. else no fine-tune (probes only).

**The final candidate** (``choose_final``). The best single model on validation is the default. A soft-vote ensemble or
a greedy soup replaces it only if its validation accuracy is strictly higher *and* its final runs (all its members on
the full pool, then the vote or the soup) fit the time left; of several such, the higher validation accuracy wins (a
tie: the cheaper final).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ARMS_MIN_EPOCHS", "FT_EPOCHS", "METHODS", "METHOD_LABEL", "SOUP_METHODS", "FinalOption", "FinetunePlan", "RunSeconds",
           "choose_final", "choose_finetune", "finetune_cost", "rungs", "soup_members"]

METHODS = ("lp_ft", "finetune", "lora")
"""The fine-tuning strategies auto chooses from (``strategy.name``), in order of preference as a single method."""
METHOD_LABEL = {"lp_ft": "LP-FT", "finetune": "full fine-tune", "lora": "LoRA"}
FT_EPOCHS = (20, 12, 8, 6, 4, 3, 2)
"""First-rung fine-tuning epochs tried, largest first (for LP-FT one of them is the linear-probe phase)."""
ARMS_MIN_EPOCHS = 4
"""Methods compete as arms only with a first rung of at least this many epochs (see the module docstring)."""
SOUP_METHODS = ("lp_ft", "finetune")
"""Fine-tunes whose weights a soup averages: both end with every weight trained (LP-FT after its probe phase). LoRA runs
are left out: a soup takes its first member's strategy as its own (which BatchNorm statistics trained and are recomputed,
how ``load_run`` rebuilds it), and a LoRA run froze what the others trained."""


def rungs(n: int, e0: int) -> list[tuple[int, int]]:
    """Successive halving: (arms, epochs) per rung: n at e0, then the better half at twice the epochs, … to 2."""
    out = [(n, e0)]
    while out[-1][0] > 2:
        out.append((math.ceil(out[-1][0] / 2), out[-1][1] * 2))
    return out


@dataclass
class FinetunePlan:
    """The fine-tune stage: ``methods`` (one, or several as arms) for the ``finetunes`` best probed candidates, the
    successive-halving ``rungs`` ((arms, epochs) each), its planned ``seconds``, the ``final_s`` of its most expensive
    final run, and ``why`` it was chosen."""

    methods: list[str]
    finetunes: int
    rungs: list[tuple[int, int]]
    seconds: float
    final_s: float
    why: str

    @property
    def epochs(self) -> int:
        return self.rungs[0][1]


RunSeconds = Callable[[str, int, bool], float]
"""``(method, epochs, final) -> seconds`` of one run of the most expensive candidate (``final``: on the full pool, one
run; else on the dev data, all its folds)."""


def finetune_cost(run_s: RunSeconds, methods: list[str], n: int, e0: int) -> tuple[list[tuple[int, int]], float, float]:
    """(rungs, stage seconds, final-run seconds) of ``n`` candidates × ``methods`` arms from ``e0`` epochs. The first rung
    runs every arm; which arms survive is not known yet, so later rungs count each arm at the dearest method's cost."""
    rr = rungs(n * len(methods), e0)
    first = n * sum(run_s(m, e0, False) for m in methods)
    later = sum(k * max(run_s(m, e, False) for m in methods) for k, e in rr[1:])
    return rr, first + later, max(run_s(m, rr[-1][1], True) for m in methods)


def choose_finetune(run_s: RunSeconds, methods: list[str], n_max: int, room: float, final_reserved: float) -> FinetunePlan | None:
    """The fine-tune stage that fits ``room`` seconds (module docstring): ``methods`` are those available here (LP-FT
    always; LoRA only with ``peft``); ``final_reserved`` is the final run already kept in reserve (a fine-tuned final
    run costs more: the difference must fit too). ``None``: not even one 2-epoch run of any method fits."""
    single = [m for m in ("lp_ft", "lora") if m in methods]
    for n in range(n_max, 0, -1):
        options: list[tuple[list[str], list[int], str]] = []
        if len(methods) > 1:
            options.append((list(methods), [e for e in FT_EPOCHS if e >= ARMS_MIN_EPOCHS],
                            f"every method as an arm: the budget fits a first rung of at least {ARMS_MIN_EPOCHS} epochs, "
                            "so validation accuracy chooses the method"))
        for m in single:
            why = ("LP-FT alone: the method arms do not fit; LP-FT costs less than a full fine-tune of as many epochs and is "
                   "as accurate in distribution (Kumar et al. 2022)") if m == "lp_ft" else \
                "LoRA alone: not even a 2-epoch LP-FT run fits, a LoRA run (cheaper steps) does"
            options.append(([m], list(FT_EPOCHS), why))
        for ms, epochs, why in options:
            for e0 in epochs:
                rr, stage_s, final_s = finetune_cost(run_s, ms, n, e0)
                if stage_s + max(0.0, final_s - final_reserved) <= room:
                    return FinetunePlan(ms, n, rr, stage_s, final_s, why)
    return None


def soup_members(models: dict[str, dict[str, Any]]) -> list[str]:
    """The greedy soup's members, best first: the fine-tuned models (LP-FT or full; ``SOUP_METHODS``) of one candidate —
    a soup needs one architecture and one pretrained start — the one with at least two of them whose best is the best
    on validation. None has two: no soup (``[]``)."""
    groups: dict[str, list[str]] = {}
    for k, m in models.items():
        if m.get("kind") in SOUP_METHODS and m.get("val_acc") is not None:
            groups.setdefault(m["candidate"], []).append(k)
    groups = {c: sorted(ks, key=lambda k: -models[k]["val_acc"]) for c, ks in groups.items() if len(ks) >= 2}
    if not groups:
        return []
    return max(groups.values(), key=lambda ks: models[ks[0]]["val_acc"])


@dataclass
class FinalOption:
    """A candidate for the final stage: its validation accuracy and the estimated seconds of its final runs."""

    model: str
    val_acc: float | None
    final_s: float
    kind: str = "single"
    extra: dict[str, Any] = field(default_factory=dict)


def choose_final(best: FinalOption, others: list[FinalOption], left: float) -> tuple[FinalOption, dict[str, str]]:
    """The final model (module docstring) and, for every other option, why it was not chosen."""
    why: dict[str, str] = {}
    fit = []
    for o in others:
        if o.val_acc is None:
            why[o.model] = "did not run or failed"
        elif o.val_acc <= best.val_acc:  # type: ignore[operator]
            why[o.model] = f"validation accuracy {o.val_acc:.4f} does not beat the best single model ({best.val_acc:.4f})"
        elif o.final_s > left:
            why[o.model] = f"its final runs need ~{o.final_s:.0f}s, {max(0.0, left):.0f}s left"
        else:
            fit.append(o)
    if not fit:
        return best, why
    fit.sort(key=lambda o: (-(o.val_acc or 0.0), o.final_s))
    for o in fit[1:]:
        why[o.model] = f"validation accuracy {o.val_acc:.4f} below {fit[0].model}'s ({fit[0].val_acc:.4f})"
    why[best.model] = f"validation accuracy {best.val_acc:.4f} below {fit[0].model}'s ({fit[0].val_acc:.4f})"
    return fit[0], why
