"""How much of a run's FID is the estimator's small-sample bias?

FID computed from n synthetic and n real images overestimates the FID of the two
distributions by about k/n (Chong & Forsyth 2020, "Effectively Unbiased FID"): the
demo reports FID on 500 + 500 images. For one finished run this bench draws seeded
subsets of n synthetic images (from ``sample/samples.npz``) and n sensitive training
images for each n, prints the median FID over ``--draws`` subsets, fits FID = FID_inf +
k/n by least squares, and prints FID_inf, the extrapolation to infinitely many images.

Features are TF-Inception-2015 pool features, cached under the run config's cache folder
(about 10 images/s on a 2-core CPU: the first call on 1,500 synthetic and 2,000
training images takes about 6 minutes, later ones seconds).

Usage::

    .venv/bin/python bench/fid_sample_size.py runs/demo --sizes 250 500 1000 1500
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
from pathlib import Path

import numpy as np
import torch

from privimage import (
    cache_root,
    cached_features,
    frechet_distance_of_features,
    load_dataset,
    load_run_config,
)


def _digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 1500])
    ap.add_argument("--draws", type=int, default=3, help="seeded subsets per size")
    ap.add_argument("--batch-size", type=int, default=25)
    args = ap.parse_args()
    cfg = load_run_config(args.run_dir)
    cache = cache_root(cfg.cache_dir)
    with np.load(args.run_dir / "sample" / "samples.npz") as f:
        synthetic = torch.from_numpy(f["images"])
    train = load_dataset(cfg.data, cache_dir=cache, progress=False).train
    n_max = max(args.sizes)
    if n_max > min(len(synthetic), len(train)):
        raise SystemExit(
            f"--sizes up to {n_max}, but the run has {len(synthetic)} synthetic and "
            f"{len(train)} training images; pass smaller --sizes"
        )

    def first(n: int, total: int) -> torch.Tensor:  # a seeded subset: both sets, no order
        return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n]

    real = train.images[first(n_max, len(train))]
    synthetic = synthetic[first(n_max, len(synthetic))]
    opts = {"cache_dir": cache, "batch_size": args.batch_size, "device": "cpu"}
    synth_feats = cached_features(
        f"fid-size-{_digest(synthetic)}", lambda: synthetic, desc="synthetic", **opts
    )
    real_feats = cached_features(f"fid-size-{_digest(real)}", lambda: real, desc="real", **opts)

    rng = np.random.default_rng(0)
    print(f"run {args.run_dir}: features of {n_max} synthetic and {n_max} training images")
    print(f"{'n (each side)':>13}  {'FID median':>10}  {'min':>7}  {'max':>7}")
    medians = []
    for n in args.sizes:
        fids = [
            frechet_distance_of_features(
                synth_feats[rng.choice(len(synth_feats), n, replace=False)],
                real_feats[rng.choice(len(real_feats), n, replace=False)],
            )
            for _ in range(args.draws)
        ]
        medians.append(statistics.median(fids))
        print(f"{n:>13}  {medians[-1]:>10.1f}  {min(fids):>7.1f}  {max(fids):>7.1f}")
    # FID_n = FID_inf + k / n, least squares over the sizes.
    slope, intercept = np.polyfit(1.0 / np.asarray(args.sizes, float), medians, 1)
    print(f"FID_inf (extrapolated to infinitely many images): {intercept:.1f}; k = {slope:.0f}")


if __name__ == "__main__":
    main()
