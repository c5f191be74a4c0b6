"""A lower bound on epsilon from one training run (Steinke, Nasr and Jagielski 2023).

The audit inserts ``m`` canaries into the training data, each by an independent fair coin
that only the auditor knows, trains once, scores every canary (higher: more likely it was
trained on), and guesses "in" for the ``r`` highest scores. If the training is
(ε, δ)-DP, the number ``W`` of correct guesses cannot beat a coin of bias
``q = e^ε / (1 + e^ε)`` by much: for every ``v`` (their Theorem 5.2),

    P[W >= v] <= β + 2 m δ α,   β = P[B >= v],   α = max_{1<=i<=v} (P[B >= v - i] - β) / i,

with ``B ~ Binomial(r, q)``. The right-hand side is a p-value for the claim "(ε, δ)-DP";
the lower bound is the largest ε that the observed ``W`` rejects at the chosen
significance. Everything here is pure math on counts and scores: the canaries, the
training and the scoring live elsewhere.

Even a run that leaks everything cannot certify more than :func:`largest_bound`: with
``r`` guesses all correct, the bound is where ``q^r`` meets the significance, about
``log(r / log(1/significance))``, so auditing a claim of ε needs enough canaries to reach
past it. The guess count is fixed before looking at the scores (the paper's protocol), so
no correction for trying several is needed; ``jax-privacy``'s
``CanaryScoreAuditor.epsilon_one_run`` with an explicit threshold at the same place is the
referee in the tests.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import UNet2DModel
from scipy import optimize, special, stats

from privimage.config.schema import DiffusionConfig
from privimage.diffusion import formulation
from privimage.errors import ConfigError, PrivImageError


def one_run_p_value(
    *, canaries: int, guesses: int, correct: int, epsilon: float, delta: float
) -> float:
    """P-value of the claim "(epsilon, delta)-DP" given ``correct`` of ``guesses`` right.

    Args:
        canaries: m, the number of canaries (each in with probability 1/2).
        guesses: r, how many canaries were guessed "in".
        correct: W, how many of those guesses were right.
        epsilon: The claimed epsilon (>= 0).
        delta: The claimed delta (>= 0).
    """
    q = special.expit(epsilon)  # e^ε / (1 + e^ε), without overflow at large ε
    beta = float(stats.binom.sf(correct - 1, guesses, q))  # P[B >= correct]
    if delta == 0 or correct == 0:
        return beta
    shifts = np.arange(1, correct + 1)
    # P[B >= correct - i] - P[B >= correct] = P[correct - i <= B < correct], per unit i.
    gains = (stats.binom.sf(correct - shifts - 1, guesses, q) - beta) / shifts
    return min(1.0, beta + 2 * canaries * delta * float(gains.max()))


def epsilon_one_run(
    *, canaries: int, guesses: int, correct: int, significance: float, delta: float
) -> float:
    """The largest epsilon whose (epsilon, delta) claim these counts reject (0: none).

    Args:
        canaries: m, the number of canaries.
        guesses: r, the canaries guessed "in" (chosen before the scores were seen).
        correct: W, the right ones among them.
        significance: Probability that the bound is wrong (0.05: 95% confidence).
        delta: The delta of the claim being audited.

    Raises:
        ConfigError: A count or probability outside its range.
    """
    if not 0 <= correct <= guesses <= canaries:
        raise ConfigError(
            f"audit counts: need 0 <= correct ({correct}) <= guesses ({guesses}) <= "
            f"canaries ({canaries})"
        )
    if not 0 < significance < 1:
        raise ConfigError(f"audit significance={significance} must be in (0, 1), e.g. 0.05")
    if not 0 <= delta < 1:
        raise ConfigError(f"audit delta={delta} must be in [0, 1)")

    def excess(eps: float) -> float:  # > 0 where the claim is rejected
        p = one_run_p_value(
            canaries=canaries, guesses=guesses, correct=correct, epsilon=eps, delta=delta
        )
        return significance - p

    # The p-value grows with epsilon: rejected at 0 or nowhere.
    if excess(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while excess(hi) > 0:
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # cannot happen for finite counts; guards a broken input
            raise RuntimeError("the one-run bound did not converge")
    return float(optimize.brentq(excess, lo, hi, xtol=1e-12, rtol=4 * np.finfo(float).eps))


def largest_bound(*, canaries: int, guesses: int, significance: float, delta: float) -> float:
    """The bound a perfect attack would give: every one of ``guesses`` right."""
    return epsilon_one_run(
        canaries=canaries,
        guesses=guesses,
        correct=guesses,
        significance=significance,
        delta=delta,
    )


def epsilon_lower_bound(
    in_scores: np.ndarray,
    out_scores: np.ndarray,
    *,
    guesses: int,
    significance: float,
    delta: float,
) -> dict:
    """The one-run bound from canary scores, guessing "in" for the top ``guesses``.

    Args:
        in_scores: Scores of the canaries whose coin put them in the training data.
        out_scores: Scores of the others. Higher means "more likely trained on" (for a
            loss, pass its negative).
        guesses: How many of the highest scores to guess "in". Scores tied with the
            last of them are guessed too (a threshold cannot split a tie).
        significance: Probability that the bound is wrong.
        delta: The delta of the claim being audited.

    Returns:
        ``epsilon`` (the bound), ``threshold``, ``guesses`` and ``correct`` (as counted),
        ``canaries`` and ``largest`` (the bound a perfect attack would reach here).
    """
    ins = np.asarray(in_scores, dtype=float).ravel()
    outs = np.asarray(out_scores, dtype=float).ravel()
    scores = np.concatenate([ins, outs])
    if not np.isfinite(scores).all():
        raise ConfigError("audit scores hold NaN or infinite values; score every canary")
    m = scores.size
    if not 1 <= guesses <= m:
        raise ConfigError(f"audit guesses={guesses} must be between 1 and the {m} canaries")
    threshold = float(np.sort(scores)[::-1][guesses - 1])
    r = int((scores >= threshold).sum())
    w = int((ins >= threshold).sum())
    eps = epsilon_one_run(canaries=m, guesses=r, correct=w, significance=significance, delta=delta)
    return {
        "epsilon": eps,
        "threshold": threshold,
        "guesses": r,
        "correct": w,
        "canaries": m,
        "largest": largest_bound(canaries=m, guesses=r, significance=significance, delta=delta),
    }


# The canaries and their scores (the audit stage, privimage.stages.audit, runs them).


def canary_images(count: int, shape: tuple[int, ...], *, seed: int) -> torch.Tensor:
    """``count`` flat images, each one grey level drawn uniformly in [-1, 1] from ``seed``.

    Out of distribution for natural images, and each told apart from the others only by
    its level, which the model can learn only through the canary's own class row; a flat
    image's loss gradient on that row points the same way at every high noise level, so
    what one training step does to the row is what the score measures.
    """
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 17)
    levels = torch.rand(count, generator=g) * 2 - 1
    return levels.view(count, *([1] * len(shape))).expand(count, *shape).contiguous()


def with_canary_classes(model: UNet2DModel, count: int) -> UNet2DModel:
    """A copy of ``model`` whose class table has ``count`` more rows, one per canary.

    Rows ``0 .. C-1`` stay the sensitive classes, rows ``C .. C+count-1`` are the canaries'
    (each started at the null row, so an untrained canary is generated unconditionally)
    and the null class stays last, where :func:`privimage.diffusion.null_class` finds it.
    """
    rows = model.config.num_class_embeds
    if rows is None:
        raise PrivImageError("the pretrained UNet has no class table; the audit needs one")
    grown = UNet2DModel.from_config({**dict(model.config), "num_class_embeds": rows + count})
    state = model.state_dict()
    table = state["class_embedding.weight"]
    null = table[rows - 1]
    state["class_embedding.weight"] = torch.cat(
        [table[: rows - 1], null.expand(count, -1), null[None]]
    )
    grown.load_state_dict(state)
    return grown


@dataclass(frozen=True)
class CanaryScoring:
    """How canaries are scored: their denoising loss at the noise levels ``sigmas``, with
    one noise image per (level, image) fixed by ``seed``, so that every model scored sees
    the same noise and two models' losses differ only by what the models learnt.

    EDM: the training loss ``lambda(s) * mean (D(x + s n; s) - x)^2`` at each level ``s``.
    DDPM: the epsilon MSE at timestep ``round(s * (T - 1))`` for each ``s`` in (0, 1].
    """

    spec: DiffusionConfig
    sigmas: list[float]
    seed: int
    batch_size: int = 250
    device: torch.device | str = "cpu"

    def _batches(self, images: torch.Tensor, labels: torch.Tensor):
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + 29)
        noise = torch.randn((len(self.sigmas), *images.shape), generator=g)
        for j, s in enumerate(self.sigmas):
            for lo in range(0, len(images), self.batch_size):
                hi = min(lo + self.batch_size, len(images))
                yield (
                    slice(lo, hi),
                    images[lo:hi].to(self.device),
                    labels[lo:hi].to(self.device),
                    noise[j, lo:hi].to(self.device),
                    s,
                )

    @torch.no_grad()
    def losses(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
        """Each image's loss averaged over the levels, as a float64 array."""
        model.eval().to(self.device)
        total = torch.zeros(len(images), dtype=torch.float64)
        kind = formulation(self.spec)
        for rows, x, y, n, s in self._batches(images, labels):
            total[rows] += kind.fixed_noise_loss(model, x, y, n, s).double().cpu()
        return (total / len(self.sigmas)).numpy()

    def row_alignment(
        self,
        reference: UNet2DModel,
        audited: UNet2DModel,
        images: torch.Tensor,
        labels: torch.Tensor,
    ) -> np.ndarray:
        """Each image's cosine between how its class row moved and the way down its loss.

        The two models differ only in the rows ``labels`` name, one per image. The move is
        ``audited - reference`` in the image's row; the way down is minus the gradient, in
        the reference, of the image's :meth:`losses` loss with respect to that row. A row
        trained on its image moves down its loss; a row moved only by DP noise points
        anywhere. Unlike the loss drop itself, the cosine does not reward a row for moving
        far: under Adam a row that only noise moved travels about as far as a trained one.
        """
        net = copy.deepcopy(reference).eval().to(self.device).requires_grad_(False)
        table = net.class_embedding.weight
        table.requires_grad_(True)
        kind = formulation(self.spec)
        for _, x, y, n, s in self._batches(images, labels):
            # Each image has its own row, so one backward of the summed losses gives every
            # row its own image's gradient.
            kind.fixed_noise_loss(net, x, y, n, s).sum().backward()
        rows = labels.to(self.device)
        down = -table.grad[rows].double()
        with torch.no_grad():
            move = (
                audited.class_embedding.weight.to(self.device)[rows]
                - reference.class_embedding.weight.to(self.device)[rows]
            ).double()
        return torch.nn.functional.cosine_similarity(down, move, dim=1, eps=1e-30).cpu().numpy()
