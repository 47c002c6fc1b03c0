"""What each experiment kind uses of a config, declared by the kind and read by every layer.

The kinds (``transferlab.kinds``) sit far above the config, data, model and run-directory layers, which
still need to know, for an experiment, whether it loads a dataset, builds a model, trains with the loop
or combines other runs. Instead of testing ``cfg.kind == "ensemble"`` everywhere, each kind declares a
``KindUses`` when it registers (``transferlab.kinds.base.Kind.uses``), and the lower layers ask
``cfg.uses`` (``ExperimentConfig.uses``) — the way ``register_choices`` connects a registry above to a
field here. A new kind gets correct checks, data handling and plans by declaring what it uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["KindUses", "declare_kinds", "kind_uses"]


@dataclass(frozen=True)
class KindUses:
    """The parts of a config an experiment kind uses."""

    data: bool = True
    """It loads the ``data:`` section's dataset itself (an ensemble reads its members' test images instead)."""
    model: bool = True
    """It builds one model from ``model:`` / ``head:`` (``strategy:`` says what of it trains); it has weights to export."""
    training: bool = False
    """It trains with the loop: ``train:`` (epochs, optimiser, schedule, recipes), ``lr: find``, calibration,
    the ``predict:`` / ``activations:`` sections after testing."""
    members: bool = False
    """It combines finished runs (``ensemble:``), which must exist before it runs."""
    folds: bool = True
    """``data.folds`` splits it into one run per fold (a kind that samples its own episodes does not)."""
    features: bool = False
    """It works on the frozen backbone's pooled features (one backbone pass, shareable with other runs)."""
    multilabel: bool = False
    """It handles ``data.task: multilabel`` (several labels per image); a kind that does not is refused by the config
    checks, naming the kind."""


_DECLARED: list[Callable[[str], KindUses | None]] = []


def declare_kinds(lookup: Callable[[str], KindUses | None]) -> None:
    """Where ``kind_uses`` finds a kind's declaration: ``lookup(name)`` (the kinds registry; ``None`` for an unknown name)."""
    _DECLARED.append(lookup)


def kind_uses(kind: str) -> KindUses:
    """What ``kind`` uses; an unknown (or not yet registered) kind gets the defaults of a model-building kind, and
    ``kind`` itself is refused by the config checks with a did-you-mean."""
    for lookup in _DECLARED:
        found = lookup(kind)
        if found is not None:
            return found
    return KindUses()
