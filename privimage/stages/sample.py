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
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from privimage.config import Config, sampler_name
from privimage.data.imagesets import safe_name
from privimage.diffusion import sample_batch, to_uint8
from privimage.io.release import Output
from privimage.models import check_same_diffusion, load_unet, weight_files
from privimage.plots import save_image_grid
from privimage.runtime import (
    mark_done,
    read_json,
    require_upstream,
    resolve_device,
    stage_dir,
    write_json,
)
from privimage.stages import pretrain

log = logging.getLogger(__name__)

STAGE = "sample"

# Post-processing of the DP model with public seeds (privimage.io.release): released as
# release/synthetic/. BN-statistics images have no DP model behind them and are withheld.
_FROM_MODEL = ("finetune/unet", "public")
RELEASE = {
    name: Output(inputs=_FROM_MODEL, dest=f"synthetic/{name}")
    for name in ("images", "samples.npz", "dataset", "grid.png")
}


def class_seeds(*, num_classes: int, images_per_class: int, first_seed: int) -> np.ndarray:
    """Seeds laid out class by class: seeds[c, i] = first_seed + c * images_per_class + i."""
    return first_seed + np.arange(num_classes * images_per_class).reshape(
        num_classes, images_per_class
    )


def to_pil(image: torch.Tensor) -> Image.Image:
    arr = image.numpy()
    return Image.fromarray(arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0)))


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


def save_png(image: torch.Tensor, path: Path) -> None:
    # Written aside and renamed, so a crash never leaves a truncated PNG to resume from.
    tmp = path.with_name(path.name + ".tmp")
    to_pil(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def write_dataset(
    out: Path,
    *,
    paths: list[Path],
    labels: np.ndarray,
    seeds: np.ndarray,
    class_names: list[str],
    grid_images_per_class: int,
    title: str,
) -> None:
    """``samples.npz``, ``dataset/`` and ``grid.png`` from the PNGs at ``paths``.

    Everything is rebuilt from the PNGs (lossless), so a resumed run's outputs are
    byte-for-byte those of an uninterrupted one. Shared by every synthesizer, so the
    evaluation reads the same files whichever made them.
    """
    num_classes = len(class_names)
    pil_images = [Image.open(p).copy() for p in paths]
    arrays = [np.asarray(im) for im in pil_images]
    images = np.stack([a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrays])
    np.savez_compressed(
        out / "samples.npz",
        images=images,
        labels=labels.astype(np.int64),
        seeds=seeds.astype(np.int64),
        class_names=np.array(class_names),
    )
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=class_names),
            "seed": datasets.Value("int64"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"image": pil_images, "label": labels.tolist(), "seed": seeds.tolist()},
        features=features,
    )
    if (out / "dataset").exists():
        shutil.rmtree(out / "dataset")
    ds.save_to_disk(str(out / "dataset"))
    tensor = torch.from_numpy(images)
    rows = [tensor[labels == c][:grid_images_per_class] for c in range(num_classes)]
    save_image_grid(rows, out / "grid.png", row_labels=class_names, title=title)


def run(cfg: Config, run_dir: Path) -> Path:
    """Sample ``images_per_class`` images per class; see the module docstring for outputs."""
    if cfg.synthesizer == "bnstat":
        from privimage.stages.sample_bnstat import run_bnstat

        return run_bnstat(cfg, run_dir)
    finetune_dir = require_upstream(run_dir, "finetune", STAGE)
    out = stage_dir(run_dir, STAGE)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    class_names = pretrain.class_names(run_dir, needed_by=STAGE)
    num_classes = len(class_names)
    solver = sampler_name(cfg)

    model, trained_with = load_unet(finetune_dir / "unet")
    check_same_diffusion(trained_with, cfg.diffusion, finetune_dir / "unet")
    model = model.to(device).eval()
    seeds = class_seeds(
        num_classes=num_classes,
        images_per_class=cfg.sample.images_per_class,
        first_seed=cfg.sample.first_seed,
    ).reshape(-1)
    labels = np.repeat(np.arange(num_classes), cfg.sample.images_per_class)
    image_dir = out / "images"
    paths = [
        image_dir / safe_name(class_names[label]) / f"{seed:06d}.png"
        for label, seed in zip(labels, seeds, strict=True)
    ]

    # Resume: every image is a function of its seed alone, so the PNGs of an interrupted
    # attempt are kept and only the missing seeds are sampled.
    fingerprint = _fingerprint(cfg, finetune_dir / "unet", solver)
    progress_file = out / "progress.json"
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
                save_png(img, paths[i])
            bar.update(len(chunk))

    write_dataset(
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
