"""Evaluation metrics for synthetic image sets (FID with TF-Inception features).

Note that ``privimage.metrics.fid`` is the convenience function :func:`fid`; it shadows the
submodule of the same name, which ``importlib.import_module("privimage.metrics.fid")`` returns.
"""

from privimage.metrics.fid import (
    FEATURE_DIM,
    TFInceptionFeatures,
    cached_statistics,
    feature_statistics,
    fid,
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
    "fid",
    "frechet_distance",
    "inception_features",
    "inception_path",
    "load_inception",
]
