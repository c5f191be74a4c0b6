"""Diffusion math as pure functions: noise schedule, per-example loss, seeded sampler.

The formulation is DDPM epsilon-prediction with a linear beta schedule; sampling is
deterministic DDIM (eta = 0) through diffusers' ``DDIMScheduler``. The loss is returned
per example because DP-SGD clips each example's gradient separately.

A *denoiser* here is any callable ``(x_t, t, labels) -> predicted noise``; see
:func:`unet_denoiser` for the diffusers UNet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from diffusers import DDIMScheduler, UNet2DModel
from tqdm.auto import tqdm

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

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


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One Gaussian image per seed, each drawn from its own generator.

    This is what makes every sample a function of its own seed alone, so a sampling
    job split into pieces or resumed reproduces the same images.
    """
    out = torch.empty((len(seeds), *shape))
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        out[i] = torch.randn(shape, generator=g)
    return out


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


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    *,
    seeds: Sequence[int],
    labels: torch.Tensor,
    image_shape: tuple[int, int, int],
    num_train_timesteps: int,
    num_inference_steps: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) sampling of one batch; returns floats in [-1, 1]."""
    if len(seeds) != labels.shape[0]:
        raise ValueError(f"{len(seeds)} seeds but {labels.shape[0]} labels")
    scheduler = ddim_scheduler(num_train_timesteps)
    scheduler.set_timesteps(num_inference_steps)
    x = initial_noise(seeds, image_shape).to(device)
    labels = labels.to(device)
    for t in scheduler.timesteps:
        t_batch = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        eps = denoiser(x, t_batch, labels)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1.0, 1.0)


def sample_in_batches(
    model: UNet2DModel,
    *,
    seeds: Sequence[int],
    labels: torch.Tensor,
    image_shape: tuple[int, int, int],
    num_train_timesteps: int,
    num_inference_steps: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Sample ``len(seeds)`` images in batches; returns uint8 ``(N, C, H, W)`` on CPU."""
    model.eval()
    denoiser = unet_denoiser(model)
    chunks = []
    n_batches = math.ceil(len(seeds) / batch_size)
    for b in tqdm(range(n_batches), desc="sampling", disable=not progress):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        x = ddim_sample(
            denoiser,
            seeds=seeds[sl],
            labels=labels[sl],
            image_shape=image_shape,
            num_train_timesteps=num_train_timesteps,
            num_inference_steps=num_inference_steps,
            device=device,
        )
        chunks.append(to_uint8(x.cpu()))
    return torch.cat(chunks) if chunks else torch.empty((0, *image_shape), dtype=torch.uint8)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map floats in [-1, 1] to uint8 pixels with rounding."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
