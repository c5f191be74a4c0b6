"""Book-keeping clipping is exact: per-example norms and the clipped sum equal torch.func's.

The reference takes each example's gradient of its K-averaged loss with ``torch.func``
(``vmap(grad(...))`` over the rows, averaged per example), independently of any hook, and
clips it with Opacus' formula. Every UNet preset, attention included, K = 1 and 4. Two
deliberately broken variants (the K rows clipped separately; the most important layer
left out of the norm) must fail the same comparison, so the tolerance has teeth.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import privimage
from privimage.diffusion.ddpm import add_noise, linear_alphas_cumprod
from privimage.dp import layers as L
from privimage.dp.bookkeeping import BookKeeping
from privimage.errors import ConfigError
from privimage.nets.models import build_unet

ALPHAS = linear_alphas_cumprod(1000)
TOLERANCE = 1e-4
# (preset, resolution, channels): every preset at the data shape it is made for.
PRESETS = [
    ("nano", 16, 1),
    ("tiny28", 28, 1),
    ("small28", 28, 1),
    ("tiny32", 32, 3),
    ("small32", 32, 3),
]


def _unet(preset: str, resolution: int, channels: int) -> nn.Module:
    cfg = privimage.compose([f"model={preset}"])
    torch.manual_seed(0)
    return build_unet(cfg.model, resolution=resolution, channels=channels, num_classes=10)


def _rows(resolution: int, channels: int, *, examples: int, k: int):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(examples, channels, resolution, resolution, generator=g) * 2 - 1
    y = torch.arange(examples) % 10
    t = torch.randint(0, 1000, (examples * k,), generator=g)
    noise = torch.randn(examples * k, channels, resolution, resolution, generator=g)
    return x.repeat_interleave(k, 0), y.repeat_interleave(k, 0), t, noise


def _row_loss(model, x, y, t, noise):
    x_t = add_noise(x, noise, t, ALPHAS).float()
    return (model(x_t, t, class_labels=y).sample - noise).pow(2).flatten(1).mean(1)


def _reference(model, rows, *, examples: int, k: int) -> dict[str, torch.Tensor]:
    """Per-example gradients of the K-averaged loss, {name: (B, *shape)}, via torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one_row(p, x, y, t, noise):
        return _row_loss(
            lambda *a, **kw: functional_call(model, p, a, kw), *(v[None] for v in (x, y, t, noise))
        )[0]

    per_row = vmap(grad(one_row), in_dims=(None, 0, 0, 0, 0))(params, *rows)
    return {n: v.reshape(examples, k, *v.shape[1:]).mean(1) for n, v in per_row.items()}


def _clip(reference: dict[str, torch.Tensor], clip: float):
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in reference.values()))
    weights = (clip / (norms + 1e-6)).clamp(max=1.0)
    return norms, {n: torch.tensordot(weights, v, dims=([0], [0])) for n, v in reference.items()}


def _worst_error(model, expected: dict[str, torch.Tensor]) -> tuple[float, str]:
    total = torch.sqrt(sum(v.pow(2).sum() for v in expected.values()))
    worst, where = 0.0, ""
    for name, p in model.named_parameters():
        ref = expected[name]
        if ref.norm() <= 1e-7 * total:
            continue  # e.g. the key bias under softmax: identically zero, only rounding
        got = p.grad if p.grad is not None else torch.zeros_like(ref)
        err = float((got - ref).norm() / ref.norm())
        if err > worst:
            worst, where = err, name
    return worst, where


def _setup(preset, resolution, channels, k, examples=3):
    model = _unet(preset, resolution, channels)
    rows = _rows(resolution, channels, examples=examples, k=k)
    reference = _reference(model, rows, examples=examples, k=k)
    norms, _ = _clip(reference, 1.0)
    # Between the smallest and the largest norm: some examples clipped, some not.
    clip = float(norms.median())
    return model, rows, reference, clip


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("preset,resolution,channels", PRESETS)
def test_norms_and_clipped_sum_equal_torch_func(preset, resolution, channels, k):
    model, rows, reference, clip = _setup(preset, resolution, channels, k)
    norms, expected = _clip(reference, clip)
    assert (norms > clip).any() and (norms < clip).any()

    engine = BookKeeping(model, max_grad_norm=clip, noise_multiplicity=k)
    _row_loss(engine, *rows).mean().backward()

    assert torch.allclose(engine.last_norms, norms, rtol=TOLERANCE, atol=0)
    worst, where = _worst_error(model, expected)
    assert worst < TOLERANCE, f"{where}: relative error {worst:.2e}"
    if preset != "nano":
        assert any("attentions" in n for n, _ in engine.covered_parameters())
    # The wrapper leaves the model as it found it.
    assert all(p.requires_grad for p in model.parameters())


def test_k_rows_clipped_separately_fails_the_comparison():
    """The naive noise multiplicity (each row clipped, then the K rows averaged)."""
    k = 4
    model, rows, reference, clip = _setup("tiny28", 28, 1, k)
    _, expected = _clip(reference, clip)
    broken = BookKeeping(model, max_grad_norm=clip, noise_multiplicity=1)
    _row_loss(broken, *rows).mean().backward()
    for p in model.parameters():
        p.grad /= k  # rows were scaled as examples; average the K clipped rows
    worst, _ = _worst_error(model, expected)
    assert worst > 10 * TOLERANCE


def test_a_layer_left_out_of_the_norm_fails_the_comparison():
    model, rows, reference, clip = _setup("tiny28", 28, 1, 1)
    _, expected = _clip(reference, clip)
    engine = BookKeeping(model, max_grad_norm=clip)
    # The layer with the largest gradient: its share of each example's norm goes missing.
    biggest = max(reference, key=lambda n: float(reference[n].norm())).rsplit(".", 1)[0]
    on_grad = engine._on_output_grad

    def forget(layer, g):
        before = None if engine._norm2 is None else engine._norm2.clone()
        on_grad(layer, g)
        if layer.name == biggest:
            engine._norm2 -= engine._norm2 - (0 if before is None else before)

    engine._on_output_grad = forget
    _row_loss(engine, *rows).mean().backward()
    worst, _ = _worst_error(model, expected)
    assert worst > 10 * TOLERANCE


@pytest.mark.parametrize("preset,resolution,channels", PRESETS)
def test_every_trainable_parameter_is_in_the_norm(preset, resolution, channels):
    model = _unet(preset, resolution, channels)
    engine = BookKeeping(model, max_grad_norm=1.0)
    covered = sorted(n for n, _ in engine.covered_parameters())
    assert covered == sorted(n for n, _ in model.named_parameters())


def test_layers_without_an_exact_norm_are_refused():
    with pytest.raises(ConfigError, match="BatchNorm2d"):
        BookKeeping(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="groups=2"):
        BookKeeping(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), max_grad_norm=1.0)


def test_plan_picks_ghost_norms_for_few_positions_and_instantiation_for_many():
    lin = nn.Linear(128, 64)
    a, g = torch.zeros(8, 128), torch.zeros(8, 64)  # one position per row (time embedding)
    assert L.plan_layer(lin, a, g, examples=8).norm == "ghost"
    conv = nn.Conv2d(32, 32, 3, padding=1)
    a, g = torch.zeros(8, 32, 32, 32), torch.zeros(8, 32, 32, 32)  # 1024 positions
    plan = L.plan_layer(conv, a, g, examples=8)
    assert plan.norm == "instantiate" and plan.keep == "grads"


@pytest.mark.parametrize("k", [1, 3])
def test_ghost_and_instantiated_norms_agree_per_layer(k):
    """Both norm methods of each layer type against each other on random tensors."""
    torch.manual_seed(0)
    b = 4
    conv = nn.Conv2d(5, 6, 3, padding=1, stride=2)
    a, g = torch.randn(b * k, 5, 9, 9), torch.randn(b * k, 6, 5, 5)
    inst = sum(v.flatten(1).pow(2).sum(1) for v in L.conv2d_grads(conv, a, g, examples=b).values())
    assert torch.allclose(L.conv2d_ghost_norm2(conv, a, g, examples=b), inst, rtol=1e-4)
    lin = nn.Linear(7, 3)
    a, g = torch.randn(b * k, 5, 7), torch.randn(b * k, 5, 3)
    inst = sum(v.flatten(1).pow(2).sum(1) for v in L.linear_grads(lin, a, g, examples=b).values())
    assert torch.allclose(L.linear_ghost_norm2(lin, a, g, examples=b), inst, rtol=1e-4)


def test_a_failed_backward_pass_does_not_poison_the_next_one():
    model, rows, reference, clip = _setup("nano", 16, 1, 1)
    _, expected = _clip(reference, clip)
    engine = BookKeeping(model, max_grad_norm=clip)
    on_grad = engine._on_output_grad

    calls = []

    def explode(layer, g):
        calls.append(layer.name)
        if len(calls) > 1:  # after the first layer queued the end-of-pass callback
            raise RuntimeError("out of memory")
        on_grad(layer, g)

    engine._on_output_grad = explode
    with pytest.raises(RuntimeError, match="out of memory"):
        _row_loss(engine, *rows).mean().backward()
    engine._on_output_grad = on_grad
    model.zero_grad(set_to_none=True)
    _row_loss(engine, *rows).mean().backward()
    worst, where = _worst_error(model, expected)
    assert worst < TOLERANCE, f"{where}: relative error {worst:.2e}"
