"""Evaluation metrics for synthetic image sets.

``fid`` (TF-Inception features, FID), ``neighbours`` (exact k-NN, precision/recall),
``downstream`` (train on synthetic, test once on real), ``leakage`` (nearest-neighbour
similarity, near-copies, membership inference).
"""

from privimage.metrics.fid import (
    FEATURE_DIM,
    TFInceptionFeatures,
    cached_features,
    cached_statistics,
    feature_statistics,
    fid_score,
    frechet_distance,
    frechet_distance_of_features,
    inception_features,
    inception_path,
    load_inception,
)
from privimage.metrics.neighbours import precision_recall

__all__ = [
    "FEATURE_DIM",
    "TFInceptionFeatures",
    "cached_features",
    "cached_statistics",
    "feature_statistics",
    "fid_score",
    "frechet_distance",
    "frechet_distance_of_features",
    "inception_features",
    "inception_path",
    "load_inception",
    "precision_recall",
]
