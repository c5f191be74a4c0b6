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
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from privimage.config.schema import Config
from privimage.diffusion import sample_batch, sampler_name
from privimage.io import artifacts
from privimage.io.artifacts import Stage, mark_done, require_upstream, stage_dir
from privimage.io.cards import write_dataset_card
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


def _fingerprint(cfg: Config, unet_dir: Path, solver: str) -> dict:
    """What the images on disk depend on; leftovers made under anything else are wiped."""
    weights = weight_files(unet_dir)
    return {
        "weights": [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights],
        "solver": solver,
        "num_inference_steps": cfg.sample.num_inference_steps,
        "guidance_scale": cfg.sample.guidance_scale,
        "black_below_uint8": cfg.sample.black_below_uint8,
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
    solver = sampler_name(cfg)

    model, trained_with = load_unet(finetune_dir / artifacts.UNET)
    check_same_diffusion(trained_with, cfg.diffusion, finetune_dir / artifacts.UNET)
    model = model.to(device).eval()
    layout = artifacts.SampleLayout.class_by_class(
        out,
        class_names,
        images_per_class=cfg.sample.images_per_class,
        first_seed=cfg.sample.first_seed,
    )
    seeds, labels, paths = layout.seeds, layout.labels, layout.paths

    # Resume: every image is a function of its seed alone, so the PNGs of an interrupted
    # attempt are kept and only the missing seeds are sampled.
    fingerprint = _fingerprint(cfg, finetune_dir / artifacts.UNET, solver)
    if artifacts.restart_unless_made_with(out, fingerprint):
        log.info("sample: settings or weights changed since the last attempt; starting over")
    for name in {p.parent for p in paths}:
        name.mkdir(parents=True, exist_ok=True)
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if len(todo) < len(paths):
        log.info(
            "sample: resuming, %d of %d images already on disk", len(paths) - len(todo), len(paths)
        )
    batch = cfg.sample.batch_size
    with tqdm(total=len(paths), initial=len(paths) - len(todo), desc="sampling", unit="img") as bar:
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            images = sample_batch(
                model,
                spec=cfg.diffusion,
                seeds=seeds[chunk].tolist(),
                labels=torch.from_numpy(labels[chunk]),
                num_steps=cfg.sample.num_inference_steps,
                solver=solver,
                guidance_scale=cfg.sample.guidance_scale,
                black_below_uint8=cfg.sample.black_below_uint8,
            )
            for i, img in zip(chunk, images, strict=True):
                artifacts.save_png(img, paths[i])
            bar.update(len(chunk))

    floor = cfg.sample.black_below_uint8
    artifacts.write_sample_set(
        out,
        layout,
        grid_images_per_class=cfg.sample.grid_images_per_class,
        title=(
            f"synthetic samples ({solver}, {cfg.sample.num_inference_steps} steps, "
            f"guidance {cfg.sample.guidance_scale:g}"
            + (f", black below {floor})" if floor else ")")
        ),
    )
    write_dataset_card(
        out / artifacts.DATASET, cfg, run_dir, images=len(paths), class_names=class_names
    )
    log.info("wrote %d synthetic images to %s", len(paths), out)
    mark_done(out)
    return out


SPEC = Stage(name=STAGE, run=run, release=lambda cfg: RELEASE)
