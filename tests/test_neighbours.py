"""Exact nearest neighbours and k-NN precision/recall against brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest

from privimage.metrics import precision_recall
from privimage.metrics.neighbours import knn_radii, nearest


def _brute(queries, keys):
    return np.sqrt(((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1))


def test_nearest_matches_brute_force_across_chunks():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(37, 5)), rng.normal(size=(50, 5))
    d, i = nearest(q, k, n=4, chunk_size=8)
    full = _brute(q, k)
    np.testing.assert_array_equal(i, np.argsort(full, axis=1)[:, :4])
    np.testing.assert_allclose(d, np.sort(full, axis=1)[:, :4], rtol=1e-9, atol=1e-9)


def test_nearest_exclude_self_skips_only_the_diagonal():
    x = np.array([[0.0], [0.0], [5.0]])  # a duplicate pair: each is the other's neighbour
    d, i = nearest(x, x, n=1, exclude_self=True, chunk_size=2)
    assert i[:, 0].tolist() == [1, 0, 0] or i[:, 0].tolist() == [1, 0, 1]
    assert d[:2, 0].tolist() == [0.0, 0.0] and d[2, 0] == 5.0


def test_nearest_rejects_too_many_neighbours():
    with pytest.raises(ValueError, match="only 2 keys"):
        nearest(np.zeros((1, 2)), np.zeros((3, 2)), n=3, exclude_self=True)


def _reference_precision_recall(real, fake, k):
    rr = np.sort(_brute(real, real), axis=1)[:, k]  # column 0 is the point itself
    fr = np.sort(_brute(fake, fake), axis=1)[:, k]
    precision = (_brute(fake, real) <= rr[None, :]).any(1).mean()
    recall = (_brute(real, fake) <= fr[None, :]).any(1).mean()
    return precision, recall


def test_knn_radii_are_kth_other_neighbour():
    x = np.arange(10, dtype=float)[:, None]
    np.testing.assert_allclose(knn_radii(x, k=2), [2, 1, 1, 1, 1, 1, 1, 1, 1, 2])


def test_precision_recall_of_identical_sets_is_one():
    x = np.random.default_rng(1).normal(size=(200, 16))
    pr = precision_recall(x, x.copy(), k=4, chunk_size=64)
    assert pr["precision"] == 1.0 and pr["recall"] == 1.0


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(120, 8))
    fake = rng.normal(loc=0.7, scale=0.6, size=(90, 8))
    pr = precision_recall(real, fake, k=4, chunk_size=32)
    p, r = _reference_precision_recall(real, fake, 4)
    assert pr["precision"] == pytest.approx(p) and pr["recall"] == pytest.approx(r)
    assert 0 < pr["precision"] < 1 and 0 < pr["recall"] < 1


def test_mode_collapse_keeps_precision_and_loses_recall():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 4))
    collapsed = real[real[:, 0] > 1.0]  # only one corner of the data
    pr = precision_recall(real, collapsed, k=4)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.5


def test_disjoint_sets_score_zero():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(100, 4))
    pr = precision_recall(real, real + 100.0, k=4)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0


def test_precision_recall_needs_more_than_k_vectors():
    with pytest.raises(ValueError, match="more than 4 generated"):
        precision_recall(np.zeros((10, 2)), np.zeros((4, 2)), k=4)
