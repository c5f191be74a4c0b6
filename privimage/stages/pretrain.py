"""Stage 2: non-private pretraining of the diffusion UNet on the selected public images.

The public images chosen by the query are relabelled to their sensitive classes, so the
class-conditional UNet learns "what class c looks like" from public data before it ever
sees sensitive data (``pretrain.public_subset=semantic``, PrivImage). The baselines:
``all`` pretrains unconditionally on the whole public training split (PDP-Diffusion) and
``none`` writes the initial weights untouched (DPDM); ``pretrain.images_seen`` gives
methods with subsets of different sizes the same compute.

Public data costs no privacy, so this is a plain Accelerate loop on one process or many
(``torchrun --nproc_per_node N -m privimage ...``), with mixed precision where the
hardware has it, gradient accumulation, label dropout for classifier-free guidance and
an EMA of the weights.

Seeds are data here too: the epoch's shuffle is a function of ``(seed, epoch)`` and
every micro-batch's diffusion noise a function of ``(seed, step, process, micro-batch)``.
So the run is resumable from Accelerate's ``save_state`` checkpoint with nothing else
to restore, and each process takes its own disjoint share of every global batch.

Writes ``pretrain/``: ``unet/`` (EMA weights, ``save_pretrained`` + ``diffusion.json``),
``classes.json`` (the sensitive class names in label order), ``stats.jsonl``,
``loss.png``, ``grid.png`` (samples per class), ``processes.json``
(world size and what each process saw), ``logs/`` with a tracker; ``checkpoint/``
exists only while a run is unfinished.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from privimage import data
from privimage.config.schema import Config
from privimage.diffusion import (
    configured_pipeline,
    drop_labels,
    sample_batch,
    solver_or_default,
    training_loss,
)
from privimage.diffusion.pipeline import save_pipeline
from privimage.errors import ConfigError, PrivImageError
from privimage.io import artifacts
from privimage.io.artifacts import Stage, mark_done, require_upstream, stage_dir
from privimage.io.atomic import write_json
from privimage.io.release import Output
from privimage.io.seeding import step_generator
from privimage.io.stats import STATS, StatsWriter
from privimage.nets.models import EMA, build_unet, count_parameters, save_unet
from privimage.plots import save_image_grid, save_loss_curve
from privimage.runtime import cache_root
from privimage.schedule import epoch_order, micro_batch, scheduled_lr

log = logging.getLogger(__name__)

STAGE = "pretrain"
CHECKPOINT = "checkpoint"


def release_outputs(cfg: Config) -> dict[str, Output]:
    """The pretrained model's lineage (privimage.io.release); not itself released.

    It is computed from public images only: the query's noisy selection of them
    (PrivImage), all of them, or none (the seeded initial weights). The sensitive class
    names it reads are public by assumption.
    """
    if cfg.pretrain.public_subset == "semantic":
        inputs = tuple(f"query/{n}" for n in (artifacts.PUBLIC_INDEX, artifacts.PUBLIC_LABELS))
        inputs = (*inputs, "public")
    else:
        inputs = ("public",)
    return {artifacts.UNET: Output(inputs=inputs)}


class TrainState:
    """The loop's own resumable state: the number of optimizer steps taken, and the
    settings the run was started with (a resume under other settings is refused)."""

    def __init__(self, settings: dict) -> None:
        self.step = 0
        self.settings = settings

    def state_dict(self) -> dict:
        return {"step": self.step, "settings": self.settings}

    def load_state_dict(self, state: dict) -> None:
        if state["settings"] != self.settings:
            changed = sorted(
                k for k in self.settings if state["settings"].get(k) != self.settings[k]
            )
            raise ConfigError(
                f"pretrain/{CHECKPOINT} was written with other settings ({', '.join(changed)}); "
                f"restore the original settings to resume, or delete pretrain/{CHECKPOINT}"
            )
        self.step = int(state["step"])


def mixed_precision(setting: str, device: str) -> str:
    """Resolve ``auto``: bf16 where a CUDA device supports it, else full precision."""
    if setting != "auto":
        return setting
    use_cuda = device != "cpu" and torch.cuda.is_available()
    return "bf16" if use_cuda and torch.cuda.is_bf16_supported() else "no"


def _check_batch(cfg: Config, num_images: int, num_processes: int) -> int:
    """Steps per epoch; refuses batch sizes that do not split or do not fit."""
    p = cfg.pretrain
    parts = num_processes * p.gradient_accumulation_steps
    if p.batch_size % parts:
        raise ConfigError(
            f"pretrain.batch_size={p.batch_size} does not split into {num_processes} processes x "
            f"{p.gradient_accumulation_steps} accumulation steps; make it a multiple of {parts}"
        )
    if p.batch_size > num_images:
        raise ConfigError(
            f"pretrain.batch_size={p.batch_size} exceeds the {num_images} selected public images; "
            "lower pretrain.batch_size, or select more public classes (query.*)"
        )
    return num_images // p.batch_size


def _save_checkpoint(accelerator: Accelerator, out: Path) -> None:
    """Accelerate ``save_state`` made atomic: write aside, then swap the folders."""
    tmp, final, old = out / f"{CHECKPOINT}.tmp", out / CHECKPOINT, out / f"{CHECKPOINT}.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _find_checkpoint(out: Path) -> Path | None:
    # A crash between the two renames leaves only the old one, which is complete.
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        if (out / name).is_dir():
            return out / name
    return None


def _save_grid(cfg: Config, ema: torch.nn.Module, names: list[str], path: Path) -> None:
    """A look at what pretraining learned: a few samples per class from the EMA weights.

    Seeds ``0 .. n-1`` for every class, so grids of runs are comparable image by image.
    A model pretrained unconditionally (``public_subset=all``) gets one row, drawn with
    the null label.
    """
    p = cfg.pretrain
    n = p.grid_images_per_class
    if p.public_subset == "all":
        rows, row_labels = ["unconditional"], torch.full((n,), len(names))
    else:
        rows, row_labels = names, torch.arange(len(names)).repeat_interleave(n)
    images = sample_batch(
        ema.eval(),
        spec=cfg.diffusion,
        seeds=list(range(n)) * len(rows),
        labels=row_labels,
        num_steps=p.grid_num_inference_steps,
        solver=solver_or_default(p.grid_sampler, cfg.diffusion.formulation),
        guidance_scale=p.grid_guidance_scale,
    )
    save_image_grid(
        [images[i * n : (i + 1) * n] for i in range(len(rows))],
        path,
        row_labels=rows,
        title=f"pretrained on public data (EMA), guidance {p.grid_guidance_scale:g}",
    )


def _public_subset(cfg: Config, run_dir: Path, public: data.ImageDataset):
    """The pretraining images, their labels, and the sensitive class names.

    ``semantic``: the query's selection relabelled to the sensitive classes (the class
    names come from the query's released output; the sensitive data is never opened).
    ``all``: every public training image with the null label (unconditional: the public
    labels mean nothing to the sensitive classes). ``none``: no images. For the last two
    only the sensitive dataset's class list is read, which is public by assumption (the
    task's label set), not its images.
    """
    subset = cfg.pretrain.public_subset
    if subset == "semantic":
        query_dir = require_upstream(run_dir, "query", STAGE)
        index, labels, names = artifacts.load_selection(query_dir)
        return index, torch.from_numpy(labels), names
    names = data.load(cfg.data, cache_dir=cache_root(cfg.cache_dir)).class_names
    if subset == "none":
        return np.empty(0, np.int64), torch.empty(0, dtype=torch.long), names
    index = np.arange(len(public.train))
    return index, torch.full((len(index),), len(names), dtype=torch.long), names


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Optimizer steps: ``images_seen / batch_size`` when set (matched compute), else epochs."""
    p = cfg.pretrain
    if p.images_seen is not None:
        return math.ceil(p.images_seen / p.batch_size)
    return p.epochs * steps_per_epoch


def run(cfg: Config, run_dir: Path) -> Path:
    """Pretrain on the chosen public images; see the module docstring for outputs."""
    out = stage_dir(run_dir, STAGE)
    p = cfg.pretrain
    accelerator = _accelerator(cfg, out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    main = accelerator.is_main_process
    public = data.load(cfg.public, cache_dir=cache_root(cfg.cache_dir), progress=main)
    index, labels, names = _public_subset(cfg, run_dir, public)
    if p.max_images is not None and len(index) > p.max_images:
        keep = np.random.default_rng(cfg.seed).permutation(len(index))[: p.max_images]
        index, labels = index[keep], labels[keep]
    # Index before converting: the selection is a small part of a large public set.
    images = data.ImageSplit(public.train.images[torch.from_numpy(index)], labels).as_float()
    if len(images):
        steps_per_epoch = _check_batch(cfg, len(images), accelerator.num_processes)
        steps = total_steps(cfg, steps_per_epoch)
    else:  # public_subset=none: the initial weights are the output
        steps_per_epoch, steps = 1, 0

    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = build_unet(
        cfg.model,
        resolution=cfg.data.resolution,
        channels=cfg.data.channels,
        num_classes=len(names),
    )
    ema = EMA(model, decay=p.ema_decay)
    if main:
        log.info(
            "pretraining a %.2fM-parameter UNet (%s) on %d public images, %d steps of %d, "
            "%d process(es), mixed precision %s",
            count_parameters(model) / 1e6,
            cfg.diffusion.formulation,
            len(images),
            steps,
            p.batch_size,
            accelerator.num_processes,
            accelerator.mixed_precision,
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ema.to(accelerator.device)
    state = TrainState(_settings(cfg, len(images)))
    accelerator.register_for_checkpointing(ema, state)
    checkpoint = _find_checkpoint(out)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        ema.resume(None, updates=state.step)  # a checkpoint of before counts no updates
        if main:
            log.info("resuming pretraining at step %d/%d from %s", state.step, steps, checkpoint)
    if p.tracker is not None:
        accelerator.init_trackers("pretrain", config={"lr": p.lr, "batch_size": p.batch_size})
    loop = _Loop(cfg, accelerator, model, optimizer, ema, state, images, labels, len(names))
    seen, first_ids = loop.train(out, steps=steps, steps_per_epoch=steps_per_epoch)
    # What each process did, for the record (and the multi-process test).
    world = accelerator.num_processes
    mine = torch.tensor(
        [accelerator.process_index, *seen.tolist(), *(first_ids + [-1] * (8 - len(first_ids)))]
    )
    everyone = accelerator.gather(mine.to(accelerator.device).double()).cpu().view(world, -1)
    accelerator.wait_for_everyone()
    if main:
        _write_outputs(cfg, out, ema.module, names, everyone, steps=steps, accelerator=accelerator)
    if p.tracker is not None:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return out


def _accelerator(cfg: Config, out: Path) -> Accelerator:
    tracker = cfg.pretrain.tracker  # checked when the config was composed
    return Accelerator(
        mixed_precision=mixed_precision(cfg.pretrain.mixed_precision, cfg.device),
        cpu=cfg.device == "cpu",
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


def _settings(cfg: Config, num_images: int) -> dict:
    """What a checkpoint must agree on to be resumed by this run."""
    p = cfg.pretrain
    return {
        "num_images": num_images,
        "batch_size": p.batch_size,
        "gradient_accumulation_steps": p.gradient_accumulation_steps,
        "epochs": p.epochs,
        "images_seen": p.images_seen,
        "public_subset": p.public_subset,
        "lr": p.lr,
        "warmup_steps": p.warmup_steps,
        "lr_decay": p.lr_decay,
        "label_dropout": p.label_dropout,
        "ema_decay": p.ema_decay,
        "seed": cfg.seed,
        "model": asdict(cfg.model),
        "diffusion": asdict(cfg.diffusion),
    }


@dataclass
class _Loop:
    """The pretraining loop's moving parts, on one process of ``accelerator``."""

    cfg: Config
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: torch.nn.Module
    state: TrainState
    images: torch.Tensor
    labels: torch.Tensor
    null_label: int

    def train(self, out: Path, *, steps: int, steps_per_epoch: int) -> tuple[torch.Tensor, list]:
        """Steps ``state.step .. steps - 1``; returns (images seen, sum of their ids) and
        the first ids this process saw."""
        p, acc, state = self.cfg.pretrain, self.accelerator, self.state
        main = acc.is_main_process
        stats = None
        if main:
            stats = StatsWriter.resume(out / STATS, after_step=state.step)
        bar = tqdm(total=steps, initial=state.step, desc="pretrain (public)", disable=not main)
        seen = torch.zeros(2, dtype=torch.float64)  # images this process saw, sum of their ids
        first_ids: list[int] = []
        order, order_epoch = None, -1
        started, started_step = time.perf_counter(), state.step
        self.model.train()
        for step in range(state.step, steps):
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order = epoch_order(seed=self.cfg.seed, epoch=epoch, num_images=len(self.images))
                order_epoch = epoch
            # A function of the step alone, so a resumed run continues the same schedule.
            for group in self.optimizer.param_groups:
                group["lr"] = scheduled_lr(
                    p.lr,
                    step=step,
                    warmup_steps=p.warmup_steps,
                    total_steps=steps,
                    decay=p.lr_decay,
                )
            step_loss, ids = self._step(order, step=step, in_epoch=in_epoch)
            for idx in ids:
                seen += torch.tensor([len(idx), float(idx.sum())], dtype=torch.float64)
                if not first_ids:
                    first_ids = idx[:8].tolist()
            state.step = step + 1
            bar.update(1)
            if state.step % p.log_every_steps == 0 or state.step == steps:
                rate = (state.step - started_step) * p.batch_size / (time.perf_counter() - started)
                self._log(step_loss, epoch=epoch, rate=rate, bar=bar, stats=stats)
            if state.step % p.checkpoint_every_steps == 0 and state.step < steps:
                _save_checkpoint(acc, out)
        bar.close()
        if stats is not None:
            stats.close()
        return seen, first_ids

    def _step(self, order, *, step: int, in_epoch: int) -> tuple[torch.Tensor, list]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        p, acc = self.cfg.pretrain, self.accelerator
        accum = p.gradient_accumulation_steps
        rank, world = acc.process_index, acc.num_processes
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=acc.device)
        ids = []
        for micro in range(accum):
            idx = micro_batch(
                order,
                step_in_epoch=in_epoch,
                batch_size=p.batch_size,
                process=rank,
                num_processes=world,
                micro=micro,
                accumulation=accum,
            )
            ids.append(idx)
            g = step_generator(seed=self.cfg.seed, step=step, process=rank, micro=micro)
            x = self.images[idx].to(acc.device)
            y = drop_labels(
                self.labels[idx],
                probability=p.label_dropout,
                null_label=self.null_label,
                generator=g,
            ).to(acc.device)
            # Gradients are all-reduced on the last micro-batch only.
            sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(self.model)
            with sync:
                with acc.autocast():
                    loss = training_loss(self.model, x, y, spec=self.cfg.diffusion, generator=g)
                    loss = loss.mean()
                acc.backward(loss / accum)
            step_loss += loss.detach() / accum
        self.optimizer.step()
        self.ema.update_parameters(acc.unwrap_model(self.model))
        return step_loss, ids

    def _log(self, step_loss: torch.Tensor, *, epoch: int, rate: float, bar, stats) -> None:
        # A collective: every process reaches it at the same steps.
        mean_loss = self.accelerator.reduce(step_loss, reduction="mean").item()
        if not math.isfinite(mean_loss):
            raise PrivImageError(
                f"pretraining diverged (loss={mean_loss}) at step {self.state.step}; "
                f"lower pretrain.lr={self.cfg.pretrain.lr}"
            )
        bar.set_postfix(loss=f"{mean_loss:.4f}", epoch=epoch, img_s=f"{rate:.0f}")
        if stats is not None:
            stats.write(step=self.state.step, epoch=epoch, loss=mean_loss, images_per_s=rate)
        if self.cfg.pretrain.tracker is not None:
            self.accelerator.log({"loss": mean_loss, "images_per_s": rate}, step=self.state.step)


def _write_outputs(cfg, out, ema, names, everyone, *, steps: int, accelerator) -> None:
    """The pretrained UNet and what goes with it; process 0 only, DONE last."""
    p = cfg.pretrain
    save_unet(ema, out / artifacts.UNET, diffusion=cfg.diffusion)
    save_pipeline(configured_pipeline(ema, cfg, names), out / artifacts.PIPELINE)
    # The class names, in label order, for the stages after fine-tuning.
    write_json(out / artifacts.CLASSES, {"public_subset": p.public_subset, "classes": names})
    write_json(
        out / "processes.json",
        {
            "world_size": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "steps": steps,
            "processes": [
                {
                    "rank": int(r[0]),
                    "images_seen": int(r[1]),
                    "image_id_sum": int(r[2]),
                    "first_image_ids": [int(v) for v in r[3:] if v >= 0],
                }
                for r in everyone
            ],
        },
    )
    if steps > 0:
        save_loss_curve(out / STATS, out / "loss.png", title="pretraining loss (public)")
    if p.grid_images_per_class > 0 and steps > 0:
        _save_grid(cfg, ema, names, out / artifacts.GRID)
    for name in (CHECKPOINT, f"{CHECKPOINT}.old", f"{CHECKPOINT}.tmp"):
        shutil.rmtree(out / name, ignore_errors=True)
    mark_done(out)


def inputs(cfg: Config) -> dict:
    """Everything pretraining's output depends on besides the query: its key when shared.
    Subsets other than the semantic one read the sensitive class names (not images)."""
    return {
        "data": data.content_key(cfg.data),
        "public": data.content_key(cfg.public),
        "pretrain": asdict(cfg.pretrain),
        "model": asdict(cfg.model),
        "diffusion": asdict(cfg.diffusion),
    }


SPEC = Stage(
    name=STAGE,
    run=run,
    release=release_outputs,
    inputs=inputs,
    upstream=lambda cfg: ("query",) if cfg.pretrain.public_subset == "semantic" else (),
)
