"""How good is a public-class selection? A score that needs no labels from a person.

A classifier trained on the sensitive training split (the judge) looks at sample images
of every public class. ``affinity[p, s]`` is the fraction of public class ``p``'s images
the judge assigns to sensitive class ``s``. A selection that pairs sensitive class ``s``
with public classes whose images look like ``s`` scores high:

    score = mean over selected pairs (s, p) of affinity[p, s]

A random selection of the same shape (the same number of public classes per sensitive
class, drawn uniformly) has the expected score ``sum_s n_s * mean_p affinity[p, s] /
sum_s n_s``, computed exactly here rather than by sampling; the ratio of the two says how
much better than chance the DP query chose.

The judge is trained without DP, so the score is a measurement for the data owner, like
the evaluation stage's numbers: it is not part of the DP release and no later stage reads
it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def class_affinity(
    predicted_sensitive: np.ndarray,
    public_labels: np.ndarray,
    *,
    num_public_classes: int,
    num_sensitive_classes: int,
) -> np.ndarray:
    """``(num_public, num_sensitive)`` matrix: row ``p`` is the distribution of the judge's
    predictions over the images of public class ``p`` (all zeros if it has no images)."""
    predicted_sensitive = np.asarray(predicted_sensitive, dtype=np.int64)
    public_labels = np.asarray(public_labels, dtype=np.int64)
    if predicted_sensitive.shape != public_labels.shape:
        raise ValueError("one prediction per public image is needed")
    counts = np.zeros((num_public_classes, num_sensitive_classes))
    np.add.at(counts, (public_labels, predicted_sensitive), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def selection_score(affinity: np.ndarray, selection: Sequence[Sequence[int]]) -> dict:
    """Score a selection (``selection[s]`` = public classes chosen for sensitive class ``s``).

    Returns:
        ``{"score", "random_baseline", "ratio", "per_class": [{"score",
        "random_baseline"}, ...]}``; ``ratio`` is ``score / random_baseline``.
    """
    affinity = np.asarray(affinity, dtype=np.float64)
    if len(selection) != affinity.shape[1]:
        raise ValueError(
            f"selection has {len(selection)} sensitive classes, affinity {affinity.shape[1]}"
        )
    column_means = affinity.mean(axis=0)
    per_class, pair_scores, baseline_terms = [], [], []
    for s, chosen in enumerate(selection):
        scores = [float(affinity[p, s]) for p in chosen]
        pair_scores += scores
        baseline_terms += [float(column_means[s])] * len(chosen)
        per_class.append(
            {
                "score": float(np.mean(scores)) if scores else None,
                "random_baseline": float(column_means[s]),
            }
        )
    score = float(np.mean(pair_scores)) if pair_scores else 0.0
    baseline = float(np.mean(baseline_terms)) if baseline_terms else 0.0
    return {
        "score": score,
        "random_baseline": baseline,
        "ratio": score / baseline if baseline > 0 else None,
        "per_class": per_class,
    }


def sample_per_class(
    labels: np.ndarray, *, images_per_class: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of up to ``images_per_class`` random images of every class (sorted)."""
    labels = np.asarray(labels)
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picks.append(rng.choice(idx, size=min(images_per_class, len(idx)), replace=False))
    return np.sort(np.concatenate(picks)) if picks else np.empty(0, dtype=np.int64)
