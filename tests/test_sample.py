"""The sample stage: every output format, split and resumed jobs give the same images.

The fine-tuned UNet is a real (untrained) diffusers model saved the way the fine-tune
stage saves it; sampling it exercises the whole stage in seconds.
"""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from privimage.errors import ConfigError
from privimage.io.artifacts import mark_done
from privimage.io.atomic import write_json
from privimage.nets.models import build_unet, save_unet
from privimage.stages import sample

CLASSES = ["zero", "one", "two"]
BASE = [
    "experiment=smoke",
    "stages=[sample]",
    "sample.images_per_class=5",
    "sample.num_inference_steps=3",
    "data.resolution=16",
    "public.resolution=16",
]


def _upstream(run_dir, cfg, formulation="edm"):
    q = run_dir / "query"
    q.mkdir(parents=True)
    write_json(q / "selection.json", {"classes": [{"name": n} for n in CLASSES]})
    mark_done(q)
    torch.manual_seed(0)
    model = build_unet(cfg.model, resolution=16, channels=1, num_classes=len(CLASSES))
    with torch.no_grad():
        model.class_embedding.weight.mul_(30)  # classes visibly apart in an untrained net
    spec = cfg.diffusion
    if formulation != spec.formulation:
        spec = type(spec)(formulation=formulation)
    save_unet(model, run_dir / "finetune" / "unet", diffusion=spec)
    mark_done(run_dir / "finetune")


def _sample(run_dir, compose, *extra):
    cfg = compose([*BASE, *extra])
    if not (run_dir / "finetune").exists():
        _upstream(run_dir, cfg)
    return sample.run(cfg, run_dir), cfg


def _images(run_dir, compose, *extra):
    out, _ = _sample(run_dir, compose, *extra)
    return np.load(out / "samples.npz")["images"]


def test_writes_folder_dataset_npz_and_grid(tmp_path, compose):
    out, _ = _sample(tmp_path, compose)
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (15, 1, 16, 16) and npz["images"].dtype == np.uint8
    assert npz["labels"].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert npz["seeds"].tolist() == list(range(15))
    assert npz["class_names"].tolist() == CLASSES
    for label, seed, image in zip(npz["labels"], npz["seeds"], npz["images"], strict=True):
        png = np.asarray(Image.open(out / "images" / CLASSES[label] / f"{seed:06d}.png"))
        assert np.array_equal(png, image[0])
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert ds.features["label"].names == CLASSES
    assert ds["label"] == npz["labels"].tolist() and ds["seed"] == npz["seeds"].tolist()
    assert np.array_equal(np.asarray(ds[7]["image"]), npz["images"][7, 0])
    assert (out / "grid.png").stat().st_size > 0 and (out / "DONE").exists()
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_split_and_resumed_jobs_give_the_same_images(tmp_path, compose):
    whole, _ = _sample(tmp_path / "whole", compose, "sample.batch_size=15")
    ref = np.load(whole / "samples.npz")["images"]

    split, _ = _sample(tmp_path / "split", compose, "sample.batch_size=4")
    # Other batch compositions may change float summation order, never an image by more
    # than one rounding step.
    got = np.load(split / "samples.npz")["images"].astype(int)
    assert np.abs(got - ref).max() <= 1 and (got != ref).mean() < 1e-3

    # An interrupted job: some PNGs written, no DONE. The rerun samples only the rest.
    resumed = tmp_path / "resumed"
    out, _ = _sample(resumed, compose)
    (out / "DONE").unlink()
    (out / "samples.npz").unlink()
    gone = sorted((out / "images").rglob("*.png"))[::3]
    for path in gone:
        path.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    out, _ = _sample(resumed, compose)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()), "kept images were redone"
    assert all(p.exists() for p in gone)
    got = np.load(out / "samples.npz")["images"].astype(int)
    assert np.abs(got - ref).max() <= 1 and (got != ref).mean() < 1e-3


@pytest.mark.slow
def test_changed_settings_start_over(tmp_path, compose):
    out, _ = _sample(tmp_path, compose)
    before = np.load(out / "samples.npz")["images"]
    (out / "DONE").unlink()
    out, _ = _sample(tmp_path, compose, "sample.sampler=euler")
    assert json.loads((out / "progress.json").read_text())["solver"] == "euler"
    assert not np.array_equal(np.load(out / "samples.npz")["images"], before)


@pytest.mark.slow
def test_guidance_changes_the_images(tmp_path, compose):
    a = _images(tmp_path / "plain", compose)
    b = _images(tmp_path / "guided", compose, "sample.guidance_scale=3")
    assert not np.array_equal(a, b)


@pytest.mark.slow
def test_the_black_floor_clears_dark_pixels_and_nothing_else(tmp_path, compose):
    a = _images(tmp_path / "plain", compose)
    b = _images(tmp_path / "floored", compose, "sample.black_below_uint8=96")
    dark = a < 96
    assert 0.05 < dark.mean() < 0.95  # the test means something: both kinds of pixel occur
    assert (b[dark] == 0).all()
    assert np.array_equal(b[~dark], a[~dark])
    on_disk = np.asarray(
        Image.open(next((tmp_path / "floored" / "sample" / "images").rglob("*.png")))
    )
    assert not ((on_disk > 0) & (on_disk < 96)).any()


def test_the_black_floor_must_be_a_pixel_level(compose):
    with pytest.raises(ConfigError, match="sample.black_below_uint8=256 must be a pixel level"):
        compose([*BASE, "sample.black_below_uint8=256"])


@pytest.mark.slow
def test_a_unet_of_another_formulation_is_refused(tmp_path, compose):
    cfg = compose(BASE)
    _upstream(tmp_path, cfg, formulation="ddpm")
    with pytest.raises(ConfigError, match="diffusion.formulation=ddpm"):
        sample.run(cfg, tmp_path)
    # The same run under the DDPM formulation samples with DDIM.
    cfg = compose([*BASE, "diffusion=ddpm"])
    out = sample.run(cfg, tmp_path)
    assert json.loads((out / "progress.json").read_text())["solver"] == "ddim"


def test_a_sampler_that_does_not_fit_the_formulation_is_refused(compose):
    with pytest.raises(ConfigError, match="sample.sampler='ddim' does not fit"):
        compose([*BASE, "sample.sampler=ddim"])


@pytest.mark.parametrize(
    ("overrides", "scheduler"),
    [
        ([], "EDMHeunScheduler"),
        (["sample.sampler=euler", "sample.guidance_scale=2"], "EDMEulerScheduler"),
        (["sample.sampler=dpmpp_2m"], "EDMDPMSolverMultistepScheduler"),
        (["sample.sampler=euler", "sample.black_below_uint8=96"], "EDMEulerScheduler"),
        (["diffusion=ddpm"], "DDIMScheduler"),
    ],
)
def test_the_saved_pipeline_draws_the_stages_images(tmp_path, compose, overrides, scheduler):
    """A pipeline saved as fine-tuning saves it, loaded by diffusers' generic loader,
    gives the sample stage's images seed for seed, with every sampler."""
    from diffusers import DiffusionPipeline

    from privimage.diffusion import configured_pipeline
    from privimage.diffusion.pipeline import save_pipeline
    from privimage.nets.models import load_unet

    cfg = compose([*BASE, *overrides])
    _upstream(tmp_path, cfg, formulation=cfg.diffusion.formulation)
    out = sample.run(cfg, tmp_path)
    model, _ = load_unet(tmp_path / "finetune" / "unet")
    folder = save_pipeline(configured_pipeline(model, cfg, CLASSES), tmp_path / "pipeline")
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(pipe).__name__ == "PrivImagePipeline"
    assert type(pipe.scheduler).__name__ == scheduler
    npz = np.load(out / "samples.npz")
    generators = [torch.Generator().manual_seed(int(s)) for s in npz["seeds"]]
    by_name = [CLASSES[y] for y in npz["labels"]]  # labels by name work too
    images = pipe(class_labels=by_name, generator=generators, output_type="np").images
    assert np.array_equal((images * 255).round().astype(np.uint8)[..., 0], npz["images"][:, 0])
    with pytest.raises(ValueError, match="class label 4 is out of range; use 0..2"):
        pipe(class_labels=[4])
