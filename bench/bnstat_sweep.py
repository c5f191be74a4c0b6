"""A small sweep behind the BN-statistics synthesis defaults (``conf/bnstat/default.yaml``).

BN-statistics synthesis (Soufleri et al. 2022, :mod:`privimage.bnstat`) has one loss with
several weights and an optimiser; this bench changes one setting at a time around the
defaults and measures, for each setting, on the same teacher and the same seeds:

* ``bn``, ``ce``: the last step's BN-statistics distance and cross-entropy, mean over the
  batches (how well the images match what the synthesis aims at);
* ``student acc``: a CNN trained from scratch on the synthetic images alone, scored on real
  images the teacher never saw (the utility the method claims);
* ``L2 nearest``, ``SSIM nearest``: median pixel L2 distance and SSIM between each synthetic
  image and its nearest teacher-training image (how far from the sensitive data it stays);
* the seconds the synthesis took.

No hyperparameter is chosen on the sensitive *test* split: the sensitive training split is
cut in two (stratified, ``--validation-fraction``); the teacher and its statistics come
from the first part, the students are scored on the second. The test split is never read.

Usage::

    .venv/bin/python bench/bnstat_sweep.py                        # MNIST (embedded), CPU: slow
    python bench/bnstat_sweep.py --data cifar10 --device cuda --images-per-class 50
    python bench/bnstat_sweep.py --only default steps=100 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from privimage import (
    ClassStatistics,
    ResNet,
    accuracy,
    cache_root,
    compose,
    load_dataset,
    load_group,
    nearest_neighbours,
    pixel_vectors,
    predict_logits,
    resolve_device,
    ssim,
    stratified_split,
    synthesize_bnstat,
    train_bnstat_teacher,
    train_classifier,
)

# One change at a time around the defaults: name -> (field, value).
VARIATIONS = {
    "default": {},
    "steps=100": {"steps": 100},
    "steps=1000": {"steps": 1000},
    "lr=0.03": {"lr": 0.03},
    "lr=0.3": {"lr": 0.3},
    "bn=0": {"bn_weight": 0.0},  # class inversion only, no statistics
    "bn=10": {"bn_weight": 10.0},
    "ce=0": {"ce_weight": 0.0},  # statistics only
    "tv=0": {"tv_weight": 0.0},
    "tv=0.1": {"tv_weight": 0.1},
    "jitter=2": {"jitter_pixels": 2},
    "flip": {"flip": True},
    "batch=10": {"batch_size": 10},
}


def default_cache() -> Path:
    """The cache folder a run would use (``cache_dir`` of ``conf/config.yaml``)."""
    return cache_root(compose().cache_dir)


def _student_accuracy(x, y, val_x, val_y, *, num_classes, args, device) -> float:
    model = train_classifier(
        x,
        y,
        num_classes=num_classes,
        width=32,
        epochs=args.student_epochs,
        batch_size=64,
        lr=2e-3,
        device=device,
        seed=args.seed,
        hflip=args.hflip,
        progress=False,
    )
    return accuracy(predict_logits(model, val_x, batch_size=500, device=device), val_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="mnist5k", help="a conf/data preset")
    parser.add_argument("--data-path", default=None, help="data.path (archive or folder)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--teacher-epochs", type=int, default=None)
    parser.add_argument("--images-per-class", type=int, default=20)
    parser.add_argument("--student-epochs", type=int, default=30)
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--max-validation-images", type=int, default=2000)
    parser.add_argument("--only", nargs="*", default=None, help="names of VARIATIONS to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument(
        "--teacher",
        default=None,
        help="teacher file: loaded when it exists, else trained and saved there (lets "
        "several processes split the settings with --only and share one teacher)",
    )
    args = parser.parse_args()

    device = resolve_device(args.device)
    data_cfg = load_group("data", args.data)
    data_cfg.path = args.data_path or data_cfg.path
    defaults = load_group("bnstat", "default")
    args.hflip = args.data != "mnist5k" and data_cfg.channels == 3
    teacher_epochs = args.teacher_epochs or defaults.teacher_epochs

    ds = load_dataset(data_cfg, cache_dir=default_cache())
    train = ds.train
    teach_idx, val_idx = stratified_split(
        train.labels.numpy(), args.validation_fraction, seed=args.seed
    )
    val_idx = val_idx[: args.max_validation_images]
    teach, val = train.subset(teach_idx), train.subset(val_idx)
    num_classes = ds.num_classes
    x = teach.as_float()
    print(
        f"data {args.data}: teacher part {len(teach)}, validation part {len(val)} "
        f"(sensitive test split unused); device {device}"
    )

    t0 = time.perf_counter()
    if args.teacher and Path(args.teacher).exists():
        saved = torch.load(args.teacher, map_location="cpu", weights_only=False)
        teacher = ResNet(
            in_channels=data_cfg.channels, num_classes=num_classes, width=defaults.teacher_width
        )
        teacher.load_state_dict(saved["state_dict"])
        teacher = teacher.to(device).eval()
        stats = ClassStatistics.from_dict(saved["statistics"])
    else:
        teacher, stats = train_bnstat_teacher(
            dataclasses.replace(defaults, teacher_epochs=teacher_epochs, teacher_hflip=args.hflip),
            x,
            teach.labels,
            num_classes=num_classes,
            device=device,
            seed=args.seed,
        )
        if args.teacher:
            state = {k: v.cpu() for k, v in teacher.state_dict().items()}
            torch.save({"state_dict": state, "statistics": stats.to_dict()}, args.teacher)
    val_x = val.as_float()
    teacher_acc = accuracy(
        predict_logits(teacher, val_x, batch_size=500, device=device), val.labels
    )
    print(
        f"teacher: {teacher_epochs} epochs in {time.perf_counter() - t0:.0f} s, "
        f"validation accuracy {teacher_acc:.3f}"
    )

    # Reference: a student trained on as many *real* teacher-part images.
    n = args.images_per_class
    rng = np.random.default_rng(args.seed)
    real_idx = np.concatenate(
        [
            rng.choice(np.flatnonzero(teach.labels.numpy() == c), n, replace=False)
            for c in range(num_classes)
        ]
    )
    real_acc = _student_accuracy(
        x[real_idx],
        teach.labels[real_idx],
        val_x,
        val.labels,
        num_classes=num_classes,
        args=args,
        device=device,
    )
    print(f"student on {len(real_idx)} real images: validation accuracy {real_acc:.3f}")

    teach_pixels = pixel_vectors(teach.images)
    names = args.only or list(VARIATIONS)
    rows = []
    for name in names:
        # cfg.bnstat is the synthesis settings plus the teacher's and the batch size.
        weights = dataclasses.replace(defaults, **VARIATIONS[name])
        batch_size = weights.batch_size
        start = time.perf_counter()
        images, labels, bn_losses, ce_losses = [], [], [], []
        for c in range(num_classes):
            for first in range(0, n, batch_size):
                last: dict = {}
                images.append(
                    synthesize_bnstat(
                        teacher,
                        stats,
                        c,
                        num_images=min(batch_size, n - first),
                        image_shape=tuple(x.shape[1:]),
                        seed=args.seed + c * n + first,
                        weights=weights,
                        device=device,
                        on_step=lambda step, parts: last.update(parts),  # noqa: B023
                    )
                )
                labels += [c] * len(images[-1])
                bn_losses.append(last["bn"])
                ce_losses.append(last["ce"])
        seconds = time.perf_counter() - start
        synth = torch.cat(images)
        synth_u8 = ((synth + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        acc = _student_accuracy(
            synth,
            torch.tensor(labels),
            val_x,
            val.labels,
            num_classes=num_classes,
            args=args,
            device=device,
        )
        dist, idx = nearest_neighbours(pixel_vectors(synth_u8), teach_pixels, n=1, device=device)
        similarity = ssim(synth_u8, teach.images[torch.from_numpy(idx[:, 0])])
        row = {
            "setting": name,
            "bn": statistics.mean(bn_losses),
            "ce": statistics.mean(ce_losses),
            "student_accuracy": acc,
            "pixel_l2_nearest_median": float(np.median(dist[:, 0])),
            "ssim_nearest_median": float(np.median(similarity)),
            "seconds": seconds,
        }
        rows.append(row)
        print(
            f"{name:30s} bn {row['bn']:8.3f}  ce {row['ce']:6.3f}  student acc {acc:.3f}  "
            f"L2 nearest {row['pixel_l2_nearest_median']:6.2f}  "
            f"SSIM nearest {row['ssim_nearest_median']:.3f}  {seconds:6.1f} s",
            flush=True,
        )

    print(
        f"\n{args.data}: teacher {teacher_epochs} epochs (validation acc {teacher_acc:.3f}); "
        f"{n} images/class; students {args.student_epochs} epochs; "
        f"real-data student {real_acc:.3f}\n"
    )
    print("| setting | BN distance | CE | student acc | L2 to nearest | SSIM to nearest | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['bn']:.3f} | {r['ce']:.3f} | {r['student_accuracy']:.3f} "
            f"| {r['pixel_l2_nearest_median']:.2f} | {r['ssim_nearest_median']:.3f} "
            f"| {r['seconds']:.1f} |"
        )
    if args.json:
        summary = {
            "data": args.data,
            "teacher_epochs": teacher_epochs,
            "teacher_validation_accuracy": teacher_acc,
            "images_per_class": n,
            "real_student_accuracy": real_acc,
            "device": str(device),
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
