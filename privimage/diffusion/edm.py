"""EDM (Karras et al. 2022; the default, as in DPDM and PrivImage): the network ``F`` is
wrapped as ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)``, trained at log-normal
noise levels with the weight ``lambda(sigma)``, and sampled by a deterministic Euler,
Heun or DPM-Solver++(2M) solver on a Karras sigma schedule: diffusers' EDM schedulers
and our Heun (:mod:`privimage.diffusion.pipeline`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from privimage.config.schema import DiffusionConfig
from privimage.diffusion.common import Network, mean_over_draws
from privimage.diffusion.pipeline import EDMHeunScheduler

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


class EDM:
    """The EDM formulation behind one call shape, as EDM's ``training/loss.py`` keeps
    each formulation a small class: ``loss`` (per example, for DP-SGD's clipping),
    ``scheduler`` (the diffusers scheduler each sampler is) and ``fixed_noise_loss``
    (the audit's score at one noise level)."""

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

    def scheduler(self, solver: str):
        """The diffusers scheduler of ``solver`` on the spec's Karras sigmas
        (:mod:`privimage.diffusion.pipeline`)."""
        spec = self.spec
        kw = dict(
            sigma_min=spec.sigma_min,
            sigma_max=spec.sigma_max,
            sigma_data=spec.sigma_data,
            rho=spec.rho,
            prediction_type="epsilon",  # the network is EDM's F: c_out scales it
            final_sigmas_type="zero",
        )
        if solver == "dpmpp_2m":
            return EDMDPMSolverMultistepScheduler(
                **kw, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint"
            )
        return (EDMHeunScheduler if solver == "heun" else EDMEulerScheduler)(**kw)

    def fixed_noise_loss(self, model, x, labels, noise, level: float) -> torch.Tensor:
        """``lambda(s) * mean (D(x + s n; s) - x)^2`` at the one level ``s = level``."""
        sigma_data = self.spec.sigma_data
        sigma = torch.full((len(x),), float(level), device=x.device)
        denoised = edm_denoise(
            unet_network(model), x + level * noise, sigma, labels, sigma_data=sigma_data
        )
        weight = float(edm_loss_weight(torch.tensor(float(level)), sigma_data=sigma_data))
        return weight * (denoised - x).pow(2).flatten(1).mean(1)
