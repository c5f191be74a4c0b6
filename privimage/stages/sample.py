"""Stage 4: sample the labelled synthetic dataset from the fine-tuned UNet.

Image i of class c uses seed ``first_seed + c * images_per_class + i`` and depends on
that seed alone (deterministic DDIM), so any split of the job gives the same images.
Sampling is post-processing of a DP model: it costs no privacy.

Writes ``sample/``: ``images/<class>/<seed>.png``, ``samples.npz`` (images, labels,
seeds, class names), ``dataset/`` (Hugging Face ``save_to_disk``), ``grid.png``.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import torch
from diffusers import UNet2DModel
from PIL import Image

from privimage.config import Config
from privimage.diffusion import sample_in_batches
from privimage.plots import save_image_grid
from privimage.runtime import mark_done, read_json, require_upstream, resolve_device, stage_dir

log = logging.getLogger(__name__)

STAGE = "sample"


def folder_name(name: str) -> str:
    """A class name made safe as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def class_seeds(*, num_classes: int, images_per_class: int, first_seed: int) -> np.ndarray:
    """Seeds laid out class by class: seeds[c, i] = first_seed + c * images_per_class + i."""
    return first_seed + np.arange(num_classes * images_per_class).reshape(
        num_classes, images_per_class
    )


def to_pil(image: torch.Tensor) -> Image.Image:
    arr = image.numpy()
    return Image.fromarray(arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0)))


def run(cfg: Config, run_dir: Path) -> Path:
    """Sample ``images_per_class`` images per class; see the module docstring for outputs."""
    finetune_dir = require_upstream(run_dir, "finetune", STAGE)
    query_dir = require_upstream(run_dir, "query", STAGE)
    out = stage_dir(run_dir, STAGE)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    class_names = [c["name"] for c in read_json(query_dir / "selection.json")["classes"]]
    num_classes = len(class_names)

    model = UNet2DModel.from_pretrained(finetune_dir / "unet").to(device)
    seeds = class_seeds(
        num_classes=num_classes,
        images_per_class=cfg.sample.images_per_class,
        first_seed=cfg.sample.first_seed,
    )
    labels = np.repeat(np.arange(num_classes), cfg.sample.images_per_class)
    images = sample_in_batches(
        model,
        seeds=seeds.reshape(-1).tolist(),
        labels=torch.from_numpy(labels),
        image_shape=(cfg.data.channels, cfg.data.resolution, cfg.data.resolution),
        num_train_timesteps=cfg.pretrain.num_train_timesteps,
        num_inference_steps=cfg.sample.num_inference_steps,
        batch_size=cfg.sample.batch_size,
        device=device,
    )

    image_dir = out / "images"
    if image_dir.exists():  # leftovers of an interrupted attempt
        shutil.rmtree(image_dir)
    pil_images = [to_pil(img) for img in images]
    for img, label, seed in zip(pil_images, labels, seeds.reshape(-1), strict=True):
        folder = image_dir / folder_name(class_names[label])
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{seed:06d}.png")

    np.savez_compressed(
        out / "samples.npz",
        images=images.numpy(),
        labels=labels.astype(np.int64),
        seeds=seeds.reshape(-1).astype(np.int64),
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
        {"image": pil_images, "label": labels.tolist(), "seed": seeds.reshape(-1).tolist()},
        features=features,
    )
    if (out / "dataset").exists():
        shutil.rmtree(out / "dataset")
    ds.save_to_disk(str(out / "dataset"))

    n_grid = cfg.sample.grid_images_per_class
    rows = [images[labels == c][:n_grid] for c in range(num_classes)]
    save_image_grid(rows, out / "grid.png", row_labels=class_names, title="synthetic samples")
    log.info("wrote %d synthetic images to %s", len(images), out)
    mark_done(out)
    return out
