"""DDPM epsilon-prediction with a linear beta schedule, sampled by deterministic DDIM
(eta = 0) through diffusers' ``DDIMScheduler``."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from privimage.config.schema import DiffusionConfig
from privimage.diffusion.common import Denoiser, mean_over_draws

BETA_START = 1e-4


BETA_END = 0.02


def linear_alphas_cumprod(num_train_timesteps: int) -> torch.Tensor:
    """Cumulative products of (1 - beta_t) for the DDPM linear schedule (float64)."""
    betas = torch.linspace(BETA_START, BETA_END, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def unet_denoiser(model: torch.nn.Module) -> Denoiser:
    """Adapt a (possibly Opacus-wrapped) diffusers UNet to the denoiser signature."""

    def denoise(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model(x, t, class_labels=labels).sample

    return denoise


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Forward process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
    abar = alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def per_example_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE for each example, shape ``(batch,)``.

    Draws one timestep and one noise tensor per example; the mean over pixels keeps the
    scale independent of resolution.
    """
    batch = x0.shape[0]
    t = torch.randint(0, alphas_cumprod.shape[0], (batch,), generator=generator, device="cpu").to(
        x0.device
    )
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
    x_t = add_noise(x0, noise, t, alphas_cumprod)
    pred = denoiser(x_t, t, labels)
    return (pred - noise).pow(2).flatten(1).mean(dim=1)


def ddim_scheduler(num_train_timesteps: int) -> DDIMScheduler:
    """DDIM scheduler matching :func:`linear_alphas_cumprod`; clips x0 to [-1, 1]."""
    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="linear",
        clip_sample=True,
        set_alpha_to_one=True,
    )


class DDPM:
    """The DDPM formulation behind one call shape (see :class:`privimage.diffusion.edm.EDM`)."""

    name = "ddpm"
    solvers = ("ddim",)  # the first is the default

    def __init__(self, spec: DiffusionConfig) -> None:
        self.spec = spec
        self.alphas_cumprod = linear_alphas_cumprod(spec.num_train_timesteps)

    def loss(self, model, x0, labels, *, generator=None, noise_draws: int = 1) -> torch.Tensor:
        """Per-example epsilon MSE at uniform timesteps, averaged over ``noise_draws``."""
        denoiser = unet_denoiser(model)
        return mean_over_draws(
            lambda x, y: per_example_loss(
                denoiser, x, y, alphas_cumprod=self.alphas_cumprod, generator=generator
            ),
            x0,
            labels,
            noise_draws,
        )

    def scheduler(self, solver: str) -> DDIMScheduler:
        """DDIM (``solver`` is ``ddim``), deterministic (eta = 0)."""
        return ddim_scheduler(self.spec.num_train_timesteps)

    def fixed_noise_loss(self, model, x, labels, noise, level: float) -> torch.Tensor:
        """The epsilon MSE at timestep ``round(level * (T - 1))``, ``level`` in (0, 1]."""
        t = round(min(max(float(level), 0.0), 1.0) * (self.spec.num_train_timesteps - 1))
        tt = torch.full((len(x),), t, dtype=torch.long, device=x.device)
        pred = unet_denoiser(model)(add_noise(x, noise, tt, self.alphas_cumprod), tt, labels)
        return (pred - noise).pow(2).flatten(1).mean(1)
