"""Gradient inversion (Geiping et al. 2020, "Inverting Gradients"): from one gradient of a
classifier on one labelled example, reconstruct the example.

The attacker knows the model, the label and the gradient ``g`` of the loss with respect to
every parameter. Starting from Gaussian noise, it minimises

    1 - cos(grad_theta L(f(x), y), g) + w_tv * TV(x)

over the image ``x`` with Adam (step decay at 3/8, 5/8 and 7/8 of the steps, as in the
paper), projecting onto the pixel box [-1, 1] after every step. The cosine compares the
direction of the whole gradient, concatenated over layers, which is what makes the attack
work for trained networks as well as untrained ones.

Used by the evaluation as a leakage measurement: a high PSNR/SSIM between the
reconstruction and the true image means a gradient of that model gives the image away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from privimage.bnstat import total_variation


def example_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool = False
) -> list[torch.Tensor]:
    """Gradient of the cross-entropy of ``model`` on the batch ``(x, y)`` per parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def cosine_gradient_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """``1 - cos`` between two gradients, each a list of per-parameter tensors."""
    dot = sum((x * y).sum() for x, y in zip(a, b, strict=True))
    na = torch.sqrt(sum(x.square().sum() for x in a))
    nb = torch.sqrt(sum(y.square().sum() for y in b))
    return 1 - dot / (na * nb + 1e-12)


def invert_gradient(
    model: nn.Module,
    target: list[torch.Tensor],
    label: torch.Tensor,
    *,
    image_shape: tuple[int, int, int],
    steps: int = 500,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    signed: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, list[float]]:
    """Reconstruct one image from its gradient ``target`` (as from :func:`example_gradient`).

    ``signed``: step along the sign of the image gradient, as the paper's released attack
    does. ``bench/gradient_attack.py`` measured no consistent gain from it on the
    evaluation's CNNs (MNIST and CIFAR-10, 300-1500 steps), so it is off by default.

    The model is used in eval mode (BatchNorm then uses its running statistics, so the
    gradient of one example does not depend on a batch) and is not modified.

    Returns:
        ``(image, losses)``: the reconstruction in [-1, 1], shape ``(1, *image_shape)`` on
        the CPU, and the gradient distance at every step.
    """
    model = model.to(device).eval()
    target = [t.to(device).detach() for t in target]
    label = label.to(device).reshape(1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *image_shape, generator=g).mul_(0.5).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    losses = []
    for _ in range(steps):
        grad = example_gradient(model, x, label, create_graph=True)
        distance = cosine_gradient_distance(grad, target)
        loss = distance + tv_weight * total_variation(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if signed:
            x.grad.sign_()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(-1.0, 1.0)
        losses.append(float(distance.detach()))
    model.zero_grad(set_to_none=True)  # the attack's backward passes touched .grad
    return x.detach().cpu(), losses
