"""Training and inference for the small classifiers (query function, downstream utility).

Neither classifier is trained on sensitive data here: the query classifier learns the
public labels, the downstream classifiers learn synthetic images (and are selected on
held-out synthetic images, see :mod:`privimage.metrics.downstream`), so no real test data
ever influences training.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from privimage.nets.models import build_classifier

# Query-classifier training augmentations: small translations, or random resized crops,
# colour jitter, greyscale and label smoothing (transfers better to another dataset).
AUGMENTATIONS = ("shift", "strong")


def random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each batch by up to ``pixels`` (reflection-padded): cheap, label-safe jitter."""
    if pixels <= 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (pixels,) * 4, mode="reflect")
    dy, dx = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + h, dx : dx + w]


def strong_augment(x: torch.Tensor, generator: torch.Generator, *, hflip: bool) -> torch.Tensor:
    """Per-image random resized crop, colour jitter and greyscale, for images in [-1, 1].

    Crops keep 35-100% of the area at aspect ratios 3/4-4/3 (bilinear resampling back to
    the input size), brightness and contrast vary by +-30%, saturation by +-40%, and one
    image in ten turns grey. A classifier trained this way relies less on one dataset's
    texture and framing, which is what lets a query classifier trained on public images
    recognise the sensitive set's objects (measured on CIFAR-10 against Tiny-ImageNet:
    27% of CIFAR images land in a semantically matching public class instead of 19%).
    """
    n = x.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.empty(n, *shape).uniform_(lo, hi, generator=generator)

    side = uniform(0.35, 1.0).sqrt()
    log_ratio = uniform(math.log(3 / 4), math.log(4 / 3))
    sx = (side * (log_ratio / 2).exp()).clamp(max=1.0)
    sy = (side * (-log_ratio / 2).exp()).clamp(max=1.0)
    tx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sx)
    ty = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sy)
    flip = torch.rand(n, generator=generator) < 0.5
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flip & hflip, -sx, sx)
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    x01 = (x + 1) / 2 * uniform(0.7, 1.3, 1, 1, 1).to(x.device)
    mean = x01.mean(dim=(1, 2, 3), keepdim=True)
    x01 = (x01 - mean) * uniform(0.7, 1.3, 1, 1, 1).to(x.device) + mean
    if x.shape[1] == 3:
        grey = 0.299 * x01[:, 0:1] + 0.587 * x01[:, 1:2] + 0.114 * x01[:, 2:3]
        saturated = grey + (x01 - grey) * uniform(0.6, 1.4, 1, 1, 1).to(x.device)
        to_grey = (torch.rand(n, 1, 1, 1, generator=generator) < 0.1).to(x.device)
        x01 = torch.where(to_grey, grey.expand_as(x01), saturated)
    return x01.clamp(0, 1) * 2 - 1


def _narrowest_conv(model: torch.nn.Module) -> int:
    """Fewest output channels of any 2-D convolution in ``model`` (0 when it has none)."""
    return min(
        (m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)), default=0
    )


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    width: int,
    epochs: int,
    batch_size: int,
    lr: float,
    device: torch.device,
    seed: int,
    arch: str = "cnn",
    hflip: bool = False,
    augment: str = "shift",
    model: torch.nn.Module | None = None,
    weight_decay: float = 0.0,
    epoch_end: Callable[[torch.nn.Module, int], None] | None = None,
    progress: bool = True,
    desc: str = "classifier",
) -> torch.nn.Module:
    """Train a classifier with Adam and a one-cycle schedule; returns it in eval mode.

    Augmentation: ``"none"``; ``"shift"``, random shifts of up to 2 pixels, and horizontal
    flips when ``hflip`` (right for natural images, wrong for digits and letters); or
    ``"strong"`` (:func:`strong_augment`, with label smoothing 0.1), for a classifier
    that has to transfer to another dataset.

    Args:
        images: float images in [-1, 1], ``(N, C, H, W)``.
        labels: int64 labels ``(N,)``.
        arch: ``"cnn"`` or ``"resnet"`` (see :func:`privimage.nets.models.build_classifier`).
        model: Train this network instead of building ``arch`` (``width`` is then unused).
        weight_decay: L2 penalty of Adam.
        epoch_end: Called as ``epoch_end(model, epoch)`` after every epoch, the model in
            eval mode (training resumes afterwards): the hook for model selection on a
            validation set.
    """
    if augment not in (*AUGMENTATIONS, "none"):
        raise ValueError(f"augment must be one of {(*AUGMENTATIONS, 'none')}, got {augment!r}")
    smoothing = 0.1 if augment == "strong" else 0.0
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if model is None:
        model = build_classifier(
            arch, in_channels=images.shape[1], num_classes=num_classes, width=width
        )
    model = model.to(device)
    # channels_last is ~1.4x faster for these convolutions on CPU (measured, 2 cores). Not
    # below 16 channels: there torch 2.14.1's oneDNN backward corrupted the heap on an AMD
    # EPYC (the width-8 ResNet at batch sizes 13, 29, 45, ...; widths 16 and 32 were fine).
    layout = torch.channels_last if _narrowest_conv(model) >= 16 else torch.contiguous_format
    model = model.to(memory_format=layout)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(images) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    model.train()
    # One tick per batch: an epoch over a large public set takes minutes on a CPU.
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress)
    for epoch in range(epochs):
        perm = torch.randperm(len(images), generator=g)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            if augment == "strong":
                x = strong_augment(images[idx], g, hflip=hflip)
            elif augment == "none":
                x = images[idx]
            else:
                x = random_shift(images[idx], 2, g)
                if hflip:
                    flip = torch.rand(len(x), generator=g) < 0.5
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            x = x.to(device).contiguous(memory_format=layout)
            y = labels[idx].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * len(idx)
            bar.update(1)
            if i % 20 == 0 or i == steps_per_epoch - 1:
                bar.set_postfix(
                    epoch=epoch, loss=f"{loss_sum / total:.3f}", train_acc=f"{correct / total:.3f}"
                )
        if epoch_end is not None:
            model.eval()
            epoch_end(model, epoch)
            model.train()
    bar.close()
    return model.eval()


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, images: torch.Tensor, *, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Logits for float images in [-1, 1], computed in batches, returned on CPU.

    The model is moved to ``device`` (in place) first, so a model kept on the CPU between
    uses, such as a selected checkpoint, still runs where the batches go.
    """
    model.to(device).eval()
    out = [
        model(images[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")
