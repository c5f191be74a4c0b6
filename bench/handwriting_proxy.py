"""Public-proxy utility of a generator: classifiers trained on its samples, tested on
scikit-learn's 8x8 handwritten digits.

The demo's settings must not be chosen on the MNIST test split (nor on anything else
computed from the sensitive data outside the privacy ledger). scikit-learn's 1,797 digits
are public handwriting from another source: upscaled to MNIST's layout (the digit in the
central 20x20 of 28x28) and contrast-stretched, they are a rough stand-in for "does a
classifier trained on these samples read real handwritten digits?". The stand-in is
blurrier than MNIST and its figures run lower; use it to rank settings, not to predict
the MNIST number.

For every UNet folder (a run's ``pretrain/unet`` or ``finetune/unet``) and guidance scale,
it samples ``--per-class`` images per class (seeds from 10**6, apart from the run's own),
trains the evaluation stage's classifiers (CNN, logistic regression, MLP; selection on
held-out synthetic images) with ``--seeds`` seeds, and prints one JSON line: the mean
accuracy on the proxy, each classifier's, and the seconds spent sampling. With the glyph
judge of ``bench/short_pretraining.py`` at hand (``--judge``), it also prints the fraction
of samples the judge gives the class they were drawn for: a steadier signal of whether
the samples carry their class, blind to handwriting style. With ``--fid`` it also prints
the Inception FID of the samples against as many proxy digits (their features cached under
``runs/bench``): a public stand-in for the demo's FID against the sealed MNIST test split,
again for ranking settings only (the proxy's blur puts its figures on another scale).

    python bench/handwriting_proxy.py runs/demo/main/finetune/unet --guidance 1 3 --seeds 2
    python bench/handwriting_proxy.py runs/demo/main/finetune/unet --fid --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from privimage import (
    DownstreamSettings,
    ImageSplit,
    SealedSplit,
    cached_features,
    evaluate_downstream,
    frechet_distance_of_features,
    inception_features,
    load_unet,
    predict_logits,
    sample_batch,
)

FIRST_SEED = 10**6


def proxy_digits() -> ImageSplit:
    """scikit-learn's digits as 28x28 uint8: bilinear to 20x20, x1.8 contrast, 4-pixel pad."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    # The 8x8 originals are block averages: upscaled they are grey and soft, where MNIST
    # strokes saturate. The stretch brings the stroke intensities closer.
    x = F.pad((x * 1.8).clamp(0, 1), (4, 4, 4, 4))
    return ImageSplit((x * 255).round().to(torch.uint8), torch.tensor(bunch.target))


def proxy_accuracy(images: torch.Tensor, labels: torch.Tensor, seeds: range) -> list[dict]:
    """Each seed's test accuracy per classifier kind on the proxy digits."""
    out = []
    for seed in seeds:
        report, _, _ = evaluate_downstream(
            ImageSplit(images, labels),
            SealedSplit(proxy_digits()),
            num_classes=10,
            settings=DownstreamSettings(),
            seed=seed,
            progress=False,
            device=torch.device("cpu"),
        )
        out.append({k: round(v["test_accuracy"], 3) for k, v in report["classifiers"].items()})
    return out


def proxy_fid(images: torch.Tensor, *, cache_dir: Path) -> float:
    """FID of ``images`` against the first ``len(images)`` proxy digits (near balanced)."""
    n = len(images)
    digits = proxy_digits()
    if n > len(digits.images):
        raise SystemExit(f"--fid needs at most {len(digits.images)} samples, got {n}")
    # load_digits cycles through the classes 0-9, so a fixed prefix is close to balanced.
    reference = cached_features(
        f"proxy_digits_first{n}",
        lambda: digits.images[:n],
        cache_dir=cache_dir,
        batch_size=25,
        progress=False,
    )
    return frechet_distance_of_features(
        inception_features(images, batch_size=25, progress=False), reference
    )


def sample(
    unet_dir: Path,
    *,
    per_class: int,
    guidance: float,
    steps: int,
    solver: str,
    sigma_min: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    model, spec = load_unet(unet_dir)
    if sigma_min is not None:
        spec = dataclasses.replace(spec, sigma_min=sigma_min)
    model.eval()
    labels = torch.arange(10).repeat_interleave(per_class)
    seeds = list(range(FIRST_SEED, FIRST_SEED + len(labels)))
    batches = []
    for i in range(0, len(labels), 100):
        x = sample_batch(
            model,
            spec=spec,
            seeds=seeds[i : i + 100],
            labels=labels[i : i + 100],
            num_steps=steps,
            solver=solver,
            guidance_scale=guidance,
        )
        batches.append(x)
    return torch.cat(batches), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("unet", nargs="+", type=Path, help="UNet folders (save_unet layout)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--solver", default="euler")
    parser.add_argument(
        "--sigma-min", type=float, nargs="+", default=[None], help="EDM: the last noise level"
    )
    parser.add_argument("--seeds", type=int, default=2, help="classifier seeds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--judge", type=Path, default=Path("runs/bench/glyph_judge.pt"))
    parser.add_argument(
        "--fid", action="store_true", help="also Inception FID against as many proxy digits"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    judge = torch.load(args.judge, weights_only=False) if args.judge.exists() else None
    for unet in args.unet:
        for guidance, sigma_min in itertools.product(args.guidance, args.sigma_min):
            start = time.perf_counter()
            x, y = sample(
                unet,
                per_class=args.per_class,
                guidance=guidance,
                steps=args.steps,
                solver=args.solver,
                sigma_min=sigma_min,
            )
            sampled = time.perf_counter() - start
            judged = None
            if judge is not None:
                logits = predict_logits(
                    judge, ImageSplit(x, y).as_float(), batch_size=256, device=torch.device("cpu")
                )
                judged = round((logits.argmax(1) == y).float().mean().item(), 3)
            fid = fid_s = None
            if args.fid:
                start = time.perf_counter()
                fid = round(proxy_fid(x, cache_dir=args.cache_dir), 1)
                fid_s = round(time.perf_counter() - start)
            runs = proxy_accuracy(x, y, range(args.seeds))
            per_run = [float(np.mean(list(r.values()))) for r in runs]
            print(
                json.dumps(
                    {
                        "unet": str(unet),
                        "guidance": guidance,
                        "per_class": args.per_class,
                        "solver": args.solver,
                        "steps": args.steps,
                        "sigma_min": sigma_min,
                        "proxy_accuracy": round(float(np.mean(per_run)), 3) if runs else None,
                        "spread": round(float(np.ptp(per_run)), 3) if runs else None,
                        "glyph_judge_accuracy": judged,
                        "proxy_fid": fid,
                        "runs": runs,
                        "sample_s": round(sampled),
                        "fid_s": fid_s,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
