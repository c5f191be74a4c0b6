"""Diffusion math against known values, and the sampler's seed contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from privimage.config.schema import DiffusionConfig, ModelConfig
from privimage.diffusion import (
    drop_labels,
    formulation,
    null_class,
    sample_batch,
    sample_unit_floats,
    training_loss,
)
from privimage.diffusion.ddpm import (
    add_noise,
    linear_alphas_cumprod,
    per_example_loss,
    unet_denoiser,
)
from privimage.diffusion.edm import (
    TrainingNoise,
    edm_denoise,
    edm_loss_weight,
    edm_per_example_loss,
    edm_precondition,
    sample_training_sigmas,
    unet_network,
)
from privimage.diffusion.pipeline import denoise_loop, seed_generators, start_sigma
from privimage.nets.models import build_unet


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


def test_starting_noise_depends_only_on_each_seed():
    a = randn_tensor((3, 1, 4, 4), generator=seed_generators([3, 7, 11]))
    b = randn_tensor((2, 1, 4, 4), generator=seed_generators([11, 3]))
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    # Each image's noise is what its own generator draws for one image.
    assert torch.equal(a[1], torch.randn((1, 4, 4), generator=torch.Generator().manual_seed(7)))


def _tiny_unet():
    torch.manual_seed(0)
    cfg = ModelConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4)
    return build_unet(cfg, resolution=8, channels=1, num_classes=3).eval()


DDPM = DiffusionConfig(formulation="ddpm")


def _sample(model, spec, seeds, labels, solver, steps=5, guidance=1.0):
    return sample_batch(
        model,
        spec=spec,
        seeds=seeds,
        labels=labels,
        num_steps=steps,
        solver=solver,
        guidance_scale=guidance,
    )


def _assert_split_invariant(model, spec, solver):
    seeds, labels = [0, 1, 2, 3], torch.tensor([0, 1, 2, 0])
    whole = _sample(model, spec, seeds, labels, solver)
    again = _sample(model, spec, seeds, labels, solver)
    first = _sample(model, spec, seeds[:1], labels[:1], solver)
    rest = _sample(model, spec, seeds[1:], labels[1:], solver)
    assert whole.dtype == torch.uint8 and whole.shape == (4, 1, 8, 8)
    assert torch.equal(whole, again)
    # Batch composition may change float summation order: at most one level, rarely.
    split = torch.cat([first, rest])
    assert (whole.int() - split.int()).abs().max() <= 1


def test_ddim_sampler_is_deterministic_and_split_invariant():
    _assert_split_invariant(_tiny_unet(), DDPM, "ddim")


def test_sampler_uses_the_label():
    model = _tiny_unet()
    with torch.no_grad():
        model.class_embedding.weight.mul_(50)  # make the class visible in a random net
    a = _sample(model, DDPM, [5], torch.tensor([0]), "ddim", steps=3)
    b = _sample(model, DDPM, [5], torch.tensor([1]), "ddim", steps=3)
    assert not torch.equal(a, b)


def test_ema_warms_up_then_holds_its_decay():
    from privimage.nets.models import EMA, ema_decay_at

    assert ema_decay_at(0, 0.999) == 0.1
    assert ema_decay_at(10**6, 0.999) == 0.999
    model = torch.nn.Linear(3, 1)
    ema = EMA(model, decay=0.9)
    expected = model.weight.detach().clone()
    for step in range(30):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
        # The first update copies; update n + 1 keeps min(decay, (1 + n) / (10 + n)).
        d = 0.0 if step == 0 else min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * model.weight.detach()
        assert torch.allclose(ema.module.weight, expected, atol=1e-5), step
    assert not ema.module.weight.requires_grad


def test_an_ema_checkpoint_from_before_resumes_where_it_stood():
    """Checkpoints written before the EMA was an AveragedModel hold the bare module's
    weights; resumed with the step count they continue the same schedule."""
    from privimage.nets.models import EMA

    model = torch.nn.Linear(3, 1)
    old = torch.nn.Linear(3, 1).state_dict()  # what such a checkpoint's "ema" held
    ema = EMA(model, decay=0.999)
    ema.resume(old, updates=7)
    assert torch.equal(ema.module.weight, old["weight"]) and int(ema.n_averaged) == 7
    ema.update_parameters(model)
    d = 8 / 17  # ema_decay_at(7): the old rule at step 7
    expected = d * old["weight"] + (1 - d) * model.weight.detach()
    assert torch.allclose(ema.module.weight, expected, atol=1e-6)
    again = EMA(model, decay=0.999)
    again.resume(ema.state_dict(), updates=8)  # the new format round-trips
    assert torch.equal(again.module.weight, ema.module.weight)


# ------------------------------------------------------------------------------ EDM


def test_edm_preconditioning_matches_the_formulas_at_known_points():
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_precondition(
        torch.tensor([0.5], dtype=torch.float64), sigma_data=sd
    )
    # sigma = sigma_data: var = 0.5
    assert math.isclose(c_skip.item(), 0.5, rel_tol=1e-12)
    assert math.isclose(c_out.item(), 0.25 / math.sqrt(0.5), rel_tol=1e-12)
    assert math.isclose(c_in.item(), 1 / math.sqrt(0.5), rel_tol=1e-12)
    assert math.isclose(c_noise.item(), math.log(0.5) / 4, rel_tol=1e-12)
    # Low noise: the skip connection carries the image; high noise: the network does.
    lo = edm_precondition(torch.tensor([1e-4], dtype=torch.float64), sigma_data=sd)
    hi = edm_precondition(torch.tensor([80.0], dtype=torch.float64), sigma_data=sd)
    assert lo[0].item() > 0.9999 and lo[1].item() < 1e-4
    assert hi[0].item() < 1e-4 and math.isclose(hi[1].item(), sd, rel_tol=1e-4)
    assert math.isclose(hi[2].item(), 1 / math.sqrt(80.0**2 + 0.25), rel_tol=1e-12)
    # lambda(sigma) = 1 / c_out^2
    s = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    assert torch.allclose(
        edm_loss_weight(s, sigma_data=sd), 1 / edm_precondition(s, sigma_data=sd)[1] ** 2
    )


def _oracle_network(x0: torch.Tensor, sd: float):
    """The network whose preconditioned output D is exactly x0 (the perfect denoiser)."""

    def net(x_in, c_noise, labels):
        sigma = (4 * c_noise.to(torch.float64)).exp()
        c_skip, c_out, c_in, _ = (
            c.view(-1, 1, 1, 1) for c in edm_precondition(sigma, sigma_data=sd)
        )
        x = x_in / c_in
        return ((x0.repeat_interleave(len(x) // len(x0), 0) - c_skip * x) / c_out).to(x_in.dtype)

    return net


def test_edm_loss_of_a_perfect_denoiser_is_zero():
    x0 = torch.rand(6, 3, 4, 4, dtype=torch.float64) * 2 - 1
    for draws in (1, 3):
        loss = edm_per_example_loss(
            _oracle_network(x0, 0.5),
            x0,
            torch.zeros(6, dtype=torch.long),
            sigma_data=0.5,
            levels=TrainingNoise(p_mean=-1.2, p_std=1.2),
            generator=torch.Generator().manual_seed(0),
            noise_draws=draws,
        )
        assert loss.shape == (6,)
        assert loss.abs().max().item() < 1e-18


def test_edm_loss_of_the_zero_network_is_known():
    """F = 0 gives D = c_skip (x0 + sigma n); the loss is lambda * mean((D - x0)^2)."""
    x0 = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    kw = dict(sigma_data=0.5, levels=TrainingNoise(p_mean=-1.2, p_std=1.2))
    loss = edm_per_example_loss(
        lambda x, c, y: torch.zeros_like(x),
        x0,
        torch.zeros(4, dtype=torch.long),
        generator=torch.Generator().manual_seed(3),
        **kw,
    )
    g = torch.Generator().manual_seed(3)
    sigma = (torch.randn(4, generator=g) * 1.2 - 1.2).exp().double()
    noise = torch.randn(x0.shape, generator=g).double()
    c_skip = (0.25 / (sigma**2 + 0.25)).view(-1, 1, 1, 1)
    d = c_skip * (x0 + sigma.view(-1, 1, 1, 1) * noise)
    expect = (sigma**2 + 0.25) / (sigma * 0.5) ** 2 * (d - x0).pow(2).flatten(1).mean(1)
    assert torch.allclose(loss, expect, rtol=1e-10)


def test_edm_noise_draws_average_k_independent_draws():
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    y = torch.tensor([0, 1, 2])
    net = unet_network(_tiny_unet())
    kw = dict(sigma_data=0.5, levels=TrainingNoise(p_mean=-1.2, p_std=1.2))
    with torch.no_grad():
        k = edm_per_example_loss(
            net, x0, y, generator=torch.Generator().manual_seed(5), noise_draws=4, **kw
        )
        rows = edm_per_example_loss(
            net,
            x0.repeat_interleave(4, 0),
            y.repeat_interleave(4, 0),
            generator=torch.Generator().manual_seed(5),
            **kw,
        )
    assert torch.allclose(k, rows.view(3, 4).mean(1))


def test_training_sigmas_are_log_normal():
    s = sample_training_sigmas(
        200_000, TrainingNoise(p_mean=-1.2, p_std=1.2), generator=torch.Generator().manual_seed(0)
    )
    assert abs(s.log().mean().item() + 1.2) < 0.01
    assert abs(s.log().std().item() - 1.2) < 0.01


def test_training_sigma_mixture_matches_its_cdf():
    """The low-noise mixture against scipy's CDF of the two-component normal in ln(sigma)."""
    from scipy.stats import norm

    mixture = TrainingNoise(p_mean=0.6, p_std=1.2, low_noise_fraction=0.3, low_noise_p_mean=-1.2)
    logs = sample_training_sigmas(200_000, mixture, generator=torch.Generator().manual_seed(0))
    logs = np.sort(logs.log().double().numpy())
    cdf = 0.7 * norm.cdf(logs, 0.6, 1.2) + 0.3 * norm.cdf(logs, -1.2, 1.2)
    empirical = np.arange(1, len(logs) + 1) / len(logs)
    assert np.abs(cdf - empirical).max() < 0.005  # KS distance; 1.36/sqrt(n) = 0.003
    # Fraction 0 is the plain log-normal stream, draw for draw, as written out here.
    plain = (torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 1.2 + 0.6).exp()
    mixed0 = sample_training_sigmas(
        1000,
        TrainingNoise(p_mean=0.6, p_std=1.2, low_noise_fraction=0.0),
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(plain, mixed0)


def test_training_noise_reads_every_level_setting_of_the_config():
    spec = DiffusionConfig(p_mean=0.6, p_std=1.4, low_noise_fraction=0.25, low_noise_p_mean=-2.0)
    assert TrainingNoise.of(spec) == TrainingNoise(
        p_mean=0.6, p_std=1.4, low_noise_fraction=0.25, low_noise_p_mean=-2.0
    )


def _karras(n, smin, smax, rho):
    """Karras et al.'s schedule written out (their eq. 5), then 0."""
    return [
        (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        for i in range(n)
    ] + [0.0]


def _edm_scheduler(solver, steps, **spec):
    scheduler = formulation(DiffusionConfig(**spec)).scheduler(solver)
    scheduler.set_timesteps(steps)
    return scheduler


def test_every_edm_solver_steps_the_karras_schedule():
    for solver in ("euler", "heun", "dpmpp_2m"):
        sigmas = _edm_scheduler(solver, 18).sigmas.double()
        if solver == "heun":  # every evaluation listed: s0, s1, s1, ..., s17, s17, 0
            sigmas = torch.cat([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]])
        expected = torch.tensor(_karras(18, 0.002, 80.0, 7.0), dtype=torch.float64)
        assert torch.allclose(sigmas, expected, rtol=1e-6), solver
    assert start_sigma(_edm_scheduler("heun", 18)) == pytest.approx(80.0, rel=1e-7)
    linear = _edm_scheduler("euler", 5, sigma_min=1.0, sigma_max=5.0, rho=1.0).sigmas
    assert torch.allclose(linear, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0]))
    heun = _edm_scheduler("heun", 4)
    assert len(heun.timesteps) == 2 * 4 - 1  # Heun: 2N - 1 network evaluations


def _gaussian_ode_errors(runs) -> dict:
    """Max error of each ``(solver, steps)`` in ``runs`` against the closed-form ODE.

    For data ~ N(0, sd^2) the ideal denoiser is c_skip x, i.e. the zero network, and the
    probability-flow ODE has the closed form x(0) = x(smax) * sd / sqrt(smax^2 + sd^2).
    """
    sd, smax = 0.5, 80.0
    start = randn_tensor((4, 1, 4, 4), generator=seed_generators([0, 1, 2, 3])) * smax
    exact = start.double() * sd / math.sqrt(smax**2 + sd**2)
    errors = {}
    for solver, steps in runs:
        scheduler = _edm_scheduler(solver, steps)
        x = denoise_loop(
            scheduler,
            lambda x, t, y: torch.zeros_like(x),
            start * start_sigma(scheduler) / smax,
            torch.zeros(4, dtype=torch.long),
        )
        errors[solver, steps] = (x.double() - exact).abs().max().item()
    return errors


def test_edm_sampler_solves_the_gaussian_ode():
    errors = _gaussian_ode_errors([("euler", 50), ("heun", 50), ("heun", 200)])
    assert errors["heun", 50] < 1e-2
    assert errors["heun", 200] < 1e-3
    # Second order: 4x the steps cuts the error ~16x; and Heun beats Euler at equal steps.
    assert errors["heun", 200] < errors["heun", 50] / 10
    assert errors["heun", 50] < errors["euler", 50] / 5


def test_dpmpp_2m_is_second_order_on_the_gaussian_ode():
    errors = _gaussian_ode_errors([("euler", 48), ("dpmpp_2m", 12), ("dpmpp_2m", 48)])
    # At Euler's cost per step it is far closer, and 4x the steps cuts the error > 8x.
    assert errors["dpmpp_2m", 48] < errors["euler", 48] / 5
    assert errors["dpmpp_2m", 48] < errors["dpmpp_2m", 12] / 8


def _reference_sample(model, seeds, labels, solver, steps, guidance=1.0):
    """Karras et al.'s Algorithm 1 written out in float64 on our EDM preconditioning: the
    independent reference for the schedulers (Euler, and Heun's correction)."""
    spec = DiffusionConfig()
    sigmas = _karras(steps, spec.sigma_min, spec.sigma_max, spec.rho)
    x = randn_tensor((len(seeds), 1, 8, 8), generator=seed_generators(seeds)).double()
    x = x * sigmas[0]
    net, null = unet_network(model), null_class(model)

    def slope(x, sigma):
        s = torch.full((len(x),), sigma, dtype=torch.float64)
        cond = edm_denoise(net, x.float(), s, labels, sigma_data=spec.sigma_data).double()
        uncond = edm_denoise(
            net, x.float(), s, torch.full_like(labels, null), sigma_data=spec.sigma_data
        ).double()
        return (x - (uncond + guidance * (cond - uncond))) / sigma

    for cur, nxt in zip(sigmas[:-1], sigmas[1:], strict=True):
        d = slope(x, cur)
        x_next = x + (nxt - cur) * d
        if solver == "heun" and nxt > 0:
            x_next = x + (nxt - cur) * 0.5 * (d + slope(x_next, nxt))
        x = x_next
    return x.clamp(-1, 1)


def _pipeline_floats(model, solver, seeds, labels, steps, guidance=1.0):
    request = dict(seeds=seeds, labels=labels, num_steps=steps, solver=solver)
    images = sample_unit_floats(model, spec=DiffusionConfig(), guidance_scale=guidance, **request)
    return images.double() * 2 - 1


def test_euler_and_heun_schedulers_match_algorithm_1_in_float64():
    model = _tiny_unet()
    with torch.no_grad():
        model.class_embedding.weight.mul_(20)
    seeds, labels = [0, 1, 2], torch.tensor([0, 1, 2])
    for solver in ("euler", "heun"):
        for guidance in (1.0, 2.0):
            ours = _pipeline_floats(model, solver, seeds, labels, 10, guidance)
            reference = _reference_sample(model, seeds, labels, solver, 10, guidance)
            assert (ours - reference).abs().max() < 1e-5, (solver, guidance)


def test_edm_sampler_is_deterministic_and_split_invariant():
    for solver in ("euler", "heun", "dpmpp_2m"):
        _assert_split_invariant(_tiny_unet(), DiffusionConfig(), solver)


def test_guidance_scale_one_is_conditional_and_zero_is_unconditional():
    model = _tiny_unet()
    with torch.no_grad():
        model.class_embedding.weight.mul_(50)
    null = null_class(model)
    assert null == 3
    seeds, labels = [4, 5], torch.tensor([0, 1])

    def run(labels, guidance):
        return _pipeline_floats(model, "heun", seeds, labels, 4, guidance)

    plain = run(labels, 1.0)
    zero = run(labels, 0.0)
    uncond = run(torch.full((2,), null), 1.0)
    strong = run(labels, 3.0)
    assert torch.allclose(zero, uncond, atol=1e-5)
    assert not torch.allclose(strong, plain, atol=1e-3)
    assert not torch.allclose(plain, uncond, atol=1e-3)


def test_label_dropout_replaces_about_p_of_labels_with_the_null_class():
    labels = torch.zeros(20_000, dtype=torch.long)
    out = drop_labels(
        labels, probability=0.1, null_label=7, generator=torch.Generator().manual_seed(0)
    )
    assert set(out.unique().tolist()) == {0, 7}
    assert abs((out == 7).float().mean().item() - 0.1) < 0.01
    same = drop_labels(
        labels, probability=0.0, null_label=7, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(same, labels)


def test_training_loss_dispatches_on_the_formulation():
    model = _tiny_unet()
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 1])
    with torch.no_grad():
        edm = training_loss(
            model, x0, y, spec=DiffusionConfig(), generator=torch.Generator().manual_seed(0)
        )
        ddpm = training_loss(
            model,
            x0,
            y,
            spec=DiffusionConfig(formulation="ddpm"),
            generator=torch.Generator().manual_seed(0),
        )
        ref = per_example_loss(
            unet_denoiser(model),
            x0,
            y,
            alphas_cumprod=linear_alphas_cumprod(1000),
            generator=torch.Generator().manual_seed(0),
        )
    assert edm.shape == ddpm.shape == (2,)
    assert torch.equal(ddpm, ref)
    assert not torch.allclose(edm, ddpm)


def test_blacken_dark_pixels_against_a_numpy_reference():
    from privimage.diffusion.common import blacken_dark_pixels

    rng = np.random.default_rng(0)
    x = rng.random((4, 3, 8, 8)).astype(np.float32) * 0.2  # many pixels below 32/255
    x[0, 1, 0, 0] = 0.9  # one bright channel keeps a pixel in colour
    level = 32
    as_uint8 = np.round(x * 255)
    dark = (as_uint8 < level).all(axis=1, keepdims=True)
    expected = np.where(dark, 0.0, x)
    got = blacken_dark_pixels(torch.from_numpy(x), level).numpy()
    assert 0.05 < dark.mean() < 0.95
    np.testing.assert_array_equal(got, expected)
    assert got[0, 0, 0, 0] == x[0, 0, 0, 0]  # not blackened: its green channel is bright
    assert blacken_dark_pixels(torch.from_numpy(x), 0).equal(torch.from_numpy(x))


def test_blacken_dark_pixels_reads_uint8_images_as_their_floats():
    from privimage.diffusion.common import blacken_dark_pixels

    rng = np.random.default_rng(1)
    pixels = torch.from_numpy(rng.integers(0, 80, (4, 3, 8, 8), dtype=np.uint8))
    floats = pixels.float() / 255
    got = blacken_dark_pixels(pixels, 32)
    assert got.dtype == torch.uint8
    assert torch.equal(got, (blacken_dark_pixels(floats, 32) * 255).round().to(torch.uint8))
    assert not torch.equal(got, pixels)
