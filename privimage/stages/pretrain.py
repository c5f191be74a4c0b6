"""Stage 2: non-private pretraining of the diffusion UNet on the selected public images.

The public images chosen by the query are relabelled to their sensitive classes, so the
class-conditional UNet learns "what class c looks like" from public data before it ever
sees sensitive data. Public data costs no privacy, so this is a plain Accelerate loop
(one or many processes, mixed precision where the hardware has it).

Writes ``pretrain/``: ``unet/`` (EMA weights, ``save_pretrained``), ``stats.jsonl``.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from privimage import data
from privimage.config import Config
from privimage.diffusion import linear_alphas_cumprod, per_example_loss, unet_denoiser
from privimage.errors import PrivImageError
from privimage.models import build_unet, count_parameters, ema_update
from privimage.runtime import (
    StatsWriter,
    cache_root,
    mark_done,
    read_json,
    require_upstream,
    seed_everything,
    stage_dir,
)

log = logging.getLogger(__name__)

STAGE = "pretrain"


def run(cfg: Config, run_dir: Path) -> Path:
    """Pretrain on the query's public subset; see the module docstring for outputs."""
    query_dir = require_upstream(run_dir, "query", STAGE)
    out = stage_dir(run_dir, STAGE)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    public = data.load(cfg.public, cache_dir=cache_root(cfg.cache_dir))
    index = np.load(query_dir / "public_index.npy")
    labels = torch.from_numpy(np.load(query_dir / "public_labels.npy"))
    if len(index) == 0:
        raise PrivImageError(f"the query selected no public images ({query_dir}/selection.json)")
    if cfg.pretrain.max_images is not None and len(index) > cfg.pretrain.max_images:
        keep = np.random.default_rng(cfg.seed).permutation(len(index))[: cfg.pretrain.max_images]
        index, labels = index[keep], labels[keep]
    # Index before converting: the selection is a small part of a large public set.
    images = data.ImageSplit(public.train.images[torch.from_numpy(index)], labels).as_float()
    # The class count comes from the query's released output: pretraining never opens
    # the sensitive data.
    num_classes = len(read_json(query_dir / "selection.json")["classes"])

    accelerator = Accelerator(
        mixed_precision=cfg.pretrain.mixed_precision,
        cpu=cfg.device == "cpu",
    )
    model = build_unet(
        cfg.model,
        resolution=cfg.data.resolution,
        channels=cfg.data.channels,
        num_classes=num_classes,
    )
    ema = copy.deepcopy(model).requires_grad_(False)
    log.info("pretraining a %.2fM-parameter UNet", count_parameters(model) / 1e6)
    loader = DataLoader(
        TensorDataset(images, labels),
        batch_size=cfg.pretrain.batch_size,
        shuffle=True,
        drop_last=len(images) > cfg.pretrain.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain.lr, weight_decay=0.0)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = ema.to(accelerator.device)
    alphas = linear_alphas_cumprod(cfg.pretrain.num_train_timesteps)
    denoiser = unet_denoiser(model)
    gen = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)

    stats = StatsWriter(out / "stats.jsonl") if accelerator.is_main_process else None
    total_steps = cfg.pretrain.epochs * len(loader)
    bar = tqdm(total=total_steps, desc="pretrain (public)", disable=not accelerator.is_main_process)
    step = 0
    for epoch in range(cfg.pretrain.epochs):
        model.train()
        for x, y in loader:
            with accelerator.autocast():
                loss = per_example_loss(denoiser, x, y, alphas_cumprod=alphas, generator=gen).mean()
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            ema_update(
                ema, accelerator.unwrap_model(model), decay=cfg.pretrain.ema_decay, step=step
            )
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch)
            if stats is not None and (step % 10 == 0 or step == total_steps):
                stats.write(step=step, epoch=epoch, loss=float(loss.item()))
            if not math.isfinite(loss.item()):
                raise PrivImageError(
                    f"pretraining diverged (loss={loss.item()}) at step {step}; "
                    f"lower pretrain.lr={cfg.pretrain.lr}"
                )
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ema.save_pretrained(out / "unet")
        stats.close()
        mark_done(out)
    accelerator.wait_for_everyone()
    return out
