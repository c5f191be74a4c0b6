"""Deterministic train/test splits and seeded subsets, computed from labels alone.

Everything here works on indices before any image is decoded, so a capped load only
decodes the images it keeps. Each use draws from its own stream of ``split_seed`` so the
train cap does not depend on the test cap and vice versa.
"""

from __future__ import annotations

import numpy as np

# Independent random streams of one seed.
STREAM_SPLIT = 0
STREAM_TRAIN_CAP = 1
STREAM_TEST_CAP = 2


def rng(seed: int, stream: int) -> np.random.Generator:
    """A generator for ``stream`` of ``seed`` (any int, negative ones included)."""
    return np.random.default_rng([seed % 2**32, stream])


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, test), holding out ``test_fraction`` of every class.

    Returns sorted index arrays, so the kept images stay in their source order.
    """
    labels = np.asarray(labels)
    gen = rng(seed, STREAM_SPLIT)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(len(idx) * test_fraction))
        test.append(gen.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx.astype(np.int64)


def random_subset(n: int, cap: int | None, seed: int, stream: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``min(n, cap)`` of ``range(n)``."""
    if cap is None or cap >= n:
        return np.arange(n)
    return np.sort(rng(seed, stream).choice(n, size=cap, replace=False))
