"""Tests of the privacy core: query sensitivity, selection, noise, accounting and the ledger.

Everything runs against the real Opacus accountants; the golden values are computed
independently here (closed forms and a separate implementation of the sampled Gaussian
RDP) or taken from published tutorials, with their provenance next to them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from scipy.optimize import brentq
from scipy.special import gammaln, logsumexp
from scipy.stats import norm

from privimage.dp.accounting import (
    Mechanism,
    calibrate_noise_multiplier,
    check_delta,
    dpsgd_mechanism,
    epsilon_spent,
    query_mechanism,
)
from privimage.dp.ledger import Ledger
from privimage.errors import ConfigError, PrivacyBudgetError
from privimage.query.histogram import (
    add_gaussian_noise,
    classes_to_keep,
    select_public_classes,
    topk_histogram,
)

# Opacus' default RDP orders, written out here rather than imported, so the closed form
# below does not share code with the implementation under test.
ORDERS = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)


def rdp_to_dp(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """The RDP -> (eps, delta) conversion Opacus uses (Balle et al. 2020, Thm. 21)."""
    eps = rdp + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    return float(np.min(eps))


def gaussian_exact_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism, sensitivity 1 (Balle and Wang 2018, Thm. 8)."""

    def excess(eps: float) -> float:
        return (
            norm.cdf(1 / (2 * sigma) - eps * sigma)
            - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)
            - delta
        )

    return 0.0 if excess(0.0) <= 0 else brentq(excess, 0.0, 200.0, xtol=1e-12)


def sampled_gaussian_rdp_int(q: float, sigma: float, order: int) -> float:
    """RDP of the Poisson-subsampled Gaussian at an integer order, by the binomial expansion.

    ``A = sum_i C(a, i) (1-q)^(a-i) q^i exp((i^2 - i) / (2 sigma^2))`` and RDP = log(A)/(a-1)
    (Mironov, Talwar and Zhang 2019, Sec. 3.3). Independent of Opacus' implementation.
    """
    i = np.arange(order + 1)
    log_binom = gammaln(order + 1) - gammaln(i + 1) - gammaln(order - i + 1)
    terms = log_binom + i * np.log(q) + (order - i) * np.log1p(-q) + (i * i - i) / (2 * sigma**2)
    return float(logsumexp(terms) / (order - 1))


# --------------------------------------------------------------------------------------
# The semantic query
# --------------------------------------------------------------------------------------


@st.composite
def query_data(draw):
    num_sensitive = draw(st.integers(1, 5))
    num_public = draw(st.integers(1, 12))
    k = draw(st.integers(1, num_public))
    n = draw(st.integers(0, 30))
    rows = [
        draw(st.permutations(range(num_public)))[:k]  # k distinct public classes
        for _ in range(n + 1)
    ]
    labels = draw(st.lists(st.integers(0, num_sensitive - 1), min_size=n + 1, max_size=n + 1))
    return num_sensitive, num_public, k, np.array(rows, dtype=np.int64), np.array(labels)


@settings(max_examples=150, deadline=None)
@given(query_data(), st.data())
def test_one_image_changes_histogram_by_exactly_sqrt_k(case, data):
    """Adding or removing one image moves the histogram by sqrt(k) in L2: the sensitivity."""
    num_sensitive, num_public, k, topk, labels = case
    kwargs = dict(num_sensitive_classes=num_sensitive, num_public_classes=num_public)
    drop = data.draw(st.integers(0, len(labels) - 1))
    with_image = topk_histogram(topk, labels, **kwargs)
    without = topk_histogram(np.delete(topk, drop, 0), np.delete(labels, drop), **kwargs)
    assert with_image.dtype == np.int64 and with_image.shape == (num_sensitive, num_public)
    assert with_image.sum() == k * len(labels)
    diff = (with_image - without).astype(float)
    assert np.linalg.norm(diff) == pytest.approx(math.sqrt(k), abs=1e-12)
    assert set(np.unique(diff)) <= {0.0, 1.0}


def test_histogram_counts_and_refuses_repeated_classes():
    topk = np.array([[0, 2], [2, 1], [0, 1]])
    counts = topk_histogram(
        topk, np.array([1, 1, 0]), num_sensitive_classes=2, num_public_classes=3
    )
    np.testing.assert_array_equal(counts, [[1, 1, 0], [1, 1, 2]])
    with pytest.raises(ValueError, match="distinct"):
        topk_histogram(
            np.array([[1, 1]]), np.array([0]), num_sensitive_classes=1, num_public_classes=3
        )
    with pytest.raises(ValueError, match="lie in"):
        topk_histogram(
            np.array([[3]]), np.array([0]), num_sensitive_classes=1, num_public_classes=3
        )


def test_noise_std_is_noise_multiplier_times_sqrt_k():
    counts = np.zeros((100, 1000), dtype=np.int64)  # 1e5 draws
    noisy = add_gaussian_noise(
        counts, noise_multiplier=2.5, top_k=4, rng=np.random.default_rng(1234)
    )
    assert noisy.shape == counts.shape and noisy.dtype == np.float64
    expected = 2.5 * math.sqrt(4)
    # The std of the sample std is about expected / sqrt(2 n) = 0.2 %; allow 2 %.
    assert np.std(noisy) == pytest.approx(expected, rel=0.02)
    assert abs(np.mean(noisy)) < 5 * expected / math.sqrt(counts.size)
    assert not counts.any(), "the input must not be modified"


def test_zero_noise_returns_exact_counts():
    counts = np.arange(12).reshape(3, 4)
    out = add_gaussian_noise(counts, noise_multiplier=0.0, top_k=3, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out, counts)


def reference_greedy(noisy: np.ndarray, per_class: int) -> list[list[int]]:
    """The selection rule read literally: cells by (-count, sensitive, public)."""
    cells = sorted(np.ndindex(*noisy.shape), key=lambda c: (-noisy[c], c[0], c[1]))
    picks: list[list[int]] = [[] for _ in range(noisy.shape[0])]
    taken: set[int] = set()
    for s, p in cells:
        if len(picks[s]) < per_class and p not in taken:
            picks[s].append(p)
            taken.add(p)
    return picks


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_selection_is_disjoint_and_complete(data):
    num_sensitive = data.draw(st.integers(1, 6))
    per_class = data.draw(st.integers(1, 4))
    num_public = data.draw(st.integers(num_sensitive * per_class, num_sensitive * per_class + 8))
    # Small integer values force many ties, which must still be broken deterministically.
    values = data.draw(
        st.lists(
            st.integers(-3, 3),
            min_size=num_sensitive * num_public,
            max_size=num_sensitive * num_public,
        )
    )
    noisy = np.array(values, dtype=float).reshape(num_sensitive, num_public)
    picks = select_public_classes(noisy, classes_per_sensitive_class=per_class)
    assert len(picks) == num_sensitive
    assert all(len(row) == per_class for row in picks)
    flat = [p for row in picks for p in row]
    assert len(set(flat)) == len(flat), "public classes must be disjoint"
    assert all(0 <= p < num_public for p in flat)
    assert picks == reference_greedy(noisy, per_class)
    # Pick order within a row follows descending noisy count.
    for s, row in enumerate(picks):
        assert list(noisy[s, row]) == sorted(noisy[s, row], reverse=True)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_noiseless_selection_is_the_exact_top_classes(data):
    """Without noise and without collisions, every row gets exactly its own top classes."""
    num_sensitive = data.draw(st.integers(1, 5))
    per_class = data.draw(st.integers(1, 3))
    num_public = data.draw(st.integers(num_sensitive * per_class, num_sensitive * per_class + 6))
    perm = data.draw(st.permutations(range(num_public)))
    counts = np.zeros((num_sensitive, num_public), dtype=np.int64)
    expected = []
    for s in range(num_sensitive):
        block = list(perm[s * per_class : (s + 1) * per_class])  # disjoint across rows
        others = [p for p in range(num_public) if p not in block]
        floor = data.draw(st.integers(0, 50))
        # Everything outside the block stays strictly below every count in the block,
        # while other rows may put large counts on this row's classes.
        counts[s, others] = data.draw(
            st.lists(st.integers(0, floor), min_size=len(others), max_size=len(others))
        )
        top = data.draw(
            st.lists(
                st.integers(floor + 1, floor + 100),
                min_size=per_class,
                max_size=per_class,
                unique=True,
            )
        )
        counts[s, block] = top
        expected.append([p for _, p in sorted(zip(top, block, strict=True), reverse=True)])
    noisy = add_gaussian_noise(counts, noise_multiplier=0.0, top_k=1, rng=np.random.default_rng(0))
    assert select_public_classes(noisy, classes_per_sensitive_class=per_class) == expected


def test_selection_breaks_ties_by_index_and_refuses_impossible_requests():
    noisy = np.array([[5.0, 5.0, 1.0], [5.0, 5.0, 1.0]])
    # Cell order: (0,0) (0,1) (1,0) (1,1) (0,2) (1,2): row 0 takes 0, row 1 takes 1.
    assert select_public_classes(noisy, classes_per_sensitive_class=1) == [[0], [1]]
    with pytest.raises(ConfigError, match="classes_per_sensitive_class"):
        select_public_classes(noisy, classes_per_sensitive_class=2)
    # Many ties on a larger grid: compare with a direct reading of the rule.
    many_ties = np.random.default_rng(7).integers(0, 3, size=(20, 60)).astype(float)
    assert select_public_classes(many_ties, classes_per_sensitive_class=2) == reference_greedy(
        many_ties, 2
    )


def test_classes_to_keep():
    kw = dict(num_public_classes=100, num_sensitive_classes=10, classes_per_sensitive_class=3)
    assert classes_to_keep(**kw, fraction_of_public_classes=None) == 3
    assert classes_to_keep(**kw, fraction_of_public_classes=0.5) == 5
    assert classes_to_keep(**kw, fraction_of_public_classes=0.001) == 1
    # round(1.0 * 15 / 10) = 2 cannot be disjoint for 10 classes out of 15: capped at 1.
    assert (
        classes_to_keep(
            num_public_classes=15,
            num_sensitive_classes=10,
            classes_per_sensitive_class=1,
            fraction_of_public_classes=1.0,
        )
        == 1
    )
    with pytest.raises(ConfigError, match="classes_per_sensitive_class"):
        classes_to_keep(
            **{**kw, "classes_per_sensitive_class": 11}, fraction_of_public_classes=None
        )
    with pytest.raises(ConfigError, match="fewer than"):
        classes_to_keep(
            num_public_classes=5,
            num_sensitive_classes=10,
            classes_per_sensitive_class=1,
            fraction_of_public_classes=None,
        )


# --------------------------------------------------------------------------------------
# Mechanisms and accounting
# --------------------------------------------------------------------------------------


def test_mechanism_round_trip_and_validation():
    m = dpsgd_mechanism(noise_multiplier=1.3, sample_rate=0.01, steps=500, max_grad_norm=1.0)
    assert Mechanism.from_dict({**m.to_dict(), "status": "completed"}) == m
    assert json.loads(json.dumps(m.to_dict())) == m.to_dict()
    q = query_mechanism(noise_multiplier=10.0, top_k=4)
    assert (q.sample_rate, q.steps, q.sensitivity) == (1.0, 1, 2.0)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        Mechanism("query", "gaussian_histogram", 0.0, 1.0, 1, 1.0)
    with pytest.raises(ConfigError, match="sample_rate"):
        Mechanism("finetune", "dp_sgd", 1.0, 1.5, 1, 1.0)
    for steps in (float("nan"), float("inf"), 1.5, -1, "3", True):
        with pytest.raises(ConfigError, match="steps"):
            Mechanism("finetune", "dp_sgd", 1.0, 0.1, steps, 1.0)
    for steps in (1.5, float("nan"), float("inf"), 0):
        with pytest.raises(ConfigError, match="steps"):
            calibrate_noise_multiplier(target_epsilon=1, delta=1e-5, sample_rate=0.1, steps=steps)


# Golden: one Gaussian mechanism (q=1, 1 step), RDP alpha / (2 sigma^2), converted by
# rdp_to_dp over Opacus' default orders; the literals were computed with that closed form
# (2025, Opacus 1.6.0 gives the same to 1e-12).
GAUSSIAN_GOLDEN = {10.0: 0.3752912223662765, 2.0: 2.1657156590294435, 1.0: 4.728507067217623}


@pytest.mark.parametrize("sigma", sorted(GAUSSIAN_GOLDEN))
def test_single_gaussian_epsilon_matches_closed_form(sigma):
    delta = 1e-5
    closed_form = rdp_to_dp(ORDERS / (2 * sigma**2), ORDERS, delta)
    assert closed_form == pytest.approx(GAUSSIAN_GOLDEN[sigma], rel=1e-12)
    for k in (1, 4):  # the noise scales with sqrt(k), so epsilon does not depend on k
        got = epsilon_spent([query_mechanism(noise_multiplier=sigma, top_k=k)], delta=delta)
        assert got == pytest.approx(closed_form, rel=1e-9)
    # A valid upper bound on the exact Gaussian epsilon, and not a loose one.
    exact = gaussian_exact_epsilon(sigma, delta)
    assert exact < closed_form < 1.15 * exact


# Golden: DP-SGD on MNIST as in TF Privacy's tutorials/README.md (noise 1.12, batch 256
# of 60000, 60 epochs, delta 1e-5 -> "eps 2.92"; steps = 60 * 60000 // 256 = 14062).
# TF Privacy converted RDP with the classic eps = rdp - log(delta) / (a - 1); Opacus uses
# the tighter conversion of Balle et al. 2020, giving 2.5186 for the same RDP curve.
MNIST = dict(sigma=1.12, q=256 / 60000, steps=60 * 60000 // 256, delta=1e-5)
MNIST_TF_PRIVACY_EPS = 2.92
MNIST_OPACUS_EPS = 2.5185897819186374  # epsilon_spent / RDPAccountant, Opacus 1.6.0


def test_dpsgd_epsilon_golden_mnist():
    sigma, q, steps, delta = MNIST["sigma"], MNIST["q"], MNIST["steps"], MNIST["delta"]
    got = epsilon_spent(
        [dpsgd_mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=1.0)],
        delta=delta,
    )
    assert got == pytest.approx(MNIST_OPACUS_EPS, rel=1e-9)

    # Opacus' accountant used directly on the same history agrees exactly.
    direct = RDPAccountant()
    direct.history = [(sigma, q, steps)]
    assert got == pytest.approx(direct.get_epsilon(delta=delta), rel=1e-12)

    # Independent RDP at the integer orders 2..63 (binomial expansion, not Opacus' code).
    ints = np.arange(2, 64)
    rdp = steps * np.array([sampled_gaussian_rdp_int(q, sigma, int(a)) for a in ints])
    # Classic conversion reproduces the published TF Privacy number.
    classic = float(np.min(rdp - np.log(delta) / (ints - 1)))
    assert round(classic, 2) == MNIST_TF_PRIVACY_EPS
    # Opacus' conversion over integer orders only: a bound at most a hair above Opacus',
    # which also searches fractional orders.
    integer_only = rdp_to_dp(rdp, ints.astype(float), delta)
    assert got <= integer_only <= got + 0.01


def test_epsilon_composes_and_handles_edge_cases():
    query = query_mechanism(noise_multiplier=10.0, top_k=2)
    dpsgd = dpsgd_mechanism(noise_multiplier=1.0, sample_rate=0.05, steps=100, max_grad_norm=1.0)
    both = epsilon_spent([query, dpsgd], delta=1e-5)
    assert both == pytest.approx(epsilon_spent([dpsgd, query], delta=1e-5))
    assert both > epsilon_spent([dpsgd], delta=1e-5)
    assert epsilon_spent([], delta=1e-5) == 0.0
    zero_steps = dpsgd_mechanism(noise_multiplier=1.0, sample_rate=0.05, steps=0, max_grad_norm=1)
    assert epsilon_spent([zero_steps], delta=1e-5) == 0.0
    with pytest.raises(ConfigError, match="accountant"):
        epsilon_spent([query], delta=1e-5, accountant="gdp")


def test_prv_handles_a_sample_rate_one_mechanism():
    """Opacus' PRV accountant is exact for q=1 (the query), alone and composed.

    PRVAccountant returns an upper bound, its estimate + eps_error (0.01), so the exact
    value must lie just below it.
    """
    delta = 1e-5
    for sigma in (0.5, 2.0, 10.0):
        prv = epsilon_spent(
            [query_mechanism(noise_multiplier=sigma, top_k=1)], delta=delta, accountant="prv"
        )
        exact = gaussian_exact_epsilon(sigma, delta)
        assert exact <= prv <= exact + 0.02
    # Two Gaussians compose to one with sigma^-2 = sigma_1^-2 + sigma_2^-2: an exact check
    # of the heterogeneous composition path with two q=1 entries.
    s1, s2 = 1.0, 2.0
    prv = epsilon_spent(
        [
            query_mechanism(noise_multiplier=s1, top_k=1),
            Mechanism("other", "gaussian", s2, 1.0, 1, 1.0),
        ],
        delta=delta,
        accountant="prv",
    )
    exact = gaussian_exact_epsilon((s1**-2 + s2**-2) ** -0.5, delta)
    assert exact <= prv <= exact + 0.02
    # Query + DP-SGD: more than DP-SGD alone, less than the RDP bound.
    query = query_mechanism(noise_multiplier=5.0, top_k=1)
    dpsgd = dpsgd_mechanism(noise_multiplier=1.0, sample_rate=0.05, steps=100, max_grad_norm=1)
    both = epsilon_spent([query, dpsgd], delta=delta, accountant="prv")
    assert epsilon_spent([dpsgd], delta=delta, accountant="prv") < both
    assert both < epsilon_spent([query, dpsgd], delta=delta, accountant="rdp")


# --------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------


def _composed(sigma, prior, q, steps, accountant="rdp", delta=1e-5):
    dpsgd = dpsgd_mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=1)
    return epsilon_spent([*prior, dpsgd], delta=delta, accountant=accountant)


# Opacus' own calibration (used as a cross-check) warns about its RDP order grid.
@pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")
def test_calibration_hits_the_target_from_below():
    q, steps, target, tol = 256 / 5000, 98, 8.0, 0.01
    alone = calibrate_noise_multiplier(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps
    )
    assert target - tol <= _composed(alone, [], q, steps) <= target
    # Without a prior this is Opacus' own calibration problem; the answers agree.
    opacus_sigma = get_noise_multiplier(
        target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=steps
    )
    assert alone == pytest.approx(opacus_sigma, rel=0.01)

    sigmas = []
    for query_sigma in (20.0, 5.0, 2.0):  # a more expensive query leaves less for DP-SGD
        prior = [query_mechanism(noise_multiplier=query_sigma, top_k=1)]
        sigma = calibrate_noise_multiplier(
            target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, prior=prior
        )
        assert target - tol <= _composed(sigma, prior, q, steps) <= target
        sigmas.append(sigma)
    assert alone < sigmas[0] < sigmas[1] < sigmas[2]


def test_calibration_with_prv():
    q, steps, target = 0.05, 50, 4.0
    prior = [query_mechanism(noise_multiplier=10.0, top_k=1)]
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, prior=prior, accountant="prv"
    )
    assert target - 0.01 <= _composed(sigma, prior, q, steps, "prv") <= target
    rdp_sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, prior=prior
    )
    assert sigma < rdp_sigma  # PRV is the tighter accountant


def test_query_alone_over_budget_is_refused():
    prior = [query_mechanism(noise_multiplier=0.5, top_k=3)]  # eps ~ 10.7 on its own
    with pytest.raises(PrivacyBudgetError, match="query.noise_multiplier") as info:
        calibrate_noise_multiplier(
            target_epsilon=5.0, delta=1e-5, sample_rate=0.01, steps=100, prior=prior
        )
    assert "alone" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------
# Ledger
# --------------------------------------------------------------------------------------

BUDGET = dict(target_epsilon=8.0, delta=1e-5, accountant="rdp")


def _read(path):
    return json.loads(path.read_text())  # fails if the file is not valid JSON


def _check_file(path, ledger):
    data = _read(path)
    assert set(data) == {
        "accountant",
        "delta",
        "target_epsilon",
        "epsilon_spent",
        "noise_secret",
        "differentially_private",
        "mechanisms",
        "non_private",
        "measurements",
        "events",
    }
    assert data["differentially_private"] is True and data["non_private"] == []
    assert data["epsilon_spent"] == pytest.approx(
        epsilon_spent(ledger.history, delta=ledger.delta, accountant=ledger.accountant)
    )
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary files left"
    return data


def _calibrated_dpsgd(ledger, q=0.05, steps=100):
    sigma = calibrate_noise_multiplier(
        target_epsilon=ledger.target_epsilon,
        delta=ledger.delta,
        sample_rate=q,
        steps=steps,
        prior=[m for m in ledger.history if m.stage != "finetune"],
    )
    return dpsgd_mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=1.0)


def test_ledger_round_trip(tmp_path):
    path = tmp_path / "privacy.json"
    ledger = Ledger(path, **BUDGET)
    assert ledger.history == [] and ledger.epsilon_spent == 0.0
    _check_file(path, ledger)

    query = query_mechanism(noise_multiplier=10.0, top_k=2)
    ledger.begin(query)
    data = _check_file(path, ledger)
    assert data["mechanisms"][0]["status"] == "started"
    ledger.complete(query)
    _check_file(path, ledger)

    planned = _calibrated_dpsgd(ledger)
    ledger.begin(planned)  # calibrated exactly at the target: accepted
    _check_file(path, ledger)
    actual = Mechanism(**{**planned.to_dict(), "steps": 90})
    ledger.complete(actual)
    data = _check_file(path, ledger)

    reopened = Ledger(path, **BUDGET)
    assert reopened.history == [query, actual]
    assert reopened.epsilon_spent == pytest.approx(ledger.epsilon_spent, rel=1e-12)
    assert [e["status"] for e in data["mechanisms"]] == ["completed", "completed"]
    after = [e["epsilon_after"] for e in data["mechanisms"]]
    assert after[0] == pytest.approx(epsilon_spent([query], delta=1e-5))
    assert after[1] == pytest.approx(data["epsilon_spent"])
    assert after[0] < after[1] <= BUDGET["target_epsilon"]
    assert all(isinstance(e["time"], str) for e in data["mechanisms"])


def test_ledger_begin_refuses_over_budget_before_writing(tmp_path):
    path = tmp_path / "privacy.json"
    ledger = Ledger(path, **BUDGET)
    ledger.begin(query_mechanism(noise_multiplier=10.0, top_k=1))
    before = path.read_bytes()
    greedy = dpsgd_mechanism(noise_multiplier=0.5, sample_rate=0.05, steps=1000, max_grad_norm=1)
    with pytest.raises(PrivacyBudgetError, match="target_epsilon=8") as info:
        ledger.begin(greedy)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == before
    assert len(ledger.history) == 1


def test_ledger_replaces_a_crashed_seeded_attempt_and_never_double_counts(tmp_path):
    """Seeded noise (reproducible_noise): the rerun replays the very same draws."""
    path = tmp_path / "privacy.json"
    ledger = Ledger(path, **BUDGET)
    ledger.begin(query_mechanism(noise_multiplier=10.0, top_k=1), noise_secret=False)
    ledger.complete(query_mechanism(noise_multiplier=10.0, top_k=1))
    first = _calibrated_dpsgd(ledger)
    ledger.begin(first, noise_secret=False)  # ... and the process crashes here

    rerun = Ledger(path, **BUDGET)
    assert rerun.status("finetune", "dp_sgd") == "started"
    second = _calibrated_dpsgd(rerun, steps=120)
    rerun.begin(second, noise_secret=False)  # would overspend if the crash still counted
    data = _check_file(path, rerun)
    assert [e["event"] for e in data["events"]] == ["begin", "complete", "begin", "restart"]
    assert rerun.history == [query_mechanism(noise_multiplier=10.0, top_k=1), second]
    assert data["noise_secret"] is False
    rerun.complete(second)
    spent = rerun.epsilon_spent

    with pytest.raises(PrivacyBudgetError, match="already completed"):
        rerun.begin(second)
    again = Ledger(path, **BUDGET)
    assert len(again.history) == 2 and again.epsilon_spent == pytest.approx(spent)


def test_ledger_composes_a_crashed_secret_attempt_with_its_rerun(tmp_path):
    """Secret noise: a rerun draws fresh noise, so the crashed attempt is a second release."""
    path = tmp_path / "privacy.json"
    query = query_mechanism(noise_multiplier=10.0, top_k=1)
    ledger = Ledger(path, **BUDGET)
    ledger.begin(query)
    ledger.complete(query)
    first = _calibrated_dpsgd(ledger)
    ledger.begin(first)  # ... and the process crashes here, with no checkpoint

    rerun = Ledger(path, **BUDGET)
    key = ("finetune", "dp_sgd")
    assert rerun.prior(key, resuming=True) == [query]
    assert rerun.prior(key, resuming=False) == [query, first]
    # The same mechanism again does not fit beside the abandoned one ...
    with pytest.raises(PrivacyBudgetError, match="refused before touching"):
        rerun.begin(first)
    # ... one calibrated on top of it does, and both are charged.
    second = dpsgd_mechanism(
        noise_multiplier=calibrate_noise_multiplier(
            target_epsilon=BUDGET["target_epsilon"],
            delta=BUDGET["delta"],
            sample_rate=first.sample_rate,
            steps=first.steps,
            prior=rerun.prior(key, resuming=False),
        ),
        sample_rate=first.sample_rate,
        steps=first.steps,
        max_grad_norm=1.0,
    )
    assert second.noise_multiplier > first.noise_multiplier
    rerun.begin(second)
    rerun.complete(second)
    data = _check_file(path, rerun)
    assert [e["status"] for e in data["mechanisms"]] == ["completed", "abandoned", "completed"]
    assert rerun.history == [query, first, second]
    assert data["epsilon_spent"] == pytest.approx(
        epsilon_spent([query, first, second], delta=BUDGET["delta"])
    )
    assert data["epsilon_spent"] <= BUDGET["target_epsilon"] * (1 + 1e-9)
    assert data["noise_secret"] is True
    assert [e["event"] for e in data["events"]][-2:] == ["restart", "complete"]
    assert data["events"][-2]["abandoned_attempt"] is True
    reopened = Ledger(path, **BUDGET)
    assert reopened.status(*key) == "completed" and len(reopened.history) == 3


def test_ledger_resume_continues_the_same_mechanism_and_journals_it(tmp_path):
    path = tmp_path / "privacy.json"
    query = query_mechanism(noise_multiplier=10.0, top_k=1)
    uninterrupted = Ledger(tmp_path / "reference.json", **BUDGET)
    ledger = Ledger(path, **BUDGET)
    for book in (uninterrupted, ledger):
        book.begin(query)
        book.complete(query)
    planned = _calibrated_dpsgd(ledger)
    uninterrupted.begin(planned)
    uninterrupted.complete(planned)
    ledger.begin(planned)  # ... checkpoint after step 40, then kill -9

    resumed = Ledger(path, **BUDGET)
    changed = Mechanism(**{**planned.to_dict(), "noise_multiplier": planned.noise_multiplier * 2})
    with pytest.raises(ConfigError, match="cannot resume") as info:
        resumed.begin(changed, resume_from_step=40)
    assert "\n" not in str(info.value)
    resumed.begin(planned, resume_from_step=40)
    resumed.complete(planned)

    # The account equals the uninterrupted run's: no lost and no double-counted steps.
    assert resumed.history == uninterrupted.history == [query, planned]
    assert resumed.epsilon_spent == pytest.approx(uninterrupted.epsilon_spent, rel=1e-12)
    # The journal only grows and shows what happened.
    data = json.loads(path.read_text())
    assert [e["event"] for e in data["events"]] == [
        "begin",
        "complete",
        "begin",
        "resume",
        "complete",
    ]
    assert data["events"][3]["from_step"] == 40
    assert data["events"][-1]["epsilon_spent"] == pytest.approx(data["epsilon_spent"])
    with pytest.raises(ConfigError, match="no such mechanism"):
        Ledger(tmp_path / "fresh.json", **BUDGET).begin(planned, resume_from_step=3)


def test_ledger_complete_requires_begin_and_flags_overspending(tmp_path):
    path = tmp_path / "privacy.json"
    ledger = Ledger(path, **BUDGET)
    query = query_mechanism(noise_multiplier=10.0, top_k=1)
    with pytest.raises(RuntimeError, match="begin"):
        ledger.complete(query)
    ledger.begin(query)
    ledger.complete(query)
    planned = _calibrated_dpsgd(ledger)
    ledger.begin(planned)
    overran = Mechanism(**{**planned.to_dict(), "steps": 2 * planned.steps})
    with pytest.raises(PrivacyBudgetError, match="do not release"):
        ledger.complete(overran)
    # The truth is on record regardless.
    assert Ledger(path, **BUDGET).history[-1] == overran


@pytest.mark.parametrize(
    "change",
    [{"target_epsilon": 9.0}, {"delta": 1e-6}, {"accountant": "prv"}],
)
def test_ledger_mismatch_is_a_config_error(tmp_path, change):
    path = tmp_path / "privacy.json"
    Ledger(path, **BUDGET).begin(query_mechanism(noise_multiplier=10.0, top_k=1))
    (key,) = change
    with pytest.raises(ConfigError, match=key):
        Ledger(path, **{**BUDGET, **change})


def test_ledger_with_prv(tmp_path):
    ledger = Ledger(tmp_path / "privacy.json", target_epsilon=8.0, delta=1e-5, accountant="prv")
    query = query_mechanism(noise_multiplier=10.0, top_k=1)
    ledger.begin(query)
    ledger.complete(query)
    assert ledger.epsilon_spent == pytest.approx(
        epsilon_spent([query], delta=1e-5, accountant="prv")
    )


def test_ledger_refuses_a_corrupt_file(tmp_path):
    path = tmp_path / "privacy.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        Ledger(path, **BUDGET)


# --------------------------------------------------------------------------------------
# Delta
# --------------------------------------------------------------------------------------


def test_check_delta_refuses_delta_at_or_above_one_over_n():
    check_delta(delta=1e-5, num_records=60000)
    check_delta(delta=1 / 1001, num_records=1000)
    for delta in (1e-3, 2e-3, 0.5):
        with pytest.raises(ConfigError, match="1/N") as info:
            check_delta(delta=delta, num_records=1000)
        assert "(0, 1/N)-DP" in str(info.value)
    with pytest.raises(ConfigError):
        check_delta(delta=0.0, num_records=1000)
    with pytest.raises(ConfigError):
        check_delta(delta=1e-5, num_records=0)


def test_ledger_records_a_non_private_use_once_and_keeps_it(tmp_path):
    path = tmp_path / "privacy.json"
    ledger = Ledger(path, **BUDGET)
    assert ledger.differentially_private
    ledger.record_non_private(stage="sample", name="bnstat", description="no noise")
    ledger.record_non_private(stage="sample", name="bnstat", description="no noise")
    data = _read(path)
    assert data["differentially_private"] is False
    assert [(e["stage"], e["name"]) for e in data["non_private"]] == [("sample", "bnstat")]
    assert [e["event"] for e in data["events"]] == ["non_private"]
    assert data["epsilon_spent"] == 0.0  # the DP account is untouched; the flag says the rest
    reloaded = Ledger(path, **BUDGET)
    assert not reloaded.differentially_private
