"""DP-SGD on stock Opacus, with noise multiplicity and random streams of our own.

Two ways to the clipped per-example sum (``finetune.grad_sample_mode``): book-keeping
(:mod:`privimage.dp.bookkeeping`, the default: per-example norms from activations in one
backward pass, about 1.3x a non-private step on CPUs) and Opacus' hooks, described below
(2-3x). For the hooks path three things are added to what ``PrivacyEngine.make_private``
gives, each through a public Opacus extension point rather than a copy of Opacus code:

* **Noise multiplicity K** (Dockhorn et al., DPDM; PrivImage). A diffusion loss is a
  random function of its example (the timestep and the Gaussian noise are drawn per
  call), so averaging it over K draws reduces gradient variance at no privacy cost,
  *provided the K draws are averaged before clipping*: each example must still
  contribute one gradient of norm at most C. The training loop feeds every example K
  times (:func:`repeat_for_noise_draws`), Opacus computes one per-sample gradient per
  row, and :class:`NoiseMultiplicityDPOptimizer`, a :class:`~opacus.optimizers.DPOptimizer`
  subclass, averages the K rows of each example before calling Opacus' own clipping.
  Sensitivity, sampling and therefore accounting are exactly those of plain DP-SGD.
* **A sampling generator of our own**: Opacus draws its Poisson masks from the global
  torch RNG unless told otherwise; :func:`make_private` gives the sampler a dedicated
  ``torch.Generator`` so a checkpoint can save and restore the exact position of the
  sampling stream (resume then replays the very batches an uninterrupted run would see).
  The caller seeds it, and the noise generator, with secret OS entropy
  (:mod:`privimage.io.seeding`): Opacus' ``secure_mode`` would need ``torchcsprng``, which
  has no build for current torch.
* **Contiguous activations** (:func:`privimage.nets.models.make_opacus_safe`), so per-sample
  gradients stay exact after diffusers' attention blocks.
"""

from __future__ import annotations

import warnings

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader, dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import (
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)
from torch.utils.data import DataLoader, default_collate

from privimage.dp.bookkeeping import (
    BookKeeping,
    BookKeepingDPOptimizer,
    DistributedBookKeepingDPOptimizer,
    StepCounting,
)
from privimage.dp.layers import check_noise_multiplicity, examples_in
from privimage.errors import ConfigError


def repeat_for_noise_draws(
    x: torch.Tensor, labels: torch.Tensor, noise_multiplicity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each example ``noise_multiplicity`` times, consecutively.

    Row ``i * K + j`` is draw ``j`` of example ``i``: the layout
    :class:`NoiseMultiplicityDPOptimizer` expects when it averages the K rows.
    """
    if check_noise_multiplicity(noise_multiplicity) == 1:
        return x, labels
    return (
        x.repeat_interleave(noise_multiplicity, dim=0),
        labels.repeat_interleave(noise_multiplicity, dim=0),
    )


class NoiseMultiplicityDPOptimizer(StepCounting, DPOptimizer):
    """A flat-clipping :class:`DPOptimizer` whose batch rows come in groups of K per example.

    Before Opacus clips, the K per-row gradients of each example are averaged into that
    example's gradient, so clipping, noise (std ``noise_multiplier * max_grad_norm`` on
    the sum) and the ``expected_batch_size`` normalisation all apply per *example*, as
    the privacy accounting assumes. With ``noise_multiplicity=1`` it is plain DPOptimizer.

    Rows must be averaged, not summed: the model is called with ``loss_reduction="mean"``
    over ``B*K`` rows, for which Opacus returns each row's own loss gradient; their mean
    is the gradient of the example's K-averaged loss.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplicity: int, **kwargs):
        k = check_noise_multiplicity(noise_multiplicity)
        super().__init__(optimizer, **kwargs)
        self.noise_multiplicity = k
        # Logical (noised) steps taken; physical batches that only accumulate do not count.
        self.steps_taken = 0

    @classmethod
    def from_dp_optimizer(
        cls, optimizer: DPOptimizer, *, noise_multiplicity: int
    ) -> NoiseMultiplicityDPOptimizer:
        """Rebuild an Opacus flat-clipping optimizer (as ``make_private`` returns it) as this
        class, keeping its wrapped optimizer, noise, clipping, generator and accountant hook.
        """
        if type(optimizer) is not DPOptimizer:
            raise TypeError(
                f"noise multiplicity needs Opacus' flat-clipping DPOptimizer, got "
                f"{type(optimizer).__name__}"
            )
        new = cls(
            optimizer.original_optimizer,
            noise_multiplicity=noise_multiplicity,
            noise_multiplier=optimizer.noise_multiplier,
            max_grad_norm=optimizer.max_grad_norm,
            expected_batch_size=optimizer.expected_batch_size,
            loss_reduction=optimizer.loss_reduction,
            generator=optimizer.generator,
            secure_mode=optimizer.secure_mode,
        )
        if optimizer.step_hook is not None:
            new.attach_step_hook(optimizer.step_hook)
        return new

    def _average_draws(self, grad_sample: torch.Tensor) -> torch.Tensor:
        k = self.noise_multiplicity
        examples = examples_in(grad_sample.shape[0], k)
        return grad_sample.reshape(examples, k, *grad_sample.shape[1:]).mean(dim=1)

    def clip_and_accumulate(self) -> None:
        """Average each example's K rows, then clip and accumulate exactly as Opacus does."""
        if self.noise_multiplicity > 1:
            for p in self.params:
                gs = p.grad_sample
                if isinstance(gs, list):
                    p.grad_sample = [self._average_draws(g) for g in gs]
                elif gs is not None:
                    p.grad_sample = self._average_draws(gs)
        super().clip_and_accumulate()

    def noise_only_step(self) -> None:
        """Take the step of an empty Poisson batch: no example, so the update is pure noise.

        An empty batch is a legitimate outcome of Poisson sampling and must be a real,
        noised, accounted step. The model is not called at all: diffusers' attention
        cannot reshape a batch of zero images, and there is nothing to differentiate.
        Opacus then clips zero rows and adds the usual noise.
        """
        for p in self.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        self.step()


class ShardedPoissonSampler(DistributedUniformWithReplacementSampler):
    """Opacus' distributed Poisson sampler, but every step yields a batch, empty or not.

    Opacus' version skips a process's empty local batch, which would leave that process
    a step behind the others (a hang or mismatched all-reduce, and an accountant one step
    short). Here every process takes every step; an empty one is a noise-only step.
    The shards are a fixed partition (record i goes to process i mod world size), which
    depends on no data, and each record is still included independently with
    probability q, so the global batch is exactly Poisson(q) over the whole data set.
    """

    def __iter__(self):
        shard = torch.arange(self.rank, self.total_size, self.num_replicas)
        for _ in range(self.num_batches):
            mask = torch.rand(len(shard), generator=self.generator) < self.sample_rate
            yield shard[mask].tolist()


def sharded_poisson_loader(data_loader: DataLoader, *, generator: torch.Generator) -> DataLoader:
    """This process's Poisson loader over its shard, at rate ``1 / len(data_loader)``."""
    dataset = data_loader.dataset
    sampler = ShardedPoissonSampler(
        total_size=len(dataset), sample_rate=1 / len(data_loader), generator=generator
    )
    first = dataset[0]
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        # Opacus' collate: an empty batch becomes zero-length tensors of the right shape.
        collate_fn=wrap_collate_with_empty(
            collate_fn=default_collate,
            sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
            dtypes=[dtype_safe(x) for x in first],
        ),
    )


def _poisson_sampling(dp_loader: DataLoader, generator: torch.Generator) -> DataLoader:
    """Point Opacus' Poisson sampler at our (secret, checkpointed) generator."""
    sampler = dp_loader.batch_sampler
    if not isinstance(sampler, UniformWithReplacementSampler):
        raise TypeError(f"expected Opacus' Poisson sampler, got {type(sampler).__name__}")
    sampler.generator = generator
    return dp_loader


def _privacy_engine() -> PrivacyEngine:
    """Opacus' engine (its RDP accountant counts the steps), with its secure-RNG warning
    replaced by one that says what holds here."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = PrivacyEngine(accountant="rdp")
    for w in caught:
        if "Secure RNG turned off" in str(w.message):
            # Opacus' advice (turn secure_mode on) cannot be followed here: it needs
            # torchcsprng, which has no build for current torch. Say what holds instead.
            warnings.warn(
                "Opacus secure_mode is off: the DP noise and Poisson masks come from torch "
                "generators seeded with secret OS entropy (unless privacy.reproducible_noise)"
                ", which are not CSPRNGs, and the noise is not hardened against floating-point "
                "attacks (README, Threat model)",
                UserWarning,
                stacklevel=3,
            )
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return engine


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    noise_multiplicity: int,
    sampler_generator: torch.Generator,
    noise_generator: torch.Generator,
    grad_sample_mode: str = "bookkeeping",
    distributed: bool = False,
) -> tuple[torch.nn.Module, DPOptimizer, DataLoader, PrivacyEngine]:
    """DP-SGD with Poisson sampling and noise multiplicity on stock Opacus.

    Args:
        model: The module to train (already validated: no BatchNorm).
        optimizer: Its non-private optimizer.
        data_loader: Loader over the sensitive training set; its ``batch_size`` is the
            expected logical batch.
        noise_multiplier: DP-SGD sigma (noise std on the summed gradient is
            ``noise_multiplier * max_grad_norm``).
        max_grad_norm: Per-example clipping norm C.
        noise_multiplicity: K diffusion-noise draws averaged per example before clipping.
        sampler_generator: Source of the Poisson masks (saved in checkpoints).
        noise_generator: Source of the DP noise (saved in checkpoints).
        grad_sample_mode: ``"bookkeeping"``: per-example norms from activations and the
            clipped sum in one backward pass (:mod:`privimage.dp.bookkeeping`), noised by
            Opacus' fast-gradient-clipping optimizer; ``"hooks"``: Opacus'
            ``make_private`` with its per-example gradients and
            :class:`NoiseMultiplicityDPOptimizer`. Both clip the same per-example
            gradients and add the same noise.
        distributed: One of several processes (``torch.distributed`` initialised):
            each samples its own shard of the data set at the same Poisson rate
            (:class:`ShardedPoissonSampler`), rank 0 adds the noise once for the whole
            logical batch and the clipped, noised sums are all-reduced; the expected batch
            per process is the logical batch over the world size. Book-keeping only.

    Returns:
        The wrapped model (``._module`` is the model), the optimizer (with
        ``steps_taken`` and ``noise_only_step()``), the Poisson data loader and the engine
        (whose RDP accountant counts the steps the optimizer actually took, as a
        cross-check of the privacy ledger).
    """
    engine = _privacy_engine()
    if grad_sample_mode == "bookkeeping":
        # Opacus' own pieces, assembled as its make_private does for fast gradient
        # clipping, around our wrapper instead of its two-pass module.
        # The generator goes to the sampler alone, as on the hooks path: given to the
        # loader, it would also feed the DataLoader's base seed and shift the masks.
        if distributed:
            dp_loader = sharded_poisson_loader(data_loader, generator=sampler_generator)
        else:
            dp_loader = _poisson_sampling(
                DPDataLoader.from_data_loader(data_loader), sampler_generator
            )
        sample_rate = dp_loader.batch_sampler.sample_rate
        expected = int(len(data_loader.dataset) * sample_rate)
        world = torch.distributed.get_world_size() if distributed else 1
        dp_model = BookKeeping(
            model, max_grad_norm=max_grad_norm, noise_multiplicity=noise_multiplicity
        )
        optimizer_class = (
            DistributedBookKeepingDPOptimizer if distributed else BookKeepingDPOptimizer
        )
        dp_optimizer = optimizer_class(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            # Per process, as Opacus' make_private sets it: the all-reduce averages.
            expected_batch_size=expected / world,
            loss_reduction="mean",
            generator=noise_generator,
        )
        dp_optimizer.attach_step_hook(
            engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate)
        )
        return dp_model, dp_optimizer, dp_loader, engine
    if grad_sample_mode != "hooks":
        raise ConfigError(
            f"finetune.grad_sample_mode={grad_sample_mode!r}; choose bookkeeping or hooks"
        )
    if distributed:
        raise ConfigError(
            "finetune.grad_sample_mode=hooks runs in one process; use "
            "finetune.grad_sample_mode=bookkeeping to fine-tune on several"
        )
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise_generator,
    )
    dp_loader = _poisson_sampling(dp_loader, sampler_generator)
    dp_optimizer = NoiseMultiplicityDPOptimizer.from_dp_optimizer(
        dp_optimizer, noise_multiplicity=noise_multiplicity
    )
    return dp_model, dp_optimizer, dp_loader, engine
