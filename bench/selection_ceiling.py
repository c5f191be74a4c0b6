"""What the query's selected public images alone teach a finished run's classifiers.

Pretraining reads the query's selection: the public images of the chosen classes,
relabelled to the sensitive class that took them (``query/public_index.npy`` and
``query/public_labels.npy``). A generator that learned that selection perfectly, before
any sensitive image, would hand the downstream classifiers what these images hand them.
This trains the run's own classifiers (its ``evaluate`` settings) on ``--per-class``
selected images of each class (0: all of them), for each seed of ``--seeds``, and scores
them on the run's real test split, opened once per seed after training, as
``bench/downstream_seeds.py`` does for the run's samples. It reports only: it reads the
sealed test split, so nothing here may choose a setting.

    python bench/selection_ceiling.py runs/pc/cand_a --per-class 100 0 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from downstream_seeds import classifier_accuracies
from fid_decomposition import balanced

from privimage import ImageSplit, cache_root, load_dataset, load_run_config


def selected(
    query: tuple[np.ndarray, np.ndarray], public_train: ImageSplit, per_class: int, seed: int
) -> ImageSplit:
    """``per_class`` selected public images of each class (all with 0), relabelled.

    ``query``: the run's ``(public_index, public_labels)``, as pretraining reads them.
    """
    index, labels = query
    if per_class:
        fewest = int(np.bincount(labels).min())
        if per_class > fewest:
            raise SystemExit(f"--per-class {per_class}: some class has {fewest} selected images")
        keep = balanced(labels, per_class, int(labels.max()) + 1, seed)
        index, labels = index[keep], labels[keep]
    return ImageSplit(public_train.images[torch.from_numpy(index)], torch.from_numpy(labels).long())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--per-class", type=int, nargs="+", default=[100, 0], help="0: all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.run_dir / "query" / "public_index.npy").exists():
        raise SystemExit(f"{args.run_dir}: no query/public_index.npy (run the query stage)")
    query = tuple(np.load(args.run_dir / "query" / f"public_{n}.npy") for n in ("index", "labels"))
    cfg = load_run_config(args.run_dir)
    cache = cache_root(cfg.cache_dir)
    public = load_dataset(cfg.public, cache_dir=cache, progress=False)
    sensitive = load_dataset(cfg.data, cache_dir=cache, progress=False)
    for per_class in args.per_class:
        means = []
        for seed in args.seeds:
            # A fresh subset per seed: the spread covers which public images were drawn too.
            split = selected(query, public.train, per_class, seed)
            accs = classifier_accuracies(split, sensitive, cfg, seed=seed, device=args.device)
            means.append(round(statistics.mean(accs.values()), 3))
            row = {"per_class": per_class or "all", "images": len(split), "seed": seed}
            print(json.dumps({**row, "mean": means[-1], **accs}), flush=True)
        summary = {"per_class": per_class or "all", "mean": round(statistics.mean(means), 3)}
        print(json.dumps({**summary, "min": min(means), "max": max(means)}), flush=True)


if __name__ == "__main__":
    main()
