"""Would deformed public glyphs read handwriting better? A check before building it.

Pretraining on randomly deformed glyphs (rotation, shift, scale, shear: free, the glyphs
are public) would only help if deformed glyphs are closer to handwriting. The cheap test
needs no generator: train the evaluation's classifiers directly on the query's selected
glyphs of a finished run (``--per-class`` per digit), plain or deformed, and test them on
the public handwriting proxy of ``bench/handwriting_proxy.py`` (scikit-learn's digits).
Nothing sensitive is read: the selection is the query's DP release.

    python bench/deformed_glyphs.py runs/demo/main --seeds 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from handwriting_proxy import proxy_accuracy
from torchvision.transforms import v2

from privimage import DataConfig, load_dataset

DEFORMATIONS = {
    "plain": None,
    "moderate": dict(degrees=15, translate=(0.08, 0.08), scale=(0.8, 1.1), shear=12),
    "strong": dict(degrees=25, translate=(0.1, 0.1), scale=(0.7, 1.15), shear=20),
}


def deform(images: torch.Tensor, seed: int, **kw) -> torch.Tensor:
    torch.manual_seed(seed)
    affine = v2.RandomAffine(**kw)
    return torch.stack([affine(im) for im in images])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3, help="classifier seeds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default="~/.cache/privimage")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    public = load_dataset(
        DataConfig(source="glyphs"), cache_dir=Path(args.cache_dir).expanduser(), progress=False
    )
    index = torch.from_numpy(np.load(args.run_dir / "query" / "public_index.npy"))
    labels = np.load(args.run_dir / "query" / "public_labels.npy")
    rng = np.random.default_rng(0)
    keep = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[: args.per_class] for c in range(10)]
    )
    images = public.train.images[index[torch.from_numpy(keep)]]
    y = torch.from_numpy(labels[keep]).long()
    for name, kw in DEFORMATIONS.items():
        x = images if kw is None else deform(images, 0, **kw)
        runs = proxy_accuracy(x, y, range(args.seeds))
        per_run = [float(np.mean(list(r.values()))) for r in runs]
        print(
            json.dumps(
                {
                    "glyphs": name,
                    "deformation": kw,
                    "images": len(x),
                    "proxy_accuracy": round(float(np.mean(per_run)), 3),
                    "spread": round(float(np.ptp(per_run)), 3),
                    "runs": runs,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
