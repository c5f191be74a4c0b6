"""How much of the sensitive training set shows through the synthetic images.

Pure functions behind the evaluation's privacy measurements, after Soufleri et al. (2022)
and Carlini et al. (2023):

- image similarity to the nearest training image: :func:`psnr` and :func:`ssim`;
- a normalised nearest-neighbour criterion for near-copies, :func:`near_copy_score`: the
  distance to the nearest training image divided by ``alpha`` times the mean distance to
  the ``n`` nearest, flagged below ``delta`` (Carlini et al. 2023, Sec. 5.1, as we read it:
  alpha = 0.5, n = 50, delta = 1/3). A copy (or a copy up to JPEG noise) sits far closer
  to one training image than to its other neighbours; a fresh image from the same
  distribution does not;
- a loss-threshold membership-inference attack, summarised by :func:`roc_auc` and
  :func:`tpr_at_fpr` (members should have lower loss, so the score is the negative loss).

The baseline for every statistic is the same statistic for real held-out images: if
synthetic images sit no closer to the training set than unseen real images do, the
nearest-neighbour measurements reveal nothing about membership.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

#: PSNR of identical images is infinite; it is reported as this many dB (JSON has no inf).
PSNR_CAP_DB = 100.0
#: Default neighbourhood, scale and threshold of the near-copy criterion.
NEAR_COPY_NEIGHBOURS = 50
NEAR_COPY_ALPHA = 0.5
NEAR_COPY_THRESHOLD = 1 / 3
#: Images per block in the similarity measures (bounds float64 temporaries to ~100 MB).
CHUNK = 1024


def pixel_vectors(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 images ``(N, C, H, W)`` as float64 rows in ``[0, 1]``, for pixel-space L2."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    return x.reshape(len(x), -1).astype(np.float64) / 255.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-image peak signal-to-noise ratio (dB) of two uint8 image batches.

    ``10 log10(255^2 / MSE)``; identical images give :data:`PSNR_CAP_DB`.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    _check_pair(a, b)
    out = []
    for i in range(0, len(a), CHUNK):
        x, y = a[i : i + CHUNK].double(), b[i : i + CHUNK].double()
        mse = (x - y).square().flatten(1).mean(1)
        db = 10.0 * torch.log10(255.0**2 / mse)
        out.append(db.clamp(max=PSNR_CAP_DB).nan_to_num(PSNR_CAP_DB).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Per-image structural similarity (Wang et al. 2004) of two uint8 image batches.

    The standard form: an 11x11 Gaussian window (sigma 1.5), ``K1 = 0.01``, ``K2 = 0.03``,
    data range 255, statistics over the valid window positions only (no padding), averaged
    over positions and channels. Identical images give 1. Windows larger than the image
    shrink to its smaller side (odd), so 8x8 digits still get a score.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    _check_pair(a, b)
    size = min(window, *a.shape[-2:])
    size -= 1 - size % 2  # odd, so the window has a centre
    c = a.shape[1]
    w = _gaussian_window(size, sigma).to(a.device).expand(c, 1, size, size)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    out = []
    for i in range(0, len(a), CHUNK):
        x, y = a[i : i + CHUNK].double(), b[i : i + CHUNK].double()
        mu_x, mu_y = filt(x), filt(y)
        var_x = filt(x * x) - mu_x**2
        var_y = filt(y * y) - mu_y**2
        cov = filt(x * y) - mu_x * mu_y
        s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
            (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
        )
        out.append(s.flatten(1).mean(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"need two (N, C, H, W) batches of one shape, got {a.shape}, {b.shape}")
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {a.dtype} and {b.dtype}")


def near_copy_score(sorted_distances: np.ndarray, *, alpha: float = NEAR_COPY_ALPHA) -> np.ndarray:
    """Distance to the nearest neighbour over ``alpha`` times the mean distance to the
    ``n`` nearest; a near-copy scores below the threshold (default 1/3).

    Args:
        sorted_distances: ``(Q, n)`` distances of each query to its ``n`` nearest training
            images, ascending (as from :func:`privimage.metrics.neighbours.nearest`).
        alpha: Scale of the neighbourhood mean.

    Returns:
        ``(Q,)`` scores in ``[0, 1 / alpha]``: 0 for a copy of one training image,
        ``1 / alpha`` when the nearest training image is no closer than the rest of the
        neighbourhood. A query whose whole neighbourhood is at distance 0 (a copy of an
        image the training set holds many times) scores 0.
    """
    d = np.asarray(sorted_distances, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] < 2:
        raise ValueError(f"need (Q, n >= 2) sorted distances, got shape {d.shape}")
    scale = alpha * d.mean(axis=1)
    return np.divide(d[:, 0], scale, out=np.zeros(len(d)), where=scale > 0)


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2.

    Computed exactly from ranks (the Mann-Whitney U statistic), not from a sampled curve.
    """
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs at least one positive and one negative score")
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties (1-based).
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float = 0.01) -> float:
    """Highest true-positive rate of a threshold ``score >= t`` whose false-positive rate
    is at most ``fpr`` (Carlini et al. 2022's low-FPR view of an attack)."""
    pos, neg = np.sort(np.asarray(positive, np.float64)), np.sort(np.asarray(negative, np.float64))
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("TPR at FPR needs at least one positive and one negative score")
    # With fewer than 1/fpr negatives no negative may pass: this is then the TPR at 0 FPR.
    allowed = math.floor(fpr * len(neg) + 1e-9)  # negatives that may score >= t
    # The strictest threshold that lets through at most `allowed` negatives is just above the
    # (allowed+1)-th largest negative; positives strictly above it are detected.
    if allowed >= len(neg):
        return 1.0
    bar = neg[len(neg) - 1 - allowed]
    return float((pos > bar).mean())


def loss_threshold_attack(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> dict:
    """Membership inference by thresholding the loss (Yeom et al. 2018).

    Returns ``{"auc", "tpr_at_1pct_fpr", "members", "nonmembers"}``; an AUC of 0.5 and a
    TPR of about 0.01 mean the attack does no better than guessing.
    """
    member, nonmember = -np.asarray(member_losses), -np.asarray(nonmember_losses)
    return {
        "auc": roc_auc(member, nonmember),
        "tpr_at_1pct_fpr": tpr_at_fpr(member, nonmember, 0.01),
        "members": int(len(member)),
        "nonmembers": int(len(nonmember)),
    }


def summary(values: np.ndarray) -> dict[str, float]:
    """Median, 5th and 95th percentile, mean and minimum of a distribution."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {}
    p5, p50, p95 = np.percentile(v, [5, 50, 95])
    return {
        "median": float(p50),
        "p05": float(p5),
        "p95": float(p95),
        "mean": float(v.mean()),
        "min": float(v.min()),
    }
