"""Stage 3: DP-SGD fine-tuning of the pretrained UNet on the sensitive training split.

Stock Opacus (:mod:`privimage.dp.dpsgd`): Poisson sampling, each example's loss averaged over
``noise_multiplicity`` diffusion-noise draws before its gradient is clipped to
``max_grad_norm``, Gaussian noise. The noise multiplier is calibrated on the run's composed
history (the query's Gaussian histogram plus every DP-SGD step) so that together they meet the
target (epsilon, delta) under one accountant; the privacy ledger records the mechanism before
the first step touches data and again when training ends, and Opacus' own accountant, which
counts the steps the optimizer really took, must agree.

Secret randomness: the Poisson masks, the DP noise and the loss's own draws (timesteps,
diffusion noise, label dropout) come from generators seeded with fresh OS entropy when the
mechanism begins (:mod:`privimage.io.seeding`), never from ``cfg.seed``, so nobody holding the
run's config or files can regenerate them. The loss's draws are secret as well because they are
consumed in batch order: known values would shift with the Poisson mask, and then one record
would change every other example's gradient too.

Crash-safe: every ``checkpoint_every_steps`` logical steps the model, EMA, optimizer, Opacus
accountant and all three random streams are saved atomically to the private
``finetune/checkpoint.pt`` (deleted when the stage finishes). The same command after a crash
(even ``kill -9``) resumes there and continues the checkpointed streams, drawing no new
entropy, so the run releases one instance of the mechanism; under
``privacy.reproducible_noise`` the finished model, ``stats.jsonl`` and ledger equal those of an
uninterrupted run. Only the same mechanism on the same sensitive data (content key) from the
same pretrained weights (SHA-256) resumes a checkpoint. Without one a started attempt is
abandoned; with secret noise the ledger keeps charging it (the rerun's fresh noise makes it a
second release) and the rerun is calibrated on top of it.

Writes ``finetune/``: ``unet/`` (EMA weights), ``pipeline/`` (``PrivImagePipeline`` with its
model card), ``stats.jsonl`` (one line per logical step: loss, epsilon so far).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from privimage import data
from privimage.config.schema import Config
from privimage.data.archives import file_digest
from privimage.diffusion import configured_pipeline, drop_labels, null_class, training_loss
from privimage.diffusion.pipeline import save_pipeline
from privimage.dp import accounting
from privimage.dp.ledger import Ledger, run_ledger
from privimage.dp.training import (
    STREAMS,
    Checkpoint,
    DPTraining,
    Processes,
    dp_sgd_schedule,
    prepare_for_dp_sgd,
    select_trainable,
    start_processes,
)
from privimage.errors import ConfigError, PrivacyBudgetError, PrivImageError
from privimage.io import artifacts
from privimage.io.artifacts import LEDGER, Stage, is_done, mark_done, require_upstream, stage_dir
from privimage.io.cards import write_model_card
from privimage.io.release import Output
from privimage.io.seeding import dp_entropy, public_generator, public_rng
from privimage.io.stats import STATS, StatsWriter
from privimage.io.trackers import open_tracker
from privimage.nets.models import (
    EMA,
    check_same_diffusion,
    load_unet,
    save_unet,
    weight_files,
)
from privimage.runtime import cache_root, resolve_device, seed_everything

log = logging.getLogger(__name__)

STAGE = "finetune"
CHECKPOINT = "checkpoint.pt"
MECHANISM = "finetune/dp_sgd"
NO_DP = (
    "fine-tuning on the sensitive data without clipping or noise (finetune.dp=false): no "
    "epsilon describes this run's output"
)

# The DP pipeline is released as release/model/ (privimage.io.release); the bare UNet,
# which the samples come from, is declared for their lineage only (the pipeline holds the
# same weights). stats.jsonl (exact losses of sensitive batches) and the checkpoint are not
# released. A non-private fine-tune completes no dp_sgd mechanism: its model is withheld.
_FROM = (f"pretrain/{artifacts.UNET}",)
RELEASE = {
    artifacts.UNET: Output(mechanism=MECHANISM, inputs=_FROM),
    artifacts.PIPELINE: Output(mechanism=MECHANISM, inputs=_FROM, dest="model"),
}


def weights_digest(unet_dir: Path) -> str:
    """SHA-256 of a saved UNet's weight files: the identity of the model a checkpoint
    continues."""
    weights = weight_files(unet_dir)
    if not weights:
        raise PrivImageError(f"no weights in {unet_dir}; rerun the pretrain stage")
    return ",".join(f"{w.name}:{file_digest(w)['sha256']}" for w in weights)


def check_done(cfg: Config, run_dir: Path) -> None:
    """A finished stage keeps no checkpoint: one left by a crash between ``DONE`` and its
    deletion holds the secret random streams, so it goes now."""
    (stage_dir(run_dir, STAGE) / CHECKPOINT).unlink(missing_ok=True)


def run(cfg: Config, run_dir: Path) -> Path:
    """Fine-tune with DP-SGD (resuming from a checkpoint if one exists); see module docstring."""
    pretrain_dir = require_upstream(run_dir, "pretrain", STAGE)
    out = stage_dir(run_dir, STAGE)
    out.mkdir(parents=True, exist_ok=True)
    ft = cfg.finetune
    procs, device = _start(cfg)
    ledger = run_ledger(cfg, run_dir)
    if not ft.dp:
        # Recorded before the sensitive data is opened, like every mechanism.
        ledger.record_non_private(stage=STAGE, name="non_private_training", description=NO_DP)
    sensitive = data.load(cfg.data, cache_dir=cache_root(cfg.cache_dir))
    n = len(sensitive.train)
    accounting.check_delta(delta=cfg.privacy.delta, num_records=n)
    sample_rate, steps = dp_sgd_schedule(num_records=n, batch_size=ft.batch_size, epochs=ft.epochs)
    if not ft.dp:
        _run_non_private(
            cfg, sensitive.train, steps=steps, pretrain_dir=pretrain_dir, out=out, device=device
        )
        return out

    ckpt_path = out / CHECKPOINT
    ckpt = Checkpoint.load(ckpt_path, device)
    prior, mechanism = _plan(
        cfg, run_dir, ledger, sample_rate=sample_rate, steps=steps, resuming=ckpt is not None
    )
    # Loaded before the ledger entry, which records which of its parameters are trained
    # (a bad finetune.trainable fails here, before anything is spent).
    model, trained = _pretrained_for_dp_sgd(cfg, pretrain_dir)
    identity = _identity(cfg, mechanism, num_records=n, world=procs.world, pretrained=pretrain_dir)
    start = 0
    if ckpt is not None:
        ckpt.check(identity, ckpt_path)
        start = ckpt.step
    already_completed = _begin(cfg, ledger, procs, mechanism, start=start, details=trained)
    log.info(
        "DP-SGD: N=%d, q=%.5f, %d steps, noise multiplier %.4f, K=%d for epsilon %.3g at "
        "delta %.1e%s",
        n,
        sample_rate,
        steps,
        mechanism.noise_multiplier,
        ft.noise_multiplicity,
        cfg.privacy.target_epsilon,
        cfg.privacy.delta,
        f"; resuming after step {start}" if start else "",
    )
    state = DPTraining.build(
        cfg,
        model,
        TensorDataset(sensitive.train.as_float(), sensitive.train.labels),
        noise_multiplier=mechanism.noise_multiplier,
        # Resume continues the checkpointed streams: no new entropy.
        entropy=None if ckpt is not None else _entropy(cfg, procs),
        ckpt=ckpt,
        procs=procs,
        device=device,
        sample_rate=mechanism.sample_rate,
    )
    del ckpt
    if start < steps:
        tracker = (
            _tracker(cfg, out, first_step=start + 1, noise_multiplier=mechanism.noise_multiplier)
            if procs.main
            else None
        )
        state.train(
            cfg,
            mechanism=mechanism,
            prior=prior,
            start=start,
            stats_path=out / STATS,
            save_checkpoint=lambda step: state.save(step, identity, ckpt_path, procs),
            procs=procs,
            device=device,
            tracker=tracker,
        )
    _finish(cfg, ledger, mechanism, state, out, procs, already_completed=already_completed)
    return out


def _identity(
    cfg: Config, mechanism: accounting.Mechanism, *, num_records: int, world: int, pretrained
) -> dict:
    """What a checkpoint must match to be resumed: the same mechanism on the same data
    from the same starting model."""
    return {
        "mechanism": mechanism.to_dict(),
        "noise_multiplicity": cfg.finetune.noise_multiplicity,
        "num_records": num_records,
        "seed": cfg.seed,
        "reproducible_noise": cfg.privacy.reproducible_noise,
        # Each process samples its own shard with its own streams.
        "world_size": world,
        # The same sensitive images and the same starting model, not just the same shapes.
        "data_key": data.content_key(cfg.data),
        "pretrained_weights": weights_digest(pretrained / artifacts.UNET),
        "trainable": cfg.finetune.trainable,
    }


def _pretrained_for_dp_sgd(cfg: Config, pretrain_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The pretrained UNet made Opacus-ready, and which of its parameters DP-SGD trains."""
    model, trained_with = load_unet(pretrain_dir / artifacts.UNET)
    check_same_diffusion(trained_with, cfg.diffusion, pretrain_dir / artifacts.UNET)
    model.train()
    prepare_for_dp_sgd(model)
    return model, select_trainable(model, cfg.finetune.trainable)


def _start(cfg: Config):
    """Refuse settings that cannot run, seed, and start the process group (if launched)."""
    ft = cfg.finetune
    if ft.physical_batch_size > ft.batch_size:
        raise ConfigError(
            f"finetune.physical_batch_size={ft.physical_batch_size} exceeds "
            f"finetune.batch_size={ft.batch_size}; it only splits a logical batch for memory"
        )
    seed_everything(cfg.seed)
    procs, device = start_processes(resolve_device(cfg.device))
    if procs.distributed and (not ft.dp or ft.grad_sample_mode != "bookkeeping"):
        raise ConfigError(
            f"{procs.world} processes run DP fine-tuning with finetune.grad_sample_mode="
            f"bookkeeping only (this run has finetune.dp={ft.dp}, grad_sample_mode="
            f"{ft.grad_sample_mode}); launch it as one process"
        )
    return procs, device


def _plan(
    cfg: Config, run_dir: Path, ledger: Ledger, *, sample_rate: float, steps: int, resuming: bool
) -> tuple[list[accounting.Mechanism], accounting.Mechanism]:
    """The history this attempt composes with, and its mechanism with sigma calibrated on it."""
    key = ("finetune", "dp_sgd")
    # A resumed attempt continues the started mechanism; a fresh one composes with every
    # earlier attempt whose secret noise it cannot replay.
    prior = ledger.prior(key, resuming=resuming, noise_secret=not cfg.privacy.reproducible_noise)
    if is_done(run_dir, "query") and not any(m.stage == "query" for m in prior):
        # The query spent budget on the sensitive data; calibrating without it would
        # overspend. This happens when a run folder is copied or edited by hand.
        raise PrivacyBudgetError(
            f"{Path(run_dir) / 'query'} is finished but {Path(run_dir) / LEDGER} records "
            "no query spend; restore the run's privacy.json (or delete query/ and rerun it)"
        )
    try:
        sigma = accounting.calibrate_noise_multiplier(
            target_epsilon=cfg.privacy.target_epsilon,
            delta=cfg.privacy.delta,
            sample_rate=sample_rate,
            steps=steps,
            prior=prior,
            accountant=cfg.privacy.accountant,
        )
    except PrivacyBudgetError as exc:
        raise ledger.explain_over_budget(exc, stage=STAGE) from None
    abandoned = [m for m in prior if m.key == key]
    if abandoned:
        log.warning(
            "fine-tuning restarts from step 0 after %d attempt(s) without a checkpoint; their "
            "secret noise cannot be replayed, so each is charged in full and this attempt "
            "gets noise multiplier %.4g (the first had %.4g)",
            len(abandoned),
            sigma,
            abandoned[0].noise_multiplier,
        )
    mechanism = accounting.dpsgd_mechanism(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        max_grad_norm=cfg.finetune.max_grad_norm,
    )
    return prior, mechanism


def _begin(
    cfg: Config, ledger: Ledger, procs, mechanism: accounting.Mechanism, *, start: int, details
) -> bool:
    """Record the mechanism in the ledger before any sensitive gradient; True when a
    previous attempt already completed it. Every process learns whether process 0 refused."""
    already_completed = ledger.status(*mechanism.key) == "completed"
    # Every process has read the ledger before process 0 writes to it.
    procs.barrier()
    refused: Exception | None = None
    if procs.main:
        try:
            if already_completed and start < mechanism.steps:
                ledger.begin(mechanism)  # refuses: the mechanism would be spent twice
            if not already_completed:
                # Refuses before any sensitive gradient is computed if the budget would be
                # exceeded; on resume, also if the mechanism differs from the one started.
                ledger.begin(
                    mechanism,
                    noise_secret=not cfg.privacy.reproducible_noise,
                    resume_from_step=start,
                    details=details,
                )
        except PrivImageError as exc:
            refused = exc
    if not procs.agree(refused is None):
        raise refused or PrivImageError(
            "fine-tuning process 0 refused to start (its error says why)"
        )
    return already_completed


def _entropy(cfg: Config, procs: Processes) -> dict[str, int]:
    """Secret: fresh OS entropy per stream, kept only in the private checkpoint. The
    diffusion stream (timesteps, noise and label dropout of the loss) is secret too: it is
    consumed in batch order, so a known value of it would hand each example draws that
    depend on which other records the Poisson mask picked, and one record more or less
    would change every example's gradient, not just its own. With several processes each
    draws its own: rank r's shard has its own masks."""
    rank = f"/rank{procs.rank}" if procs.distributed else ""
    return {
        name: dp_entropy(
            purpose=f"{MECHANISM}/{name}{rank}",
            seed=cfg.seed,
            reproducible=cfg.privacy.reproducible_noise,
        )
        for name in STREAMS
    }


def _finish(
    cfg: Config,
    ledger: Ledger,
    mechanism: accounting.Mechanism,
    state: DPTraining,
    out: Path,
    procs,
    *,
    already_completed: bool,
) -> None:
    """Check Opacus ran the mechanism the ledger planned, record it, write the model."""
    # Opacus' accountant saw every step the optimizer really took (across restarts, via
    # the checkpoint); it must agree with what the ledger is about to record.
    taken = [(float(s), float(q), int(k)) for s, q, k in state.engine.accountant.history]
    if taken != [(mechanism.noise_multiplier, mechanism.sample_rate, mechanism.steps)]:
        raise RuntimeError(
            f"Opacus took steps {taken} but the ledger plans {mechanism.describe()}; refusing "
            "to record a mechanism other than the one that ran"
        )
    if not procs.main:
        procs.barrier()  # process 0 records the mechanism and writes the model
        return
    if not already_completed:
        ledger.complete(mechanism)
    if ledger.epsilon_spent > cfg.privacy.target_epsilon * (1 + 1e-9):
        raise PrivacyBudgetError(
            f"spent epsilon {ledger.epsilon_spent:.4f} exceeds the target "
            f"{cfg.privacy.target_epsilon}"
        )
    _save_model(cfg, state.ema.module, out)  # the ledger is final now: the card states it
    mark_done(out)
    # Only now is the checkpoint redundant (a crash before DONE finishes from it).
    (out / CHECKPOINT).unlink(missing_ok=True)
    procs.barrier()


def _save_model(cfg: Config, ema, out: Path) -> None:
    """The UNet, its pipeline (the run's sampler settings) and the pipeline's model card."""
    save_unet(ema, out / artifacts.UNET, diffusion=cfg.diffusion)
    names = artifacts.class_names(out.parent, needed_by=STAGE)
    save_pipeline(configured_pipeline(ema, cfg, names), out / artifacts.PIPELINE)
    write_model_card(out / artifacts.PIPELINE, cfg, out.parent)


def _tracker(cfg: Config, out: Path, *, first_step: int, noise_multiplier: float | None):
    """``finetune.tracker``, logging each step's loss and epsilon from ``first_step`` on."""
    ft = cfg.finetune
    settings = {
        "dp": ft.dp,
        "target_epsilon": cfg.privacy.target_epsilon if ft.dp else None,
        "noise_multiplier": noise_multiplier,
        "batch_size": ft.batch_size,
        "lr": ft.lr,
        "max_grad_norm": ft.max_grad_norm if ft.dp else None,
        "noise_multiplicity": ft.noise_multiplicity,
        "epochs": ft.epochs,
    }
    return open_tracker(
        ft.tracker,
        stage_dir=out,
        run_name=STAGE,
        config=settings,
        first_step=first_step,
        private=True,
    )


def _run_non_private(
    cfg: Config,
    train: data.ImageSplit,
    *,
    steps: int,
    pretrain_dir: Path,
    out: Path,
    device: torch.device,
) -> None:
    """The non-private upper bound: the DP run's steps and batch size, no clipping or noise.

    Batch ``t`` is ``batch_size`` images drawn without replacement from the public stream
    ``finetune/no_dp/batch`` at ``(seed, t)``, and its diffusion noise from
    ``finetune/no_dp/diffusion`` at ``(seed, t)`` (privimage.io.seeding), so a resume
    needs only the weights, the optimizer and the step (checkpointed atomically like the
    DP path) and reproduces an uninterrupted run.
    """
    ft = cfg.finetune
    model, trained_with = load_unet(pretrain_dir / artifacts.UNET)
    check_same_diffusion(trained_with, cfg.diffusion, pretrain_dir / artifacts.UNET)
    model.to(device).train()
    select_trainable(model, ft.trainable)
    ema = EMA(model, decay=ft.ema_decay)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=ft.lr)
    settings = {
        "steps": steps,
        "batch_size": ft.batch_size,
        "lr": ft.lr,
        "seed": cfg.seed,
        # A checkpoint of other trained parameters is not this run's.
        "trainable": ft.trainable,
    }
    ckpt_path = out / CHECKPOINT
    ckpt = Checkpoint.load(ckpt_path, device)
    start = 0
    if ckpt is not None:
        ckpt.check({"settings": settings}, ckpt_path)
        model.load_state_dict(ckpt.model)
        ema.resume(ckpt.ema, updates=ckpt.step)
        optimizer.load_state_dict(ckpt.optimizer)
        start = ckpt.step
    del ckpt
    images, labels = train.as_float(), train.labels
    tracker = _tracker(cfg, out, first_step=start + 1, noise_multiplier=None)
    stats = StatsWriter.resume(out / STATS, after_step=start, tracker=tracker)
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="finetune (no DP)"):
        loss = _non_private_step(cfg, model, optimizer, images, labels, step=step, device=device)
        ema.update_parameters(model)
        stats.write(step=step + 1, loss=loss, epsilon=None)
        if (step + 1) % ft.checkpoint_every_steps == 0 or step + 1 == steps:
            Checkpoint(
                step=step + 1,
                identity={"settings": settings},
                model=model.state_dict(),
                ema=ema.state_dict(),
                optimizer=optimizer.state_dict(),
            ).save(ckpt_path)
    stats.close()
    _save_model(cfg, ema.module, out)
    mark_done(out)
    ckpt_path.unlink(missing_ok=True)


def _non_private_step(cfg, model, optimizer, images, labels, *, step: int, device) -> float:
    """One step of the non-private path; returns the batch's mean loss."""
    ft = cfg.finetune
    rng = public_rng(cfg.seed, "finetune/no_dp/batch", step)
    idx = torch.from_numpy(rng.choice(len(images), ft.batch_size, replace=False))
    g = public_generator(cfg.seed, "finetune/no_dp/diffusion", step)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for part in idx.split(ft.physical_batch_size):
        y = drop_labels(
            labels[part], probability=ft.label_dropout, null_label=null_class(model), generator=g
        )
        per_example = training_loss(
            model,
            images[part].to(device),
            y.to(device),
            spec=cfg.diffusion,
            generator=g,
            noise_draws=ft.noise_multiplicity,
        )
        (per_example.sum() / len(idx)).backward()
        loss_sum += float(per_example.detach().sum())
    optimizer.step()
    return loss_sum / len(idx)


SPEC = Stage(name=STAGE, run=run, release=lambda cfg: RELEASE, check_done=check_done)
