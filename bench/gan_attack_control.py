"""The GAN-based inversion's (GMI) controls, over seeds: does it recover what a classifier
knows, and nothing from a classifier that knows nothing?

As ``tests/test_gan_attack.py``, with more seeds: the DCGAN prior trains on the public
glyphs (cached); MNIST 5k's training split (sorted by label, so shuffled first) is cut
in two halves. A CNN (width 16) trained on the first half is attacked; a CNN (width 32)
trained on the second half is GMI's evaluation classifier. Attack accuracy: the share of
recovered images (``--per-class`` per digit) that the evaluation classifier assigns
their target digit. For each seed, the attacked CNN and the latents change; the untrained
CNN of the same seed is the negative control. Prints one row per seed and the medians.

Usage::

    .venv/bin/python bench/gan_attack_control.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bnstat_sweep import default_cache

from privimage import (
    build_classifier,
    gan_inversion,
    load_dataset,
    load_group,
    predict_logits,
    public_gan,
    train_classifier,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--prior-steps", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=200, help="latent-optimisation steps")
    ap.add_argument("--per-class", type=int, default=4)
    args = ap.parse_args()
    cache = default_cache()
    cpu = torch.device("cpu")
    spec = load_group("public", "glyphs")
    public = load_dataset(spec, cache_dir=cache, progress=False)
    gen, disc = public_gan(spec, public, cache_dir=cache, steps=args.prior_steps, seed=0)
    train = load_dataset(load_group("data", "mnist5k"), cache_dir=cache, progress=False).train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    first, second = train.subset(order[: len(order) // 2]), train.subset(order[len(order) // 2 :])

    def classifier(split, *, width: int, seed: int):
        return train_classifier(
            split.as_float(),
            split.labels,
            num_classes=10,
            width=width,
            epochs=6,
            batch_size=64,
            lr=3e-3,
            device=cpu,
            seed=seed,
            progress=False,
        )

    evaluator = classifier(second, width=32, seed=1000)

    def attack_accuracy(model, seed: int) -> float:
        recovered = gan_inversion(
            model,
            gen,
            disc,
            num_classes=10,
            images_per_class=args.per_class,
            steps=args.steps,
            seed=seed,
        )
        logits = predict_logits(evaluator, recovered.as_float(), batch_size=256, device=cpu)
        return float((logits.argmax(1) == recovered.labels).float().mean())

    print(f"{'seed':>4}  {'trained CNN':>11}  {'untrained CNN':>13}  {'seconds':>7}")
    trained, untrained = [], []
    for seed in args.seeds:
        start = time.perf_counter()
        attacked = classifier(first, width=16, seed=seed)
        torch.manual_seed(seed)
        blank = build_classifier("cnn", in_channels=1, num_classes=10, width=16).eval()
        trained.append(attack_accuracy(attacked, seed))
        untrained.append(attack_accuracy(blank, seed))
        secs = time.perf_counter() - start
        print(f"{seed:>4}  {trained[-1]:>11.3f}  {untrained[-1]:>13.3f}  {secs:>7.0f}")
    med_t, med_u = statistics.median(trained), statistics.median(untrained)
    print(f"median attack accuracy: trained {med_t:.3f}, untrained {med_u:.3f} (chance 0.1)")


if __name__ == "__main__":
    main()
