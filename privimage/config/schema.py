"""Typed configuration: one dataclass schema per Hydra config group.

Values live in ``conf/*.yaml``; the schemas here give them types and defaults. This
module imports nothing of privimage's, so every layer can read it:
:mod:`privimage.config.store` registers it with Hydra and builds it from a composed
config, :mod:`privimage.config.validate` checks the values against the registries of
the modules that own each choice. The allowed values kept here are the ones no other
module reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Test-only ways to break the audited DP-SGD (privimage.stages.audit), so that a test can
# show the audit notices; the third, a noise stream anyone can regenerate, is
# privacy.reproducible_noise=true.
AUDIT_BREAKS = ("none", "no_noise", "no_clipping")
# How the audit scores a canary (privimage.dp.audit).
AUDIT_SCORES = ("alignment", "loss")
# What the UNet is pretrained on: the query's semantic subset (PrivImage), the whole public
# training split (PDP-Diffusion), or nothing at all (DPDM: DP training from scratch).
PUBLIC_SUBSETS = ("semantic", "all", "none")
METHOD_OF_SUBSET = {"semantic": "privimage", "all": "pdp_diffusion", "none": "dpdm"}


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
    # Optional Accelerate tracker: tensorboard (pretrain/logs), wandb or mlflow.
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


# How DP fine-tuning gets clipped per-example sums (privimage.dp.dpsgd.make_private).
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
    # Optional Accelerate tracker for each step's loss and epsilon: tensorboard or mlflow
    # (finetune/logs, never released) or wandb. The loss is computed on the sensitive
    # images without noise, like stats.jsonl: keep the tracker's store private.
    tracker: str | None = None
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
    # A canary's score: alignment (the cosine between how its class row moved and the
    # way down its loss) or loss (how far its loss fell). Under Adam a row moved only by
    # noise travels as far as a trained one, which the cosine ignores and the loss drop
    # does not: on the smoke preset without clipping, 46-49 of 50 guesses right against
    # 38-41 (3 runs each).
    score: str = "alignment"
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
    # Post-processing: pixels darker than this (of 255, in every channel) become black,
    # clearing the faint grey haze a short run leaves on black backgrounds. 0 = off; for
    # data whose background is black (docs/ablation.md, seventh round). Free in privacy.
    black_below_uint8: int = 0
    batch_size: int = 250
    # Image i of class c uses seed first_seed + c * images_per_class + i.
    first_seed: int = 0
    grid_images_per_class: int = 10


@dataclass
class SynthesisWeights:
    """The image optimisation of BN-statistics synthesis (privimage.bnstat.synthesize):
    loss weights and optimiser. ``cfg.bnstat`` is one; the model-inversion attack makes its
    own."""

    steps: int = 500
    lr: float = 0.1
    bn_weight: float = 1.0
    ce_weight: float = 1.0
    tv_weight: float = 1e-2
    l2_weight: float = 1e-4
    # Random roll by up to this many pixels each step (DeepInversion's jitter).
    jitter_pixels: int = 0
    flip: bool = False


@dataclass
class BNStatConfig(SynthesisWeights):
    """BN-statistics synthesis (privimage.bnstat): teacher training and image optimisation
    (the fields of :class:`SynthesisWeights`, then these).

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
class DownstreamSettings:
    """How the downstream classifiers are trained and selected
    (privimage.metrics.downstream). ``cfg.evaluate`` is one."""

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


@dataclass
class EvaluateConfig(DownstreamSettings):
    """Fidelity, utility and leakage of a synthetic dataset (privimage.stages.evaluate);
    the downstream classifiers' settings are the fields of :class:`DownstreamSettings`."""

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
    # GAN-based model inversion (GMI, Zhang et al. 2020) against the CNNs: images per class
    # recovered from each (0 = off) and latent-optimisation steps; DCGAN steps of the prior
    # on the public data (trained once, cached); epochs of the independent evaluation
    # classifier, trained on the whole sensitive training split, that scores the attack.
    gan_attack_images_per_class: int = 4
    gan_attack_steps: int = 200
    gan_attack_prior_steps: int = 1200
    gan_attack_evaluator_epochs: int = 6


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
    # What a run does unless ``stages`` says otherwise: the audit is asked for by name.
    stages: list[str] = field(
        default_factory=lambda: ["query", "pretrain", "finetune", "sample", "evaluate"]
    )
    seed: int = 0
    # "auto" picks CUDA when available.
    device: str = "auto"
    # Preprocessed datasets, trained query classifiers and FID reference statistics.
    cache_dir: str = "~/.cache/privimage"
    # When set, the stages that do not depend on the privacy budget (query, pretrain) are
    # stored here by content and copied into every later run with the same inputs, so the
    # runs of an epsilon sweep compute them once (conf/sweep/ sets it to the sweep folder).
    reuse_dir: str | None = None


def method_of(cfg: dict) -> str | None:
    """The method a run's saved ``config.yaml`` (a plain dict) describes, from its
    settings, not its name."""
    if not cfg:
        return None
    if cfg.get("synthesizer") == "bnstat":
        return "bnstat"
    if (cfg.get("finetune") or {}).get("dp") is False:
        return "nonprivate"
    return METHOD_OF_SUBSET.get((cfg.get("pretrain") or {}).get("public_subset") or "semantic")
