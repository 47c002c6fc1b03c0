"""Frozen-prefix feature caching: cut analysis (``cuts``), the feature store (``store``), cached training (``cached``)."""

from transferlab.engine.features.cached import (
    CachedSuffix,
    CachedTraining,
    FeatureBatches,
    cached_training,
    default_cache_dir,
    extract_features,
    frozen_features,
    split_parts,
)
from transferlab.engine.features.cuts import CutCheck, CutPoint, check_cut, cut_points
from transferlab.engine.features.store import STORE, FeatureCache, FeatureCacheError, FeatureSet, cache_key, images_hash, state_hash

__all__ = [
    "STORE",
    "CachedSuffix",
    "CachedTraining",
    "CutCheck",
    "CutPoint",
    "FeatureBatches",
    "FeatureCache",
    "FeatureCacheError",
    "FeatureSet",
    "cache_key",
    "cached_training",
    "check_cut",
    "cut_points",
    "default_cache_dir",
    "extract_features",
    "frozen_features",
    "images_hash",
    "split_parts",
    "state_hash",
]
