"""Stage 3: DP-SGD fine-tuning of the pretrained UNet on the sensitive training split.

Stock Opacus: Poisson sampling, per-example clipping to ``max_grad_norm``, Gaussian
noise. The noise multiplier is calibrated on the run's composed history (the query's
Gaussian histogram plus every DP-SGD step) so that together they meet the target
(epsilon, delta) under one accountant; the privacy ledger records the mechanism before
the first step touches data and again when training ends.

Writes ``finetune/``: ``unet/`` (EMA weights, ``save_pretrained``), ``stats.jsonl``.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import UNet2DModel
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from privimage import data, privacy
from privimage.config import Config
from privimage.diffusion import linear_alphas_cumprod, per_example_loss, unet_denoiser
from privimage.errors import ConfigError, PrivacyBudgetError, PrivImageError
from privimage.models import ema_update, make_opacus_safe
from privimage.runtime import (
    LEDGER_FILE,
    StatsWriter,
    cache_root,
    mark_done,
    require_upstream,
    resolve_device,
    seed_everything,
    stage_dir,
)

log = logging.getLogger(__name__)

STAGE = "finetune"


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


def run(cfg: Config, run_dir: Path) -> Path:
    """Fine-tune with DP-SGD; see the module docstring for outputs."""
    pretrain_dir = require_upstream(run_dir, "pretrain", STAGE)
    out = stage_dir(run_dir, STAGE)
    out.mkdir(parents=True, exist_ok=True)
    ft = cfg.finetune
    if ft.physical_batch_size > ft.batch_size:
        raise ConfigError(
            f"finetune.physical_batch_size={ft.physical_batch_size} exceeds "
            f"finetune.batch_size={ft.batch_size}; it only splits a logical batch for memory"
        )
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)

    sensitive = data.load(cfg.data, cache_dir=cache_root(cfg.cache_dir))
    n = len(sensitive.train)
    privacy.check_delta(delta=cfg.privacy.delta, num_records=n)
    sample_rate, steps = dp_sgd_schedule(num_records=n, batch_size=ft.batch_size, epochs=ft.epochs)

    ledger = privacy.Ledger(
        Path(run_dir) / LEDGER_FILE,
        target_epsilon=cfg.privacy.target_epsilon,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
    )
    prior = [m for m in ledger.history if m.stage != STAGE]
    sigma = privacy.calibrate_noise_multiplier(
        target_epsilon=cfg.privacy.target_epsilon,
        delta=cfg.privacy.delta,
        sample_rate=sample_rate,
        steps=steps,
        prior=prior,
        accountant=cfg.privacy.accountant,
    )
    mechanism = privacy.dpsgd_mechanism(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        max_grad_norm=ft.max_grad_norm,
    )
    # Refuses before any sensitive gradient is computed if the budget would be exceeded.
    ledger.begin(mechanism)
    log.info(
        "DP-SGD: N=%d, q=%.5f, %d steps, noise multiplier %.4f for epsilon %.3g at delta %.1e",
        n,
        sample_rate,
        steps,
        sigma,
        cfg.privacy.target_epsilon,
        cfg.privacy.delta,
    )

    model = UNet2DModel.from_pretrained(pretrain_dir / "unet").train()
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivImageError(f"the UNet has layers DP-SGD cannot train: {errors[0]}")
    make_opacus_safe(model)
    model.to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False)

    loader = DataLoader(
        TensorDataset(sensitive.train.as_float(), sensitive.train.labels),
        batch_size=ft.batch_size,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=ft.lr)
    engine = PrivacyEngine(accountant="rdp")
    dp_model, optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=ft.max_grad_norm,
        poisson_sampling=True,
        noise_generator=torch.Generator(device=device).manual_seed(cfg.seed + 1),
    )
    if abs(dp_loader.sample_rate - sample_rate) > 1e-12:
        raise RuntimeError(
            f"Opacus samples at rate {dp_loader.sample_rate}, accounted {sample_rate}"
        )
    alphas = linear_alphas_cumprod(cfg.pretrain.num_train_timesteps)
    denoiser = unet_denoiser(dp_model)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    stats = StatsWriter(out / "stats.jsonl")

    bar = tqdm(total=steps, desc="finetune (DP-SGD)")
    done_steps = 0
    eps_every = max(1, steps // 50)
    eps_so_far = privacy.epsilon_spent(
        prior, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant
    )
    physical_losses: list[float] = []
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
        while done_steps < steps:
            for x, y in memory_safe_loader:
                x, y = x.to(device), y.to(device)
                per_example = per_example_loss(denoiser, x, y, alphas_cumprod=alphas, generator=gen)
                # An empty Poisson batch is a valid, noise-only step; its mean would be NaN.
                loss = per_example.mean() if len(per_example) else per_example.sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if len(per_example):
                    physical_losses.append(float(loss.item()))
                if optimizer._is_last_step_skipped:
                    continue
                # A logical step (one Poisson batch, noised once) has completed.
                ema_update(ema, dp_model._module, decay=ft.ema_decay, step=done_steps)
                done_steps += 1
                mean_loss = sum(physical_losses) / len(physical_losses) if physical_losses else None
                physical_losses.clear()
                if done_steps % eps_every == 0 or done_steps == steps:
                    # Accounting every step would dominate small runs under PRV.
                    eps_so_far = privacy.epsilon_spent(
                        [*prior, replace(mechanism, steps=done_steps)],
                        delta=cfg.privacy.delta,
                        accountant=cfg.privacy.accountant,
                    )
                bar.update(1)
                bar.set_postfix(loss=mean_loss, eps=f"{eps_so_far:.2f}")
                stats.write(step=done_steps, loss=mean_loss, epsilon=eps_so_far)
                if done_steps >= steps:
                    break
    bar.close()
    stats.close()
    ledger.complete(replace(mechanism, steps=done_steps))
    if ledger.epsilon_spent > cfg.privacy.target_epsilon * (1 + 1e-9):
        raise PrivacyBudgetError(
            f"spent epsilon {ledger.epsilon_spent:.4f} exceeds the target "
            f"{cfg.privacy.target_epsilon}"
        )
    ema.save_pretrained(out / "unet")
    mark_done(out)
    return out
