"""The ``tracking`` key: its two spellings as one mapping, and ``--track`` applied to a parsed study.

``tracking: [tensorboard, mlflow]`` and ``tracking: {mlflow: {tracking_uri: ...}, tensorboard: null}``
say the same kind of thing; ``tracking_specs`` turns either into ``{name: options}``. Which names
exist and which options they take is the business of ``transferlab.engine.tracking`` (the registry
and its check); this module only reshapes, so the config layer imports nothing above it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

from transferlab.config.schema import ConfigError
from transferlab.config.study import Study

__all__ = ["tracking_specs", "with_tracking"]


def tracking_specs(value: list[str] | dict[str, dict[str, Any] | None] | None) -> dict[str, dict[str, Any]]:
    """``[a, b]`` or ``{a: {...}, b: null}`` -> ``{a: {...}, b: {}}`` (names in the order given)."""
    if not value:
        return {}
    if isinstance(value, dict):
        return {str(k): dict(v or {}) for k, v in value.items()}
    return {str(name): {} for name in value}


def with_tracking(study: Study, names: Sequence[str]) -> Study:
    """A copy of ``study`` whose every experiment is also tracked by ``names`` (``transferlab run --track``).

    Trackers the study file configures keep their options; a name is validated like the study file's
    (unknown names are a ``ConfigError`` naming ``--track`` and the closest tracker).
    """
    if not names:
        return study
    experiments = []
    for cfg in study.experiments:
        specs = tracking_specs(cfg.tracking)
        for name in names:
            specs.setdefault(name, {})
        # a plain list when no tracker has options: config.yaml then reads as the user would write it
        tracking: Any = list(specs) if not any(specs.values()) else {k: v or None for k, v in specs.items()}
        new = dataclasses.replace(copy.deepcopy(cfg), tracking=tracking)
        try:
            new.validate()
        except ConfigError as e:
            raise ConfigError(f"--track {' '.join(names)}: {e}") from None
        experiments.append(new)
    return dataclasses.replace(study, experiments=experiments)
