"""How much of the sensitive training set shows through the synthetic images.

Pure functions behind the evaluation's privacy measurements, after Soufleri et al. (2022)
and Carlini et al. (2023):

- image similarity to the nearest training image: :func:`psnr` and :func:`ssim`
  (torchmetrics underneath);
- a normalised nearest-neighbour criterion for near-copies, :func:`near_copy_score`: the
  distance to the nearest training image divided by ``alpha`` times the mean distance to
  the ``n`` nearest, flagged below ``delta`` (Carlini et al. 2023, Sec. 5.1, as we read it:
  alpha = 0.5, n = 50, delta = 1/3). A copy (or a copy up to JPEG noise) sits far closer
  to one training image than to its other neighbours; a fresh image from the same
  distribution does not;
- a loss-threshold membership-inference attack, summarised by :func:`roc_auc` and
  :func:`tpr_at_fpr` (sklearn underneath; members should have lower loss, so the score is
  the negative loss).

The baseline for every statistic is the same statistic for real held-out images: if
synthetic images sit no closer to the training set than unseen real images do, the
nearest-neighbour measurements reveal nothing about membership.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torchmetrics.functional.image as tmi
from sklearn.metrics import roc_auc_score, roc_curve

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
    """Per-image peak signal-to-noise ratio (dB) of two uint8 image batches (torchmetrics).

    ``10 log10(255^2 / MSE)``; identical images give :data:`PSNR_CAP_DB`.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    _check_pair(a, b)
    out = [
        tmi.peak_signal_noise_ratio(
            x.double(), y.double(), data_range=255.0, reduction="none", dim=(1, 2, 3)
        )
        .clamp(max=PSNR_CAP_DB)
        .nan_to_num(PSNR_CAP_DB)
        .cpu()
        for x, y in _chunks(a, b)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Per-image structural similarity (Wang et al. 2004) of two uint8 image batches.

    The standard form: an 11x11 Gaussian window (sigma 1.5), ``K1 = 0.01``, ``K2 = 0.03``,
    data range 255, statistics over the valid window positions only (no padding), averaged
    over positions and channels. Identical images give 1. An image smaller than the
    window (8x8 digits) gets the largest odd window that fits, and sigma shrinks with it.

    torchmetrics computes the map. Its own mean runs over a reflection-padded border,
    which is not the standard statistic, so the border is cut off here; and it sizes the
    Gaussian window from sigma alone (``2 * int(3.5 sigma + 0.5) + 1``), hence the
    shrunken sigma for small images.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    _check_pair(a, b)
    size = min(window, *a.shape[-2:])
    size -= 1 - size % 2  # odd, so the window has a centre
    sigma = sigma * size / window  # unchanged unless the image is smaller than the window
    edge = (size - 1) // 2
    out = []
    for x, y in _chunks(a, b):
        _, full = tmi.structural_similarity_index_measure(
            x.double(),
            y.double(),
            sigma=sigma,
            data_range=255.0,
            reduction="none",
            return_full_image=True,
        )
        valid = full[..., edge : full.shape[-2] - edge, edge : full.shape[-1] - edge]
        out.append(valid.flatten(1).mean(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def _chunks(a: torch.Tensor, b: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(a), CHUNK):
        yield a[i : i + CHUNK], b[i : i + CHUNK]


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


def _labelled(positive: np.ndarray, negative: np.ndarray, what: str):
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"{what} needs at least one positive and one negative score")
    return np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2
    (sklearn's exact ``roc_auc_score``)."""
    y, scores = _labelled(positive, negative, "AUC")
    return float(roc_auc_score(y, scores))


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float = 0.01) -> float:
    """Highest true-positive rate of a threshold ``score >= t`` whose false-positive rate
    is at most ``fpr`` (Carlini et al. 2022's low-FPR view of an attack), from sklearn's
    ``roc_curve`` at every threshold."""
    y, scores = _labelled(positive, negative, "TPR at FPR")
    num_neg = int((y == 0).sum())
    # With fewer than 1/fpr negatives no negative may pass: this is then the TPR at 0 FPR.
    # Counted in whole negatives, so that 1% of 100 is exactly one.
    allowed = math.floor(fpr * num_neg + 1e-9)
    fprs, tprs, _ = roc_curve(y, scores, drop_intermediate=False)
    return float(tprs[np.rint(fprs * num_neg) <= allowed].max())


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
