"""Opacus' per-sample gradients of the real UNet presets equal torch.func's.

Guards the known trap: Opacus' hooks return zero per-sample gradients for conv layers
whose input is channels_last, which is what diffusers' attention blocks produce.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from opacus import GradSampleModule
from torch.func import functional_call, grad, vmap

from privimage.config.schema import ModelConfig
from privimage.diffusion.ddpm import add_noise, linear_alphas_cumprod
from privimage.nets.models import build_unet, make_opacus_safe


@pytest.fixture
def model_config(compose):
    """``model_config(preset, **overrides)``: the preset's composed ModelConfig."""

    def make(preset: str, **overrides) -> ModelConfig:
        return replace(compose([f"model={preset}"]).model, **overrides)

    return make


def _batch(resolution: int, channels: int, batch: int = 3):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, channels, resolution, resolution, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([10, 500, 990])[:batch]
    y = torch.tensor([0, 3, 9])[:batch]
    return add_noise(x0, noise, t, linear_alphas_cumprod(1000)).float(), noise, t, y


def _relative_errors(model: torch.nn.Module, resolution: int, channels: int) -> dict[str, float]:
    x_t, noise, t, y = _batch(resolution, channels)

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, ti, yi, ni):
        out = functional_call(model, p, (xi[None], ti[None]), {"class_labels": yi[None]}).sample
        return (out - ni[None]).pow(2).mean()

    reference = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))(params, x_t, t, y, noise)

    gsm = GradSampleModule(model, loss_reduction="sum")
    out = gsm(x_t, t, class_labels=y).sample
    (out - noise).pow(2).flatten(1).mean(1).sum().backward()
    total = torch.sqrt(sum(r.pow(2).sum() for r in reference.values()))
    errors = {}
    for name, p in gsm.named_parameters():
        ref = reference[name.removeprefix("_module.")]
        if ref.norm() <= 1e-7 * total:
            # e.g. the key bias under softmax: its true gradient is identically zero, so
            # what autograd returns is rounding noise with no meaningful relative error.
            continue
        errors[name] = float((p.grad_sample - ref).norm() / ref.norm())
    gsm._close()
    return errors


def test_default_unet_has_attention_and_exact_per_sample_grads(compose):
    """The model the default config trains with DP: attention included, to 1e-4."""
    cfg = compose([])
    assert cfg.model.attention, "the default preset is meant to exercise attention"
    torch.manual_seed(0)
    model = build_unet(
        cfg.model,
        resolution=cfg.data.resolution,
        channels=cfg.data.channels,
        num_classes=10,
    )
    assert any("attentions" in name for name, _ in model.named_parameters())
    make_opacus_safe(model)
    errors = _relative_errors(model, cfg.data.resolution, cfg.data.channels)
    assert any("attentions" in name for name in errors), "attention weights were compared"
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, f"{worst}: relative error {errors[worst]:.2e}"


@pytest.mark.parametrize("preset,resolution,channels", [("small32", 32, 3), ("nano", 16, 1)])
def test_unet_presets_per_sample_grads_match_torch_func(preset, resolution, channels, model_config):
    torch.manual_seed(0)
    model = build_unet(
        model_config(preset), resolution=resolution, channels=channels, num_classes=10
    )
    make_opacus_safe(model)
    errors = _relative_errors(model, resolution, channels)
    assert errors, "no parameter was compared"
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, f"{worst}: relative error {errors[worst]:.2e}"


def test_attention_unet_is_made_safe_for_opacus(model_config):
    """With attention blocks, make_opacus_safe restores exact per-sample gradients."""
    torch.manual_seed(0)
    model = build_unet(
        model_config("nano", attention=True), resolution=16, channels=1, num_classes=10
    )
    make_opacus_safe(model)
    errors = _relative_errors(model, 16, 1)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, f"{worst}: relative error {errors[worst]:.2e}"
