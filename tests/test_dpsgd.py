"""DP-SGD as privimage runs it, checked against first principles rather than against Opacus.

* Noise multiplicity: each example's gradient is the mean over its K noise draws (the
  reference is computed with ``torch.func``, independently of Opacus' hooks), it is
  clipped to norm <= C as a whole, and the batch sum is the sum of those clipped
  gradients.
* Noise: what the optimizer adds to the clipped sum is Gaussian with standard deviation
  ``noise_multiplier * C`` (a statistical test over every coordinate of the model).
* An empty Poisson batch is a noise-only step, never NaN.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from scipy import stats
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from privimage.config.schema import ModelConfig
from privimage.diffusion.ddpm import add_noise, linear_alphas_cumprod
from privimage.dp.bookkeeping import BookKeeping, BookKeepingDPOptimizer
from privimage.dp.dpsgd import NoiseMultiplicityDPOptimizer, make_private, repeat_for_noise_draws
from privimage.errors import ConfigError
from privimage.nets.models import build_unet, make_opacus_safe

RES = 16
K = 3
ALPHAS = linear_alphas_cumprod(1000)


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, attention=True
    )
    model = build_unet(cfg, resolution=RES, channels=1, num_classes=10)
    make_opacus_safe(model)
    return model


def _examples(n: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, RES, RES, generator=g) * 2 - 1
    y = torch.arange(n) % 10
    # Fixed draws per row (example i, draw j is row i*K + j), shared by both computations.
    t = torch.randint(0, 1000, (n * K,), generator=g)
    noise = torch.randn(n * K, 1, RES, RES, generator=g)
    return x, y, t, noise


def _row_losses(model, x, y, t, noise):
    """Per-row epsilon-prediction losses for rows already repeated K times."""
    x_t = add_noise(x, noise, t, ALPHAS).float()
    return (model(x_t, t, class_labels=y).sample - noise).pow(2).flatten(1).mean(1)


def _reference_example_grads(model, x, y, t, noise) -> dict[str, torch.Tensor]:
    """Per-example gradients of the K-averaged loss via torch.func: shape (n, *param)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    xr, yr = repeat_for_noise_draws(x, y, K)

    def loss_row(p, xi, yi, ti, ni):
        x_t = add_noise(xi[None], ni[None], ti[None], ALPHAS).float()
        out = functional_call(model, p, (x_t, ti[None]), {"class_labels": yi[None]}).sample
        return (out - ni[None]).pow(2).mean()

    rows = vmap(grad(loss_row), in_dims=(None, 0, 0, 0, 0))(params, xr, yr, t, noise)
    return {k: v.reshape(len(x), K, *v.shape[1:]).mean(1) for k, v in rows.items()}


MODES = ("bookkeeping", "hooks")


def _private(
    model,
    *,
    n: int,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int = 0,
    mode: str = "hooks",
):
    data = TensorDataset(torch.zeros(n, 1, RES, RES), torch.zeros(n, dtype=torch.long))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return make_private(
        model,
        optimizer,
        DataLoader(data, batch_size=n),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        noise_multiplicity=K,
        sampler_generator=torch.Generator().manual_seed(seed),
        noise_generator=torch.Generator().manual_seed(seed + 1),
        grad_sample_mode=mode,
    )


def _clipped_sum(optimizer) -> torch.Tensor:
    """The clipped per-example sum of the last backward pass(es), before noise."""
    if isinstance(optimizer, BookKeepingDPOptimizer):
        optimizer.accumulate()  # book-keeping left the clipped sum in p.grad
    else:
        optimizer.clip_and_accumulate()
    return _flat(p.summed_grad for p in optimizer.params)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _backward(dp_model, x, y, t, noise):
    xr, yr = repeat_for_noise_draws(x, y, K)
    _row_losses(dp_model, xr, yr, t, noise).mean().backward()


@pytest.mark.parametrize("mode", MODES)
def test_each_example_contributes_one_clipped_k_averaged_gradient(mode):
    model = _unet()
    x, y, t, noise = _examples()
    reference = _reference_example_grads(model, x, y, t, noise)
    names = [name for name, _ in model.named_parameters()]
    per_example = torch.stack([_flat(reference[name][i] for name in names) for i in range(len(x))])
    norms = per_example.norm(dim=1)
    # A clipping norm between the smallest and largest gradient: some examples are
    # clipped and some pass unchanged, so both branches are checked.
    clip = float(norms.median())
    assert (norms > clip).any() and (norms < clip).any()

    dp_model, optimizer, _, _ = _private(
        model, n=len(x), noise_multiplier=0.0, max_grad_norm=clip, mode=mode
    )
    contributions = []
    for i in range(len(x)):
        rows = slice(i * K, (i + 1) * K)
        _backward(dp_model, x[i : i + 1], y[i : i + 1], t[rows], noise[rows])
        contributions.append(_clipped_sum(optimizer))
        optimizer.zero_grad()

    for i, got in enumerate(contributions):
        # What Opacus' clipping produced, checked against the independent reference.
        assert got.norm() <= clip * (1 + 1e-5), f"example {i}: norm {got.norm():.4g} > C={clip}"
        factor = min(1.0, clip / float(norms[i]))
        expected = per_example[i] * factor
        assert (got - expected).norm() <= 1e-4 * expected.norm(), f"example {i}"

    # The whole batch at once: the sum of the individually clipped gradients.
    _backward(dp_model, x, y, t, noise)
    batch_sum = _clipped_sum(optimizer)
    expected_sum = torch.stack(contributions).sum(0)
    assert (batch_sum - expected_sum).norm() <= 1e-4 * expected_sum.norm()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_noise_added_to_the_summed_gradient_has_std_sigma_times_c(mode):
    model = _unet()
    x, y, t, noise = _examples()
    sigma, clip = 0.8, 0.05
    reference = _reference_example_grads(model, x, y, t, noise)
    names = [name for name, _ in model.named_parameters()]
    per_example = torch.stack([_flat(reference[name][i] for name in names) for i in range(len(x))])
    factors = (clip / per_example.norm(dim=1)).clamp(max=1.0)
    clipped_sum = (per_example * factors[:, None]).sum(0)

    dp_model, optimizer, _, _ = _private(
        model, n=len(x), noise_multiplier=sigma, max_grad_norm=clip, mode=mode
    )
    _backward(dp_model, x, y, t, noise)
    optimizer.step()
    # Opacus divides the noisy sum by the expected batch size (loss_reduction="mean").
    noisy_sum = _flat(p.grad for p in optimizer.params) * optimizer.expected_batch_size
    added = (noisy_sum - clipped_sum).double().numpy()

    n = added.size
    assert n > 50_000
    expected_std = sigma * clip
    # The sample std of n Gaussians has relative standard error 1/sqrt(2n) (~0.2% here);
    # 6 standard errors keeps the test deterministic in practice yet sharp.
    assert abs(added.std() / expected_std - 1) < 6 / math.sqrt(2 * n)
    assert abs(added.mean()) < 6 * expected_std / math.sqrt(n)
    # Gaussian, not merely the right scale (uniform noise of the same std fails this).
    assert stats.kstest(added / expected_std, "norm").pvalue > 1e-4
    assert abs(stats.kurtosis(added)) < 0.1


@pytest.mark.parametrize("mode", MODES)
def test_empty_poisson_batch_is_a_noise_only_step(mode):
    model = _unet()
    sigma, clip = 1.0, 1.0
    _, optimizer, _, engine = _private(
        model, n=4, noise_multiplier=sigma, max_grad_norm=clip, mode=mode
    )
    optimizer.noise_only_step()
    grads = _flat(p.grad for p in optimizer.params) * optimizer.expected_batch_size
    assert torch.isfinite(grads).all()
    assert abs(float(grads.std()) / (sigma * clip) - 1) < 0.05
    # It is a real step: the engine's accountant counted it at the Poisson rate.
    assert engine.accountant.history == [(sigma, 1.0, 1)]


@pytest.mark.slow
def test_noise_multiplicity_one_is_plain_opacus():
    """With K=1 the optimizer is exactly Opacus' DPOptimizer (same clipped sum)."""
    model = _unet()
    x, y, t, noise = _examples(3)
    dp_model, optimizer, _, _ = _private(model, n=3, noise_multiplier=0.0, max_grad_norm=0.1)
    optimizer.noise_multiplicity = 1
    x_t = add_noise(x, noise[::K], t[::K], ALPHAS).float()
    (dp_model(x_t, t[::K], class_labels=y).sample - noise[::K]).pow(2).mean().backward()
    optimizer.clip_and_accumulate()
    ours = _flat(p.summed_grad for p in optimizer.params)
    per_sample = torch.stack([_flat(p.grad_sample[i] for p in optimizer.params) for i in range(3)])
    factors = (0.1 / (per_sample.norm(dim=1) + 1e-6)).clamp(max=1.0)
    expected = (per_sample * factors[:, None]).sum(0)
    assert (ours - expected).norm() <= 1e-5 * expected.norm()


def test_make_private_uses_the_given_generators_and_refuses_bad_k():
    model = _unet()
    _, optimizer, loader, engine = _private(model, n=8, noise_multiplier=1.0, max_grad_norm=1.0)
    assert isinstance(optimizer, NoiseMultiplicityDPOptimizer)
    assert optimizer.step_hook is not None  # the engine's accountant still counts steps
    first = [list(b[0].shape) for b in loader]
    # Same seed, same Poisson masks: the sampler follows the generator it was given.
    _, _, loader2, _ = _private(_unet(), n=8, noise_multiplier=1.0, max_grad_norm=1.0)
    assert [list(b[0].shape) for b in loader2] == first
    assert engine.accountant.history == []
    with pytest.raises(ConfigError, match="noise_multiplicity=0"):
        repeat_for_noise_draws(torch.zeros(2, 1), torch.zeros(2), 0)
    with pytest.raises(RuntimeError, match="multiple of"):
        optimizer._average_draws(torch.zeros(4, 2))
    with pytest.raises(ConfigError, match="grad_sample_mode='ghost'"):
        _private(_unet(), n=8, noise_multiplier=1.0, max_grad_norm=1.0, mode="ghost")


def test_bookkeeping_is_built_from_opacus_pieces_with_our_generators():
    model = _unet()
    dp_model, optimizer, loader, engine = _private(
        model, n=8, noise_multiplier=1.0, max_grad_norm=1.0, mode="bookkeeping"
    )
    assert isinstance(dp_model, BookKeeping) and dp_model._module is model
    assert isinstance(optimizer, DPOptimizerFastGradientClipping)
    assert optimizer.step_hook is not None
    assert loader.sample_rate == 1.0 and optimizer.expected_batch_size == 8
    first = [list(b[0].shape) for b in loader]
    _, _, loader2, _ = _private(
        _unet(), n=8, noise_multiplier=1.0, max_grad_norm=1.0, mode="bookkeeping"
    )
    assert [list(b[0].shape) for b in loader2] == first


def test_repeat_layout_is_example_major():
    x = torch.arange(3.0)[:, None]
    xr, yr = repeat_for_noise_draws(x, torch.tensor([7, 8, 9]), 2)
    assert xr.squeeze(1).tolist() == [0, 0, 1, 1, 2, 2]
    assert yr.tolist() == [7, 7, 8, 8, 9, 9]
    assert np.array_equal(repeat_for_noise_draws(x, yr[:3], 1)[0].numpy(), x.numpy())
