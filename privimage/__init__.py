"""privimage: a sensitive image dataset in, a synthetic one with an (ε, δ)-DP guarantee out.

The public API, for notebooks and scripts (the CLI, ``python -m privimage``, is the
other entry)::

    from privimage import compose, run_pipeline
    cfg = compose(["experiment=demo"])          # the typed, validated config
    run_pipeline(cfg, "runs/demo")              # query, pretrain, finetune, sample, evaluate

The names below load on first use, so ``import privimage`` stays cheap (no torch).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("privimage")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

# name -> the module that defines it, or "module:attr" where the public name is another
# (``data.load`` is ``load_dataset`` here). By topic: config and running, the parts a run
# is made of, then finished runs.
_API = {
    # Config: a whole run's typed config, or one group's preset on its own
    "Config": "privimage.config.schema",
    "DataConfig": "privimage.config.schema",
    "DiffusionConfig": "privimage.config.schema",
    "ModelConfig": "privimage.config.schema",
    "compose": "privimage.config.store",
    "to_config": "privimage.config.store",
    "load_group": "privimage.config.store",
    "group_options": "privimage.config.store",
    "load_run_config": "privimage.config.store",
    # Running: the whole pipeline, the device and the cache folder a run uses
    "run_pipeline": "privimage.pipeline",
    "resolve_device": "privimage.runtime",
    "cache_root": "privimage.runtime",
    # Data: datasets as uint8 image splits
    "load_dataset": "privimage.data.loading:load",
    "ImageSplit": "privimage.data.containers",
    "stratified_split": "privimage.data.splits",
    # Networks: the diffusion UNet and the small classifiers
    "build_unet": "privimage.nets.models",
    "load_unet": "privimage.nets.models",
    "EMA": "privimage.nets.models",
    "count_parameters": "privimage.nets.models",
    "make_opacus_safe": "privimage.nets.models",
    "ResNet": "privimage.nets.models",
    "train_classifier": "privimage.nets.classifier",
    "predict_logits": "privimage.nets.classifier",
    "accuracy": "privimage.nets.classifier",
    # Diffusion: the training loss and sampler of any formulation
    "training_loss": "privimage.diffusion",
    "sample_batch": "privimage.diffusion",
    "pipeline_for": "privimage.diffusion",
    "sample_unit_floats": "privimage.diffusion",
    "PrivImagePipeline": "privimage.diffusion.pipeline",
    "EDMHeunScheduler": "privimage.diffusion.pipeline",
    "seed_generators": "privimage.diffusion.pipeline",
    "sampler_name": "privimage.diffusion",
    "drop_labels": "privimage.diffusion.common",
    "to_uint8": "privimage.diffusion.common",
    "blacken_dark_pixels": "privimage.diffusion.common",
    # Schedules: the learning rate's warm-up and decay over the steps
    "LR_DECAYS": "privimage.schedule",
    "scheduled_lr": "privimage.schedule",
    # DP-SGD: Opacus wrapping, K noise draws per example, partial fine-tuning
    "make_private": "privimage.dp.dpsgd",
    "repeat_for_noise_draws": "privimage.dp.dpsgd",
    "select_trainable": "privimage.dp.training",
    # BN-statistics synthesis (not DP): a teacher's class statistics, image optimisation
    "ClassStatistics": "privimage.bnstat",
    "classwise_bn_statistics": "privimage.bnstat",
    "SynthesisWeights": "privimage.config.schema",
    # The teacher as synthesizer=bnstat trains it (on the sensitive data, without noise).
    "train_bnstat_teacher": "privimage.stages.sample_bnstat:train_teacher",
    "synthesize_bnstat": "privimage.bnstat:synthesize",
    # Metrics: FID features, neighbours, leakage, downstream utility, the attacks
    "load_inception": "privimage.metrics.fid",
    "inception_features": "privimage.metrics.fid",
    "cached_features": "privimage.metrics.fid",
    "frechet_distance_of_features": "privimage.metrics.fid",
    "nearest_neighbours": "privimage.metrics.neighbours:nearest",
    "pixel_vectors": "privimage.metrics.leakage",
    "psnr": "privimage.metrics.leakage",
    "ssim": "privimage.metrics.leakage",
    "roc_auc": "privimage.metrics.leakage",
    "tpr_at_fpr": "privimage.metrics.leakage",
    "SealedSplit": "privimage.metrics.downstream",
    "DownstreamSettings": "privimage.config.schema",
    "evaluate_downstream": "privimage.metrics.downstream",
    "build_downstream": "privimage.metrics.downstream",
    "example_gradient": "privimage.metrics.inversion",
    "invert_gradient": "privimage.metrics.inversion",
    "public_gan": "privimage.metrics.gan_attack",
    "gan_inversion": "privimage.metrics.gan_attack",
    "gmi_attack": "privimage.metrics.gan_attack",
    "build_classifier": "privimage.nets.models",
    # Results: one run's evaluation, typed; finished runs as one table (``privimage report``)
    "Evaluation": "privimage.io.artifacts",
    "load_evaluation": "privimage.io.artifacts",
    "find_runs": "privimage.results",
    "run_row": "privimage.results",
    "read_timings": "privimage.results",
    "render_markdown": "privimage.results",
    "write_results": "privimage.results",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        module, _, attr = _API[name].partition(":")
        return getattr(importlib.import_module(module), attr or name)
    raise AttributeError(f"module 'privimage' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy names too, for dir() and tab completion.
    return sorted({*globals(), *_API})
