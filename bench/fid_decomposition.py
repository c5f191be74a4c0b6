"""Where a finished demo run loses its FID: one reference, several image sets.

With ``--reference training``, the demo's own protocol: one seeded set of ``--n`` of the
run's sensitive training images is the reference, and each set below is scored with
``--n`` images and the same Inception features:

- ``real``: ``--n`` other training images (disjoint): the estimator's floor at this n;
- ``selection``: the query's public images, relabelled (the DP release pretraining reads),
  balanced over the classes;
- ``pretrained``: samples of the run's ``pretrain/unet`` (the run's sampler, steps and
  guidance; seeds from 10**6, apart from the run's own), before any sensitive image;
- ``finetuned``: a seeded subset of the run's own ``sample/samples.npz``;
- ``finetuned, floor t``: the same images with every pixel below t/255 set to 0 (what
  ``sample.black_below_uint8`` does), for each ``--floors`` value.

Those figures read the sensitive training split, as the run's own FID does: report them,
choose no setting on them. With ``--reference public`` (the default) it reads public data
only, so its figures may choose: the pretrained samples, at each floor, against held-out
public images of the selected classes, and the run's samples, at each floor, on the
handwriting proxy of ``bench/handwriting_proxy.py``. Every row also prints ``dark_px``,
the fraction of pixels below 4/255. ``--figure`` draws one sample per class before and
after the floor. Features are cached under the run's cache folder (about 7-10 images/s
on a 2-core CPU: seven sets of 500 take about 7 minutes the first time).

    .venv/bin/python bench/fid_decomposition.py runs/demo/main --floors 4 8 16 24 32 48
    .venv/bin/python bench/fid_decomposition.py runs/demo/main --reference training
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from handwriting_proxy import proxy_accuracy

from privimage import (
    blacken_dark_pixels,
    cache_root,
    cached_features,
    frechet_distance_of_features,
    load_dataset,
    load_run_config,
    load_unet,
    sample_batch,
)

FIRST_SEED = 10**6


def _digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]


def balanced(labels: np.ndarray, per_class: int, classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(classes)]
    )


def _pretrained_samples(run_dir: Path, cfg, n: int, classes: int) -> torch.Tensor:
    model, spec = load_unet(run_dir / "pretrain" / "unet")
    model.eval()
    labels = torch.arange(classes).repeat_interleave(-(-n // classes))[:n]
    seeds = list(range(FIRST_SEED, FIRST_SEED + n))
    out = []
    for i in range(0, n, 100):
        out.append(
            sample_batch(
                model,
                spec=spec,
                seeds=seeds[i : i + 100],
                labels=labels[i : i + 100],
                num_steps=cfg.sample.num_inference_steps,
                solver=cfg.sample.sampler,
                guidance_scale=cfg.sample.guidance_scale,
            )
        )
    return torch.cat(out)


def _dark(images: torch.Tensor) -> float:
    return round(float((images < 4).float().mean()), 3)


def _fid_rows(sets: dict, reference: torch.Tensor, cache: Path, label: str) -> None:
    opts = {"cache_dir": cache, "batch_size": 25, "device": "cpu"}
    ref = cached_features(
        f"fid-dec-{_digest(reference)}", lambda: reference, desc="reference", **opts
    )
    print(f"reference: {len(reference)} {label}; dark_px {_dark(reference)}", flush=True)
    for name, images in sets.items():
        feats = cached_features(
            f"fid-dec-{_digest(images)}", lambda images=images: images, desc=name, **opts
        )
        fid = frechet_distance_of_features(feats, ref)
        row = {"set": name, "n": len(images), "fid": round(fid, 1), "dark_px": _dark(images)}
        print(json.dumps(row), flush=True)


def haze_figure(run_dir: Path, path: Path, floor: int, classes: int) -> None:
    """One sample per class as drawn and floored, each also with 0-40 of 255 stretched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with np.load(run_dir / "sample" / "samples.npz") as f:
        images, labels = torch.from_numpy(f["images"]), f["labels"]
    raw = images[[np.flatnonzero(labels == c)[0] for c in range(classes)]]
    floored = blacken_dark_pixels(raw, floor)[:, 0].numpy()
    raw = raw[:, 0].numpy()
    rows = [
        ("samples as drawn", raw, 255),
        ("as drawn, 0-40 of 255 stretched to full scale", raw, 40),
        (f"black below {floor}", floored, 255),
        ("the same, 0-40 stretched", floored, 40),
    ]
    fig, ax = plt.subplots(len(rows), classes, figsize=(classes, 4.6), squeeze=False)
    for r, (title, x, vmax) in enumerate(rows):
        for c in range(classes):
            ax[r, c].imshow(x[c], cmap="gray", vmin=0, vmax=vmax)
            ax[r, c].set_axis_off()
        ax[r, classes // 2].set_title(title, fontsize=9)
    fig.suptitle("the grey haze of the samples (one per class), before and after the floor")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def public_rows(args, cfg, cache: Path, selection: dict) -> None:
    """Public signals only: pretrained samples against held-out public images of the
    selected classes (FID), and the run's samples on the handwriting proxy (accuracy)."""
    public = load_dataset(cfg.public, cache_dir=cache, progress=False)
    classes = len(selection["classes"])
    stands_for = torch.full((public.num_classes,), -1, dtype=torch.long)
    for c in selection["classes"]:
        for p in c["public_classes"]:
            stands_for[p["public_class"]] = c["sensitive_class"]
    held_out = stands_for[public.test.labels]
    keep = balanced(held_out.numpy(), -(-args.n // classes), classes, seed=0)[: args.n]
    pretrained = _pretrained_samples(args.run_dir, cfg, args.n, classes)
    sets = {"pretrained": pretrained}
    sets.update({f"pretrained, floor {t}": blacken_dark_pixels(pretrained, t) for t in args.floors})
    _fid_rows(sets, public.test.images[torch.from_numpy(keep)], cache, "held-out public images")
    if args.proxy_seeds:
        with np.load(args.run_dir / "sample" / "samples.npz") as f:
            images, labels = torch.from_numpy(f["images"]), torch.from_numpy(f["labels"]).long()
        for t in [0, *args.floors]:
            runs = proxy_accuracy(blacken_dark_pixels(images, t), labels, range(args.proxy_seeds))
            per_run = [float(np.mean(list(r.values()))) for r in runs]
            row = {
                "set": f"run's samples, floor {t}",
                "n": len(images),
                "proxy_accuracy": round(float(np.mean(per_run)), 3),
                "spread": round(float(np.ptp(per_run)), 3),
                "runs": runs,
            }
            print(json.dumps(row), flush=True)


def training_rows(args, cfg, cache: Path, classes: int) -> None:
    """Readings of the sensitive training split, as the run's own FID is: report only."""
    train = load_dataset(cfg.data, cache_dir=cache, progress=False).train
    if 2 * args.n > len(train):
        raise SystemExit(
            f"--n {args.n} needs {2 * args.n} training images; the run has {len(train)}"
        )
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    sets: dict[str, torch.Tensor] = {"real": train.images[perm[args.n : 2 * args.n]]}
    public = load_dataset(cfg.public, cache_dir=cache, progress=False)
    index = np.load(args.run_dir / "query" / "public_index.npy")
    relabel = np.load(args.run_dir / "query" / "public_labels.npy")
    keep = balanced(relabel, -(-args.n // classes), classes, seed=0)[: args.n]
    sets["selection"] = public.train.images[torch.from_numpy(index[keep])]
    sets["pretrained"] = _pretrained_samples(args.run_dir, cfg, args.n, classes)
    with np.load(args.run_dir / "sample" / "samples.npz") as f:
        synthetic = torch.from_numpy(f["images"])
    pick = torch.randperm(len(synthetic), generator=torch.Generator().manual_seed(1))
    finetuned = synthetic[pick[: args.n]]
    sets["finetuned"] = finetuned
    sets.update({f"finetuned, floor {t}": blacken_dark_pixels(finetuned, t) for t in args.floors})
    _fid_rows(sets, train.images[perm[: args.n]], cache, "sensitive training images")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument(
        "--reference",
        choices=["public", "training"],
        default="public",
        help="public: held-out public images and the handwriting proxy (may choose); "
        "training: the sensitive training split (report only)",
    )
    ap.add_argument("--n", type=int, default=500, help="images per set (the demo: 500)")
    ap.add_argument("--floors", type=int, nargs="*", default=[4, 16, 32], help="x/255")
    ap.add_argument("--proxy-seeds", type=int, default=2, help="handwriting proxy seeds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--figure", type=Path, help="also draw the haze picture here (PNG)")
    ap.add_argument("--figure-floor", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_run_config(args.run_dir)
    cache = cache_root(cfg.cache_dir)
    # The query's selection (a DP release) names every sensitive class: public mode reads
    # no sensitive data at all.
    selection = json.loads((args.run_dir / "query" / "selection.json").read_text())
    classes = len(selection["classes"])
    print(f"run {args.run_dir}", flush=True)
    if args.figure:
        haze_figure(args.run_dir, args.figure, args.figure_floor, classes)
    if args.reference == "public":
        public_rows(args, cfg, cache, selection)
    else:
        training_rows(args, cfg, cache, classes)


if __name__ == "__main__":
    main()
