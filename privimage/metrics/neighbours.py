"""Exact k-nearest-neighbour distances in chunks, and the k-NN precision and recall.

Precision and recall follow Kynkäänniemi et al. (2019), "Improved Precision and Recall
Metric for Assessing Generative Models": each real feature vector gets a ball whose radius
is the distance to its k-th nearest *other* real vector; precision is the fraction of
generated vectors inside at least one real ball (are the samples realistic?), recall the
fraction of real vectors inside at least one generated ball (is the data covered?). k = 4
is the paper's choice.

Everything is exact brute force in float64, in chunks so that a 10,000 x 50,000 distance
matrix never exists at once; ``torch`` does the matrix products so a GPU helps when given.
"""

from __future__ import annotations

import numpy as np
import torch

#: The neighbourhood size of Kynkäänniemi et al.
DEFAULT_K = 4


def _as_tensor(x: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if x.ndim != 2:
        raise ValueError(f"expected a (N, D) matrix, got shape {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.float64)


def squared_distances(
    a: torch.Tensor, b: torch.Tensor, b_sq_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """``(len(a), len(b))`` squared Euclidean distances, clamped at 0 against rounding.

    ``b_sq_norms`` (``(b * b).sum(1)``) may be passed in when ``b`` is the same for many
    calls: for 50,000 CIFAR images it is a 1.2 GB temporary otherwise rebuilt every time.
    """
    if b_sq_norms is None:
        b_sq_norms = torch.linalg.vector_norm(b, dim=1).square()
    sq = (
        torch.linalg.vector_norm(a, dim=1).square()[:, None] + b_sq_norms[None, :] - 2.0 * (a @ b.T)
    )
    return sq.clamp_(min=0.0)


def nearest(
    queries: np.ndarray | torch.Tensor,
    keys: np.ndarray | torch.Tensor,
    *,
    n: int = 1,
    exclude_self: bool = False,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` nearest keys of every query by Euclidean distance, nearest first.

    Args:
        queries: ``(Q, D)``.
        keys: ``(K, D)``.
        n: Neighbours per query (at most ``K``, or ``K - 1`` with ``exclude_self``).
        exclude_self: ``queries`` and ``keys`` are the same set; query ``i`` does not count
            key ``i`` as its neighbour (duplicates elsewhere in the set still count).
        chunk_size: Queries per distance block (memory is ``chunk_size * K`` floats).
        device: Where the products run.

    Returns:
        ``(distances, indices)``, each ``(Q, n)``: float64 distances ascending, int64 key
        indices.
    """
    q, k = _as_tensor(queries, device), _as_tensor(keys, device)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dimensions, keys {k.shape[1]}")
    available = len(k) - (1 if exclude_self else 0)
    if not 1 <= n <= available:
        raise ValueError(f"n={n} neighbours asked for, but only {available} keys are available")
    dists, idx = [], []
    k_norms = torch.linalg.vector_norm(k, dim=1).square()
    for start in range(0, len(q), chunk_size):
        block = squared_distances(q[start : start + chunk_size], k, k_norms)
        if exclude_self:
            rows = torch.arange(len(block), device=block.device)
            block[rows, rows + start] = float("inf")
        d, i = block.topk(n, dim=1, largest=False, sorted=True)
        dists.append(d.sqrt().cpu())
        idx.append(i.cpu())
    if not dists:
        return np.zeros((0, n)), np.zeros((0, n), dtype=np.int64)
    return torch.cat(dists).numpy(), torch.cat(idx).numpy()


def knn_radii(features: np.ndarray | torch.Tensor, *, k: int = DEFAULT_K, **kwargs) -> np.ndarray:
    """Distance from every vector to its k-th nearest other vector of the same set."""
    distances, _ = nearest(features, features, n=k, exclude_self=True, **kwargs)
    return distances[:, -1]


def _inside_any_ball(
    points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk_size: int
) -> np.ndarray:
    inside = []
    radii_sq = radii.square()[None, :]
    centre_norms = torch.linalg.vector_norm(centres, dim=1).square()
    for start in range(0, len(points), chunk_size):
        block = squared_distances(points[start : start + chunk_size], centres, centre_norms)
        inside.append((block <= radii_sq).any(dim=1).cpu())
    return torch.cat(inside).numpy() if inside else np.zeros(0, dtype=bool)


def precision_recall(
    real: np.ndarray | torch.Tensor,
    generated: np.ndarray | torch.Tensor,
    *,
    k: int = DEFAULT_K,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """k-NN precision and recall of ``generated`` against ``real`` feature vectors.

    Args:
        real: ``(N, D)`` features of real images (N > k).
        generated: ``(M, D)`` features of generated images (M > k).
        k: Neighbourhood size.

    Returns:
        ``{"precision", "recall", "k"}``; both in ``[0, 1]``. Identical sets give 1 and 1.
    """
    r, g = _as_tensor(real, device), _as_tensor(generated, device)
    for name, x in (("real", r), ("generated", g)):
        if len(x) <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name} vectors")
    opts = {"k": k, "chunk_size": chunk_size, "device": device}
    real_radii = torch.as_tensor(knn_radii(r, **opts), device=device)
    gen_radii = torch.as_tensor(knn_radii(g, **opts), device=device)
    precision = _inside_any_ball(g, r, real_radii, chunk_size).mean()
    recall = _inside_any_ball(r, g, gen_radii, chunk_size).mean()
    return {"precision": float(precision), "recall": float(recall), "k": k}
