"""The selection score against hand-computed values, and its random baseline by simulation."""

from __future__ import annotations

import numpy as np
import pytest

from privimage.selection_score import class_affinity, sample_per_class, selection_score


def test_affinity_is_the_judges_prediction_distribution_per_public_class():
    public_labels = np.array([0, 0, 0, 0, 1, 1, 2])
    predicted = np.array([1, 1, 1, 0, 0, 0, 1])
    aff = class_affinity(predicted, public_labels, num_public_classes=4, num_sensitive_classes=2)
    np.testing.assert_allclose(aff, [[0.25, 0.75], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError):
        class_affinity(predicted[:3], public_labels, num_public_classes=4, num_sensitive_classes=2)


def test_score_and_exact_random_baseline():
    aff = np.array([[0.25, 0.75], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    result = selection_score(aff, [[1], [0, 2]])
    # Pairs: (s=0, p=1) -> 1.0; (s=1, p=0) -> 0.75; (s=1, p=2) -> 1.0.
    assert result["score"] == pytest.approx((1.0 + 0.75 + 1.0) / 3)
    # Column means: s=0 -> 1.25/4, s=1 -> 1.75/4; weighted by 1 and 2 chosen classes.
    assert result["random_baseline"] == pytest.approx((1.25 / 4 + 2 * 1.75 / 4) / 3)
    assert result["ratio"] == pytest.approx(result["score"] / result["random_baseline"])
    assert [c["score"] for c in result["per_class"]] == pytest.approx([1.0, 0.875])
    with pytest.raises(ValueError):
        selection_score(aff, [[1]])


def test_random_baseline_equals_the_mean_score_of_random_disjoint_selections():
    rng = np.random.default_rng(0)
    aff = rng.dirichlet(np.ones(3), size=20)  # 20 public classes, 3 sensitive classes
    shape = [2, 1, 3]
    expected = selection_score(aff, [[0, 1], [2], [3, 4, 5]])["random_baseline"]
    draws = []
    for _ in range(20000):
        perm = rng.permutation(20)
        chosen, start = [], 0
        for n in shape:
            chosen.append(perm[start : start + n].tolist())
            start += n
        draws.append(selection_score(aff, chosen)["score"])
    # The simulated mean has standard error well below 0.003 with 20,000 draws.
    assert np.mean(draws) == pytest.approx(expected, abs=0.003)


def test_sample_per_class_caps_each_class():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    idx = sample_per_class(labels, images_per_class=5, rng=np.random.default_rng(0))
    counts = np.bincount(labels[idx], minlength=3)
    assert counts.tolist() == [5, 3, 5]
    assert len(set(idx.tolist())) == len(idx) and np.all(np.diff(idx) > 0)
