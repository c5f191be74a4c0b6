"""The privacy core of PrivImage: the DP semantic query, accounting and the run's ledger.

PrivImage touches sensitive data through exactly two kinds of mechanism, and every one of
them is recorded here before it runs:

* **The semantic query** (:func:`topk_histogram`, :func:`add_gaussian_noise`,
  :func:`select_public_classes`). Each sensitive training image ``i`` with label ``y_i``
  adds 1 to the histogram cell ``(y_i, p)`` for each of its top-k predicted public classes
  ``p``. Adding or removing one image changes ``k`` distinct cells by 1, so the histogram
  has L2 sensitivity ``sqrt(k)``. Adding Gaussian noise of std
  ``noise_multiplier * sqrt(k)`` to every cell is therefore a Gaussian mechanism with noise
  multiplier ``noise_multiplier``, accounted as one step at sampling rate 1.
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
``[query, dp_sgd]`` so that the whole run lands just below the target epsilon, and
:class:`Ledger` keeps ``privacy.json``, the run's one record of what was spent, refusing a
mechanism before it touches sensitive data if it would overrun the budget.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from privimage.errors import ConfigError, PrivacyBudgetError

ACCOUNTANTS = ("rdp", "prv")

# Beyond this the DP-SGD noise would drown any signal; Opacus' own calibration gives up at
# the same point.
MAX_NOISE_MULTIPLIER = 1e6

# Calibration aims the total epsilon exactly at the target, so the ledger's check must not
# trip on the last bits of floating-point noise when the calibrated mechanism is recorded.
_BUDGET_RTOL = 1e-9

# "abandoned": an attempt that drew secret noise and was then restarted from scratch. It
# stays in the history (composed with the rerun): its outputs may have been seen, and the
# rerun's fresh noise makes the two attempts two releases.
_STATUSES = ("started", "completed", "abandoned")


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


# --------------------------------------------------------------------------------------
# The semantic query
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(
            f"privacy.accountant={accountant!r}; choose one of {', '.join(ACCOUNTANTS)}"
        )


def _check_delta_range(delta: float) -> None:
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
    _check_accountant(accountant)
    _check_delta_range(delta)
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
    _check_accountant(accountant)
    _check_delta_range(delta)
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
    _check_delta_range(delta)
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


# --------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _within_budget(epsilon: float, target: float) -> bool:
    return epsilon <= target * (1 + _BUDGET_RTOL)


class Ledger:
    """privacy.json at the run root: the run's one record of every mechanism that touched
    sensitive data.

    File layout (pretty JSON)::

        {"accountant": "rdp", "delta": 1e-05, "target_epsilon": 10.0,
         "epsilon_spent": 9.99,
         "noise_secret": true, "differentially_private": true,
         "mechanisms": [{...Mechanism.to_dict(), "noise_secret": true,
                         "status": "started" | "completed" | "abandoned",
                         "epsilon_after": 0.37, "time": "2025-01-01T00:00:00+00:00",
                         "details": {...}  # optional, e.g. which parameters DP-SGD trained
                        }],
         "non_private": [...], "measurements": [...],
         "events": [{"event": "begin" | "resume" | "restart" | "complete" | ...,
                     ...Mechanism.to_dict(), "epsilon_spent": 0.37, "time": ...}]}

    ``mechanisms`` is the current account: one live entry per ``(stage, name)``, plus the
    abandoned attempts of it (see :meth:`begin`), which are composed like any other;
    ``events`` is the append-only journal of how it got there (entries are only ever
    added), so a resumed or restarted stage stays visible. ``noise_secret`` is false as
    soon as one mechanism drew its noise from the run's seed (``reproducible_noise``):
    then no epsilon holds against anyone who knows the config. ``measurements`` lists
    what was computed from the sensitive data outside any mechanism for the data owner
    (e.g. the selection judge): not released, so not accounted. ``epsilon_after`` is the
    epsilon of the history up to and including that entry; ``epsilon_spent`` is the whole
    history, started entries included (a started entry is a mechanism that may have
    touched data). Both are recomputed from the whole history on every write, and every
    write is atomic (temporary file + ``os.replace``), so a crash never leaves a
    half-written record. The ledger assumes one writer at a time (stages of a run execute
    sequentially).

    Args:
        path: Location of ``privacy.json``.
        target_epsilon: The run's total budget.
        delta: The run's delta.
        accountant: ``"rdp"`` or ``"prv"``.

    Raises:
        ConfigError: An existing file disagrees on target, delta or accountant (the budget
            of a run cannot change once data was touched), or cannot be read.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, target_epsilon: float, delta: float, accountant: str
    ) -> None:
        _check_accountant(accountant)
        _check_delta_range(delta)
        if not (math.isfinite(target_epsilon) and target_epsilon > 0):
            raise ConfigError(f"privacy.target_epsilon={target_epsilon} must be > 0")
        self.path = Path(path)
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self._entries: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._non_private: list[dict[str, Any]] = []
        self._measurements: list[dict[str, Any]] = []
        if self.path.exists():
            self._load()
            self._epsilon_spent = self._history_epsilon(self.history)
        else:
            self._write()

    # ---- reading ----------------------------------------------------------------------

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read the privacy ledger {self.path} ({exc}); it is the run's record "
                "of spent privacy, so restore it or start a new run directory"
            ) from exc
        expected = {
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
        }
        for key, value in expected.items():
            found = data.get(key)
            same = (
                found == value
                if isinstance(value, str)
                else isinstance(found, (int, float))
                and math.isclose(float(found), value, rel_tol=1e-12)
            )
            if not same:
                raise ConfigError(
                    f"{self.path} was written with {key}={found!r} but this run has "
                    f"privacy.{key}={value!r}; a run's budget cannot change after it touched "
                    f"sensitive data: set privacy.{key}={found!r} or use a new run directory"
                )
        entries = data.get("mechanisms", [])
        for entry in entries:
            Mechanism.from_dict(entry)  # validates
            if entry.get("status") not in _STATUSES:
                raise ConfigError(f"{self.path}: unknown status {entry.get('status')!r}")
        self._entries = [dict(e) for e in entries]
        self._events = [dict(e) for e in data.get("events", [])]
        self._non_private = [dict(e) for e in data.get("non_private", [])]
        self._measurements = [dict(e) for e in data.get("measurements", [])]

    @property
    def history(self) -> list[Mechanism]:
        """Every recorded mechanism (started, completed or abandoned), in the order they
        began: what the accountant composes."""
        return [Mechanism.from_dict(e) for e in self._entries]

    @property
    def noise_secret(self) -> bool:
        """True when every mechanism drew its randomness from secret OS entropy.

        Entries without the field come from ledgers written before the noise was secret,
        when it always followed the seed, so they count as not secret.
        """
        return all(e.get("noise_secret", False) for e in self._entries)

    def prior(
        self, key: tuple[str, str], *, resuming: bool, noise_secret: bool = True
    ) -> list[Mechanism]:
        """The history a new or resumed attempt of mechanism ``key`` composes with.

        Args:
            key: ``(stage, name)`` of the mechanism about to begin.
            resuming: True when the attempt continues the live started entry from its
                checkpoint (and so its random streams): that entry is the same
                mechanism, not a prior one. False for a fresh attempt: a live started
                entry is then abandoned and stays in the history, unless both it and the
                new attempt draw seeded noise (the new one replays it). A live completed
                entry is never prior: beginning it again is refused by :meth:`begin`.
            noise_secret: Whether the new attempt's noise is secret.
        """
        index = self._find(key)
        prior = []
        for i, entry in enumerate(self._entries):
            if i == index and (
                resuming
                or entry["status"] == "completed"
                or self._replays(entry, noise_secret=noise_secret)
            ):
                continue  # continued, refused, or replaced by an identical replay
            prior.append(Mechanism.from_dict(entry))
        return prior

    @staticmethod
    def _replays(entry: dict[str, Any], *, noise_secret: bool) -> bool:
        """A fresh attempt replays ``entry`` draw for draw only if both follow the seed."""
        seeded = entry.get("noise_secret") is False and not noise_secret
        return entry["status"] == "started" and seeded

    @property
    def epsilon_spent(self) -> float:
        """Epsilon of the whole history (as last written to the file)."""
        return self._epsilon_spent

    def status(self, stage: str, name: str) -> str | None:
        """``"started"``, ``"completed"`` or ``None`` for the mechanism ``(stage, name)``."""
        index = self._find((stage, name))
        return None if index is None else self._entries[index]["status"]

    def live(self, stage: str, name: str) -> Mechanism | None:
        """The live (started or completed, not abandoned) entry of ``(stage, name)``."""
        index = self._find((stage, name))
        return None if index is None else Mechanism.from_dict(self._entries[index])

    def _find(self, key: tuple[str, str]) -> int | None:
        """Index of the live (not abandoned) entry of ``key``."""
        for i, entry in enumerate(self._entries):
            if (entry["stage"], entry["name"]) == key and entry["status"] != "abandoned":
                return i
        return None

    def _history_epsilon(self, history: Sequence[Mechanism]) -> float:
        return epsilon_spent(history, delta=self.delta, accountant=self.accountant)

    # ---- writing ----------------------------------------------------------------------

    def begin(
        self,
        mechanism: Mechanism,
        *,
        noise_secret: bool = True,
        resume_from_step: int = 0,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Record ``mechanism`` as started; call it BEFORE the mechanism touches sensitive data.

        Args:
            mechanism: The mechanism with its planned parameters.
            noise_secret: Whether its randomness comes from secret OS entropy (false
                under ``privacy.reproducible_noise``: then it follows the seed).
            resume_from_step: Nonzero when a crashed stage continues from a checkpoint
                taken after that many steps. The planned mechanism must then be exactly
                the one already started: the steps before the checkpoint are part of it,
                and the steps after it are replayed with the same random stream, so the
                run as a whole still releases one instance of ``mechanism``.
            details: What else a reader of the record needs to know about the release and
                the accountant does not (for DP-SGD: which parameters were trained);
                stored with the entry as ``details``.

        Raises:
            PrivacyBudgetError: The history plus this mechanism would exceed the target
                (checked before anything is written), or ``(stage, name)`` already
                completed in this run (running it again would spend its budget twice).
            ConfigError: ``resume_from_step`` is given but no identical mechanism was
                started (the run's settings changed since the checkpoint).
        """
        index = self._find(mechanism.key)
        if index is not None and self._entries[index]["status"] == "completed":
            raise PrivacyBudgetError(
                f"{mechanism.stage}/{mechanism.name} already completed in this run "
                f"({self.path}); running it again would spend its privacy twice; keep its "
                "output or start a new run directory"
            )
        if resume_from_step:
            started = None if index is None else Mechanism.from_dict(self._entries[index])
            if started != mechanism:
                raise ConfigError(
                    f"cannot resume {mechanism.describe()} from step {resume_from_step}: "
                    f"the ledger has {started.describe() if started else 'no such mechanism'}"
                    " started; restore the run's original settings, or delete the stage's "
                    "checkpoint to restart it from step 0"
                )
            event = "resume"
            others = self.prior(mechanism.key, resuming=True)
        else:
            # A started-but-not-completed entry without a checkpoint is an attempt that
            # crashed. With secret noise the rerun draws fresh noise, so the two attempts
            # are two releases (whatever the first let out may have been seen): the old
            # entry is kept as abandoned and composed. With seeded noise the rerun replays
            # the very same mechanism, and the old entry is replaced.
            event = "begin" if index is None else "restart"
            others = self.prior(mechanism.key, resuming=False, noise_secret=noise_secret)
        would_be = self._history_epsilon([*others, mechanism])
        if not _within_budget(would_be, self.target_epsilon):
            raise PrivacyBudgetError(
                f"{mechanism.describe()} would bring epsilon to {would_be:.4g} > "
                f"privacy.target_epsilon={self.target_epsilon:g} (delta={self.delta:g}); "
                "refused before touching sensitive data"
            )
        entry = {
            **mechanism.to_dict(),
            "noise_secret": bool(noise_secret),
            "status": "started",
            "epsilon_after": None,
            "time": _now(),
        }
        if details:
            entry["details"] = dict(details)
        extra: dict[str, Any] = {"noise_secret": bool(noise_secret)}
        if resume_from_step:
            extra["from_step"] = int(resume_from_step)
            self._entries[index] = entry
        elif index is None:
            self._entries.append(entry)
        elif self._replays(self._entries[index], noise_secret=noise_secret):
            self._entries[index] = entry
        else:
            self._entries[index]["status"] = "abandoned"
            self._entries.append(entry)
            extra["abandoned_attempt"] = True
        self._write(event=(event, mechanism, extra))

    def complete(self, mechanism: Mechanism) -> None:
        """Mark ``(stage, name)`` completed, recording the parameters it actually ran with.

        Args:
            mechanism: The mechanism as it actually ran (e.g. the actual number of steps).

        Raises:
            RuntimeError: No started entry for ``(stage, name)`` (``begin`` was skipped,
                a programming error) or it is already completed.
            PrivacyBudgetError: The actual parameters overspend the target. The truth is
                still written first, so the record stays honest; the stage's output must
                not be released.
        """
        index = self._find(mechanism.key)
        if index is None:
            raise RuntimeError(
                f"{mechanism.stage}/{mechanism.name} completed without Ledger.begin; every "
                "mechanism must be recorded before it touches sensitive data"
            )
        if self._entries[index]["status"] == "completed":
            raise RuntimeError(f"{mechanism.stage}/{mechanism.name} is already completed")
        started = self._entries[index]
        self._entries[index] = {
            **mechanism.to_dict(),
            "noise_secret": started.get("noise_secret", False),
            "status": "completed",
            "epsilon_after": None,
            "time": _now(),
            **({"details": started["details"]} if "details" in started else {}),
        }
        self._write(event=("complete", mechanism, {}))
        if not _within_budget(self._epsilon_spent, self.target_epsilon):
            raise PrivacyBudgetError(
                f"{mechanism.describe()} ran beyond what was approved: epsilon is now "
                f"{self._epsilon_spent:.4g} > privacy.target_epsilon={self.target_epsilon:g}; "
                "do not release this run's outputs"
            )

    @property
    def differentially_private(self) -> bool:
        """False once anything touched sensitive data without a DP mechanism."""
        return not self._non_private

    def record_non_private(self, *, stage: str, name: str, description: str) -> None:
        """Record that ``stage`` uses the sensitive data with no privacy guarantee.

        Some synthesizers (BN-statistics synthesis) are not differentially private at all.
        They still belong in the run's one ledger: the file then says, in
        ``differentially_private: false`` and a ``non_private`` entry, that no epsilon
        describes this run's output. Recording the same ``(stage, name)`` again is a no-op.
        """
        self._note(self._non_private, "non_private", stage, name, description)

    def record_measurement(self, *, stage: str, name: str, description: str) -> None:
        """Record a non-private measurement of the sensitive data kept by the data owner.

        Unlike :meth:`record_non_private`, its result is never released (it stays
        outside ``release/``), so it spends no budget and the release stays
        differentially private; it is listed so that the run's one record says
        everything that read the sensitive data. Recording ``(stage, name)`` again is a
        no-op.
        """
        self._note(self._measurements, "measurement", stage, name, description)

    def _note(self, into: list, event: str, stage: str, name: str, description: str) -> None:
        """Append a described use of the data to ``into`` and the journal, once per key."""
        if any((e["stage"], e["name"]) == (stage, name) for e in into):
            return
        entry = {"stage": stage, "name": name, "description": description, "time": _now()}
        into.append(entry)
        self._events.append({"event": event, **entry})
        self._write()

    @property
    def measurements(self) -> list[dict[str, Any]]:
        """Non-private measurements for the data owner (see :meth:`record_measurement`)."""
        return [dict(e) for e in self._measurements]

    @property
    def events(self) -> list[dict[str, Any]]:
        """The append-only journal: every begin, resume, restart and completion."""
        return [dict(e) for e in self._events]

    def _write(self, event: tuple[str, Mechanism, dict[str, Any]] | None = None) -> None:
        history = self.history
        for i, entry in enumerate(self._entries):
            entry["epsilon_after"] = self._history_epsilon(history[: i + 1])
        self._epsilon_spent = self._history_epsilon(history)
        if event is not None:
            name, mechanism, extra = event
            self._events.append(
                {
                    "event": name,
                    **mechanism.to_dict(),
                    **extra,
                    "epsilon_spent": self._epsilon_spent,
                    "time": _now(),
                }
            )
        data = {
            "accountant": self.accountant,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "epsilon_spent": self._epsilon_spent,
            "noise_secret": self.noise_secret,
            "differentially_private": not self._non_private,
            "mechanisms": self._entries,
            "non_private": self._non_private,
            "measurements": self._measurements,
            "events": self._events,
        }
        text = json.dumps(data, indent=2) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename: os.replace is atomic on one filesystem, so
        # readers (and a crash) see either the old or the new ledger, never a torn one.
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
