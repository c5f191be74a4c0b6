"""The one-run privacy audit's estimator against jax-privacy, and its validity by simulation.

``jax-privacy`` (Google) is the referee, as ``dp-accounting`` is for the accountant: the
same scores with the threshold at the same place must give the same bound to 1e-6. The
simulation checks what the bound promises: for a mechanism that is exactly ε-DP
(randomized response on each canary's coin), the bound stays at or below ε in at least
a 1 - significance share of runs, and a mechanism that leaks more is caught.
"""

from __future__ import annotations

import numpy as np
import pytest
from jax_privacy.auditing import CanaryScoreAuditor, Explicit

from privimage.dp.audit import (
    epsilon_lower_bound,
    epsilon_one_run,
    largest_bound,
    one_run_p_value,
)
from privimage.errors import ConfigError


def _scores(rng, m: int, shift: float):
    coins = rng.random(m) < 0.5
    scores = rng.normal(size=m) + shift * coins
    return scores[coins], scores[~coins]


@pytest.mark.parametrize("m,guesses", [(100, 10), (400, 40), (1000, 100), (1000, 500)])
@pytest.mark.parametrize("shift", [0.0, 1.0, 3.0, 8.0])
@pytest.mark.parametrize("delta", [1e-8, 1e-5])  # the referee needs delta > 0
def test_bound_equals_jax_privacy_on_the_same_scores(m, guesses, shift, delta):
    rng = np.random.default_rng([m, guesses, int(shift * 10)])
    ins, outs = _scores(rng, m, shift)
    ours = epsilon_lower_bound(ins, outs, guesses=guesses, significance=0.05, delta=delta)
    referee = CanaryScoreAuditor(ins, outs).epsilon_one_run(
        0.05, delta, threshold_strategy=Explicit(ours["threshold"])
    )
    assert ours["epsilon"] == pytest.approx(referee, abs=1e-6)
    assert 0 <= ours["epsilon"] <= ours["largest"]


def test_ties_at_the_threshold_are_all_guessed():
    ins, outs = np.array([3.0, 2.0, 2.0]), np.array([2.0, 1.0])
    out = epsilon_lower_bound(ins, outs, guesses=2, significance=0.05, delta=0)
    assert (out["guesses"], out["correct"], out["threshold"]) == (4, 3, 2.0)


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
def test_an_exactly_dp_mechanism_is_bounded_by_its_epsilon(epsilon):
    """Randomized response: each guess right with probability e^ε / (1 + e^ε) exactly."""
    rng = np.random.default_rng(7)
    q = np.exp(epsilon) / (1 + np.exp(epsilon))
    m = guesses = 1000
    runs = 400
    correct = rng.binomial(guesses, q, size=runs)
    bounds = np.array(
        [
            epsilon_one_run(canaries=m, guesses=guesses, correct=int(w), significance=0.05, delta=0)
            for w in correct
        ]
    )
    # At most a 5% share may exceed ε (with binomial slack for 400 runs: 5% + 3 sd).
    assert (bounds > epsilon).mean() <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / runs)
    # And the audit is not vacuous: at the median run it certifies most of ε.
    assert np.median(bounds) > 0.7 * epsilon


def test_a_leakier_mechanism_is_caught():
    rng = np.random.default_rng(8)
    q_leaky = np.exp(2.0) / (1 + np.exp(2.0))
    w = int(rng.binomial(1000, q_leaky))
    assert epsilon_one_run(canaries=1000, guesses=1000, correct=w, significance=0.05, delta=0) > 1


def test_the_largest_bound_grows_with_the_guesses_like_log_r():
    small = largest_bound(canaries=100, guesses=100, significance=0.05, delta=0)
    big = largest_bound(canaries=1000, guesses=1000, significance=0.05, delta=0)
    # q^r = 0.05 at the ceiling: logit(0.05^(1/r)).
    assert big == pytest.approx(np.log(0.05 ** (1 / 1000) / (1 - 0.05 ** (1 / 1000))), rel=1e-9)
    assert small < big < np.log(1000 / np.log(20)) + 0.01
    # delta > 0 lowers what the same counts can certify.
    assert largest_bound(canaries=1000, guesses=1000, significance=0.05, delta=1e-5) < big


def test_p_value_is_the_binomial_tail_at_delta_zero():
    from scipy import stats

    p = one_run_p_value(canaries=50, guesses=20, correct=15, epsilon=1.0, delta=0)
    assert p == pytest.approx(stats.binom.sf(14, 20, np.exp(1) / (1 + np.exp(1))), rel=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"canaries": 10, "guesses": 11, "correct": 1}, "correct"),
        ({"canaries": 10, "guesses": 5, "correct": 6}, "correct"),
    ],
)
def test_impossible_counts_are_one_line_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        epsilon_one_run(**kwargs, significance=0.05, delta=0)
    with pytest.raises(ConfigError, match="significance"):
        epsilon_one_run(canaries=10, guesses=5, correct=5, significance=1.5, delta=0)
    with pytest.raises(ConfigError, match="NaN"):
        epsilon_lower_bound([np.nan], [0.0], guesses=1, significance=0.05, delta=0)
