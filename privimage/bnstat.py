"""BN-statistics synthesis (Soufleri et al. 2022), the math apart from any I/O.

A classifier with BatchNorm layers is trained on the sensitive data. For every BN layer
and every class, the per-channel mean and variance of the layer's *input* over that
class's training images are recorded (:func:`classwise_bn_statistics`). Images are then
optimised from Gaussian noise, one class at a time, until the batch statistics at every
BN layer match that class's recorded ones, in the style of DeepInversion (Yin et al.
2020): the loss (:func:`synthesis_loss`) is

    w_bn * sum_l (||mu_l(x) - mu_l,c||_2 + ||var_l(x) - var_l,c||_2)
    + w_ce * CE(f(x), c) + w_tv * TV(x) + w_l2 * mean(x^2)

on a randomly shifted and mirrored copy of the batch each step, with Adam and the pixels
clipped to [-1, 1]. **This is not differentially private**: the recorded statistics and
the classifier are exact functions of the sensitive data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from privimage.config.schema import SynthesisWeights


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The model's ``BatchNorm2d`` layers with their names, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


@contextmanager
def capture_bn_inputs(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward pass stores each BN layer's input by layer name."""
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in bn_layers(model):

        def hook(_module, args, _name=name):
            inputs[_name] = args[0]

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield inputs
    finally:
        for h in handles:
            h.remove()


@dataclass
class ClassStatistics:
    """Per BN layer: ``mean[layer]`` and ``var[layer]``, each ``(num_classes, channels)``
    float64, the exact (population) statistics of the layer's input per class."""

    mean: dict[str, torch.Tensor]
    var: dict[str, torch.Tensor]
    counts: torch.Tensor  # images per class

    def to_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "counts": self.counts}

    @classmethod
    def from_dict(cls, d: dict) -> ClassStatistics:
        return cls(mean=d["mean"], var=d["var"], counts=d["counts"])

    @classmethod
    def from_running_stats(cls, model: nn.Module, num_classes: int) -> ClassStatistics:
        """Every class gets the BN layers' running (all-class) statistics.

        This is what an attacker who holds only a trained BN model knows; matching them is
        DeepInversion's model inversion (used by the evaluation's memorisation check).
        """
        mean, var = {}, {}
        for name, layer in bn_layers(model):
            mean[name] = layer.running_mean.detach().double().cpu().expand(num_classes, -1)
            var[name] = layer.running_var.detach().double().cpu().expand(num_classes, -1)
        return cls(mean=mean, var=var, counts=torch.zeros(num_classes, dtype=torch.long))


@torch.no_grad()
def classwise_bn_statistics(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> ClassStatistics:
    """Per-class, per-channel mean and variance of every BN layer's input (eval mode).

    Sums of ``x`` and ``x^2`` over images and positions are accumulated in float64, batch
    by batch, so the result equals the statistics of all of a class's images at once.

    Args:
        model: The trained classifier (put in eval mode here, so BN uses its running
            statistics and every image's activations are independent of its batch).
        images: float images in [-1, 1], ``(N, C, H, W)``.
        labels: int64 ``(N,)``.
    """
    model.to(device).eval()
    sums: dict[str, torch.Tensor] = {}
    sq_sums: dict[str, torch.Tensor] = {}
    positions: dict[str, torch.Tensor] = {}
    counts = torch.bincount(labels, minlength=num_classes).double()
    with capture_bn_inputs(model) as inputs:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            model(x)
            onehot = F.one_hot(y, num_classes).double()  # (B, K)
            for name, act in inputs.items():
                a = act.double()
                per_image = a.sum(dim=(2, 3))  # (B, C)
                per_image_sq = a.square().sum(dim=(2, 3))
                if name not in sums:
                    c = a.shape[1]
                    sums[name] = torch.zeros(num_classes, c, dtype=torch.float64, device=device)
                    sq_sums[name] = torch.zeros_like(sums[name])
                    positions[name] = torch.tensor(a.shape[2] * a.shape[3], dtype=torch.float64)
                sums[name] += onehot.T @ per_image
                sq_sums[name] += onehot.T @ per_image_sq
    mean, var = {}, {}
    for name in sums:
        n = (counts * positions[name]).to(device)[:, None].clamp(min=1)
        mean[name] = (sums[name] / n).cpu()
        var[name] = (sq_sums[name] / n - (sums[name] / n).square()).clamp(min=0).cpu()
    return ClassStatistics(mean=mean, var=var, counts=counts.long())


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic TV), per batch."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
        x[..., :, 1:] - x[..., :, :-1]
    ).abs().mean()


def synthesis_settings(weights: SynthesisWeights) -> dict:
    """The synthesis fields of ``weights`` alone (``cfg.bnstat`` also holds the teacher's)."""
    return {f.name: getattr(weights, f.name) for f in fields(SynthesisWeights)}


def synthesis_loss(
    model: nn.Module,
    x: torch.Tensor,
    target: int,
    stats: ClassStatistics,
    weights: SynthesisWeights,
    inputs: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one step on (already augmented) images ``x`` of class ``target``.

    ``inputs`` is the dict filled by :func:`capture_bn_inputs` during the forward pass
    done here. Returns the loss and its parts (floats, for logging and tests).
    """
    logits = model(x)
    bn_loss = x.new_zeros(())
    for name, act in inputs.items():
        mu = act.mean(dim=(0, 2, 3))
        var = act.var(dim=(0, 2, 3), unbiased=False)
        ref_mu = stats.mean[name][target].to(act)
        ref_var = stats.var[name][target].to(act)
        bn_loss = (
            bn_loss
            + torch.linalg.vector_norm(mu - ref_mu)
            + torch.linalg.vector_norm(var - ref_var)
        )
    labels = torch.full((len(x),), target, dtype=torch.long, device=x.device)
    ce = F.cross_entropy(logits, labels)
    tv = total_variation(x)
    l2 = x.square().mean()
    loss = (
        weights.bn_weight * bn_loss
        + weights.ce_weight * ce
        + weights.tv_weight * tv
        + weights.l2_weight * l2
    )
    parts = {
        "loss": float(loss.detach()),
        "bn": float(bn_loss.detach()),
        "ce": float(ce.detach()),
        "tv": float(tv.detach()),
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
    }
    return loss, parts


def _augment(x: torch.Tensor, weights: SynthesisWeights, g: torch.Generator) -> torch.Tensor:
    p = weights.jitter_pixels
    if p > 0:
        dy, dx = torch.randint(-p, p + 1, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if weights.flip and torch.rand((), generator=g) < 0.5:
        x = x.flip(-1)
    return x


def synthesize(
    model: nn.Module,
    stats: ClassStatistics,
    target: int,
    *,
    num_images: int,
    image_shape: tuple[int, int, int],
    seed: int,
    weights: SynthesisWeights,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> torch.Tensor:
    """Optimise ``num_images`` images of class ``target`` from noise; a function of
    ``seed`` (start noise and augmentation draws) and the inputs only.

    Returns:
        float images in [-1, 1], ``(num_images, *image_shape)``, on the CPU.
    """
    model.to(device).eval()
    # Only the images are optimised; the flags are restored so a caller's model (the
    # evaluation's classifiers) can still be differentiated afterwards.
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_images, *image_shape, generator=g).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=weights.lr, betas=(0.5, 0.9))
    with capture_bn_inputs(model) as inputs:
        for step in range(weights.steps):
            # Cosine decay: large moves to leave the noise, small ones to settle the match.
            lr = 0.5 * weights.lr * (1 + math.cos(math.pi * step / weights.steps))
            for group in opt.param_groups:
                group["lr"] = lr
            loss, parts = synthesis_loss(
                model, _augment(x, weights, g), target, stats, weights, inputs
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(-1.0, 1.0)
            if on_step is not None:
                on_step(step, parts)
    for p, flag in zip(model.parameters(), flags, strict=True):
        p.requires_grad_(flag)
    return x.detach().cpu()
