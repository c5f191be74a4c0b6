"""The sample stage for ``synthesizer=bnstat``: BN-statistics synthesis (Soufleri et al.).

1. A BatchNorm ResNet (the teacher) trains on the sensitive training split, without noise.
2. Its class-wise BN input statistics are recorded over that split.
3. Each class's images are optimised from noise to match them (:mod:`privimage.bnstat`),
   in batches of ``bnstat.batch_size``; batch ``b`` of class ``c`` starts from the seed of
   its first image (``first_seed + c * images_per_class + b * batch_size``), so a batch
   depends only on its seed and an interrupted job redoes only unfinished batches.

**Not differentially private.** The run's ledger records a ``non_private`` entry before
the sensitive data is read, and the evaluation report says so next to the leakage
measurements. Writes the same ``sample/`` files as the diffusion path (so ``evaluate``
works unchanged) plus ``teacher.pt`` (weights and class-wise statistics) and
``synthesis.jsonl`` (the loss of every batch's last step).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from privimage import bnstat, data
from privimage.config.schema import BNStatConfig, Config
from privimage.diffusion import to_uint8
from privimage.dp.ledger import run_ledger
from privimage.io import artifacts
from privimage.io.artifacts import Stage, mark_done, stage_dir
from privimage.io.atomic import torch_save
from privimage.io.cards import write_dataset_card
from privimage.io.release import Output
from privimage.nets.classifier import train_classifier
from privimage.nets.models import ResNet
from privimage.runtime import cache_root, resolve_device

log = logging.getLogger(__name__)

STAGE = "sample"
# The images come from a teacher trained without DP on the sensitive data; the ledger
# records that use, so the release withholds them (privimage.io.release).
RELEASE = {
    name: Output(inputs=("data",), dest=f"synthetic/{name}")
    for name in (artifacts.IMAGES, artifacts.SAMPLES, artifacts.DATASET, artifacts.GRID)
}
NON_PRIVATE_NOTE = (
    "BN-statistics synthesis: a BatchNorm classifier trains on the sensitive training split "
    "without noise and the images are optimised to match its class-wise BN statistics; no "
    "differential-privacy guarantee"
)


def train_teacher(
    b: BNStatConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    device: torch.device,
    seed: int,
) -> tuple[ResNet, bnstat.ClassStatistics]:
    """Train the BatchNorm teacher on float ``images`` and record its class-wise statistics."""
    model = train_classifier(
        images,
        labels,
        num_classes=num_classes,
        width=b.teacher_width,
        epochs=b.teacher_epochs,
        batch_size=b.teacher_batch_size,
        lr=b.teacher_lr,
        device=device,
        seed=seed,
        hflip=b.teacher_hflip,
        model=ResNet(in_channels=images.shape[1], num_classes=num_classes, width=b.teacher_width),
        desc="bnstat teacher (sensitive data, not DP)",
    )
    stats = bnstat.classwise_bn_statistics(
        model, images, labels, num_classes=num_classes, device=device
    )
    return model.eval(), stats


def _teacher(cfg: Config, sensitive: data.ImageDataset, out: Path, device: torch.device):
    """Train (or reload) the teacher; returns it, its class-wise statistics and the
    settings it was trained with (part of the synthesized images' fingerprint)."""
    b = cfg.bnstat
    settings = {
        "width": b.teacher_width,
        "epochs": b.teacher_epochs,
        "batch_size": b.teacher_batch_size,
        "lr": b.teacher_lr,
        "hflip": b.teacher_hflip,
        "seed": cfg.seed,
        "data": data.content_key(cfg.data),
    }
    path = out / "teacher.pt"
    num_classes = sensitive.num_classes
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved["settings"] == settings:
            model = ResNet(
                in_channels=sensitive.train.images.shape[1],
                num_classes=num_classes,
                width=b.teacher_width,
            )
            model.load_state_dict(saved["state_dict"])
            stats = bnstat.ClassStatistics.from_dict(saved["statistics"])
            return model.to(device).eval(), stats, settings
        log.info("bnstat: teacher settings changed; training a new teacher")
    model, stats = train_teacher(
        b,
        sensitive.train.as_float(),
        sensitive.train.labels,
        num_classes=num_classes,
        device=device,
        seed=cfg.seed,
    )
    torch_save(
        {
            "settings": settings,
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "statistics": stats.to_dict(),
        },
        path,
    )
    return model, stats, settings


def run(cfg: Config, run_dir: Path) -> Path:
    """Make ``images_per_class`` images per class by BN-statistics synthesis."""
    out = stage_dir(run_dir, STAGE)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    ledger = run_ledger(cfg, run_dir)
    # Recorded before the sensitive data is read, like every mechanism.
    ledger.record_non_private(stage=STAGE, name="bnstat", description=NON_PRIVATE_NOTE)
    sensitive = data.load(cfg.data, cache_dir=cache_root(cfg.cache_dir))
    class_names = sensitive.class_names
    model, stats, teacher_settings = _teacher(cfg, sensitive, out, device)
    del sensitive  # the synthesis reads only the teacher and the statistics

    b, s = cfg.bnstat, cfg.sample
    weights = b  # cfg.bnstat is a SynthesisWeights
    fingerprint = {
        "teacher": teacher_settings,
        "weights": bnstat.synthesis_settings(weights),
        "batch_size": b.batch_size,
        "images_per_class": s.images_per_class,
        "first_seed": s.first_seed,
    }
    if artifacts.restart_unless_made_with(out, fingerprint):
        log.info("bnstat: settings changed since the last attempt; starting over")
    layout = artifacts.SampleLayout.class_by_class(
        out, class_names, images_per_class=s.images_per_class, first_seed=s.first_seed
    )
    _synthesize_missing(cfg, model, stats, weights, layout, out, device)

    artifacts.write_sample_set(
        out,
        layout,
        grid_images_per_class=s.grid_images_per_class,
        title=f"BN-statistics synthesis ({b.steps} steps; not differentially private)",
    )
    write_dataset_card(
        out / artifacts.DATASET,
        cfg,
        run_dir,
        images=len(layout.paths),
        class_names=list(class_names),
    )
    log.info("bnstat: wrote %d images to %s (not differentially private)", len(layout.paths), out)
    mark_done(out)
    return out


def _synthesize_missing(cfg, model, stats, weights, layout, out, device) -> None:
    """Synthesize every batch whose PNGs are not all on disk yet (a resumed run makes only
    the missing ones); each batch's last loss parts go to ``synthesis.jsonl``."""
    b, s = cfg.bnstat, cfg.sample
    paths, labels, seeds = layout.paths, layout.labels, layout.seeds
    num_classes = len(layout.class_names)
    image_shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    batches = []
    for c in range(num_classes):
        first = c * s.images_per_class
        for i in range(0, s.images_per_class, b.batch_size):
            end = min(i + b.batch_size, s.images_per_class)
            batches.append(list(range(first + i, first + end)))
    todo = [batch for batch in batches if not all(paths[j].exists() for j in batch)]
    with (
        tqdm(
            total=len(paths),
            initial=len(paths) - sum(map(len, todo)),
            desc="bnstat synthesis",
            unit="img",
        ) as bar,
        (out / "synthesis.jsonl").open("a") as log_file,
    ):
        last: dict = {}  # the last step's loss parts of the batch being made
        for batch in todo:
            c = int(labels[batch[0]])
            last.clear()
            images = bnstat.synthesize(
                model,
                stats,
                c,
                num_images=len(batch),
                image_shape=image_shape,
                seed=int(seeds[batch[0]]),
                weights=weights,
                device=device,
                on_step=lambda step, parts: last.update(parts, step=step),  # noqa: B023
            )
            paths[batch[0]].parent.mkdir(parents=True, exist_ok=True)
            for j, img in zip(batch, to_uint8(images), strict=True):
                artifacts.save_png(img, paths[j])
            log_file.write(json.dumps({"class": c, "first_seed": int(seeds[batch[0]]), **last}))
            log_file.write("\n")
            log_file.flush()
            bar.update(len(batch))
            bar.set_postfix(bn=f"{last['bn']:.3f}", ce=f"{last['ce']:.3f}")


SPEC = Stage(name=STAGE, run=run, release=lambda cfg: RELEASE)
