"""Diffusion math as pure functions: preconditioning, noise sampling, losses, samplers.

Two formulations share one UNet architecture:

* **EDM** (Karras et al. 2022; the default, as in DPDM and PrivImage): the network ``F``
  is wrapped as ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)``, trained at
  log-normal noise levels with the weight ``lambda(sigma)``, and sampled by a
  deterministic Euler or Heun solver on a Karras sigma schedule.
* **DDPM** epsilon-prediction with a linear beta schedule, sampled by deterministic DDIM
  (eta = 0) through diffusers' ``DDIMScheduler``.

Losses are returned per example because DP-SGD clips each example's gradient
separately. Samplers draw each image's starting noise from its own seed and are
otherwise deterministic, so an image depends on its seed (and label) alone.

A *network* here is any callable ``(x_in, c_noise, labels) -> output`` (see
:func:`unet_network`); a DDPM *denoiser* is ``(x_t, t, labels) -> predicted noise``.
Classifier-free guidance uses the null label ``num_classes`` that
:func:`privimage.nets.models.build_unet` reserves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from privimage.config.schema import Config, DiffusionConfig

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

BETA_START = 1e-4
BETA_END = 0.02

# The samplers that fit each formulation (the first is the default).
SOLVERS = {"edm": ("heun", "euler", "dpmpp_2m"), "ddpm": ("ddim",)}


def sampler_name(cfg: Config) -> str:
    """The sampler to use: ``sample.sampler`` or the formulation's default."""
    return cfg.sample.sampler or SOLVERS[cfg.diffusion.formulation][0]


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
    guidance_scale: float = 1.0,
    null_label: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) sampling of one batch; returns floats in [-1, 1]."""
    if len(seeds) != labels.shape[0]:
        raise ValueError(f"{len(seeds)} seeds but {labels.shape[0]} labels")
    if guidance_scale != 1.0 and null_label is None:
        raise ValueError("classifier-free guidance needs the null label")
    scheduler = ddim_scheduler(num_train_timesteps)
    scheduler.set_timesteps(num_inference_steps)
    x = initial_noise(seeds, image_shape).to(device)
    labels = labels.to(device)
    for t in scheduler.timesteps:
        t_batch = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        eps = guided(
            lambda xx, ll, tt: denoiser(xx, tt, ll),
            x,
            labels,
            t_batch,
            guidance_scale=guidance_scale,
            null_label=null_label,
        )
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1.0, 1.0)


# --------------------------------------------------------------------------- EDM


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


def mean_over_draws(
    row_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    labels: torch.Tensor,
    noise_draws: int,
) -> torch.Tensor:
    """Each example's loss averaged over ``noise_draws`` independent draws, ``(batch,)``.

    ``row_loss(x, labels)`` returns one loss per row with fresh random draws per row;
    the examples are repeated K times in place (rows ``i*K .. i*K+K-1`` are example i),
    so the gradient of the mean is the average of the K per-draw gradients (DPDM's noise
    multiplicity).
    """
    if noise_draws < 1:
        raise ValueError(f"noise_draws must be >= 1, got {noise_draws}")
    rows = row_loss(
        x0.repeat_interleave(noise_draws, dim=0), labels.repeat_interleave(noise_draws, dim=0)
    )
    return rows.view(x0.shape[0], noise_draws).mean(dim=1)


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


def guided(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    labels: torch.Tensor,
    cond: torch.Tensor,
    *,
    guidance_scale: float,
    null_label: int | None,
) -> torch.Tensor:
    """Classifier-free guidance: ``u + w (c - u)`` from one batch of doubled size.

    ``fn(x, labels, cond)`` is the model's prediction, ``cond`` its per-row noise level
    or timestep (doubled along with ``x``); ``w = 1`` is plain conditional sampling (one
    pass), ``w = 0`` unconditional.
    """
    if guidance_scale == 1.0:
        return fn(x, labels, cond)
    if null_label is None:
        raise ValueError("classifier-free guidance needs the null label")
    null = torch.full_like(labels, null_label)
    both = fn(torch.cat([x, x]), torch.cat([labels, null]), torch.cat([cond, cond]))
    cond_pred, uncond_pred = both.chunk(2)
    return uncond_pred + guidance_scale * (cond_pred - uncond_pred)


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
    if solver not in SOLVERS["edm"]:
        raise ValueError(f"solver must be one of {SOLVERS['edm']}, got {solver!r}")
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


# ------------------------------------------------------------- formulation switch


def training_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    spec: DiffusionConfig,
    generator: torch.Generator | None = None,
    noise_draws: int = 1,
) -> torch.Tensor:
    """The per-example training loss of ``spec``'s formulation, shape ``(batch,)``."""
    if spec.formulation == "edm":
        return edm_per_example_loss(
            unet_network(model),
            x0,
            labels,
            sigma_data=spec.sigma_data,
            levels=TrainingNoise.of(spec),
            generator=generator,
            noise_draws=noise_draws,
        )
    alphas = linear_alphas_cumprod(spec.num_train_timesteps)
    denoiser = unet_denoiser(model)
    return mean_over_draws(
        lambda x, y: per_example_loss(denoiser, x, y, alphas_cumprod=alphas, generator=generator),
        x0,
        labels,
        noise_draws,
    )


def drop_labels(
    labels: torch.Tensor, *, probability: float, null_label: int, generator: torch.Generator
) -> torch.Tensor:
    """Replace each label by the null label with ``probability`` (guidance training).

    Always draws one uniform per label, so the random stream does not depend on the
    probability being zero or not.
    """
    drop = torch.rand(labels.shape[0], generator=generator) < probability
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_label), labels)


@torch.no_grad()
def sample_batch(
    model: torch.nn.Module,
    *,
    spec: DiffusionConfig,
    seeds: Sequence[int],
    labels: torch.Tensor,
    image_shape: tuple[int, int, int],
    num_steps: int,
    solver: str,
    guidance_scale: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Sample one batch with ``spec``'s formulation; floats in [-1, 1]."""
    if solver not in SOLVERS[spec.formulation]:
        raise ValueError(
            f"solver {solver!r} does not fit the {spec.formulation} formulation; "
            f"choose one of {SOLVERS[spec.formulation]}"
        )
    null_label = null_class(model)
    if spec.formulation == "edm":
        return edm_sample(
            unet_network(model),
            seeds=seeds,
            labels=labels,
            image_shape=image_shape,
            num_steps=num_steps,
            sigma_data=spec.sigma_data,
            sigma_min=spec.sigma_min,
            sigma_max=spec.sigma_max,
            rho=spec.rho,
            solver=solver,
            guidance_scale=guidance_scale,
            null_label=null_label,
            device=device,
        )
    return ddim_sample(
        unet_denoiser(model),
        seeds=seeds,
        labels=labels,
        image_shape=image_shape,
        num_train_timesteps=spec.num_train_timesteps,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        null_label=null_label,
        device=device,
    )


def null_class(model: torch.nn.Module) -> int | None:
    """The null (unconditional) label of a UNet built by ``build_unet``: its last class."""
    n = getattr(getattr(model, "config", None), "num_class_embeds", None)
    return None if n is None else int(n) - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map floats in [-1, 1] to uint8 pixels with rounding."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
