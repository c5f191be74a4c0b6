"""The evaluation's privacy attacks, and the nearest-training-image statistics they share.

:func:`neighbour_stats` measures how close a set of images comes to the sensitive
training set (pixel and feature distance, SSIM, PSNR, near-copy score).
:func:`gradient_attack` inverts one gradient per image of a classifier's training data
(Geiping et al. 2020); :func:`model_memorisation` inverts images out of a classifier
DeepInversion-style and measures how close they come to training images. Both compare
against the held-out real baseline the evaluate stage passes in.
"""

from __future__ import annotations

import numpy as np
import torch

from privimage import bnstat, data
from privimage.config.schema import EvaluateConfig, SynthesisWeights
from privimage.diffusion import to_uint8
from privimage.metrics import downstream as ds
from privimage.metrics import leakage
from privimage.metrics.inversion import example_gradient, invert_gradient
from privimage.metrics.neighbours import nearest
from privimage.nets.classifier import accuracy

# The pixel-space statistics of neighbour_stats (feature_l2 needs Inception features).
PIXEL_METRICS = ("pixel_l2", "ssim", "psnr", "near_copy_score")


def neighbour_stats(
    queries: data.ImageSplit,
    query_feats: np.ndarray | None,
    train: data.ImageSplit,
    train_pixels: np.ndarray,
    ref_feats: np.ndarray,
    *,
    alpha: float,
    n_near: int,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Nearest-training-image statistics of one query set (synthetic or held-out), with
    the ``n_near`` nearest training images behind the near-copy score. Without
    ``query_feats`` the Inception-feature distance is left out."""
    dist, idx = nearest(
        leakage.pixel_vectors(queries.images), train_pixels, n=n_near, device=device
    )
    neighbours = train.images[torch.from_numpy(idx[:, 0])]
    stats = {}
    if query_feats is not None:
        feat_dist, _ = nearest(query_feats, ref_feats, n=1, device=device)
        stats["feature_l2"] = feat_dist[:, 0]
    return {
        "pixel_l2": dist[:, 0],
        **stats,
        "ssim": leakage.ssim(queries.images, neighbours),
        "psnr": leakage.psnr(queries.images, neighbours),
        "near_copy_score": leakage.near_copy_score(dist, alpha=alpha),
        "nearest_index": idx[:, 0],
    }


def closeness(
    images: data.ImageSplit,
    train: data.ImageSplit,
    train_pixels: np.ndarray,
    held_nn: dict[str, np.ndarray],
    ev: EvaluateConfig,
    *,
    n_near: int,
    device: torch.device,
) -> tuple[dict, np.ndarray]:
    """How close attack outputs come to the sensitive training set, beside the held-out
    baseline: the pixel statistics of :func:`neighbour_stats` summarised, the near-copy
    count, and the share nearer than the median held-out real image (about 0.5 means no
    closer than unseen data). Returns the summary and each image's nearest training index."""
    stats = neighbour_stats(
        images,
        None,
        train,
        train_pixels,
        None,
        alpha=ev.near_copy_alpha,
        n_near=n_near,
        device=device,
    )
    summary = {
        "images": len(images),
        **{m: leakage.summary(stats[m]) for m in PIXEL_METRICS},
        "near_copies": int((stats["near_copy_score"] < ev.near_copy_threshold).sum()),
        "nearer_than_heldout_median": float(
            (stats["pixel_l2"] < np.median(held_nn["pixel_l2"])).mean()
        ),
    }
    return summary, stats["nearest_index"]


def gradient_attack(
    ev: EvaluateConfig,
    models: dict[str, ds.Selected],
    cases: dict[str, data.ImageSplit],
    train: data.ImageSplit,
    train_pixels: np.ndarray,
    device: torch.device,
    seed: int,
) -> tuple[dict, list[torch.Tensor], list[str]]:
    """Invert one gradient per image of each model's own training data.

    ``cases`` maps a model key (``"real/cnn"``, ``"cnn"``) to images from its training
    set. Each reconstruction is compared with the true image (did the attack work?) and
    with its nearest sensitive training image (what does it reveal of sensitive data?).
    Returns the summary, picture rows and their labels.
    """
    results, rows, labels = {}, [], []
    for key, split in cases.items():
        model = models[key].model.to(device).eval()
        recons = []
        images = split.as_float()
        for i in range(len(split)):
            x = images[i : i + 1].to(device)
            y = split.labels[i : i + 1].to(device)
            target = example_gradient(model, x, y)
            r, _ = invert_gradient(
                model,
                target,
                y,
                image_shape=tuple(split.images.shape[1:]),
                steps=ev.gradient_attack_steps,
                seed=seed + i,
                device=device,
            )
            recons.append(r)
        recon = to_uint8(torch.cat(recons))
        _, idx = nearest(leakage.pixel_vectors(recon), train_pixels, n=1, device=device)
        nearest_train = train.images[torch.from_numpy(idx[:, 0])]
        results[key] = {
            "images": len(split),
            "psnr_to_true_image": leakage.summary(leakage.psnr(recon, split.images)),
            "ssim_to_true_image": leakage.summary(leakage.ssim(recon, split.images)),
            "psnr_to_nearest_sensitive": leakage.summary(leakage.psnr(recon, nearest_train)),
            "ssim_to_nearest_sensitive": leakage.summary(leakage.ssim(recon, nearest_train)),
        }
        who = "real" if key.startswith("real/") else "synthetic"
        rows += [split.images, recon, nearest_train]
        labels += [
            f"{who} training image",
            f"from {who}-trained\nCNN's gradient",
            "nearest sensitive\ntraining image",
        ]
    return results, rows, labels


def model_memorisation(
    ev: EvaluateConfig,
    models: dict[str, ds.Selected],
    train: data.ImageSplit,
    train_pixels: np.ndarray,
    held_nn: dict[str, np.ndarray],
    *,
    num_classes: int,
    n_near: int,
    device: torch.device,
    seed: int,
) -> tuple[dict, list[torch.Tensor], list[str]]:
    """Invert images from each CNN and measure how close they come to training images.

    A classifier that memorised its training images can give them back under model
    inversion. Each CNN (``"cnn"``, trained on synthetic data; ``"real/cnn"``, the
    positive control trained on real data) is inverted DeepInversion-style: per class,
    images are optimised from noise towards the class under the CNN's own running BN
    statistics (:meth:`~privimage.bnstat.ClassStatistics.from_running_stats`), with the
    synthesizer's priors. Their nearest sensitive training images are then measured as
    the synthetic images are, beside the held-out real baseline.
    """
    k = ev.model_inversion_images_per_class
    weights = SynthesisWeights(
        steps=ev.model_inversion_steps, bn_weight=ev.model_inversion_bn_weight
    )
    results, rows, labels = {}, [], []
    for key in ("real/cnn", "cnn"):
        if key not in models:
            continue
        model = models[key].model
        stats = bnstat.ClassStatistics.from_running_stats(model, num_classes)
        images = torch.cat(
            [
                bnstat.synthesize(
                    model,
                    stats,
                    c,
                    num_images=k,
                    image_shape=tuple(train.images.shape[1:]),
                    seed=seed + c * k,
                    weights=weights,
                    device=device,
                )
                for c in range(num_classes)
            ]
        )
        inverted = data.ImageSplit(
            images=to_uint8(images), labels=torch.arange(num_classes).repeat_interleave(k)
        )
        with torch.no_grad():
            logits = model.to(device).eval()(images.to(device)).cpu()
        results[key], nearest_index = closeness(
            inverted, train, train_pixels, held_nn, ev, n_near=n_near, device=device
        )
        results[key]["classified_as_target"] = accuracy(logits, inverted.labels)
        who = "real" if key.startswith("real/") else "synthetic"
        first = torch.arange(num_classes) * k  # one image per class in the picture
        rows += [
            inverted.images[first],
            train.images[torch.from_numpy(nearest_index[first.numpy()])],
        ]
        labels += [f"inverted from\n{who}-trained CNN", "nearest sensitive\ntraining image"]
    results["heldout_real"] = {m: leakage.summary(held_nn[m]) for m in PIXEL_METRICS}
    return results, rows, labels
