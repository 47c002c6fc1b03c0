"""Experiment kinds as peers: ``train``, ``logistic``, ``knn``, ``fewshot``, ``ensemble``, ``soup`` (each registers itself)."""

from transferlab.kinds import ensemble, fewshot, knn, logistic, soup, train  # noqa: F401 - each registers its kind
from transferlab.kinds.base import KINDS, Kind, RunContext, run_experiment
from transferlab.kinds.ensemble import EnsembleError, combine_votes, evaluate_ensemble, run_ensemble

__all__ = ["KINDS", "EnsembleError", "Kind", "RunContext", "combine_votes", "evaluate_ensemble", "run_ensemble", "run_experiment"]
