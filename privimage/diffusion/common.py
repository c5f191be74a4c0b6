"""What both formulations share: averaging a loss over noise draws, classifier-free
guidance, label dropout, the null class, the uint8 mapping and the black floor.

A *network* is any callable ``(x_in, c_noise, labels) -> output`` (EDM's ``F``); a DDPM
*denoiser* is ``(x_t, t, labels) -> predicted noise``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


def drop_labels(
    labels: torch.Tensor, *, probability: float, null_label: int, generator: torch.Generator
) -> torch.Tensor:
    """Replace each label by the null label with ``probability`` (guidance training).

    Always draws one uniform per label, so the random stream does not depend on the
    probability being zero or not.
    """
    drop = torch.rand(labels.shape[0], generator=generator) < probability
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_label), labels)


def null_class(model: torch.nn.Module) -> int | None:
    """The null (unconditional) label of a UNet built by ``build_unet``: its last class."""
    n = getattr(getattr(model, "config", None), "num_class_embeds", None)
    return None if n is None else int(n) - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map floats in [-1, 1] to uint8 pixels with rounding."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def blacken_dark_pixels(images: torch.Tensor, level: int) -> torch.Tensor:
    """``images`` (``(N, C, H, W)``: floats in [0, 1], or uint8) with every pixel whose
    uint8 value is below ``level`` in all channels set to 0; ``level`` 0 leaves them
    unchanged.

    A short diffusion run leaves a faint grey haze where its data are black (the demo's
    samples: 56% of the pixels below 4 of 255, the digits and glyphs 78-81%), which
    Inception features weigh heavily (docs/ablation.md, seventh round). The test is on
    the rounded uint8 value, so the PNGs of the sample stage and the pipeline's images
    agree to the pixel.
    """
    if level <= 0:
        return images
    pixels = images if images.dtype == torch.uint8 else (images * 255).round()
    return images.masked_fill((pixels < level).all(dim=1, keepdim=True), 0)
