"""The DP-SGD training loop and its bookkeeping, shared by fine-tuning and the audit.

:meth:`DPTraining.train` runs logical DP-SGD steps on an Opacus-wrapped model (from
:func:`privimage.dp.dpsgd.make_private`): label dropout and the K diffusion-noise draws per
example, the EMA, the statistics and the checkpoints; :func:`dp_sgd_schedule` is the
sampling rate and step count Opacus realises; :func:`select_trainable` freezes what is
not trained. The fine-tuning stage (:mod:`privimage.stages.finetune`) runs them on the
sensitive data, and the privacy audit (:mod:`privimage.stages.audit`) on the same data
with canaries, so the audit measures the very loop that makes the released model.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from privimage.config.schema import Config
from privimage.diffusion import drop_labels, null_class, training_loss
from privimage.dp import accounting
from privimage.dp.dpsgd import make_private, repeat_for_noise_draws
from privimage.errors import ConfigError, PrivImageError
from privimage.io.atomic import torch_save
from privimage.io.seeding import torch_generator
from privimage.io.stats import StatsWriter
from privimage.nets.models import EMA, make_opacus_safe


@dataclass(frozen=True)
class Processes:
    """This process's place among the fine-tuning processes (torchrun / accelerate launch).

    Every process samples its own shard of the sensitive set at the global Poisson rate
    and clips its own examples; process 0 adds the noise once for the whole logical batch,
    writes the ledger, the statistics, the checkpoint and the model.
    """

    rank: int = 0
    world: int = 1
    # Where collective tensors live: NCCL reduces only CUDA tensors, gloo CPU ones.
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def agree(self, ok: bool) -> bool:
        """True on every process only if ``ok`` was true on every process."""
        if not self.distributed:
            return ok
        flag = torch.tensor([1 if ok else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


def start_processes(device: torch.device) -> tuple[Processes, torch.device]:
    """Join the launcher's process group (gloo on CPUs, NCCL on GPUs) when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    collective = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return Processes(rank=dist.get_rank(), world=dist.get_world_size(), device=collective), device


# The three random streams of a DP-SGD run and where each lives: the Poisson sampler and
# the loss's draws on the CPU (they index and shape batches), the noise beside the model.
STREAMS = ("sampler", "noise", "diffusion")


def prepare_for_dp_sgd(model: torch.nn.Module) -> torch.nn.Module:
    """Refuse a model DP-SGD cannot train (BatchNorm, ...) in one line; ready Opacus' hooks."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivImageError(f"the UNet has layers DP-SGD cannot train: {errors[0]}")
    return make_opacus_safe(model)


def dp_streams(entropy: dict[str, int] | None, *, device: torch.device) -> dict:
    """The run's generators, seeded from secret ``entropy`` (one value per name in STREAMS).

    ``None`` gives unseeded generators, for a resumed run whose checkpoint restores their
    states: no new entropy is drawn.
    """

    def where(name: str) -> torch.device | str:
        return device if name == "noise" else "cpu"

    if entropy is None:
        return {name: torch.Generator(device=where(name)) for name in STREAMS}
    return {name: torch_generator(entropy[name], device=where(name)) for name in STREAMS}


def dp_sgd_schedule(*, num_records: int, batch_size: int, epochs: float) -> tuple[float, int]:
    """Poisson sampling rate and step count exactly as Opacus' DP data loader realises them.

    Opacus samples each record with probability 1 / len(loader) where the loader has
    ``ceil(N / batch_size)`` batches, so the accounted rate must be that, not
    ``batch_size / N``.
    """
    if batch_size > num_records:
        raise ConfigError(
            f"finetune.batch_size={batch_size} exceeds the {num_records} sensitive training "
            "images; lower it"
        )
    sample_rate = 1.0 / math.ceil(num_records / batch_size)
    steps = max(1, math.ceil(epochs / sample_rate))
    return sample_rate, steps


def select_trainable(model: torch.nn.Module, prefixes: list[str] | None) -> dict:
    """Freeze every parameter of ``model`` outside ``prefixes`` (None: train them all).

    A prefix matches a parameter whose qualified name equals it or starts with it
    followed by a dot (``up_blocks.1`` matches ``up_blocks.1.resnets.0.conv1.weight``, not
    ``up_blocks.10...``). Returns what is trained, for the stats and the ledger.

    Raises:
        ConfigError: A prefix matches no parameter (naming the UNet's top-level modules).
    """
    names = [n for n, _ in model.named_parameters()]
    total = sum(p.numel() for p in model.parameters())
    if prefixes is None:
        model.requires_grad_(True)
        return {"trainable": "all", "trained_parameters": total, "parameters": total}
    prefixes = [str(x) for x in prefixes]

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    for prefix in prefixes:
        if not any(under(n, prefix) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(
                f"finetune.trainable={prefixes}: {prefix!r} names no parameter of the UNet; "
                f"use prefixes of its modules, e.g. {', '.join(tops)}"
            )
    trained = 0
    for n, p in model.named_parameters():
        keep = any(under(n, x) for x in prefixes)
        p.requires_grad_(keep)
        trained += p.numel() if keep else 0
    return {"trainable": prefixes, "trained_parameters": trained, "parameters": total}


@dataclass
class Checkpoint:
    """``finetune/checkpoint.pt``: the private state a fine-tune resumes from, one type for
    the DP-SGD path (written by :meth:`DPTraining.save`) and the non-private path (the
    audit never resumes: a killed audit starts over). ``identity`` is what a resume
    must match (mechanism, data, pretrained weights, settings); it is stored flat beside
    the state, so a checkpoint reads as one dictionary.
    """

    step: int
    identity: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    # DP-SGD only: the Opacus accountant and every process's secret random streams.
    accountant: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None

    _STATE = ("step", "model", "ema", "optimizer", "accountant", "rng")

    def save(self, path: Path) -> None:
        state = {
            "step": self.step,
            **self.identity,
            "model": self.model,
            "ema": self.ema,
            "optimizer": self.optimizer,
        }
        if self.accountant is not None:
            state |= {"accountant": self.accountant, "rng": self.rng}
        torch_save(state, path)

    @classmethod
    def load(cls, path: Path, device: torch.device) -> Checkpoint | None:
        """The checkpoint at ``path``, or None when there is none."""
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 (any unreadable file gets the same advice)
            # Writes are atomic, so this is not a torn write but a foreign or damaged file.
            raise PrivImageError(
                f"cannot read the fine-tuning checkpoint {path} ({type(exc).__name__}); "
                "delete it to restart fine-tuning from step 0"
            ) from exc
        identity = {k: v for k, v in state.items() if k not in cls._STATE}
        return cls(identity=identity, **{k: state.get(k) for k in cls._STATE})

    def check(self, expected: dict[str, Any], path: Path) -> None:
        """The checkpoint must come from exactly this fine-tuning setup."""
        for key, value in expected.items():
            if self.identity.get(key) != value:
                raise ConfigError(
                    f"{path} was written with {key}={self.identity.get(key)!r}, this run has "
                    f"{value!r}; restore the original settings to resume, or delete the "
                    "checkpoint to restart fine-tuning from step 0 (the abandoned attempt "
                    "stays charged)"
                )


@dataclass
class DPTraining:
    """What DP-SGD trains with: the Opacus-wrapped model, optimizer, Poisson loader and
    accountant, the EMA, and the three secret random streams; one type, and one private
    checkpoint format, for fine-tuning and the audit."""

    dp_model: torch.nn.Module
    optimizer: Any
    dp_loader: DataLoader
    engine: Any
    ema: EMA
    streams: dict[str, torch.Generator]

    @classmethod
    def build(
        cls,
        cfg: Config,
        model: torch.nn.Module,
        dataset: TensorDataset,
        *,
        noise_multiplier: float,
        entropy: dict[str, int] | None,
        ckpt: Checkpoint | None,
        procs: Processes,
        device: torch.device,
        sample_rate: float | None = None,
    ) -> DPTraining:
        """Fresh (streams from ``entropy``), or restored from the private checkpoint
        ``ckpt`` (weights, optimizer, Opacus accountant, streams). ``sample_rate``: the
        accounted Poisson rate, checked against the one Opacus samples at."""
        ft = cfg.finetune
        if ckpt is not None:
            model.load_state_dict(ckpt.model)
        model.to(device).train()
        ema = EMA(model, decay=ft.ema_decay)
        if ckpt is not None:
            ema.resume(ckpt.ema, updates=ckpt.step)
        streams = dp_streams(entropy, device=device)
        loader = DataLoader(dataset, batch_size=ft.batch_size)
        dp_model, optimizer, dp_loader, engine = make_private(
            model,
            torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=ft.lr),
            loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=ft.max_grad_norm,
            noise_multiplicity=ft.noise_multiplicity,
            sampler_generator=streams["sampler"],
            noise_generator=streams["noise"],
            grad_sample_mode=ft.grad_sample_mode,
            distributed=procs.distributed,
        )
        sampled_rate = dp_loader.batch_sampler.sample_rate
        if sample_rate is not None and abs(sampled_rate - sample_rate) > 1e-12:
            raise RuntimeError(f"Opacus samples at rate {sampled_rate}, accounted {sample_rate}")
        if ckpt is not None:
            optimizer.original_optimizer.load_state_dict(ckpt.optimizer)
            engine.accountant.load_state_dict(ckpt.accountant)
            mine = ckpt.rng["processes"][procs.rank]
            for name, generator in streams.items():
                generator.set_state(mine[name].cpu())
            torch.set_rng_state(mine["torch"].cpu())
            optimizer.steps_taken = int(ckpt.step)
        return cls(dp_model, optimizer, dp_loader, engine, ema, streams)

    def train(
        self,
        cfg: Config,
        *,
        mechanism: accounting.Mechanism,
        prior: list[accounting.Mechanism],
        start: int,
        stats_path: Path,
        save_checkpoint,
        procs: Processes,
        device: torch.device,
        tracker: Any = None,
    ) -> None:
        """Run logical DP-SGD steps ``start + 1 .. mechanism.steps``, checkpointing as it goes;
        each step's loss and epsilon go to ``stats_path`` and to ``tracker`` if given."""
        dp_model, optimizer, dp_loader, ema = (
            self.dp_model,
            self.optimizer,
            self.dp_loader,
            self.ema,
        )
        diffusion_generator = self.streams["diffusion"]
        ft = cfg.finetune
        steps = mechanism.steps
        null_label = null_class(dp_model._module)
        stats = (
            StatsWriter.resume(stats_path, after_step=start, tracker=tracker)
            if procs.main
            else None
        )

        def epsilon_after(step: int) -> float:
            return accounting.epsilon_spent(
                [*prior, replace(mechanism, steps=step)],
                delta=cfg.privacy.delta,
                accountant=cfg.privacy.accountant,
            )

        eps_every = max(1, steps // 50)  # accounting every step would dominate under PRV
        eps_so_far = epsilon_after(start)
        bar = tqdm(total=steps, initial=start, desc="finetune (DP-SGD)", disable=not procs.main)
        done = start
        loss_sum, loss_rows = 0.0, 0
        with (
            warnings.catch_warnings(),
            BatchMemoryManager(
                data_loader=dp_loader,
                max_physical_batch_size=ft.physical_batch_size,
                optimizer=optimizer,
            ) as memory_safe_loader,
        ):
            # Opacus' hooks make torch warn on every backward that the first layer's input
            # needs no gradient; expected (images are data, not parameters), so silenced here.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            while done < steps:
                for x, y, *slot_weight in memory_safe_loader:
                    optimizer.zero_grad(set_to_none=True)
                    if len(x):
                        # Label dropout per example (before the K copies), drawn independently
                        # of the data, so it changes nothing in the privacy analysis.
                        y = drop_labels(
                            y,
                            probability=ft.label_dropout,
                            null_label=null_label,
                            generator=diffusion_generator,
                        )
                        x, y = repeat_for_noise_draws(
                            x.to(device), y.to(device), ft.noise_multiplicity
                        )
                        per_row = training_loss(
                            dp_model, x, y, spec=cfg.diffusion, generator=diffusion_generator
                        )
                        if slot_weight:
                            # The audit's canary slots (privimage.stages.audit): weight 0 is a
                            # canary left out, whose gradient is exactly zero, so the slot adds
                            # nothing to the clipped sum yet takes its Poisson draw and its
                            # loss draws like any record, keeping every other stream in step.
                            weight = slot_weight[0].to(device, per_row.dtype)
                            per_row = per_row * weight.repeat_interleave(ft.noise_multiplicity)
                        # Mean over B*K rows: Opacus then hands the optimizer each row's own
                        # gradient, which it averages per example before clipping.
                        per_row.mean().backward()
                        optimizer.step()
                        loss_sum += float(per_row.detach().sum())
                        loss_rows += len(per_row)
                    else:
                        optimizer.noise_only_step()  # an empty Poisson batch
                    if optimizer.steps_taken == done:
                        continue  # a physical batch inside a larger logical one
                    done = optimizer.steps_taken
                    ema.update_parameters(dp_model._module)
                    if procs.distributed:  # the logical batch's loss, over every process
                        total = torch.tensor(
                            [loss_sum, float(loss_rows)], dtype=torch.float64, device=procs.device
                        )
                        dist.all_reduce(total)
                        loss_sum, loss_rows = float(total[0]), int(total[1])
                    mean_loss = loss_sum / loss_rows if loss_rows else None
                    loss_sum, loss_rows = 0.0, 0
                    if done % eps_every == 0 or done == steps:
                        eps_so_far = epsilon_after(done)
                    bar.update(1)
                    bar.set_postfix(loss=mean_loss, eps=f"{eps_so_far:.2f}")
                    if stats is not None:
                        stats.write(step=done, loss=mean_loss, epsilon=eps_so_far)
                    if done % ft.checkpoint_every_steps == 0 or done == steps:
                        save_checkpoint(done)
                    if done >= steps:
                        break
        bar.close()
        if stats is not None:
            stats.close()

    def save(self, step: int, identity: dict, path: Path, procs: Processes) -> None:
        """The private checkpoint: everything a resume needs, every process's streams."""
        rng = {
            **{name: g.get_state().cpu() for name, g in self.streams.items()},
            "torch": torch.get_rng_state(),
        }
        # Process 0 writes every process's streams; the weights are the same everywhere.
        everyone = [rng]
        if procs.distributed:
            everyone = [None] * procs.world
            dist.all_gather_object(everyone, rng)
        if procs.main:
            Checkpoint(
                step=step,
                identity=identity,
                model=self.dp_model._module.state_dict(),
                ema=self.ema.state_dict(),
                optimizer=self.optimizer.original_optimizer.state_dict(),
                accountant=self.engine.accountant.state_dict(),
                rng={"processes": everyone},
            ).save(path)
        procs.barrier()
