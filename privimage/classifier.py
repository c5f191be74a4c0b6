"""Training and inference for the small classifiers (query function, downstream utility).

Neither classifier is trained on sensitive data here: the query classifier learns the
public labels, the downstream classifier learns synthetic images. The fixed epoch count
is the whole model-selection policy, so no real test data ever influences training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from privimage.models import build_classifier


def random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each batch by up to ``pixels`` (reflection-padded): cheap, label-safe jitter."""
    if pixels <= 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (pixels,) * 4, mode="reflect")
    dy, dx = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + h, dx : dx + w]


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
    progress: bool = True,
    desc: str = "classifier",
) -> torch.nn.Module:
    """Train a classifier with Adam and a one-cycle schedule; returns it in eval mode.

    Augmentation: random shifts of up to 2 pixels, and horizontal flips when ``hflip``
    (right for natural images, wrong for digits and letters).

    Args:
        images: float images in [-1, 1], ``(N, C, H, W)``.
        labels: int64 labels ``(N,)``.
        arch: ``"cnn"`` or ``"resnet"`` (see :func:`privimage.models.build_classifier`).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_classifier(
        arch, in_channels=images.shape[1], num_classes=num_classes, width=width
    ).to(device)
    # channels_last is ~1.4x faster for these convolutions on CPU (measured, 2 cores).
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
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
            x = random_shift(images[idx], 2, g)
            if hflip:
                flip = torch.rand(len(x), generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            y = labels[idx].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
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
    bar.close()
    return model.eval()


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, images: torch.Tensor, *, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Logits for float images in [-1, 1], computed in batches, returned on CPU."""
    model.eval()
    out = [
        model(images[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")
