"""How much compute the gradient-inversion attack needs (Geiping et al. 2020).

The evaluation inverts one gradient per image of the CNN trained on real data (the
positive control) and of the one trained on synthetic data. A control that fails says
only that the attack was too weak, so this bench measures, on one dataset, what the
attack recovers from the *real-data* CNN (the evaluation's ``cnn`` downstream classifier,
trained the evaluation's way on ``--train-images`` real training images) and from the
same network untrained, as a function of steps and of the signed-gradient step:

* PSNR and SSIM of each reconstruction against the true image (median over
  ``--images`` training images);
* seconds per image.

Usage::

    .venv/bin/python bench/gradient_attack.py --steps 300 1000      # MNIST, CPU
    python bench/gradient_attack.py --data cifar10 --device cuda --steps 300 1000 3000
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from bnstat_sweep import default_cache

from privimage import (
    build_downstream,
    example_gradient,
    invert_gradient,
    load_dataset,
    load_group,
    psnr,
    resolve_device,
    ssim,
    to_uint8,
    train_classifier,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="mnist5k", help="a conf/data preset")
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--images", type=int, default=4, help="images attacked per setting")
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--tv-weights", type=float, nargs="+", default=[1e-4])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = resolve_device(args.device)
    data_cfg = load_group("data", args.data)
    data_cfg.path = args.data_path or data_cfg.path
    ev = load_group("evaluate", "default")
    ds = load_dataset(data_cfg, cache_dir=default_cache())
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.choice(len(ds.train), args.train_images, replace=False))
    train = ds.train.subset(idx)
    shape = tuple(train.images.shape[1:])
    hflip = data_cfg.channels == 3

    def fresh() -> torch.nn.Module:
        torch.manual_seed(args.seed)
        return build_downstream(
            "cnn",
            image_shape=shape,
            num_classes=ds.num_classes,
            cnn_arch=ev.classifier_arch,
            width=ev.classifier_width,
        )

    trained = train_classifier(
        train.as_float(),
        train.labels,
        num_classes=ds.num_classes,
        width=ev.classifier_width,
        epochs=ev.classifier_epochs,
        batch_size=ev.classifier_batch_size,
        lr=ev.classifier_lr,
        device=device,
        seed=args.seed,
        hflip=hflip,
        model=fresh(),
        weight_decay=ev.cnn_weight_decay,
        progress=False,
    )
    models = {"trained on real": trained.eval(), "untrained": fresh().eval()}
    targets = train.subset(np.arange(args.images))
    x_all = targets.as_float()
    print(
        f"{args.data}: {ev.classifier_arch} width {ev.classifier_width}, trained "
        f"{ev.classifier_epochs} epochs on {len(train)} real images; {args.images} images "
        f"attacked per setting; device {device}"
    )
    print("| model | steps | signed | TV | PSNR dB (median) | SSIM (median) | s/image |")
    print("|---|---|---|---|---|---|---|")
    for name, model in models.items():
        model = model.to(device)
        for tv in args.tv_weights:
            for steps in args.steps:
                for signed in (True, False):
                    recons, seconds = [], []
                    for i in range(args.images):
                        x = x_all[i : i + 1].to(device)
                        y = targets.labels[i : i + 1].to(device)
                        target = example_gradient(model, x, y)
                        start = time.perf_counter()
                        r, _ = invert_gradient(
                            model,
                            target,
                            y,
                            image_shape=shape,
                            steps=steps,
                            tv_weight=tv,
                            signed=signed,
                            seed=args.seed + i,
                            device=device,
                        )
                        seconds.append(time.perf_counter() - start)
                        recons.append(r)
                    recon = to_uint8(torch.cat(recons))
                    db = psnr(recon, targets.images)
                    similarity = ssim(recon, targets.images)
                    print(
                        f"| {name} | {steps} | {'yes' if signed else 'no'} | {tv:g} "
                        f"| {float(np.median(db)):.1f} | {float(np.median(similarity)):.3f} "
                        f"| {statistics.median(seconds):.1f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
