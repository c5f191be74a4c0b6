"""Evaluation metrics for synthetic image sets (FID with TF-Inception features)."""

from privimage.metrics.fid import (
    FEATURE_DIM,
    TFInceptionFeatures,
    cached_statistics,
    feature_statistics,
    fid_score,
    frechet_distance,
    inception_features,
    inception_path,
    load_inception,
)

__all__ = [
    "FEATURE_DIM",
    "TFInceptionFeatures",
    "cached_statistics",
    "feature_statistics",
    "fid_score",
    "frechet_distance",
    "inception_features",
    "inception_path",
    "load_inception",
]
