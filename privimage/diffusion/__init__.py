"""Diffusion math as pure functions: preconditioning, noise sampling, losses, samplers.

Two formulations share one UNet architecture, each a small class with one call shape
(``loss``, ``sample``, ``fixed_noise_loss``), as EDM's ``training/loss.py`` keeps them:

* **EDM** (:mod:`privimage.diffusion.edm`; Karras et al. 2022; the default, as in DPDM
  and PrivImage): ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)``, trained at
  log-normal noise levels with the weight ``lambda(sigma)``, and sampled by a
  deterministic solver on a Karras sigma schedule.
* **DDPM** (:mod:`privimage.diffusion.ddpm`): epsilon-prediction with a linear beta
  schedule, sampled by deterministic DDIM (eta = 0) through diffusers' ``DDIMScheduler``.

Losses are returned per example because DP-SGD clips each example's gradient
separately. Samplers draw each image's starting noise from its own seed and are
otherwise deterministic, so an image depends on its seed (and label) alone.
Classifier-free guidance uses the null label ``num_classes`` that
:func:`privimage.nets.models.build_unet` reserves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from privimage.config.schema import Config, DiffusionConfig
from privimage.diffusion.common import drop_labels, null_class, to_uint8
from privimage.diffusion.ddpm import DDPM
from privimage.diffusion.edm import EDM
from privimage.diffusion.pipeline import PrivImagePipeline, seed_generators

__all__ = [
    "FORMULATIONS",
    "SOLVERS",
    "configured_pipeline",
    "drop_labels",
    "formulation",
    "null_class",
    "pipeline_for",
    "sample_batch",
    "sample_unit_floats",
    "sampler_name",
    "solver_or_default",
    "to_uint8",
    "training_loss",
]

FORMULATIONS = {f.name: f for f in (EDM, DDPM)}
# The samplers that fit each formulation (the first is the default).
SOLVERS = {name: f.solvers for name, f in FORMULATIONS.items()}


def formulation(spec: DiffusionConfig) -> EDM | DDPM:
    """The formulation ``spec`` names, set up with its settings."""
    return FORMULATIONS[spec.formulation](spec)


def solver_or_default(solver: str | None, formulation: str) -> str:
    """``solver``, or the formulation's default when it is None."""
    return solver or SOLVERS[formulation][0]


def sampler_name(cfg: Config) -> str:
    """The sampler to use: ``sample.sampler`` or the formulation's default."""
    return solver_or_default(cfg.sample.sampler, cfg.diffusion.formulation)


def training_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    spec: DiffusionConfig,
    generator: torch.Generator | None = None,
    noise_draws: int = 1,
) -> torch.Tensor:
    """The per-example training loss of ``spec``'s formulation, shape ``(batch,)``."""
    return formulation(spec).loss(model, x0, labels, generator=generator, noise_draws=noise_draws)


def pipeline_for(
    model: torch.nn.Module,
    *,
    spec: DiffusionConfig,
    solver: str,
    class_names: Sequence[str] | None = None,
    num_inference_steps: int = 18,
    guidance_scale: float = 1.0,
    black_below_uint8: int = 0,
) -> PrivImagePipeline:
    """The diffusers pipeline that samples ``model`` with ``solver`` under ``spec``."""
    if solver not in SOLVERS[spec.formulation]:
        raise ValueError(
            f"solver {solver!r} does not fit the {spec.formulation} formulation; "
            f"choose one of {SOLVERS[spec.formulation]}"
        )
    return PrivImagePipeline(
        unet=model,
        scheduler=formulation(spec).scheduler(solver),
        class_names=class_names,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        black_below_uint8=black_below_uint8,
    )


def configured_pipeline(
    model: torch.nn.Module, cfg: Config, class_names: Sequence[str]
) -> PrivImagePipeline:
    """The pipeline as the run's sample stage uses it: its sampler, steps, guidance and
    black floor."""
    return pipeline_for(
        model,
        spec=cfg.diffusion,
        solver=sampler_name(cfg),
        class_names=class_names,
        num_inference_steps=cfg.sample.num_inference_steps,
        guidance_scale=cfg.sample.guidance_scale,
        black_below_uint8=cfg.sample.black_below_uint8,
    )


@torch.no_grad()
def sample_unit_floats(
    model: torch.nn.Module,
    *,
    spec: DiffusionConfig,
    seeds: Sequence[int],
    labels: torch.Tensor,
    num_steps: int,
    solver: str,
    guidance_scale: float = 1.0,
    black_below_uint8: int = 0,
) -> torch.Tensor:
    """One batch through :class:`PrivImagePipeline` on the model's device, image ``i``
    from ``seeds[i]`` alone: the pipeline's ``"pt"`` output, floats in [0, 1]
    ``(N, C, H, W)`` on the CPU."""
    pipe = pipeline_for(model, spec=spec, solver=solver)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        labels,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        black_below_uint8=black_below_uint8,
        generator=seed_generators(seeds),
        output_type="pt",
    ).images


def sample_batch(model: torch.nn.Module, **request) -> torch.Tensor:
    """:func:`sample_unit_floats` as uint8 pixels, those of the pipeline's PIL images."""
    # As diffusers' numpy_to_pil rounds, so the stage's PNGs are the pipeline's images.
    return (sample_unit_floats(model, **request) * 255).round().to(torch.uint8)
