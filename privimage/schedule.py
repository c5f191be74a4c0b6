"""Pure schedules of a training run, functions of the step alone so that a resumed run
continues exactly where it stopped: the learning rate, each epoch's image order, and the
micro-batch every process takes.
"""

from __future__ import annotations

import math

import numpy as np

# Learning-rate decays after the warm-up (pretrain.lr_decay).
LR_DECAYS = ("none", "linear", "cosine")


def scheduled_lr(
    lr: float, *, step: int, warmup_steps: int, total_steps: int = 0, decay: str = "none"
) -> float:
    """The learning rate of optimizer step ``step`` (from 0 to ``total_steps - 1``).

    Linear warm-up over ``warmup_steps``, then ``lr`` (``decay="none"``), or a decay
    towards zero at ``total_steps``: ``linear`` or ``cosine``. A decay to zero lets a
    short run settle into the minimum it has found instead of ending mid-stride.
    """
    factor = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    if decay != "none" and step >= warmup_steps:
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        factor *= 1.0 - t if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return lr * factor


def epoch_order(*, seed: int, epoch: int, num_images: int) -> np.ndarray:
    """The shuffled image order of one epoch: a function of ``(seed, epoch)`` alone."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def micro_batch(
    order: np.ndarray,
    *,
    step_in_epoch: int,
    batch_size: int,
    process: int,
    num_processes: int,
    micro: int,
    accumulation: int,
) -> np.ndarray:
    """Indices of one process's micro-batch: the global batch cut into equal disjoint parts.

    Global batch ``b`` of the epoch is ``order[b*B:(b+1)*B]``; it splits into
    ``num_processes * accumulation`` parts, part ``micro * num_processes + process``
    going to that process at that accumulation step.
    """
    per = batch_size // (num_processes * accumulation)
    start = step_in_epoch * batch_size + (micro * num_processes + process) * per
    return order[start : start + per]
