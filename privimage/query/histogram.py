"""The DP semantic query's histogram and selection, as pure functions.

Each sensitive training image ``i`` with label ``y_i`` adds 1 to the histogram cell
``(y_i, p)`` for each of its top-k predicted public classes ``p`` (:func:`topk_histogram`).
Adding or removing one image changes ``k`` distinct cells by 1, so the histogram has L2
sensitivity ``sqrt(k)``; Gaussian noise of std ``noise_multiplier * sqrt(k)`` on every cell
(:func:`add_gaussian_noise`) is a Gaussian mechanism with noise multiplier
``noise_multiplier`` (:func:`privimage.dp.accounting.query_mechanism`). Each sensitive
class then takes its top public classes, disjoint (:func:`select_public_classes`).
"""

from __future__ import annotations

import math

import numpy as np

from privimage.errors import ConfigError


def topk_histogram(
    topk_public: np.ndarray,
    sensitive_labels: np.ndarray,
    *,
    num_sensitive_classes: int,
    num_public_classes: int,
) -> np.ndarray:
    """Count, per sensitive class, how often each public class is among an image's top-k.

    Args:
        topk_public: ``(N, k)`` integer public class ids predicted for each sensitive
            image; the ids within a row must be distinct.
        sensitive_labels: ``(N,)`` integer sensitive labels.
        num_sensitive_classes: ``C_s``.
        num_public_classes: ``C_p``.

    Returns:
        ``(C_s, C_p)`` int64 counts. Every image adds exactly ``k`` ones, in ``k`` distinct
        cells of its own label's row, which is what makes the L2 sensitivity ``sqrt(k)``.

    Raises:
        ValueError: Shapes disagree, an id is out of range, or a row repeats a public
            class (a repeated class would add 2 to one cell and break the ``sqrt(k)``
            sensitivity the noise is calibrated to).
    """
    topk = np.asarray(topk_public)
    labels = np.asarray(sensitive_labels)
    if topk.ndim != 2 or topk.shape[1] < 1:
        raise ValueError(f"topk_public must have shape (N, k) with k >= 1, got {topk.shape}")
    if labels.shape != (topk.shape[0],):
        raise ValueError(
            f"sensitive_labels shape {labels.shape} does not match topk_public rows "
            f"({topk.shape[0]},)"
        )
    if topk.size and not np.issubdtype(topk.dtype, np.integer):
        raise ValueError(f"topk_public must hold integer class ids, got dtype {topk.dtype}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"sensitive_labels must be integers, got dtype {labels.dtype}")
    if num_sensitive_classes < 1 or num_public_classes < 1:
        raise ValueError("num_sensitive_classes and num_public_classes must be >= 1")
    counts = np.zeros((num_sensitive_classes, num_public_classes), dtype=np.int64)
    if topk.shape[0] == 0:
        return counts
    if topk.min() < 0 or topk.max() >= num_public_classes:
        raise ValueError(f"topk_public ids must lie in [0, {num_public_classes})")
    if labels.min() < 0 or labels.max() >= num_sensitive_classes:
        raise ValueError(f"sensitive_labels must lie in [0, {num_sensitive_classes})")
    ordered = np.sort(topk, axis=1)
    if np.any(ordered[:, 1:] == ordered[:, :-1]):
        raise ValueError("each row of topk_public must name distinct public classes")
    flat = labels.astype(np.int64)[:, None] * num_public_classes + topk.astype(np.int64)
    counts += np.bincount(flat.ravel(), minlength=counts.size).reshape(counts.shape)
    return counts


def add_gaussian_noise(
    counts: np.ndarray, *, noise_multiplier: float, top_k: int, rng: np.random.Generator
) -> np.ndarray:
    """Add i.i.d. Gaussian noise of std ``noise_multiplier * sqrt(top_k)`` to every cell.

    Args:
        counts: The exact histogram from :func:`topk_histogram` (left unchanged).
        noise_multiplier: Noise std in units of the L2 sensitivity ``sqrt(top_k)``. Zero
            gives the exact counts back (no privacy; for tests only, the ledger refuses it).
        top_k: ``k`` used to build the histogram.
        rng: Source of the noise. It must be secret (seeded from OS entropy, see
            :mod:`privimage.io.seeding`): anyone who can regenerate it subtracts the noise
            and gets the exact histogram back.

    Returns:
        float64 noisy counts of the same shape.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier={noise_multiplier} must be >= 0")
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    exact = np.asarray(counts, dtype=np.float64)
    std = noise_multiplier * math.sqrt(top_k)
    return exact + rng.normal(0.0, std, size=exact.shape)


def select_public_classes(
    noisy_counts: np.ndarray, *, classes_per_sensitive_class: int
) -> list[list[int]]:
    """Pick disjoint public classes for every sensitive class from the noisy histogram.

    Greedy over all ``(sensitive, public)`` cells in descending noisy count: a cell is taken
    when its sensitive class still needs classes and its public class is not taken yet.
    Ties are broken by the cell's row-major index (lower sensitive class, then lower
    public class, first), so the result is deterministic. This is post-processing of the
    noisy counts and costs no privacy.

    Args:
        noisy_counts: ``(C_s, C_p)`` noisy counts.
        classes_per_sensitive_class: How many public classes each sensitive class gets.

    Returns:
        For each sensitive class, its public class ids in the order they were picked.

    Raises:
        ConfigError: ``C_s * classes_per_sensitive_class > C_p``, so disjoint classes
            cannot be found for everyone.
        ValueError: The counts are not a finite 2-D array.
    """
    counts = np.asarray(noisy_counts, dtype=np.float64)
    if counts.ndim != 2 or 0 in counts.shape:
        raise ValueError(f"noisy_counts must be a non-empty 2-D array, got {counts.shape}")
    if not np.all(np.isfinite(counts)):
        raise ValueError("noisy_counts must be finite")
    num_sensitive, num_public = counts.shape
    per_class = int(classes_per_sensitive_class)
    if per_class < 1:
        raise ConfigError(
            f"query.classes_per_sensitive_class={classes_per_sensitive_class} must be >= 1"
        )
    if num_sensitive * per_class > num_public:
        raise ConfigError(
            f"query.classes_per_sensitive_class={per_class} x {num_sensitive} sensitive "
            f"classes needs {num_sensitive * per_class} disjoint public classes but the public "
            f"dataset has {num_public}; lower query.classes_per_sensitive_class or "
            "query.fraction_of_public_classes"
        )
    # A stable sort of the negated counts keeps equal cells in row-major index order.
    order = np.argsort(-counts.ravel(), kind="stable")
    picks: list[list[int]] = [[] for _ in range(num_sensitive)]
    taken = np.zeros(num_public, dtype=bool)
    remaining = num_sensitive * per_class
    for flat in order:
        s, p = divmod(int(flat), num_public)
        if len(picks[s]) < per_class and not taken[p]:
            picks[s].append(p)
            taken[p] = True
            remaining -= 1
            if remaining == 0:
                break
    return picks


def classes_to_keep(
    *,
    num_public_classes: int,
    num_sensitive_classes: int,
    classes_per_sensitive_class: int,
    fraction_of_public_classes: float | None,
) -> int:
    """How many public classes each sensitive class keeps.

    Args:
        num_public_classes: ``C_p``.
        num_sensitive_classes: ``C_s``.
        classes_per_sensitive_class: Used when no fraction is given.
        fraction_of_public_classes: When set, wins: the selection should cover about this
            fraction of the public classes in total, i.e.
            ``max(1, round(fraction * C_p / C_s))`` per sensitive class (Python ``round``,
            half to even), capped at ``C_p // C_s`` because the selection is disjoint.

    Returns:
        The number of public classes per sensitive class.

    Raises:
        ConfigError: There are fewer public than sensitive classes, the fraction is not in
            (0, 1], or the explicit count cannot be met disjointly.
    """
    if num_sensitive_classes < 1 or num_public_classes < 1:
        raise ConfigError("need at least one sensitive and one public class")
    capacity = num_public_classes // num_sensitive_classes
    if capacity < 1:
        raise ConfigError(
            f"the public dataset has {num_public_classes} classes, fewer than the "
            f"{num_sensitive_classes} sensitive classes; each sensitive class needs its own "
            "public class, so choose a public dataset with more classes"
        )
    if fraction_of_public_classes is None:
        if classes_per_sensitive_class < 1 or classes_per_sensitive_class > capacity:
            raise ConfigError(
                f"query.classes_per_sensitive_class={classes_per_sensitive_class} must be in "
                f"[1, {capacity}] ({num_public_classes} public classes shared disjointly by "
                f"{num_sensitive_classes} sensitive classes)"
            )
        return int(classes_per_sensitive_class)
    fraction = float(fraction_of_public_classes)
    if not 0 < fraction <= 1:
        raise ConfigError(f"query.fraction_of_public_classes={fraction} must be in (0, 1]")
    wanted = max(1, round(fraction * num_public_classes / num_sensitive_classes))
    # Rounding up can ask for more than a disjoint split allows (e.g. 15 public classes,
    # 10 sensitive, fraction 1 -> 2 each); keep what is feasible instead of failing later.
    return min(wanted, capacity)
