"""Diffusion math against known values, and the sampler's seed contract."""

from __future__ import annotations

import math

import torch

from privimage.config import ModelConfig
from privimage.diffusion import (
    add_noise,
    ddim_sample,
    initial_noise,
    linear_alphas_cumprod,
    per_example_loss,
    to_uint8,
    unet_denoiser,
)
from privimage.models import build_unet


def test_linear_schedule_known_values():
    abar = linear_alphas_cumprod(1000)
    assert abar.shape == (1000,)
    assert math.isclose(abar[0].item(), 1 - 1e-4, rel_tol=1e-12)
    # abar_1 = (1 - beta_0)(1 - beta_1), beta_1 = 1e-4 + (0.02 - 1e-4) / 999
    beta1 = 1e-4 + (0.02 - 1e-4) / 999
    assert math.isclose(abar[1].item(), (1 - 1e-4) * (1 - beta1), rel_tol=1e-12)
    assert torch.all(abar[1:] < abar[:-1])
    assert abar[-1].item() < 1e-4  # almost pure noise at the end


def test_add_noise_is_the_forward_process():
    abar = linear_alphas_cumprod(1000)
    x0 = torch.full((2, 1, 2, 2), 0.5, dtype=torch.float64)
    noise = torch.ones_like(x0)
    t = torch.tensor([0, 999])
    x_t = add_noise(x0, noise, t, abar)
    for i in range(2):
        expect = abar[t[i]].sqrt() * 0.5 + (1 - abar[t[i]]).sqrt()
        assert torch.allclose(x_t[i], expect.expand_as(x_t[i]))


def test_loss_of_a_perfect_denoiser_is_zero():
    """A denoiser that inverts the forward process exactly has zero loss per example."""
    abar = linear_alphas_cumprod(1000)
    x0 = torch.rand(5, 1, 4, 4, dtype=torch.float64) * 2 - 1

    def oracle(x_t, t, labels):
        a = abar[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    loss = per_example_loss(
        oracle,
        x0,
        torch.zeros(5, dtype=torch.long),
        alphas_cumprod=abar,
        generator=torch.Generator().manual_seed(0),
    )
    assert loss.shape == (5,)
    assert loss.abs().max().item() < 1e-20


def test_loss_of_the_zero_denoiser_is_the_noise_energy():
    abar = linear_alphas_cumprod(1000)
    x0 = torch.zeros(3, 1, 8, 8)
    g = torch.Generator().manual_seed(1)
    loss = per_example_loss(
        lambda x, t, y: torch.zeros_like(x),
        x0,
        torch.zeros(3, dtype=torch.long),
        alphas_cumprod=abar,
        generator=g,
    )
    # Same draws as inside the loss: t first, then the noise.
    g = torch.Generator().manual_seed(1)
    torch.randint(0, 1000, (3,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.allclose(loss, noise.pow(2).flatten(1).mean(1))


def test_initial_noise_depends_only_on_each_seed():
    a = initial_noise([3, 7, 11], (1, 4, 4))
    b = initial_noise([11, 3], (1, 4, 4))
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])


def _tiny_unet():
    torch.manual_seed(0)
    cfg = ModelConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4)
    return build_unet(cfg, resolution=8, channels=1, num_classes=3).eval()


def test_sampler_is_deterministic_and_split_invariant():
    model = _tiny_unet()
    kw = dict(image_shape=(1, 8, 8), num_train_timesteps=1000, num_inference_steps=5)
    den = unet_denoiser(model)
    seeds, labels = [0, 1, 2, 3], torch.tensor([0, 1, 2, 0])
    whole = ddim_sample(den, seeds=seeds, labels=labels, **kw)
    again = ddim_sample(den, seeds=seeds, labels=labels, **kw)
    first = ddim_sample(den, seeds=seeds[:1], labels=labels[:1], **kw)
    rest = ddim_sample(den, seeds=seeds[1:], labels=labels[1:], **kw)
    assert torch.equal(whole, again)
    split = torch.cat([first, rest])
    # Batch composition may change float summation order, never the image.
    assert torch.equal(to_uint8(whole), to_uint8(split)) or torch.allclose(whole, split, atol=1e-5)
    assert whole.min() >= -1 and whole.max() <= 1


def test_sampler_uses_the_label():
    model = _tiny_unet()
    with torch.no_grad():
        model.class_embedding.weight.mul_(50)  # make the class visible in a random net
    den = unet_denoiser(model)
    kw = dict(image_shape=(1, 8, 8), num_train_timesteps=1000, num_inference_steps=3)
    a = ddim_sample(den, seeds=[5], labels=torch.tensor([0]), **kw)
    b = ddim_sample(den, seeds=[5], labels=torch.tensor([1]), **kw)
    assert not torch.allclose(a, b)


def test_ema_warms_up_then_holds_its_decay():
    from privimage.models import ema_decay_at, ema_update

    assert ema_decay_at(0, 0.999) == 0.1
    assert ema_decay_at(10**6, 0.999) == 0.999
    ema, model = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        ema.weight.fill_(0.0)
        model.weight.fill_(1.0)
    ema_update(ema, model, decay=0.999, step=0)
    assert abs(ema.weight.item() - 0.9) < 1e-6  # mostly the trained weights, not the init
