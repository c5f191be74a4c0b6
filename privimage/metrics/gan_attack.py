"""The GAN-based model-inversion attack (GMI; Zhang et al. 2020), as the BN-statistics
paper (Soufleri et al. 2022) uses it beside gradient matching and model memorisation.

A small DCGAN trained on the *public* data is the image prior. To recover what a
classifier knows of class c, latents z are optimised so that the generated image G(z)
is both realistic to the discriminator (the prior loss, ``softplus(-D(G(z)))``) and
assigned class c by the attacked classifier (the identity loss, its cross-entropy,
weighted by ``identity_weight``). The GAN never sees sensitive data, and is cached
(:func:`public_gan`) keyed on the public images themselves, like the query classifier.

Success is measured as GMI does, by *attack accuracy*: how often an independent
evaluation classifier assigns the recovered images their target class. Against a
classifier that knows its classes, the attack should recover them (the positive
control); against one with random weights, nothing (chance). :func:`gmi_attack` runs it
in the evaluation against the CNN trained on real data (the positive control) and the one
trained on synthetic data, and measures how close the recovered images come to sensitive
training images beside two baselines: real held-out images, and the prior's own samples
from random latents (what the public data alone gives an attacker).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from privimage import data
from privimage.config.schema import DataConfig, EvaluateConfig
from privimage.data.cache import cache_key
from privimage.io.atomic import torch_save
from privimage.metrics import downstream as ds
from privimage.metrics import leakage
from privimage.metrics.attacks import PIXEL_METRICS, closeness
from privimage.nets.classifier import accuracy, predict_logits, train_classifier

log = logging.getLogger(__name__)


class Generator(nn.Module):
    """DCGAN generator: z -> (C, R, R) in [-1, 1], R divisible by 4 (28, 32)."""

    def __init__(self, *, channels: int, resolution: int, z_dim: int = 64, width: int = 64):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"the GAN needs a resolution divisible by 4, got {resolution}")
        self.z_dim, self.start = z_dim, resolution // 4
        self.project = nn.Sequential(
            nn.Linear(z_dim, 2 * width * self.start**2, bias=False),
            nn.BatchNorm1d(2 * width * self.start**2),  # public data only: no DP here
            nn.ReLU(),
        )
        self.body = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(len(z), -1, self.start, self.start)
        return self.body(h)


class Discriminator(nn.Module):
    """DCGAN discriminator: (C, R, R) -> one realness logit."""

    def __init__(self, *, channels: int, resolution: int, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * width * (resolution // 4) ** 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(1)


def train_gan(
    images: torch.Tensor,
    *,
    steps: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 2e-4,
    z_dim: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[Generator, Discriminator]:
    """A DCGAN (non-saturating loss, Adam(0.5, 0.999)) on uint8 ``images`` (N, C, R, R)."""
    torch.manual_seed(seed)
    _, channels, resolution, _ = images.shape
    gen = Generator(channels=channels, resolution=resolution, z_dim=z_dim).to(device)
    disc = Discriminator(channels=channels, resolution=resolution).to(device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.999))
    g = torch.Generator().manual_seed(seed)
    real_all = images.to(torch.float32) / 127.5 - 1.0
    for _ in tqdm(range(steps), desc="GAN prior (public data)", disable=not progress):
        real = real_all[torch.randint(0, len(real_all), (batch_size,), generator=g)].to(device)
        z = torch.randn(batch_size, z_dim, generator=g).to(device)
        fake = gen(z)
        loss_d = F.softplus(-disc(real)).mean() + F.softplus(disc(fake.detach())).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = F.softplus(-disc(fake)).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    return gen.eval().requires_grad_(False), disc.eval().requires_grad_(False)


def public_gan(
    spec: DataConfig,
    public: data.ImageDataset,
    *,
    cache_dir: str | os.PathLike,
    steps: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[Generator, Discriminator]:
    """The GAN prior of ``public`` (described by ``spec``), trained once and cached under
    ``<cache_dir>/gan_priors``, keyed on the preprocessed images, ``steps`` and ``seed``."""
    key = cache_key({"public": data.content_key(spec), "steps": steps, "seed": seed, "v": 1})
    path = Path(os.path.expanduser(os.fspath(cache_dir))) / "gan_priors" / f"{key}.pt"
    _, channels, resolution, _ = public.train.images.shape
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        gen = Generator(channels=channels, resolution=resolution)
        disc = Discriminator(channels=channels, resolution=resolution)
        gen.load_state_dict(saved["generator"])
        disc.load_state_dict(saved["discriminator"])
        log.info("GAN prior reused from %s", path)
    else:
        gen, disc = train_gan(public.train.images, steps=steps, seed=seed, device=device)
        path.parent.mkdir(parents=True, exist_ok=True)
        weights = {"generator": gen.cpu().state_dict(), "discriminator": disc.cpu().state_dict()}
        torch_save(weights, path)
    return gen.to(device).eval().requires_grad_(False), disc.to(device).eval().requires_grad_(False)


def invert(
    classifier: nn.Module,
    gen: Generator,
    disc: Discriminator,
    target: int,
    *,
    num_images: int,
    steps: int,
    seed: int,
    identity_weight: float = 100.0,
    lr: float = 0.02,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``num_images`` images of class ``target`` recovered from ``classifier`` through
    the GAN prior: floats in [-1, 1], ``(num_images, C, R, R)`` on the CPU."""
    classifier = classifier.to(device).eval()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num_images, gen.z_dim, generator=g).to(device).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    labels = torch.full((num_images,), target, dtype=torch.long, device=device)
    for _ in range(steps):
        x = gen(z)
        prior = F.softplus(-disc(x)).mean()
        identity = F.cross_entropy(classifier(x), labels)
        loss = prior + identity_weight * identity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return gen(z).cpu()


def gan_inversion(
    classifier: nn.Module,
    gen: Generator,
    disc: Discriminator,
    *,
    num_classes: int,
    images_per_class: int,
    steps: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> data.ImageSplit:
    """``images_per_class`` recovered images of every class (seed ``seed + class``), as
    uint8 images labelled with their target class."""
    images = torch.cat(
        [
            invert(
                classifier,
                gen,
                disc,
                c,
                num_images=images_per_class,
                steps=steps,
                seed=seed + c,
                device=device,
            )
            for c in range(num_classes)
        ]
    )
    return _labelled(images, num_classes, images_per_class)


def _labelled(images: torch.Tensor, num_classes: int, per_class: int) -> data.ImageSplit:
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return data.ImageSplit(pixels, torch.arange(num_classes).repeat_interleave(per_class))


def evaluation_classifier(
    train: data.ImageSplit,
    ev: EvaluateConfig,
    *,
    num_classes: int,
    device: torch.device,
    seed: int,
) -> nn.Module:
    """GMI's evaluation classifier: trained on the whole sensitive training split, twice
    as wide as the attacked CNNs and from another seed, so that it judges the recovered
    images independently of the models that produced them."""
    return train_classifier(
        train.as_float(),
        train.labels,
        num_classes=num_classes,
        width=2 * ev.classifier_width,
        epochs=ev.gan_attack_evaluator_epochs,
        batch_size=ev.classifier_batch_size,
        lr=ev.classifier_lr,
        device=device,
        seed=seed + 1,
        arch=ev.classifier_arch,
        hflip=ev.classifier_hflip,
        desc="GMI evaluation classifier (real training images)",
    )


def gmi_attack(
    ev: EvaluateConfig,
    models: dict[str, ds.Selected],
    *,
    public: DataConfig,
    cache_dir: str | os.PathLike,
    train: data.ImageSplit,
    train_pixels: np.ndarray,
    heldout: data.ImageSplit,
    held_nn: dict[str, np.ndarray],
    num_classes: int,
    n_near: int,
    device: torch.device,
    seed: int,
) -> tuple[dict, list[torch.Tensor], list[str]]:
    """GMI against each CNN of ``models`` (``"real/cnn"``, the control, and ``"cnn"``),
    through the prior of ``public`` (:func:`public_gan`, drawn at the shape of ``train``)
    and scored by :func:`evaluation_classifier`.

    For each CNN: the attack accuracy (the share of recovered images that ``evaluator``
    assigns their target class), the share the attacked CNN itself assigns it, and how
    close they come to sensitive training images (:func:`~privimage.metrics.attacks.
    closeness`). Baselines: the prior's samples from random latents with targets dealt
    round-robin (the attack accuracy of guessing from public data alone) and the held-out
    real images. Returns the summary, picture rows (one image per class) and labels.
    """
    k = ev.gan_attack_images_per_class
    _, channels, resolution, _ = train.images.shape
    # The prior is drawn at the sensitive images' shape, whatever public.resolution says.
    spec = replace(public, resolution=resolution, channels=channels)
    gen, disc = public_gan(
        spec,
        data.load(spec, cache_dir=cache_dir),
        cache_dir=cache_dir,
        steps=ev.gan_attack_prior_steps,
        seed=seed,
        device=device,
    )
    evaluator = evaluation_classifier(train, ev, num_classes=num_classes, device=device, seed=seed)

    def score(split: data.ImageSplit, classifier: nn.Module) -> float:
        logits = predict_logits(classifier, split.as_float(), batch_size=256, device=device)
        return accuracy(logits, split.labels)

    results = {
        "evaluator": {
            "trained_on": f"all {len(train)} sensitive training images",
            "heldout_accuracy": score(heldout, evaluator),
        }
    }
    rows, labels = [], []
    first = torch.arange(num_classes) * k  # one image per class in the picture
    cases = {
        key: gan_inversion(
            models[key].model,
            gen,
            disc,
            num_classes=num_classes,
            images_per_class=k,
            steps=ev.gan_attack_steps,
            seed=seed,
            device=device,
        )
        for key in ("real/cnn", "cnn")
        if key in models
    }
    with torch.no_grad():
        z = torch.randn(num_classes * k, gen.z_dim, generator=torch.Generator().manual_seed(seed))
        cases["prior_only"] = _labelled(gen(z.to(device)).cpu(), num_classes, k)
    for key, recovered in cases.items():
        summary, nearest_index = closeness(
            recovered, train, train_pixels, held_nn, ev, n_near=n_near, device=device
        )
        results[key] = {"attack_accuracy": score(recovered, evaluator), **summary}
        if key in models:
            results[key]["classified_as_target"] = score(recovered, models[key].model)
        who = "real" if key.startswith("real/") else "synthetic"
        who = f"recovered from\n{who}-trained CNN" if key in models else "GAN prior alone\n(random)"
        nearest_train = train.images[torch.from_numpy(nearest_index[first.numpy()])]
        rows += [recovered.images[first], nearest_train]
        labels += [who, "nearest sensitive\ntraining image"]
    results["heldout_real"] = {m: leakage.summary(held_nn[m]) for m in PIXEL_METRICS}
    return results, rows, labels
