"""Typed configuration: one dataclass schema per Hydra config group.

Values live in ``conf/*.yaml``; the schemas here give them types and defaults and are
registered with Hydra's ConfigStore so a misspelt key fails at compose time. The only
logic here is :func:`validate`, which turns bad values into one-line
:class:`~privimage.errors.ConfigError` messages before any stage runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from privimage.errors import ConfigError

STAGES = ("query", "pretrain", "finetune", "sample", "evaluate", "audit")
# What a run does unless ``stages`` says otherwise: the audit is asked for by name.
DEFAULT_STAGES = STAGES[:5]
# Test-only ways to break the audited DP-SGD (privimage.stages.audit), so that a test can
# show the audit notices; the third, a noise stream anyone can regenerate, is
# privacy.reproducible_noise=true.
AUDIT_BREAKS = ("none", "no_noise", "no_clipping")
FORMULATIONS = ("edm", "ddpm")
# The samplers that fit each formulation (the first is the default).
SOLVERS = {"edm": ("heun", "euler", "dpmpp_2m"), "ddpm": ("ddim",)}
# Query-classifier training augmentations (privimage.classifier).
AUGMENTATIONS = ("shift", "strong")
# What makes the synthetic images: PrivImage's DP diffusion pipeline, or BN-statistics
# synthesis (Soufleri et al. 2022; not differentially private).
SYNTHESIZERS = ("diffusion", "bnstat")
# The stages each synthesizer runs (bnstat makes its images in the sample stage).
SYNTHESIZER_STAGES = {"diffusion": STAGES, "bnstat": ("sample", "evaluate")}
# What the UNet is pretrained on: the query's semantic subset (PrivImage), the whole public
# training split (PDP-Diffusion), or nothing at all (DPDM: DP training from scratch).
PUBLIC_SUBSETS = ("semantic", "all", "none")
LR_DECAYS = ("none", "linear", "cosine")


@dataclass
class DataConfig:
    """An image dataset: where it comes from and how it is preprocessed.

    ``source`` is one of the names in :data:`privimage.data.SOURCES`: ``mnist5k``,
    ``digits`` and ``glyphs`` ship inside installed packages; ``cifar10`` and
    ``tinyimagenet`` read the archives under ``path`` (default ``../shared/data``);
    ``folder`` and ``tar`` read ``<class>/<image>`` trees; ``hub`` loads the Hugging
    Face dataset named by ``path`` (needs network).
    """

    source: str = "mnist5k"
    path: str | None = None
    resolution: int = 28
    channels: int = 1
    # Fraction held out as the test split for sources that ship without one.
    test_fraction: float = 0.2
    split_seed: int = 0
    # Optional caps (random, seeded subsets) that keep presets small.
    max_train_images: int | None = None
    max_test_images: int | None = None
    # Column names for hub datasets.
    image_column: str = "image"
    label_column: str = "label"


@dataclass
class ModelConfig:
    """Class-conditional diffusers ``UNet2DModel``; GroupNorm only (DP-safe)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    # Self-attention at the lowest resolution. Its channels_last activations would give
    # zero per-sample gradients in Opacus' hooks; models.make_opacus_safe fixes that.
    attention: bool = True
    dropout: float = 0.0


@dataclass
class DiffusionConfig:
    """What the UNet learns and how noise levels are drawn; shared by every stage.

    ``edm`` (default): Karras et al.'s preconditioning with ``sigma_data``, training
    levels ``ln(sigma) ~ N(p_mean, p_std^2)``, sampling from ``sigma_max`` down to
    ``sigma_min`` on a schedule with exponent ``rho``. ``ddpm``: epsilon prediction on a
    linear schedule of ``num_train_timesteps``. Saved beside every UNet as
    ``diffusion.json``; later stages use the saved one.
    """

    formulation: str = "edm"
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    # A share of the training levels drawn around low_noise_p_mean instead (0: none).
    low_noise_fraction: float = 0.0
    low_noise_p_mean: float = -1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    num_train_timesteps: int = 1000


@dataclass
class PrivacyConfig:
    """The run's total (epsilon, delta) budget over every mechanism on sensitive data."""

    target_epsilon: float = 10.0
    # Shorthand: ``privacy.epsilon=1`` sets target_epsilon (and wins over it) when given.
    epsilon: float | None = None
    # Must be below 1/N for N sensitive training images; 1e-5 suits N up to 1e5.
    delta: float = 1e-5
    accountant: str = "rdp"
    # TESTS ONLY. The DP noise and Poisson masks are drawn from fresh OS entropy unless
    # this is true; then they follow ``seed`` and the run is NOT differentially private
    # against anyone who knows its config (the ledger records noise_secret: false).
    reproducible_noise: bool = False


@dataclass
class QueryConfig:
    """Semantic query: public classifier, DP top-k histogram, class selection."""

    top_k: int = 1
    # Gaussian noise std is noise_multiplier * sqrt(top_k) (the L2 sensitivity).
    noise_multiplier: float = 10.0
    # The query's own epsilon share at privacy.delta; when set, the noise multiplier is
    # calibrated to it (and noise_multiplier is ignored).
    epsilon: float | None = None
    # How many public classes each sensitive class keeps (disjoint); a fraction of
    # the public classes wins when set.
    classes_per_sensitive_class: int = 1
    fraction_of_public_classes: float | None = None
    # The semantic query function: "classifier" (trained here on the public set) or
    # "clip" (open_clip zero-shot against the public class names; weights from a file).
    method: str = "classifier"
    clip_model: str = "ViT-B-32"
    clip_weights: str | None = None
    clip_prompt: str = "a photo of a {}."
    # The query classifier: "resnet" (CIFAR-style, as PrivImage) or "cnn"; trained once
    # per public dataset and settings, then cached.
    classifier_arch: str = "resnet"
    classifier_width: int = 32
    classifier_epochs: int = 3
    # Horizontal flips in training (and, averaged with the original, when querying):
    # right for natural images, wrong for glyphs.
    classifier_hflip: bool = False
    # "shift" (small translations) or "strong" (random resized crops, colour jitter,
    # greyscale, label smoothing): strong transfers better to another dataset.
    classifier_augment: str = "shift"
    batch_size: int = 128
    lr: float = 2e-3
    grid_images_per_class: int = 8
    # Selection score (query/selection_score.json), opt-in: a judge classifier trained
    # WITHOUT DP on the sensitive training split rates sample images of each public class.
    # A measurement for the data owner, like the evaluation stage: recorded in the ledger
    # as a non-private measurement, never released, and nothing downstream reads it.
    score_selection: bool = False
    score_classifier_epochs: int = 5
    score_images_per_class: int = 50


@dataclass
class PretrainConfig:
    """Non-private pretraining on the selected public subset (Accelerate, 1..n processes)."""

    # semantic (the query's selection, relabelled: PrivImage), all (every public training
    # image, unconditional: PDP-Diffusion) or none (the UNet's initial weights: DPDM).
    public_subset: str = "semantic"
    epochs: int = 5
    # Compute budget in images seen (optimizer steps x batch_size); wins over epochs when
    # set, so methods that pretrain on subsets of different sizes get the same compute.
    images_seen: int | None = None
    # Images per optimizer step over all processes and accumulation steps together, so
    # a run means the same thing on 1 or 8 GPUs; each process takes an equal share.
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    lr: float = 2e-3
    # Linear learning-rate warm-up over the first steps (0: none); lets short CPU runs
    # use a higher lr without the first steps blowing the weights up.
    warmup_steps: int = 0
    # After the warm-up: none (constant lr), linear or cosine decay to zero at the end.
    lr_decay: str = "none"
    ema_decay: float = 0.999
    # Labels replaced by the null class in training, for classifier-free guidance.
    label_dropout: float = 0.1
    # "auto": bf16 on GPUs that have it, else full precision; or no, fp16, bf16.
    mixed_precision: str = "auto"
    # Accelerate save_state checkpoints for resume (re-run the same command).
    checkpoint_every_steps: int = 500
    log_every_steps: int = 10
    # Optional Accelerate tracker ("tensorboard") logging into pretrain/logs.
    tracker: str | None = None
    max_images: int | None = None
    # Samples per class in pretrain/grid.png (0: no grid). The grid has its own sampler
    # settings, not the sample stage's, so that changing how the sample stage samples
    # does not change pretraining's reuse key (a shared pretraining is not recomputed
    # for a picture). grid_sampler None: the formulation's default.
    grid_images_per_class: int = 8
    grid_sampler: str | None = None
    grid_num_inference_steps: int = 12
    grid_guidance_scale: float = 1.0


# How DP fine-tuning gets clipped per-example sums (privimage.dpsgd.make_private).
GRAD_SAMPLE_MODES = ("bookkeeping", "hooks")


@dataclass
class FinetuneConfig:
    """DP-SGD fine-tuning on the sensitive training split (Opacus)."""

    # false: plain training without clipping or noise, the same steps and batch size (the
    # non-private upper bound); the ledger then says the run is NOT differentially private.
    dp: bool = True
    epochs: float = 5.0
    # Expected logical batch size; the Poisson sampling rate is batch_size / N.
    batch_size: int = 256
    physical_batch_size: int = 64
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    ema_decay: float = 0.99
    # K diffusion-noise draws averaged per example before clipping (DPDM); costs K x compute.
    noise_multiplicity: int = 1
    # bookkeeping (privimage.dp.bookkeeping: norms from activations, one backward pass) or
    # hooks (Opacus' per-example gradients); the same clipped sum at different cost.
    grad_sample_mode: str = "bookkeeping"
    # Atomic resume checkpoints (model, EMA, optimizer, RNG streams) every this many steps.
    checkpoint_every_steps: int = 25
    # Labels replaced by the null class (guidance); the draw is data-independent.
    label_dropout: float = 0.0
    # Parameter-efficient DP fine-tuning: the UNet's parameters whose qualified names start
    # with one of these prefixes are trained, the rest stay as pretrained (None: all). The
    # noise is added to the trained parameters only, so its total norm shrinks with their
    # number while each example's clipped gradient keeps norm <= max_grad_norm.
    trainable: list[str] | None = None


@dataclass
class AuditConfig:
    """The one-run privacy audit (privimage.stages.audit): a measured lower bound on epsilon.

    The audit fine-tunes with the run's DP-SGD settings (batch, epochs, clipping, learning
    rate, K, trainable parameters) but calibrates the noise to its own small claim, since
    ``canaries`` can show at most about log(guesses / 3).
    """

    # The claim audited: DP-SGD alone at (epsilon, privacy.delta). Well below the most that
    # the canaries can show (2.76 for 1000 canaries and 50 guesses), so that a broken
    # mechanism has room to show above it.
    epsilon: float = 0.5
    # Out-of-distribution images, each with its own label, each trained on by a secret coin.
    canaries: int = 1000
    # How many of the highest-scoring canaries are guessed "in" (fixed before scoring).
    guesses: int = 50
    # A canary's loss is multiplied by this: a worst-case record whose gradient is far
    # above the clipping norm (clipping makes the factor irrelevant; no clipping does not).
    canary_loss_scale: float = 1000.0
    # The bound holds with probability 1 - significance.
    significance: float = 0.05
    # EDM noise levels (DDPM: timestep fractions in (0, 1)) at which each canary's loss
    # is measured, with one fixed noise image per level and canary.
    score_sigmas: list[float] = field(default_factory=lambda: [2.0, 5.0, 10.0])
    # TESTS ONLY: break the audited DP-SGD (none, no_noise, no_clipping) to check that
    # the audit notices; the bound then describes a mechanism privimage never runs.
    broken: str = "none"


@dataclass
class SampleConfig:
    """Class-conditional sampling of the synthetic dataset."""

    images_per_class: int = 50
    # Solver steps (EDM's Heun makes 2 network calls per step but the last).
    num_inference_steps: int = 50
    # heun, euler or dpmpp_2m (edm), ddim (ddpm); None = the formulation's first.
    sampler: str | None = None
    # Classifier-free guidance weight: 1 = plain conditional, > 1 sharper classes.
    guidance_scale: float = 1.0
    batch_size: int = 250
    # Image i of class c uses seed first_seed + c * images_per_class + i.
    first_seed: int = 0
    grid_images_per_class: int = 10


@dataclass
class BNStatConfig:
    """BN-statistics synthesis (privimage.bnstat): teacher training and image optimisation.

    Not differentially private: the teacher trains on the sensitive data without noise.
    """

    # The teacher: a BatchNorm ResNet trained on the sensitive training split.
    teacher_width: int = 32
    teacher_epochs: int = 10
    teacher_batch_size: int = 128
    teacher_lr: float = 2e-3
    teacher_hflip: bool = False
    # Images optimised together; they share (and jointly match) one set of batch statistics.
    batch_size: int = 50
    steps: int = 500
    lr: float = 0.1
    bn_weight: float = 1.0
    ce_weight: float = 1.0
    tv_weight: float = 1e-2
    l2_weight: float = 1e-4
    # Random roll by up to this many pixels each step (DeepInversion's jitter).
    jitter_pixels: int = 0
    flip: bool = False


# Downstream classifier kinds (privimage.metrics.downstream).
DOWNSTREAM_CLASSIFIERS = ("cnn", "logreg", "mlp")


@dataclass
class DeviceCount:
    """An image count with one default for CPU runs and one for GPU runs (null = all).

    Inception features cost about 0.1 s per image on a 2-core CPU and well under a
    millisecond on a GPU, so the standard full-split evaluation is only the GPU default.
    """

    cpu: int | None = 2000
    gpu: int | None = None

    def pick(self, device_type: str) -> int | None:
        return self.gpu if device_type == "cuda" else self.cpu


@dataclass
class EvaluateConfig:
    """Fidelity, utility and leakage of a synthetic dataset (privimage.stages.evaluate)."""

    # A folder (<class>/<image> or flat) or .npz of images to evaluate instead of this
    # run's sample/ output; then any folder of images can be scored against cfg.data.
    synthetic: str | None = None
    # Real training images for FID, precision/recall and feature-space neighbours.
    reference_images: DeviceCount = field(default_factory=lambda: DeviceCount(2000, None))
    # Real test images: the baseline of the leakage statistics and the non-members of the
    # membership-inference attack (as many training images serve as members).
    heldout_images: DeviceCount = field(default_factory=lambda: DeviceCount(1000, None))
    # Synthetic images (a seeded random subset) whose Inception features enter FID,
    # precision/recall and the feature-space neighbour distance (null = all). The
    # downstream classifiers and the pixel-space near-copy check always use every image:
    # more images help the classifiers long after they stop changing FID's estimate.
    fidelity_images: DeviceCount = field(default_factory=lambda: DeviceCount(None, None))
    feature_batch_size: int = 50
    precision_recall_k: int = 4
    classifiers: list[str] = field(default_factory=lambda: list(DOWNSTREAM_CLASSIFIERS))
    # The "cnn" classifier's architecture: cnn (SmallCNN) or resnet.
    classifier_arch: str = "cnn"
    classifier_width: int = 32
    classifier_epochs: int = 10
    # Epochs of the logistic-regression and MLP classifiers.
    linear_epochs: int = 20
    classifier_batch_size: int = 128
    classifier_lr: float = 2e-3
    # Learning rate of the logistic-regression and MLP classifiers.
    linear_lr: float = 1e-2
    # Mirror images while training the CNN (natural images yes, digits no).
    classifier_hflip: bool = False
    cnn_weight_decay: float = 5e-4
    # Grid of the linear models, selected on held-out synthetic data.
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-3])
    # Fraction of the synthetic images held out for model selection.
    validation_fraction: float = 0.1
    # Also train the classifiers on as many real training images (the reference accuracy).
    real_baseline: bool = True
    # Near-copy criterion (Carlini et al. 2023): an image is flagged when
    # nearest / (alpha * mean of its n nearest training images) < threshold.
    near_copy_neighbours: int = 50
    near_copy_alpha: float = 0.5
    near_copy_threshold: float = 1 / 3
    # Closest synthetic-training pairs drawn in nearest_pairs.png.
    closest_pairs: int = 16
    # Gradient inversion (Geiping et al. 2020) against the CNNs: images attacked per model
    # (0 = off) and Adam steps per image.
    gradient_attack_images: int = 4
    gradient_attack_steps: int = 300
    # Model memorisation: images per class inverted from each CNN (DeepInversion on its
    # running BN statistics; 0 = off), and the optimisation steps per batch.
    model_inversion_images_per_class: int = 4
    model_inversion_steps: int = 200
    # Weight of the BN-statistics term against the cross-entropy; at 1 the six BN layers
    # of the CNN drown the class term and inversions are not even classified as their class.
    model_inversion_bn_weight: float = 0.1


@dataclass
class Config:
    """The whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    public: DataConfig = field(default_factory=lambda: DataConfig(source="glyphs"))
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    bnstat: BNStatConfig = field(default_factory=BNStatConfig)
    synthesizer: str = "diffusion"
    name: str = "default"
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    seed: int = 0
    # "auto" picks CUDA when available.
    device: str = "auto"
    # Preprocessed datasets, trained query classifiers and FID reference statistics.
    cache_dir: str = "~/.cache/privimage"
    # When set, the stages that do not depend on the privacy budget (query, pretrain) are
    # stored here by content and copied into every later run with the same inputs, so the
    # runs of an epsilon sweep compute them once (conf/sweep/ sets it to the sweep folder).
    reuse_dir: str | None = None


def register_configs() -> None:
    """Register the schemas so Hydra type-checks the YAML against them."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, schema in [
        ("data", DataConfig),
        ("public", DataConfig),
        ("model", ModelConfig),
        ("diffusion", DiffusionConfig),
        ("privacy", PrivacyConfig),
        ("query", QueryConfig),
        ("pretrain", PretrainConfig),
        ("finetune", FinetuneConfig),
        ("sample", SampleConfig),
        ("evaluate", EvaluateConfig),
        ("audit", AuditConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=schema)


def to_config(cfg: DictConfig | dict[str, Any]) -> Config:
    """Build the typed :class:`Config` from a composed Hydra config (ignores ``hydra``)."""
    if isinstance(cfg, DictConfig):
        container = OmegaConf.to_container(cfg, resolve=True)
    else:
        container = dict(cfg)
    container.pop("hydra", None)
    merged = OmegaConf.merge(OmegaConf.structured(Config), container)
    typed: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if typed.privacy.epsilon is not None:
        typed.privacy.target_epsilon = typed.privacy.epsilon
    validate(typed)
    return typed


def _positive(value: float, name: str, hint: str = "") -> None:
    if not value > 0:
        raise ConfigError(f"{name}={value} must be > 0{hint}")


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
    for key in ("gradient_attack_images", "model_inversion_images_per_class"):
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


def sampler_name(cfg: Config) -> str:
    """The sampler to use: ``sample.sampler`` or the formulation's default."""
    return cfg.sample.sampler or SOLVERS[cfg.diffusion.formulation][0]


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
    from privimage.data import SOURCES

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
    _positive(cfg.query.top_k, "query.top_k")
    _positive(cfg.query.noise_multiplier, "query.noise_multiplier")
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
    _positive(cfg.query.classifier_epochs, "query.classifier_epochs")
    _positive(cfg.query.score_classifier_epochs, "query.score_classifier_epochs")
    _positive(cfg.query.score_images_per_class, "query.score_images_per_class")
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
    _positive(
        cfg.pretrain.batch_size,
        "pretrain.batch_size",
        "; set the images per optimizer step, e.g. pretrain.batch_size=64",
    )
    _positive(cfg.pretrain.gradient_accumulation_steps, "pretrain.gradient_accumulation_steps")
    _positive(cfg.pretrain.checkpoint_every_steps, "pretrain.checkpoint_every_steps")
    _positive(cfg.pretrain.log_every_steps, "pretrain.log_every_steps")
    if cfg.pretrain.mixed_precision not in ("auto", "no", "fp16", "bf16"):
        raise ConfigError(
            f"pretrain.mixed_precision={cfg.pretrain.mixed_precision!r}; "
            "choose auto, no, fp16 or bf16"
        )
    if cfg.pretrain.tracker not in (None, "tensorboard"):
        raise ConfigError(f"pretrain.tracker={cfg.pretrain.tracker!r}; choose tensorboard or null")
    for key, p in (
        ("pretrain.label_dropout", cfg.pretrain.label_dropout),
        ("finetune.label_dropout", cfg.finetune.label_dropout),
    ):
        if not 0 <= p < 1:
            raise ConfigError(f"{key}={p} must be in [0, 1)")
    _validate_evaluate(cfg.evaluate)
    _positive(cfg.finetune.epochs, "finetune.epochs")
    _positive(
        cfg.finetune.batch_size,
        "finetune.batch_size",
        "; set the expected images per DP-SGD step, e.g. finetune.batch_size=256",
    )
    _positive(
        cfg.finetune.physical_batch_size,
        "finetune.physical_batch_size",
        "; set the images per forward pass, e.g. finetune.physical_batch_size=64",
    )
    _positive(cfg.finetune.max_grad_norm, "finetune.max_grad_norm")
    _positive(cfg.finetune.noise_multiplicity, "finetune.noise_multiplicity")
    if cfg.finetune.grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"finetune.grad_sample_mode={cfg.finetune.grad_sample_mode!r} is not one of "
            f"{', '.join(GRAD_SAMPLE_MODES)}; bookkeeping is the fast default"
        )
    _positive(cfg.finetune.checkpoint_every_steps, "finetune.checkpoint_every_steps")
    _positive(cfg.sample.images_per_class, "sample.images_per_class")
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
    if cfg.synthesizer not in SYNTHESIZERS:
        raise ConfigError(f"synthesizer={cfg.synthesizer!r}; choose one of {list(SYNTHESIZERS)}")
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
