"""Reject bad config values with one line that names the key and the fix, before any
stage runs. Each allowed-values list is read from the module that owns the choice.
"""

from __future__ import annotations

import math

from privimage.config.schema import (
    AUDIT_BREAKS,
    AUDIT_SCORES,
    DOWNSTREAM_CLASSIFIERS,
    GRAD_SAMPLE_MODES,
    PUBLIC_SUBSETS,
    AuditConfig,
    Config,
    EvaluateConfig,
)
from privimage.data import SOURCES
from privimage.diffusion import FORMULATIONS, SOLVERS
from privimage.errors import ConfigError
from privimage.io.artifacts import STAGES, SYNTHESIZER_STAGES
from privimage.io.trackers import check_tracker
from privimage.nets.classifier import AUGMENTATIONS
from privimage.schedule import LR_DECAYS


def _positive(value: float, name: str, hint: str = "") -> None:
    if not value > 0:
        raise ConfigError(f"{name}={value} must be > 0{hint}")


# What to set, for the positive settings whose meaning is not plain from their name.
_HINTS = {
    "pretrain.batch_size": "; set the images per optimizer step, e.g. pretrain.batch_size=64",
    "finetune.batch_size": (
        "; set the expected images per DP-SGD step, e.g. finetune.batch_size=256"
    ),
    "finetune.physical_batch_size": (
        "; set the images per forward pass, e.g. finetune.physical_batch_size=64"
    ),
}


def _all_positive(cfg: Config, *keys: str) -> None:
    """Each ``group.name`` setting must be > 0, checked in the order given."""
    for key in keys:
        group, name = key.split(".")
        _positive(getattr(getattr(cfg, group), name), key, _HINTS.get(key, ""))


def _validate_audit(au: AuditConfig) -> None:
    _positive(au.epsilon, "audit.epsilon", "; the audit's claim, e.g. audit.epsilon=1")
    if not math.isfinite(au.epsilon):
        raise ConfigError(f"audit.epsilon={au.epsilon} must be finite, e.g. audit.epsilon=1")
    _positive(au.canaries, "audit.canaries", ", e.g. audit.canaries=1000")
    if not 1 <= au.guesses <= au.canaries:
        raise ConfigError(
            f"audit.guesses={au.guesses} must be between 1 and audit.canaries={au.canaries}, "
            "e.g. a tenth of the canaries"
        )
    if not 0 < au.significance < 1:
        raise ConfigError(f"audit.significance={au.significance} must be in (0, 1), e.g. 0.05")
    _positive(au.canary_loss_scale, "audit.canary_loss_scale", ", e.g. 1000")
    if not au.score_sigmas or not all(s > 0 for s in au.score_sigmas):
        raise ConfigError(
            f"audit.score_sigmas={au.score_sigmas} must be positive noise levels, e.g. [0.2, 1.0]"
        )
    if au.score not in AUDIT_SCORES:
        raise ConfigError(f"audit.score={au.score!r}; choose one of {list(AUDIT_SCORES)}")
    if au.broken not in AUDIT_BREAKS:
        raise ConfigError(f"audit.broken={au.broken!r}; choose one of {list(AUDIT_BREAKS)}")


def _validate_evaluate(ev: EvaluateConfig) -> None:
    for key in ("reference_images", "heldout_images", "fidelity_images"):
        for kind in ("cpu", "gpu"):
            value = getattr(getattr(ev, key), kind)
            if value is not None:
                _positive(value, f"evaluate.{key}.{kind}", " (or null for the whole split)")
    for key in (
        "feature_batch_size",
        "precision_recall_k",
        "classifier_width",
        "classifier_epochs",
        "linear_epochs",
        "classifier_batch_size",
        "classifier_lr",
        "linear_lr",
        "closest_pairs",
        "near_copy_alpha",
        "gradient_attack_steps",
        "model_inversion_steps",
        "gan_attack_steps",
        "gan_attack_prior_steps",
        "gan_attack_evaluator_epochs",
    ):
        _positive(getattr(ev, key), f"evaluate.{key}")
    if ev.model_inversion_bn_weight < 0:
        raise ConfigError(
            f"evaluate.model_inversion_bn_weight={ev.model_inversion_bn_weight} must be >= 0"
        )
    unknown = [k for k in ev.classifiers if k not in DOWNSTREAM_CLASSIFIERS]
    if unknown or len(set(ev.classifiers)) != len(ev.classifiers):
        raise ConfigError(
            f"evaluate.classifiers={list(ev.classifiers)}; use each of "
            f"{list(DOWNSTREAM_CLASSIFIERS)} at most once"
        )
    if ev.classifier_arch not in ("cnn", "resnet"):
        raise ConfigError(f"evaluate.classifier_arch={ev.classifier_arch!r}; choose cnn or resnet")
    if not ev.weight_decays or any(w < 0 for w in ev.weight_decays) or ev.cnn_weight_decay < 0:
        raise ConfigError(
            f"evaluate.weight_decays={list(ev.weight_decays)} and evaluate.cnn_weight_decay="
            f"{ev.cnn_weight_decay} must be >= 0 (and the grid non-empty)"
        )
    for key in (
        "gradient_attack_images",
        "model_inversion_images_per_class",
        "gan_attack_images_per_class",
    ):
        if getattr(ev, key) < 0:
            raise ConfigError(f"evaluate.{key}={getattr(ev, key)} must be >= 0 (0 = off)")
    if not 0 < ev.validation_fraction < 1:
        raise ConfigError(
            f"evaluate.validation_fraction={ev.validation_fraction} must be in (0, 1)"
        )
    if ev.near_copy_neighbours < 2:
        raise ConfigError(f"evaluate.near_copy_neighbours={ev.near_copy_neighbours} must be >= 2")
    if not 0 < ev.near_copy_threshold < 1 / ev.near_copy_alpha:
        raise ConfigError(
            f"evaluate.near_copy_threshold={ev.near_copy_threshold} must be in (0, "
            f"1/near_copy_alpha={1 / ev.near_copy_alpha:g})"
        )


def _validate_diffusion(cfg: Config) -> None:
    d = cfg.diffusion
    if d.formulation not in FORMULATIONS:
        raise ConfigError(
            f"diffusion.formulation={d.formulation!r}; choose one of {list(FORMULATIONS)}"
        )
    for key in ("sigma_data", "p_std", "sigma_min", "sigma_max", "rho", "num_train_timesteps"):
        _positive(getattr(d, key), f"diffusion.{key}")
    if not 0 <= d.low_noise_fraction < 1:
        raise ConfigError(
            f"diffusion.low_noise_fraction={d.low_noise_fraction} must be in [0, 1) "
            "(the share of training noise levels drawn around diffusion.low_noise_p_mean)"
        )
    if not d.sigma_min < d.sigma_max:
        raise ConfigError(
            f"diffusion.sigma_min={d.sigma_min} must be below diffusion.sigma_max={d.sigma_max}"
        )


def _sampler_settings(cfg: Config, *, key: str, sampler, steps: int, guidance: float) -> None:
    """Check one set of sampler settings (``key`` is the config prefix, e.g. ``sample.``)."""
    _positive(steps, f"{key}num_inference_steps")
    solvers = SOLVERS[cfg.diffusion.formulation]
    if sampler is not None and sampler not in solvers:
        raise ConfigError(
            f"{key}sampler={sampler!r} does not fit "
            f"diffusion.formulation={cfg.diffusion.formulation}; choose one of {list(solvers)}"
        )
    if not guidance >= 0:
        raise ConfigError(f"{key}guidance_scale={guidance} must be >= 0")


def validate(cfg: Config) -> None:
    """Reject bad values with one clear line that names the key and the fix."""
    for key, data in (("data", cfg.data), ("public", cfg.public)):
        if data.source not in SOURCES:
            raise ConfigError(
                f"{key}.source={data.source!r} is not a known dataset source; "
                f"choose one of {', '.join(sorted(SOURCES))}"
            )
        if data.source in ("folder", "tar", "hub") and not data.path:
            raise ConfigError(
                f"{key}.source={data.source} needs {key}.path (the image folder, archive or "
                f"hub dataset name); set {key}.path=..."
            )
        _positive(data.resolution, f"{key}.resolution")
        if data.channels not in (1, 3):
            raise ConfigError(f"{key}.channels={data.channels} must be 1 or 3")
        if not 0 < data.test_fraction < 1:
            raise ConfigError(f"{key}.test_fraction={data.test_fraction} must be in (0, 1)")
    # bnstat uses no public data and no UNet, so only the diffusion path needs the public
    # and model shapes to fit the sensitive data.
    diffusion_path = cfg.synthesizer == "diffusion"
    if diffusion_path and (
        cfg.data.channels != cfg.public.channels or cfg.data.resolution != cfg.public.resolution
    ):
        raise ConfigError(
            f"public images ({cfg.public.channels}x{cfg.public.resolution}px) must match the "
            f"sensitive ones ({cfg.data.channels}x{cfg.data.resolution}px); set "
            f"public.channels={cfg.data.channels} public.resolution={cfg.data.resolution}"
        )
    downsamples = len(cfg.model.block_out_channels) - 1
    if diffusion_path and cfg.data.resolution % (2**downsamples):
        raise ConfigError(
            f"data.resolution={cfg.data.resolution} is not divisible by 2^{downsamples} "
            f"(model.block_out_channels has {downsamples + 1} levels); change either"
        )
    for ch in cfg.model.block_out_channels:
        if ch % cfg.model.norm_num_groups:
            raise ConfigError(
                f"model.block_out_channels entry {ch} is not divisible by "
                f"model.norm_num_groups={cfg.model.norm_num_groups}"
            )
    eps_key = "privacy.epsilon" if cfg.privacy.epsilon is not None else "privacy.target_epsilon"
    _positive(cfg.privacy.target_epsilon, eps_key, " (the privacy budget)")
    if not math.isfinite(cfg.privacy.target_epsilon):
        # An infinite budget would calibrate zero noise and still call the run private.
        raise ConfigError(
            f"{eps_key}={cfg.privacy.target_epsilon} must be finite; set a finite budget, "
            f"e.g. {eps_key}=10 (experiment=nonprivate for the non-private baseline)"
        )
    if not 0 < cfg.privacy.delta < 1:
        raise ConfigError(
            f"privacy.delta={cfg.privacy.delta} must be in (0, 1); use one below 1/N for N "
            "sensitive training images, e.g. privacy.delta=1e-5"
        )
    if cfg.privacy.accountant not in ("rdp", "prv"):
        raise ConfigError(f"privacy.accountant={cfg.privacy.accountant!r}; choose rdp or prv")
    _all_positive(cfg, "query.top_k", "query.noise_multiplier")
    if cfg.query.epsilon is not None:
        _positive(cfg.query.epsilon, "query.epsilon", " (the query's share of the budget)")
        if cfg.query.epsilon >= cfg.privacy.target_epsilon:
            raise ConfigError(
                f"query.epsilon={cfg.query.epsilon} leaves nothing of "
                f"privacy.target_epsilon={cfg.privacy.target_epsilon} for DP-SGD; lower it"
            )
    _positive(cfg.query.classes_per_sensitive_class, "query.classes_per_sensitive_class")
    if cfg.query.classifier_arch not in ("resnet", "cnn"):
        raise ConfigError(
            f"query.classifier_arch={cfg.query.classifier_arch!r}; choose resnet or cnn"
        )
    if cfg.query.classifier_augment not in AUGMENTATIONS:
        raise ConfigError(
            f"query.classifier_augment={cfg.query.classifier_augment!r}; "
            f"choose one of {list(AUGMENTATIONS)}"
        )
    if cfg.query.method not in ("classifier", "clip"):
        raise ConfigError(f"query.method={cfg.query.method!r}; choose classifier or clip")
    if cfg.query.fraction_of_public_classes is not None:
        f = cfg.query.fraction_of_public_classes
        if not 0 < f <= 1:
            raise ConfigError(f"query.fraction_of_public_classes={f} must be in (0, 1]")
    _all_positive(
        cfg,
        "query.classifier_epochs",
        "query.score_classifier_epochs",
        "query.score_images_per_class",
    )
    _validate_diffusion(cfg)
    _positive(cfg.pretrain.epochs, "pretrain.epochs")
    if cfg.pretrain.warmup_steps < 0:
        raise ConfigError(
            f"pretrain.warmup_steps={cfg.pretrain.warmup_steps} must be >= 0 (0: no warm-up)"
        )
    if cfg.pretrain.lr_decay not in LR_DECAYS:
        raise ConfigError(
            f"pretrain.lr_decay={cfg.pretrain.lr_decay!r} is not one of {', '.join(LR_DECAYS)}"
        )
    if cfg.pretrain.images_seen is not None:
        _positive(cfg.pretrain.images_seen, "pretrain.images_seen", " (or null to use epochs)")
    if cfg.pretrain.public_subset not in PUBLIC_SUBSETS:
        raise ConfigError(
            f"pretrain.public_subset={cfg.pretrain.public_subset!r}; choose one of "
            f"{list(PUBLIC_SUBSETS)}"
        )
    if cfg.pretrain.public_subset != "semantic" and "query" in cfg.stages:
        # The query would spend privacy budget on a selection nothing reads.
        rest = [s for s in cfg.stages if s != "query"]
        raise ConfigError(
            f"pretrain.public_subset={cfg.pretrain.public_subset} does not use the semantic "
            f"query, which would spend privacy budget for nothing; set stages=[{','.join(rest)}]"
        )
    _all_positive(
        cfg,
        "pretrain.batch_size",
        "pretrain.gradient_accumulation_steps",
        "pretrain.checkpoint_every_steps",
        "pretrain.log_every_steps",
    )
    if cfg.pretrain.mixed_precision not in ("auto", "no", "fp16", "bf16"):
        raise ConfigError(
            f"pretrain.mixed_precision={cfg.pretrain.mixed_precision!r}; "
            "choose auto, no, fp16 or bf16"
        )
    check_tracker(cfg.pretrain.tracker, key="pretrain.tracker")
    check_tracker(cfg.finetune.tracker, key="finetune.tracker")
    for key, p in (
        ("pretrain.label_dropout", cfg.pretrain.label_dropout),
        ("finetune.label_dropout", cfg.finetune.label_dropout),
    ):
        if not 0 <= p < 1:
            raise ConfigError(f"{key}={p} must be in [0, 1)")
    _validate_evaluate(cfg.evaluate)
    _all_positive(
        cfg,
        "finetune.epochs",
        "finetune.batch_size",
        "finetune.physical_batch_size",
        "finetune.max_grad_norm",
        "finetune.noise_multiplicity",
    )
    if cfg.finetune.grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"finetune.grad_sample_mode={cfg.finetune.grad_sample_mode!r} is not one of "
            f"{', '.join(GRAD_SAMPLE_MODES)}; bookkeeping is the fast default"
        )
    _all_positive(cfg, "finetune.checkpoint_every_steps", "sample.images_per_class")
    if not 0 <= cfg.sample.black_below_uint8 <= 255:
        raise ConfigError(
            f"sample.black_below_uint8={cfg.sample.black_below_uint8} must be a pixel level "
            "in 0..255 (0 = off)"
        )
    for key, group in (("sample", cfg.sample), ("pretrain", cfg.pretrain)):
        prefix = "" if key == "sample" else "grid_"
        _sampler_settings(
            cfg,
            key=f"{key}.{prefix}",
            sampler=getattr(group, f"{prefix}sampler"),
            steps=getattr(group, f"{prefix}num_inference_steps"),
            guidance=getattr(group, f"{prefix}guidance_scale"),
        )
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages={cfg.stages} has unknown {unknown}; choose from {list(STAGES)}")
    if cfg.synthesizer not in SYNTHESIZER_STAGES:
        raise ConfigError(
            f"synthesizer={cfg.synthesizer!r}; choose one of {list(SYNTHESIZER_STAGES)}"
        )
    allowed = SYNTHESIZER_STAGES[cfg.synthesizer]
    extra = [s for s in cfg.stages if s not in allowed]
    if extra:
        raise ConfigError(
            f"stages={list(cfg.stages)} has {extra}, which synthesizer={cfg.synthesizer} does "
            f"not use; set stages=[{','.join(allowed)}]"
        )
    _validate_audit(cfg.audit)
    b = cfg.bnstat
    for key in (
        "teacher_width",
        "teacher_epochs",
        "teacher_batch_size",
        "teacher_lr",
        "batch_size",
        "steps",
        "lr",
    ):
        _positive(getattr(b, key), f"bnstat.{key}")
    for key in ("bn_weight", "ce_weight", "tv_weight", "l2_weight", "jitter_pixels"):
        if getattr(b, key) < 0:
            raise ConfigError(f"bnstat.{key}={getattr(b, key)} must be >= 0")
