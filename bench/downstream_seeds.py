"""Downstream accuracy of a finished run's synthetic data over several classifier seeds.

The evaluation stage trains each classifier once, with the run's seed. A headline figure
needs its spread: this retrains the same classifiers (same settings, selection on held-out
synthetic images) with each seed of ``--seeds`` and scores them on the real test split,
once per seed, after training. It reports only: nothing here feeds back into a setting.
``--black-below`` applies ``sample.black_below_uint8``'s floor to the samples first, to
measure the floor alone on a run sampled without it.

    python bench/downstream_seeds.py runs/demo/main --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from privimage import (
    ImageSplit,
    SealedSplit,
    blacken_dark_pixels,
    cache_root,
    evaluate_downstream,
    load_dataset,
    load_run_config,
    resolve_device,
)


def classifier_accuracies(train, sensitive, cfg, *, seed: int, device: str) -> dict[str, float]:
    """Each of the run's classifiers trained on ``train`` with ``seed`` (its ``evaluate``
    settings), scored on the real test split of ``sensitive``, opened once, after training."""
    report, _, _ = evaluate_downstream(
        train,
        SealedSplit(sensitive.test),
        num_classes=len(sensitive.class_names),
        settings=cfg.evaluate,
        seed=seed,
        progress=False,
        device=resolve_device(device),
    )
    return {k: round(v["test_accuracy"], 3) for k, v in report["classifiers"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--black-below", type=int, default=0, help="floor the samples first")
    # The evaluation stage trains these on the run's device; on a GPU machine a CPU retrain
    # took 200 s per seed where the whole evaluation took 43 s.
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_run_config(args.run_dir)
    samples = np.load(args.run_dir / "sample" / "samples.npz")
    images = blacken_dark_pixels(torch.from_numpy(samples["images"]), args.black_below)
    synthetic = ImageSplit(images, torch.from_numpy(samples["labels"]).long())
    sensitive = load_dataset(cfg.data, cache_dir=cache_root(cfg.cache_dir), progress=False)
    rows = []
    for seed in args.seeds:
        accs = classifier_accuracies(synthetic, sensitive, cfg, seed=seed, device=args.device)
        rows.append({"seed": seed, "mean": round(statistics.mean(accs.values()), 3), **accs})
        print(json.dumps(rows[-1]), flush=True)
    means = [r["mean"] for r in rows]
    print(
        json.dumps(
            {
                "run": str(args.run_dir),
                "synthetic_images": len(synthetic),
                "black_below": args.black_below,
                "seeds": args.seeds,
                "mean_accuracy": round(statistics.mean(means), 3),
                "min": min(means),
                "max": max(means),
                "stdev": round(statistics.stdev(means), 3) if len(means) > 1 else 0.0,
            }
        )
    )


if __name__ == "__main__":
    main()
