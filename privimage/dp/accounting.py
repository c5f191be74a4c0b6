"""Accounting: the mechanisms that touched sensitive data, composed by one accountant.

PrivImage touches sensitive data through exactly two kinds of mechanism:

* **The semantic query** (:mod:`privimage.query.histogram`): a Gaussian mechanism on a
  histogram of L2 sensitivity ``sqrt(k)``, with noise multiplier ``noise_multiplier``,
  accounted as one step at sampling rate 1.
* **DP-SGD fine-tuning**: Poisson sampling at rate ``q``, noise multiplier ``sigma`` and
  ``steps`` steps (a Poisson-subsampled Gaussian mechanism).

Both enter one history of ``(noise_multiplier, sample_rate, steps)`` triples that a single
stock Opacus accountant composes (:func:`epsilon_spent`): ``"rdp"`` (default,
:class:`opacus.accountants.RDPAccountant`) or ``"prv"``
(:class:`opacus.accountants.PRVAccountant`). Opacus' PRV accountant handles a
sampling-rate-1 entry correctly: its Poisson-subsampled Gaussian PRV reduces at ``q = 1``
to the exact Gaussian privacy-loss distribution, and the tests check it against the
analytic Gaussian mechanism (Balle and Wang, 2018), alone and composed.

:func:`calibrate_noise_multiplier` picks the DP-SGD ``sigma`` on the *composed* history
``[query, dp_sgd]`` so that the whole run lands just below the target epsilon. Pure
functions and one frozen record type; the run's file of what was spent is
:class:`privimage.dp.ledger.Ledger`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from privimage.errors import ConfigError, PrivacyBudgetError

ACCOUNTANTS = ("rdp", "prv")

# Beyond this the DP-SGD noise would drown any signal; Opacus' own calibration gives up at
# the same point.
MAX_NOISE_MULTIPLIER = 1e6


@dataclass(frozen=True)
class Mechanism:
    """One mechanism that touched sensitive data, in the form the accountant composes.

    Attributes:
        stage: Pipeline stage that ran it (``"query"``, ``"finetune"``, ...).
        name: What it is (``"gaussian_histogram"``, ``"dp_sgd"``).
        noise_multiplier: Gaussian noise std divided by the L2 sensitivity.
        sample_rate: Poisson sampling rate per step (1 for the one-shot query).
        steps: Number of steps (1 for the query). Zero is allowed for a stage that stopped
            before its first step; it spends nothing.
        sensitivity: L2 sensitivity the noise was scaled to (``sqrt(k)`` for the query,
            ``max_grad_norm`` for DP-SGD). Informational: epsilon depends only on the
            noise multiplier, because the noise std is always ``noise_multiplier *
            sensitivity``.

    Raises:
        ConfigError: A value cannot describe a private mechanism (for example a noise
            multiplier of 0, which gives no privacy at all).
    """

    stage: str
    name: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    sensitivity: float

    def __post_init__(self) -> None:
        if not self.stage or not self.name:
            raise ConfigError(
                f"mechanism needs a stage and a name, got {self.stage!r}/{self.name!r}"
            )
        label = f"{self.stage}/{self.name}"
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigError(
                f"{label}: noise_multiplier={self.noise_multiplier} must be a finite number > 0 "
                "(without noise the mechanism is not differentially private)"
            )
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"{label}: sample_rate={self.sample_rate} must be in (0, 1]")
        if (
            isinstance(self.steps, bool)
            or not isinstance(self.steps, (int, float, np.integer, np.floating))
            or not math.isfinite(self.steps)
            or int(self.steps) != self.steps
            or self.steps < 0
        ):
            raise ConfigError(f"{label}: steps={self.steps} must be an integer >= 0")
        if not (math.isfinite(self.sensitivity) and self.sensitivity > 0):
            raise ConfigError(f"{label}: sensitivity={self.sensitivity} must be > 0")
        # Normalise numpy scalars and integral floats so JSON and equality behave.
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", float(self.sample_rate))
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "sensitivity", float(self.sensitivity))

    @property
    def key(self) -> tuple[str, str]:
        """The ``(stage, name)`` pair that identifies this mechanism in a run."""
        return (self.stage, self.name)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Mechanism:
        """Build a mechanism from :meth:`to_dict` output, ignoring extra keys.

        Extra keys are ignored so a ledger entry (which adds ``status``, ``epsilon_after``
        and ``time``) can be read back directly.
        """
        return cls(
            stage=str(data["stage"]),
            name=str(data["name"]),
            noise_multiplier=float(data["noise_multiplier"]),
            sample_rate=float(data["sample_rate"]),
            steps=int(data["steps"]),
            sensitivity=float(data["sensitivity"]),
        )

    def describe(self) -> str:
        """One short human-readable line, for error messages."""
        return (
            f"{self.stage}/{self.name} (noise_multiplier={self.noise_multiplier:.4g}, "
            f"sample_rate={self.sample_rate:.4g}, steps={self.steps})"
        )


def query_mechanism(*, noise_multiplier: float, top_k: int) -> Mechanism:
    """The semantic query as a mechanism: one Gaussian step at sampling rate 1.

    Args:
        noise_multiplier: ``query.noise_multiplier``; the noise std is this times
            ``sqrt(top_k)``.
        top_k: How many public classes each sensitive image votes for.
    """
    return Mechanism(
        stage="query",
        name="gaussian_histogram",
        noise_multiplier=noise_multiplier,
        sample_rate=1.0,
        steps=1,
        sensitivity=math.sqrt(top_k),
    )


def dpsgd_mechanism(
    *, noise_multiplier: float, sample_rate: float, steps: int, max_grad_norm: float
) -> Mechanism:
    """DP-SGD fine-tuning as a mechanism (stage ``"finetune"``, name ``"dp_sgd"``).

    Args:
        noise_multiplier: DP-SGD noise multiplier sigma.
        sample_rate: Poisson sampling rate (expected batch size / N).
        steps: Number of optimizer steps.
        max_grad_norm: Per-sample clipping norm (the L2 sensitivity of the summed gradient).
    """
    return Mechanism(
        stage="finetune",
        name="dp_sgd",
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        sensitivity=max_grad_norm,
    )


def check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(
            f"privacy.accountant={accountant!r}; choose one of {', '.join(ACCOUNTANTS)}"
        )


def check_delta_range(delta: float) -> None:
    if not 0 < delta < 1:
        raise ConfigError(f"privacy.delta={delta} must be in (0, 1)")


def _epsilon(triples: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon of ``(noise_multiplier, sample_rate, steps)`` triples under stock Opacus."""
    history = [(float(s), float(q), int(n)) for s, q, n in triples if n > 0]
    if not history:
        return 0.0
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        # Opacus warns when the best RDP order is at the edge of its default grid (typical
        # for the q=1 query alone, whose optimum order lies above 63; the PRV accountant
        # also runs RDP internally to size its grid). The bound is still valid, only a
        # little loose, and repeating the warning on every ledger write would alarm users
        # for nothing.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        # At sample_rate 1 the PRV code evaluates log(1 - q) = log(0) = -inf on purpose
        # (the privacy loss is then supported on the whole real line); numpy's divide
        # warning is expected and harmless, hence the errstate.
        if accountant == "rdp":
            # Opacus' RDPAccountant.get_privacy_spent, step for step, with each
            # mechanism's per-step RDP computed once: fine-tuning asks for the epsilon
            # after every step, and recomputing the fractional orders each time cost
            # about 0.2 s per ask (10 s of the demo's fine-tuning).
            rdp = sum([_rdp_per_step(q, s) * n for s, q, n in history])
            eps, _ = rdp_analysis.get_privacy_spent(
                orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
            )
            return float(eps)
        acc = PRVAccountant()
        acc.history = history
        return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one step of the subsampled Gaussian at Opacus' default orders (read-only)."""
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )
    rdp.setflags(write=False)  # shared by every caller of the cache
    return rdp


def epsilon_spent(history: Sequence[Mechanism], *, delta: float, accountant: str = "rdp") -> float:
    """Total epsilon of a history of mechanisms at ``delta``, composed by one accountant.

    ``"rdp"`` sums the Rényi DP of every mechanism over Opacus' default orders
    (``1.1, 1.2, ..., 10.9, 12, ..., 63``) and converts with the conversion Opacus uses
    (Balle et al. 2020, Thm. 21): ``eps = min_a [rdp(a) + log((a-1)/a) - (log(delta) +
    log(a)) / (a-1)]``. ``"prv"`` composes privacy-loss random variables numerically
    (Gopi et al. 2021) and returns Opacus' upper bound (estimate + its ``eps_error`` of
    0.01).

    Args:
        history: Mechanisms in any order (composition is commutative).
        delta: Target delta.
        accountant: ``"rdp"`` or ``"prv"``.

    Returns:
        Epsilon; 0 for an empty history (or one whose mechanisms ran no steps).

    Raises:
        ConfigError: Unknown accountant, delta outside (0, 1), or the PRV accountant
            cannot evaluate the history (its grid would be enormous, which only happens
            at tiny noise multipliers).
    """
    check_accountant(accountant)
    check_delta_range(delta)
    triples = [(m.noise_multiplier, m.sample_rate, m.steps) for m in history]
    try:
        return _epsilon(triples, delta, accountant)
    except (ValueError, RuntimeError, MemoryError) as exc:
        if accountant != "prv":
            raise
        raise ConfigError(
            f"the PRV accountant cannot evaluate this history ({exc}); use privacy.accountant=rdp"
        ) from exc


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: Sequence[Mechanism] = (),
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """DP-SGD noise multiplier so that ``prior + DP-SGD`` spends just under the target.

    Unlike ``opacus.accountants.utils.get_noise_multiplier``, which calibrates DP-SGD on its
    own, this composes the DP-SGD mechanism with ``prior`` (the semantic query) in one
    accountant, so the run's total epsilon, not DP-SGD's share, meets the target.

    The search brackets sigma by doubling, then bisects; it returns the upper end of the
    bracket, whose epsilon is always ``<= target_epsilon``, once it is within
    ``epsilon_tolerance`` of the target. With ``"prv"`` the bracket starts at the RDP
    answer (RDP is looser, so its sigma is nearly always enough) and never evaluates
    sigmas far below the solution, where the PRV grid becomes huge and slow.

    Args:
        target_epsilon: Total epsilon budget of the run.
        delta: Target delta.
        sample_rate: DP-SGD Poisson sampling rate.
        steps: Number of DP-SGD steps.
        prior: Mechanisms that already ran or will run on the same data (the query).
        accountant: ``"rdp"`` or ``"prv"``.
        epsilon_tolerance: How far below the target the result may land.

    Returns:
        The noise multiplier sigma.

    Raises:
        PrivacyBudgetError: ``prior`` alone already spends the target, or the target
            cannot be met with a noise multiplier below ``MAX_NOISE_MULTIPLIER``.
        ConfigError: Invalid arguments.
    """
    check_accountant(accountant)
    check_delta_range(delta)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"privacy.target_epsilon={target_epsilon} must be > 0")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"DP-SGD sample_rate={sample_rate} must be in (0, 1]")
    if isinstance(steps, bool) or not float(steps).is_integer() or steps < 1:
        raise ConfigError(f"DP-SGD steps={steps} must be an integer >= 1")
    if not epsilon_tolerance > 0:
        raise ConfigError(f"epsilon_tolerance={epsilon_tolerance} must be > 0")

    prior_triples = [(m.noise_multiplier, m.sample_rate, m.steps) for m in prior]
    prior_eps = epsilon_spent(prior, delta=delta, accountant=accountant)
    if prior_eps >= target_epsilon:
        names = ", ".join(m.describe() for m in prior)
        raise PrivacyBudgetError(
            f"{names} alone already spends epsilon={prior_eps:.4g} >= "
            f"privacy.target_epsilon={target_epsilon:g} at delta={delta:g}, leaving nothing "
            "for DP-SGD; raise query.noise_multiplier or privacy.target_epsilon"
        )

    def eps_at(sigma: float) -> float:
        try:
            return _epsilon([*prior_triples, (sigma, sample_rate, steps)], delta, accountant)
        except (ValueError, RuntimeError, MemoryError):
            if accountant != "prv":
                raise
            # The PRV grid only fails at far too little noise: treat it as over budget.
            return math.inf

    def too_much(sigma: float) -> PrivacyBudgetError:
        return PrivacyBudgetError(
            f"DP-SGD would need noise_multiplier > {sigma:g} to keep the total epsilon "
            f"within privacy.target_epsilon={target_epsilon:g} (the query already spends "
            f"{prior_eps:.4g}); raise query.noise_multiplier or privacy.target_epsilon, or "
            "train fewer steps"
        )

    high = 1.0
    if accountant == "prv":
        # Start from the (cheap, looser) RDP answer, which nearly always suffices for PRV.
        # If even RDP cannot fit, PRV (tighter) still may: then search from sigma = 1.
        with contextlib.suppress(PrivacyBudgetError):
            high = calibrate_noise_multiplier(
                target_epsilon=target_epsilon,
                delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                prior=prior,
                accountant="rdp",
                epsilon_tolerance=epsilon_tolerance,
            )
    eps_high = eps_at(high)
    low = 0.0
    while eps_high > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise too_much(MAX_NOISE_MULTIPLIER)
        eps_high = eps_at(high)
    if low == 0.0:
        # Walk down by halves to a sigma that overspends, so bisection never probes sigmas
        # near 0 (where epsilon, and the PRV grid, explode).
        while True:
            candidate = high / 2
            eps_candidate = eps_at(candidate)
            if eps_candidate > target_epsilon:
                low = candidate
                break
            high, eps_high = candidate, eps_candidate
            if high < 1e-6:  # pragma: no cover - only with absurd targets
                return high
    for _ in range(200):
        if target_epsilon - eps_high <= epsilon_tolerance:
            break
        if high - low <= 1e-12 * high:
            # Epsilon jumps across the tolerance band (PRV discretisation); the safe end
            # of the bracket is as close as floating point gets.
            break
        mid = (low + high) / 2
        eps_mid = eps_at(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high


def check_delta(*, delta: float, num_records: int) -> None:
    """Refuse a delta that is not cryptographically small for ``num_records`` records.

    A mechanism that publishes one randomly chosen record in full is ``(0, 1/N)``-DP, so
    any ``delta >= 1/N`` allows outcomes as bad as leaking a whole training image.

    Args:
        delta: The run's delta.
        num_records: ``N``, the number of sensitive training records.

    Raises:
        ConfigError: ``delta`` is not in (0, 1) or ``delta >= 1/N``.
    """
    if num_records < 1:
        raise ConfigError(f"need at least one sensitive training record, got {num_records}")
    check_delta_range(delta)
    if delta >= 1.0 / num_records:
        raise ConfigError(
            f"privacy.delta={delta:g} is >= 1/N = {1.0 / num_records:.3g} for N={num_records} "
            "sensitive training images; a mechanism that releases one whole record at random "
            "is already (0, 1/N)-DP, so such a delta protects nothing; set privacy.delta "
            f"below {1.0 / num_records:.3g} (e.g. {_suggest_delta(num_records):g})"
        )


def _suggest_delta(num_records: int) -> float:
    """A round delta well below ``1/N``: the power of ten below ``1/(10 N)``."""
    return 10.0 ** math.floor(math.log10(1.0 / (10 * num_records)))
