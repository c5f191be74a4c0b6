"""EDM (Karras et al. 2022; the default, as in DPDM and PrivImage): the network ``F`` is
wrapped as ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)``, trained at log-normal
noise levels with the weight ``lambda(sigma)``, and sampled by a deterministic Euler,
Heun or DPM-Solver++(2M) solver on a Karras sigma schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from privimage.config.schema import DiffusionConfig
from privimage.diffusion.common import Network, guided, initial_noise, mean_over_draws

# The deterministic solvers (the first is the default).
EDM_SOLVERS = ("heun", "euler", "dpmpp_2m")


def edm_precondition(
    sigma: torch.Tensor, *, sigma_data: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM's preconditioning (Karras et al. 2022, Table 1).

    Returns ``(c_skip, c_out, c_in, c_noise)`` with the shape of ``sigma``:
    ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s sd / sqrt(s^2 + sd^2)``,
    ``c_in = 1 / sqrt(s^2 + sd^2)``, ``c_noise = ln(s) / 4``. They keep the network's
    input and training target at unit variance at every noise level.
    """
    var = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / var
    c_out = sigma * sigma_data / var.sqrt()
    c_in = 1.0 / var.sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, *, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (s^2 + sd^2) / (s sd)^2: the inverse of c_out^2, so every level
    contributes a unit-scale loss."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


@dataclass(frozen=True)
class TrainingNoise:
    """Where EDM's training noise levels come from: ln(sigma) ~ N(p_mean, p_std^2), or,
    with ``low_noise_fraction = f > 0``, that normal with probability 1 - f and
    N(low_noise_p_mean, p_std^2) with probability f.

    One value instead of four loose arguments, so the loss and the sampler of levels
    cannot be handed a half-updated set. :meth:`of` reads it from a ``DiffusionConfig``.
    """

    p_mean: float = -1.2
    p_std: float = 1.2
    low_noise_fraction: float = 0.0
    low_noise_p_mean: float = -1.2

    @classmethod
    def of(cls, spec: DiffusionConfig) -> TrainingNoise:
        return cls(
            p_mean=spec.p_mean,
            p_std=spec.p_std,
            low_noise_fraction=spec.low_noise_fraction,
            low_noise_p_mean=spec.low_noise_p_mean,
        )


def sample_training_sigmas(
    n: int, levels: TrainingNoise, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` training noise levels drawn from ``levels``, shape ``(n,)``.

    The mixture lets a run centred on high noise (where short runs learn the class) still
    meet the low levels where the last sampler steps clean the image. The component draws
    come after the normal draws, so f = 0 gives exactly the plain log-normal stream.
    """
    z = torch.randn(n, generator=generator) * levels.p_std
    if levels.low_noise_fraction <= 0:
        return (z + levels.p_mean).exp()
    low = torch.rand(n, generator=generator) < levels.low_noise_fraction
    return (z + torch.where(low, levels.low_noise_p_mean, levels.p_mean)).exp()


def unet_network(model: torch.nn.Module) -> Network:
    """Adapt a (possibly Opacus- or DDP-wrapped) diffusers UNet to ``(x, c_noise, labels)``.

    The UNet's sinusoidal time embedding takes the real-valued ``c_noise`` (EDM's
    DDPM++ does the same with its positional embedding).
    """

    def net(x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model(x, c_noise, class_labels=labels).sample

    return net


def edm_denoise(
    net: Network,
    x: torch.Tensor,
    sigma: torch.Tensor,
    labels: torch.Tensor,
    *,
    sigma_data: float,
) -> torch.Tensor:
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise): the denoised image estimate.

    ``sigma`` has shape ``(batch,)``; the network runs in the input's dtype.
    """
    c_skip, c_out, c_in, c_noise = (
        c.to(x.dtype) for c in edm_precondition(sigma.to(torch.float64), sigma_data=sigma_data)
    )
    view = (-1,) + (1,) * (x.ndim - 1)
    out = net(x * c_in.view(view), c_noise, labels)
    return c_skip.view(view) * x + c_out.view(view) * out.to(x.dtype)


def edm_per_example_loss(
    net: Network,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    sigma_data: float,
    levels: TrainingNoise,
    generator: torch.Generator | None = None,
    noise_draws: int = 1,
) -> torch.Tensor:
    """EDM's weighted denoising loss for each example, shape ``(batch,)``.

    ``lambda(sigma) * mean over pixels of (D(x0 + sigma n; sigma) - x0)^2`` with sigma
    drawn from ``levels`` (:class:`TrainingNoise`). With ``noise_draws = K`` each example's loss is
    the mean over K independent (sigma, n) draws: DPDM's noise multiplicity, whose
    gradient is the average of the K per-draw gradients. Random draws come from
    ``generator`` on the CPU (sigmas first, then the noise), so results do not depend on
    the device.
    """

    def row_loss(x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = sample_training_sigmas(len(x0), levels, generator=generator)
        noise = torch.randn(x0.shape, generator=generator, device="cpu")
        sigma = sigma.to(x0.device)
        view = (-1,) + (1,) * (x0.ndim - 1)
        x_noisy = x0 + noise.to(x0.device, x0.dtype) * sigma.to(x0.dtype).view(view)
        denoised = edm_denoise(net, x_noisy, sigma, labels, sigma_data=sigma_data)
        weight = edm_loss_weight(sigma.to(torch.float64), sigma_data=sigma_data).to(x0.dtype)
        return weight * (denoised - x0).pow(2).flatten(1).mean(dim=1)

    return mean_over_draws(row_loss, x0, labels, noise_draws)


def karras_sigmas(
    num_steps: int, *, sigma_min: float, sigma_max: float, rho: float
) -> torch.Tensor:
    """EDM's time steps: ``num_steps`` sigmas from sigma_max down to sigma_min, then 0.

    ``sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho`` in float64;
    a large rho spends more steps at low noise, where detail forms.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(num_steps, dtype=torch.float64)
    ramp = i / max(num_steps - 1, 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def edm_sample(
    net: Network,
    *,
    seeds: Sequence[int],
    labels: torch.Tensor,
    image_shape: tuple[int, int, int],
    num_steps: int,
    sigma_data: float,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    solver: str = "heun",
    guidance_scale: float = 1.0,
    null_label: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Deterministic EDM sampling of one batch (Karras et al. 2022, Algorithm 1).

    ``solver="euler"`` takes ``num_steps`` first-order steps of the probability-flow ODE
    (DDIM-like, ``num_steps`` network calls); ``"heun"`` adds the second-order correction
    on every step but the last (``2 num_steps - 1`` calls); ``"dpmpp_2m"`` is
    DPM-Solver++(2M) (Lu et al. 2022): second order from the previous step's denoised
    image, so ``num_steps`` calls like Euler. Returns floats clamped to [-1, 1].
    """
    if solver not in EDM_SOLVERS:
        raise ValueError(f"solver must be one of {EDM_SOLVERS}, got {solver!r}")
    if len(seeds) != labels.shape[0]:
        raise ValueError(f"{len(seeds)} seeds but {labels.shape[0]} labels")
    if guidance_scale != 1.0 and null_label is None:
        raise ValueError("classifier-free guidance needs the null label")
    sigmas = karras_sigmas(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    labels = labels.to(device)
    # The ODE state is kept in float64, as EDM does; the network runs in float32.
    x = initial_noise(seeds, image_shape).to(device, torch.float64) * sigmas[0]

    def predict(xx: torch.Tensor, ll: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
        return edm_denoise(net, xx, ss, ll, sigma_data=sigma_data)

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        s = torch.full((x.shape[0],), sigma, dtype=torch.float64, device=device)
        denoised = guided(
            predict, x.float(), labels, s, guidance_scale=guidance_scale, null_label=null_label
        )
        return denoised.double()

    def slope(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return (x - denoise(x, sigma)) / sigma

    if solver == "dpmpp_2m":
        return _dpmpp_2m(denoise, x, sigmas).float().clamp(-1.0, 1.0)
    for i in range(num_steps):
        s_cur, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = slope(x, s_cur)
        x_next = x + (s_next - s_cur) * d
        if solver == "heun" and s_next > 0:
            x_next = x + (s_next - s_cur) * 0.5 * (d + slope(x_next, s_next))
        x = x_next
    return x.float().clamp(-1.0, 1.0)


def _dpmpp_2m(
    denoise: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """DPM-Solver++(2M) on EDM's ODE (alpha = 1), in log-SNR time ``lambda = -ln sigma``.

    Each step is the exact solution of the ODE for a data prediction that is linear in
    lambda, fitted through this step's and the previous step's denoised images
    (``D + (D - D_prev) h / (2 h_prev)``); the first step has no previous one and the
    last (to sigma 0) returns the denoised image, so both are first order, as in the
    paper's multistep solver.
    """
    previous, h_previous = None, None
    for i in range(len(sigmas) - 1):
        s_cur, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, s_cur)
        if s_next == 0:
            return denoised
        h = math.log(s_cur / s_next)  # lambda_next - lambda_cur > 0
        d = denoised
        if previous is not None:
            d = denoised + (denoised - previous) * (h / (2 * h_previous))
        # x_next = (s_next / s_cur) x + (1 - e^-h) d: the exact step for a constant d.
        x = (s_next / s_cur) * x - math.expm1(-h) * d
        previous, h_previous = denoised, h
    return x


class EDM:
    """The EDM formulation behind one call shape, as EDM's ``training/loss.py`` keeps
    each formulation a small class: ``loss`` (per example, for DP-SGD's clipping),
    ``sample`` (each image from its own seed) and ``fixed_noise_loss`` (the audit's score
    at one noise level)."""

    name = "edm"
    solvers = EDM_SOLVERS

    def __init__(self, spec: DiffusionConfig) -> None:
        self.spec = spec

    def loss(self, model, x0, labels, *, generator=None, noise_draws: int = 1) -> torch.Tensor:
        """Per-example weighted denoising loss at the spec's training noise levels."""
        return edm_per_example_loss(
            unet_network(model),
            x0,
            labels,
            sigma_data=self.spec.sigma_data,
            levels=TrainingNoise.of(self.spec),
            generator=generator,
            noise_draws=noise_draws,
        )

    def sample(self, model, **request) -> torch.Tensor:
        """``request``: seeds, labels, image_shape, num_steps, solver, guidance_scale,
        null_label, device, as :func:`edm_sample` takes them."""
        spec = self.spec
        return edm_sample(
            unet_network(model),
            sigma_data=spec.sigma_data,
            sigma_min=spec.sigma_min,
            sigma_max=spec.sigma_max,
            rho=spec.rho,
            **request,
        )

    def fixed_noise_loss(self, model, x, labels, noise, level: float) -> torch.Tensor:
        """``lambda(s) * mean (D(x + s n; s) - x)^2`` at the one level ``s = level``."""
        sigma_data = self.spec.sigma_data
        sigma = torch.full((len(x),), float(level), device=x.device)
        denoised = edm_denoise(
            unet_network(model), x + level * noise, sigma, labels, sigma_data=sigma_data
        )
        weight = float(edm_loss_weight(torch.tensor(float(level)), sigma_data=sigma_data))
        return weight * (denoised - x).pow(2).flatten(1).mean(1)
