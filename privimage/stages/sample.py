"""Stage 4: sample the labelled synthetic dataset from the fine-tuned UNet.

Image i of class c uses seed ``first_seed + c * images_per_class + i`` and depends on
that seed alone (deterministic Heun/Euler/DDIM), so any split of the job gives the same
images, and an interrupted job resumes by sampling only the seeds whose PNG is missing.
Sampling is post-processing of a DP model: it costs no privacy.

Writes ``sample/``: ``images/<class>/<seed>.png``, ``samples.npz`` (images, labels,
seeds, class names), ``dataset/`` (Hugging Face ``save_to_disk``), ``grid.png``, and
``progress.json`` (what the images on disk were made with).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from privimage.config.schema import Config
from privimage.data.imagesets import safe_name
from privimage.diffusion import sample_batch, sampler_name, to_uint8
from privimage.io import artifacts
from privimage.io.artifacts import Stage, mark_done, read_json, require_upstream, stage_dir
from privimage.io.atomic import write_json
from privimage.io.release import Output
from privimage.nets.models import check_same_diffusion, load_unet, weight_files
from privimage.runtime import resolve_device

log = logging.getLogger(__name__)

STAGE = "sample"

# Post-processing of the DP model with public seeds (privimage.io.release): released as
# release/synthetic/. (BN-statistics synthesis, stages/sample_bnstat.py, declares its own.)
_FROM_MODEL = (f"finetune/{artifacts.UNET}", "public")
RELEASE = {
    name: Output(inputs=_FROM_MODEL, dest=f"synthetic/{name}")
    for name in (artifacts.IMAGES, artifacts.SAMPLES, artifacts.DATASET, artifacts.GRID)
}


def class_seeds(*, num_classes: int, images_per_class: int, first_seed: int) -> np.ndarray:
    """Seeds laid out class by class: seeds[c, i] = first_seed + c * images_per_class + i."""
    return first_seed + np.arange(num_classes * images_per_class).reshape(
        num_classes, images_per_class
    )


def _fingerprint(cfg: Config, unet_dir: Path, solver: str) -> dict:
    """What the images on disk depend on; leftovers made under anything else are wiped."""
    weights = weight_files(unet_dir)
    return {
        "weights": [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights],
        "solver": solver,
        "num_inference_steps": cfg.sample.num_inference_steps,
        "guidance_scale": cfg.sample.guidance_scale,
        "images_per_class": cfg.sample.images_per_class,
        "first_seed": cfg.sample.first_seed,
        "diffusion": asdict(cfg.diffusion),
    }


def run(cfg: Config, run_dir: Path) -> Path:
    """Sample ``images_per_class`` images per class; see the module docstring for outputs."""
    finetune_dir = require_upstream(run_dir, "finetune", STAGE)
    out = stage_dir(run_dir, STAGE)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    class_names = artifacts.class_names(run_dir, needed_by=STAGE)
    num_classes = len(class_names)
    solver = sampler_name(cfg)

    model, trained_with = load_unet(finetune_dir / artifacts.UNET)
    check_same_diffusion(trained_with, cfg.diffusion, finetune_dir / artifacts.UNET)
    model = model.to(device).eval()
    seeds = class_seeds(
        num_classes=num_classes,
        images_per_class=cfg.sample.images_per_class,
        first_seed=cfg.sample.first_seed,
    ).reshape(-1)
    labels = np.repeat(np.arange(num_classes), cfg.sample.images_per_class)
    image_dir = out / artifacts.IMAGES
    paths = [
        image_dir / safe_name(class_names[label]) / f"{seed:06d}.png"
        for label, seed in zip(labels, seeds, strict=True)
    ]

    # Resume: every image is a function of its seed alone, so the PNGs of an interrupted
    # attempt are kept and only the missing seeds are sampled.
    fingerprint = _fingerprint(cfg, finetune_dir / artifacts.UNET, solver)
    progress_file = out / artifacts.PROGRESS
    if progress_file.exists() and read_json(progress_file) != fingerprint:
        log.info("sample: settings or weights changed since the last attempt; starting over")
        shutil.rmtree(image_dir, ignore_errors=True)
    write_json(progress_file, fingerprint)
    for name in {p.parent for p in paths}:
        name.mkdir(parents=True, exist_ok=True)
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if len(todo) < len(paths):
        log.info(
            "sample: resuming, %d of %d images already on disk", len(paths) - len(todo), len(paths)
        )
    image_shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    batch = cfg.sample.batch_size
    with tqdm(total=len(paths), initial=len(paths) - len(todo), desc="sampling", unit="img") as bar:
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            x = sample_batch(
                model,
                spec=cfg.diffusion,
                seeds=seeds[chunk].tolist(),
                labels=torch.from_numpy(labels[chunk]),
                image_shape=image_shape,
                num_steps=cfg.sample.num_inference_steps,
                solver=solver,
                guidance_scale=cfg.sample.guidance_scale,
                device=device,
            )
            for i, img in zip(chunk, to_uint8(x.cpu()), strict=True):
                artifacts.save_png(img, paths[i])
            bar.update(len(chunk))

    artifacts.write_sample_set(
        out,
        paths=paths,
        labels=labels,
        seeds=seeds,
        class_names=class_names,
        grid_images_per_class=cfg.sample.grid_images_per_class,
        title=(
            f"synthetic samples ({solver}, {cfg.sample.num_inference_steps} steps, "
            f"guidance {cfg.sample.guidance_scale:g})"
        ),
    )
    log.info("wrote %d synthetic images to %s", len(paths), out)
    mark_done(out)
    return out


SPEC = Stage(name=STAGE, run=run, release=lambda cfg: RELEASE)
