"""``PrivImagePipeline``: a diffusers ``DiffusionPipeline`` that draws class-conditional
images from a privimage UNet, the way ``DDPMPipeline`` draws unconditional ones.

Every sampler privimage offers is a diffusers scheduler stepped by one loop
(:func:`denoise_loop`), in the sample stage as in a user's notebook:

* ``euler``: diffusers' ``EDMEulerScheduler``;
* ``dpmpp_2m``: diffusers' ``EDMDPMSolverMultistepScheduler`` (dpmsolver++, order 2);
* ``heun``: :class:`EDMHeunScheduler` below. Diffusers has no EDM Heun scheduler: its
  ``HeunDiscreteScheduler`` steps a discrete DDPM schedule (sigmas from
  ``alphas_cumprod``, inputs scaled for sigma_data = 1), not EDM's preconditioned
  continuous sigmas, so Karras et al.'s Algorithm 1 stays ours, as a subclass of the
  Euler scheduler that adds the second-order correction;
* ``ddim`` (the DDPM formulation): diffusers' ``DDIMScheduler``, eta = 0.

``bench/scheduler_equality.py`` measured them against the float64 sampler they replace
(README, "Sampling a released model"): at most 6.6e-7 apart on a trained tiny32 UNet at
18 steps, 1.2e-5 (Heun) on a tiny28 one; at most a few uint8 pixels differ.

:func:`save_pipeline` writes it with ``save_pretrained``; the folder loads in a fresh
Python with privimage installed, either way::

    PrivImagePipeline.from_pretrained(folder)
    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

Diffusers asks ``trust_remote_code`` of every pipeline class it does not ship itself;
the code it runs is the folder's ``pipeline.py``, one import from privimage.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    EDMEulerScheduler,
    ImagePipelineOutput,
    SchedulerMixin,
    UNet2DModel,
)
from diffusers.schedulers.scheduling_edm_euler import EDMEulerSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from privimage.diffusion.common import blacken_dark_pixels, guided, null_class
from privimage.io.atomic import drop_json_keys

# diffusers loads a component declared as (this module, class) by the base classes it
# finds among this module's names: SchedulerMixin must be one of them.
__all__ = ["EDMHeunScheduler", "PrivImagePipeline", "SchedulerMixin", "save_pipeline"]

# The file diffusers imports the pipeline class from, and what model_index.json names.
CODE_MODULE = "pipeline"
MODEL_INDEX = "model_index.json"
_SHIM = '''"""Loads privimage's PrivImagePipeline (pip install privimage), so that
DiffusionPipeline.from_pretrained(this_folder, trust_remote_code=True) works."""

from privimage.diffusion.pipeline import PrivImagePipeline

__all__ = ["PrivImagePipeline"]
'''


class EDMHeunScheduler(EDMEulerScheduler):
    """Heun's second-order method on EDM's ODE (Karras et al. 2022, Algorithm 1, no churn).

    Each step but the last evaluates the network twice, at sigma_i and, for the
    corrector, at sigma_(i+1); the last step (to sigma = 0) is an Euler step, so N steps
    cost 2N - 1 evaluations. As in diffusers' ``HeunDiscreteScheduler``, the timesteps
    list every evaluation (``[s0, s1, s1, s2, s2, ..., s_(N-1), s_(N-1)]``) and ``step``
    alternates predictor and corrector, so any diffusers loop can drive it. Everything
    else (Karras sigmas, preconditioning, config) is ``EDMEulerScheduler``'s.
    """

    order = 2

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None):
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas)
        plain = self.sigmas  # (N + 1,), the last one 0
        self.sigmas = torch.cat([plain[:1], plain[1:-1].repeat_interleave(2), plain[-1:]])
        self.timesteps = self.precondition_noise(self.sigmas[:-1]).to(device)
        self._origin = None

    @property
    def state_in_first_order(self) -> bool:
        """True before a predictor step, False before its corrector."""
        return getattr(self, "_origin", None) is None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **_: object,
    ) -> EDMEulerSchedulerOutput | tuple:
        if self.step_index is None:
            self._init_step_index(timestep)
        k = self.step_index
        sigma = self.sigmas[k]
        x = sample.to(torch.float32)  # as EDMEulerScheduler: the state in float32
        denoised = self.precondition_outputs(x, model_output, sigma)
        slope = (x - denoised) / sigma
        if self.state_in_first_order:
            dt = self.sigmas[k + 1] - sigma
            prev = x + slope * dt
            if self.sigmas[k + 1] > 0:  # the corrector evaluates at the predicted point
                self._origin = (x, slope, dt)
        else:
            origin, first_slope, dt = self._origin
            prev = origin + dt * 0.5 * (first_slope + slope)
            self._origin = None
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return prev, denoised
        return EDMEulerSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed, for the pipeline's ``generator``: each image's starting
    noise then comes from its own seed alone, so a sampling job split into pieces or
    resumed reproduces the same images, on any device."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def is_edm(scheduler) -> bool:
    """Whether ``scheduler`` preconditions EDM-style (its timesteps are c_noise values)."""
    return hasattr(scheduler, "precondition_noise")


def start_sigma(scheduler) -> float:
    """The scale of the starting noise: sigma_max for EDM schedulers, as in Karras et
    al.'s Algorithm 1 and as training saw it (diffusers' ``init_noise_sigma`` is
    sqrt(sigma_max^2 + 1) for them), the scheduler's own otherwise."""
    if is_edm(scheduler):
        return float(scheduler.sigmas[0])
    return float(scheduler.init_noise_sigma)


def denoise_loop(
    scheduler,
    network: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    guidance_scale: float = 1.0,
    null_label: int | None = None,
    progress: Callable = iter,
) -> torch.Tensor:
    """Step ``scheduler`` (timesteps already set) from the starting noise ``x`` to images.

    ``network(x_in, t, labels)`` is the raw model output: EDM's ``F`` (c_noise as ``t``)
    or DDPM's predicted noise. Classifier-free guidance mixes raw outputs,
    ``u + w (c - u)``; EDM's denoiser is affine in ``F`` at fixed ``x``, so this is
    the same as mixing denoised images. Returns the final state, unclamped.
    """

    def predict(x_in, ll, tt):
        return network(x_in, tt, ll)

    for t in progress(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        tt = t.expand(x.shape[0])
        out = guided(
            predict, x_in, labels, tt, guidance_scale=guidance_scale, null_label=null_label
        )
        x = scheduler.step(out, t, x).prev_sample
    return x


class PrivImagePipeline(DiffusionPipeline):
    """Class-conditional image generation from a privimage UNet.

    Args:
        unet: A class-conditional ``UNet2DModel`` whose last class embedding is the null
            (unconditional) label, as privimage builds it.
        scheduler: One of the schedulers in the module docstring.
        class_names: The name of each label, so labels may be given by name.
        num_inference_steps: The steps the run sampled its synthetic data with.
        guidance_scale: The guidance the run sampled its synthetic data with.
        black_below_uint8: Pixels darker than this (of 255, in every channel) become
            black, as in the run's synthetic data (0: off; see ``sample.black_below_uint8``).
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler,
        class_names: list[str] | None = None,
        num_inference_steps: int = 18,
        guidance_scale: float = 1.0,
        black_below_uint8: int = 0,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(
            class_names=list(class_names) if class_names is not None else None,
            num_inference_steps=int(num_inference_steps),
            guidance_scale=float(guidance_scale),
            black_below_uint8=int(black_below_uint8),
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # The code diffusers would fetch is this class, already imported: nothing remote.
        if cls is PrivImagePipeline:
            kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def null_label(self) -> int:
        """The unconditional label: the UNet's last class embedding."""
        return null_class(self.unet)

    def label_ids(self, class_labels: Sequence[int | str] | torch.Tensor) -> torch.Tensor:
        """``class_labels`` (ints, or names from ``class_names``) as a tensor of ids."""
        names = self.config.class_names or []
        items = class_labels.tolist() if torch.is_tensor(class_labels) else list(class_labels)
        ids = []
        for label in items:
            if isinstance(label, str):
                if label not in names:
                    raise ValueError(f"unknown class name {label!r}; choose one of {names}")
                label = names.index(label)
            if not 0 <= int(label) <= self.null_label:
                raise ValueError(
                    f"class label {label} is out of range; use 0..{self.null_label - 1} "
                    f"(or {self.null_label}, the null label, for unconditional images)"
                )
            ids.append(int(label))
        return torch.tensor(ids, dtype=torch.long)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int | str] | torch.Tensor,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        black_below_uint8: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Draw one image per label.

        Args:
            class_labels: One label per image: ints or class names.
            num_inference_steps: Solver steps; the run's setting when None.
            guidance_scale: Classifier-free guidance ``w`` (1: plain conditional); the
                run's setting when None.
            black_below_uint8: Pixels darker than this (of 255) become black; the run's
                setting when None (pipelines saved before it existed: 0, off).
            generator: One generator, or one per image: then each image depends on its
                own generator alone, as in privimage's sample stage (seed ``s`` there is
                ``torch.Generator().manual_seed(s)`` here).
            output_type: ``"pil"``, ``"np"`` (NHWC floats in [0, 1]) or ``"pt"`` (NCHW).
            return_dict: Return an ``ImagePipelineOutput`` rather than a tuple.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        steps = num_inference_steps or self.config.num_inference_steps
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        labels = self.label_ids(class_labels).to(self.device)
        config = self.unet.config
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        if isinstance(generator, list) and len(generator) != len(labels):
            raise ValueError(f"{len(generator)} generators for {len(labels)} labels")
        self.scheduler.set_timesteps(steps, device=self.device)
        dtype = self.unet.dtype
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        x = x * start_sigma(self.scheduler)

        def network(x_in, t, ll):
            return self.unet(x_in.to(dtype), t, class_labels=ll).sample

        x = denoise_loop(
            self.scheduler,
            network,
            x,
            labels,
            guidance_scale=scale,
            null_label=self.null_label,
            progress=self.progress_bar,
        )
        images = (x.float() / 2 + 0.5).clamp(0, 1).cpu()
        floor = self.config.black_below_uint8 if black_below_uint8 is None else black_below_uint8
        images = blacken_dark_pixels(images, floor)
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def save_pipeline(pipe: PrivImagePipeline, path: Path) -> Path:
    """``save_pretrained`` plus what makes ``DiffusionPipeline.from_pretrained`` find the
    class: ``pipeline.py`` (one import from privimage) and ``_class_name`` naming it."""
    path = Path(path)
    pipe.save_pretrained(path)
    (path / f"{CODE_MODULE}.py").write_text(_SHIM)
    index_file = path / MODEL_INDEX
    index = json.loads(index_file.read_text())
    index["_class_name"] = [CODE_MODULE, type(pipe).__name__]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    # diffusers keeps where a model was loaded from; a released model must not carry
    # a path on the data owner's machine.
    for config_file in path.glob("*/config.json"):
        drop_json_keys(config_file, "_name_or_path")
    return path
