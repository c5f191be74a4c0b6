"""What a short pretraining run learns: class accuracy of its samples, on public data only.

The demo pretrains for a few hundred steps on a CPU, and the question that decides its
usefulness is whether the samples carry their class. This bench answers it without
touching sensitive data, so its answers may choose settings:

* the training set is the public glyphs of the digits ``0``-``9`` (the selection the DP
  query would make if it chose every digit's own glyph), labelled by digit;
* a judge CNN trained on those glyphs (cached in ``--judge``) classifies samples drawn
  from the EMA weights at the steps of ``--eval-at``, ``--per-class`` (20) per class,
  for every guidance scale in ``--guidance``; the bench prints the fraction the judge
  gives the class they were drawn for (0.1 is chance), and the training and sampling
  seconds;
* how clean the background is: the fraction of sample pixels darker than 4/255
  (``dark_px``; the training glyphs' own fraction is printed first), since an
  undertrained low-noise denoiser leaves grey speckle where the glyphs are black;
* with ``--fid``, the Inception FID of the samples against as many held-out digit glyphs.

With ``--selection`` (a query's ``query/selection.json``, itself a DP release) the training
set is that selection instead: the public classes each sensitive class took, relabelled
to it, as the pretraining stage sees them. ``--public tinyimagenet --selection ...`` asks
the same questions of CIFAR-10's pretraining at 32x32 RGB; the judge and the FID reference
are then that selection's own held-out public images.

The loop is the pretraining stage's (EDM loss, Adam, EMA with warm-up, label dropout for
guidance), without checkpoints or Accelerate.

Usage::

    .venv/bin/python bench/short_pretraining.py                         # the demo's settings
    .venv/bin/python bench/short_pretraining.py --p-mean -1.2 --lr 2e-3 --warmup 0  # before
    .venv/bin/python bench/short_pretraining.py --steps 200 --eval-at 200 --batch-size 32
    .venv/bin/python bench/short_pretraining.py --channels 16,32,64 --steps 920 \
        --eval-at 920 --decay linear --guidance 1 --per-class 50 --fid --p-std 1.6
    .venv/bin/python bench/short_pretraining.py --public tinyimagenet \
        --selection runs/scratch/cifar_query/query/selection.json --fid --per-class 50
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from privimage import (
    EMA,
    LR_DECAYS,
    DiffusionConfig,
    ImageSplit,
    ModelConfig,
    build_unet,
    cached_features,
    drop_labels,
    frechet_distance_of_features,
    group_options,
    inception_features,
    load_dataset,
    load_group,
    predict_logits,
    sample_batch,
    scheduled_lr,
    to_uint8,
    train_classifier,
    training_loss,
)

DIGITS = 10
# The public presets (conf/public/*.yaml), loaded as a run loads them.
PUBLIC_PRESETS = group_options("public")
DARK = 4  # of 255: a pixel below it counts as background (glyphs: 78% of pixels)


def dark_fraction(images: torch.Tensor) -> float:
    """Fraction of pixels below ``DARK`` (uint8 images, or floats in [-1, 1])."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    return round((images < DARK).float().mean().item(), 3)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-at", default="200,400,600", help="steps to sample at")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup", type=int, default=20, help="linear lr warm-up steps")
    ap.add_argument("--decay", default="none", choices=LR_DECAYS, help="lr decay after warm-up")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--p-mean", type=float, default=0.6, help="EDM training ln(sigma) mean")
    ap.add_argument("--p-std", type=float, default=1.2)
    ap.add_argument(
        "--low-noise-fraction",
        type=float,
        default=0.0,
        help="share of training levels drawn around --low-p-mean instead (a mixture)",
    )
    ap.add_argument("--low-p-mean", type=float, default=-1.2)
    ap.add_argument("--channels", default="32,64,64", help="UNet block_out_channels")
    ap.add_argument("--layers-per-block", type=int, default=ModelConfig.layers_per_block)
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--label-dropout", type=float, default=0.1)
    ap.add_argument("--guidance", default="1,3", help="guidance scales to sample with")
    ap.add_argument("--per-class", type=int, default=20, help="samples per class judged")
    ap.add_argument("--solver-steps", type=int, default=12, help="Euler steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default="~/.cache/privimage")
    ap.add_argument("--public", default="glyphs", choices=PUBLIC_PRESETS)
    ap.add_argument(
        "--selection", type=Path, default=None, help="a query's selection.json (default: digits)"
    )
    ap.add_argument("--judge", type=Path, default=None, help="judge cache (default: runs/bench)")
    ap.add_argument("--grid", type=Path, default=None, help="save the last samples here")
    ap.add_argument("--fid", action="store_true", help="FID against held-out public images")
    return ap.parse_args()


def selection_mapping(selection: dict) -> dict[int, int]:
    """Public class -> the sensitive class that took it, from a query's selection.json."""
    return {
        p["public_class"]: c["sensitive_class"]
        for c in selection["classes"]
        for p in c["public_classes"]
    }


def relabelled(split: ImageSplit, mapping: dict[int, int], num_public_classes: int) -> ImageSplit:
    """The images of ``split`` whose class is in ``mapping``, labelled by its value."""
    lookup = torch.full((num_public_classes,), -1, dtype=torch.long)
    for public, sensitive in mapping.items():
        lookup[public] = sensitive
    new = lookup[split.labels]
    kept = torch.nonzero(new >= 0).squeeze(1)
    return ImageSplit(images=split.images[kept], labels=new[kept])


def training_set(a: argparse.Namespace):
    """(train, held-out, classes, tag, data): public images labelled by the class they stand for.

    Default: the digit glyphs. With ``--selection``: the query's public classes relabelled
    to their sensitive class; the tag names the selection (judge and FID caches).
    """
    data = load_group("public", a.public)
    ds = load_dataset(data, cache_dir=a.cache_dir)
    if a.selection is None:
        if data.source != "glyphs":
            raise SystemExit(f"--public {a.public} needs --selection (a query's selection.json)")
        # Glyph classes 0-9 are the digits (privimage.data.glyphs.CLASS_NAMES).
        mapping = {d: d for d in range(DIGITS)}
        tag = "glyph"
    else:
        if not a.selection.exists():
            raise SystemExit(f"--selection {a.selection}: no such file (run the query stage)")
        sel = json.loads(a.selection.read_text())
        if sel["public_source"] != data.source:
            raise SystemExit(
                f"--selection is a query of {sel['public_source']}, not --public {data.source}"
            )
        mapping = selection_mapping(sel)
        digest = hashlib.sha1(json.dumps(sorted(mapping.items())).encode()).hexdigest()[:8]
        tag = f"{data.source}_{digest}"
    classes = len(set(mapping.values()))
    return (
        relabelled(ds.train, mapping, ds.num_classes),
        relabelled(ds.test, mapping, ds.num_classes),
        classes,
        tag,
        data,
    )


def get_judge(path: Path, train, test, *, classes: int, hflip: bool) -> torch.nn.Module:
    cpu = torch.device("cpu")
    if path.exists():
        judge = torch.load(path, weights_only=False)
    else:
        judge = train_classifier(
            train.as_float(),
            train.labels,
            num_classes=classes,
            width=32,
            epochs=4,
            hflip=hflip,
            batch_size=128,
            lr=2e-3,
            device=cpu,
            seed=0,
            desc="judge (public images)",
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(judge, path)
    pred = predict_logits(judge, test.as_float(), batch_size=256, device=cpu).argmax(1)
    print(f"judge accuracy on held-out public images: {(pred == test.labels).float().mean():.3f}")
    return judge


def fid_reference(test, per_class: int, cache_dir: str, *, classes: int, tag: str):
    """Inception features of the first ``per_class`` held-out images of each class (cached).

    Computed once, before training, so a short run fails before its minutes are spent.
    """
    fewest = int(torch.bincount(test.labels, minlength=classes).min())
    if per_class > fewest:
        raise SystemExit(f"--fid: --per-class {per_class} but some class has {fewest} held out")
    idx = torch.cat(
        [torch.nonzero(test.labels == c).squeeze(1)[:per_class] for c in range(classes)]
    )
    # The digit glyphs keep their old cache name, so earlier caches stay valid.
    name = "digit_glyphs" if tag == "glyph" else tag
    return cached_features(
        f"{name}_test_{per_class}_per_class",
        lambda: test.images[idx],
        cache_dir=cache_dir,
        batch_size=25,
        progress=False,
    )


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    train, test, classes, tag, data = training_set(a)
    judge_path = a.judge or Path(f"runs/bench/{tag}_judge.pt")
    # Flips suit natural images, not glyphs (as the query classifier's presets say).
    judge = get_judge(judge_path, train, test, classes=classes, hflip=data.source != "glyphs")
    spec = DiffusionConfig(
        p_mean=a.p_mean,
        p_std=a.p_std,
        low_noise_fraction=a.low_noise_fraction,
        low_noise_p_mean=a.low_p_mean,
    )
    mc = ModelConfig(
        block_out_channels=[int(c) for c in a.channels.split(",")],
        layers_per_block=a.layers_per_block,
        attention=not a.no_attention,
    )
    resolution, channels = data.resolution, data.channels
    torch.manual_seed(a.seed)
    model = build_unet(mc, resolution=resolution, channels=channels, num_classes=classes)
    ema = EMA(model, decay=a.ema)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    g = torch.Generator().manual_seed(a.seed + 1)
    x_all, y_all = train.as_float(), train.labels
    eval_at = {int(s) for s in a.eval_at.split(",")}
    scales = [float(v) for v in a.guidance.split(",")]
    print(json.dumps({k: v for k, v in vars(a).items() if k not in ("judge", "grid")}, default=str))
    print(json.dumps({"training_images": len(train), "dark_px": dark_fraction(train.images)}))
    reference = (
        fid_reference(test, a.per_class, a.cache_dir, classes=classes, tag=tag) if a.fid else None
    )
    train_s = 0.0
    for step in range(a.steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(x_all), (a.batch_size,), generator=g)
        y = drop_labels(y_all[idx], probability=a.label_dropout, null_label=classes, generator=g)
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(
                a.lr, step=step, warmup_steps=a.warmup, total_steps=a.steps, decay=a.decay
            )
        loss = training_loss(model, x_all[idx], y, spec=spec, generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(model)
        train_s += time.perf_counter() - t0
        if step + 1 not in eval_at:
            continue
        row = {"step": step + 1, "train_s": round(train_s, 1), "loss": round(loss.item(), 4)}
        labels = torch.arange(classes).repeat_interleave(a.per_class)
        for w in scales:
            t1 = time.perf_counter()
            images = sample_batch(
                ema.module.eval(),
                spec=spec,
                seeds=list(range(len(labels))),
                labels=labels,
                num_steps=a.solver_steps,
                solver="euler",
                guidance_scale=w,
            )
            pred = predict_logits(
                judge, images.float() / 127.5 - 1, batch_size=256, device=torch.device("cpu")
            )
            row[f"class_acc_g{w:g}"] = round((pred.argmax(1) == labels).float().mean().item(), 3)
            row[f"sample_s_g{w:g}"] = round(time.perf_counter() - t1, 1)
            row[f"dark_px_g{w:g}"] = dark_fraction(images)
            if reference is not None:
                feats = inception_features(images, batch_size=25, progress=False)
                row[f"fid_g{w:g}"] = round(frechet_distance_of_features(feats, reference), 1)
            if a.grid is not None and step + 1 == a.steps and w == scales[-1]:
                from torchvision.utils import save_image

                save_image(images.float() / 255, a.grid, nrow=a.per_class)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
