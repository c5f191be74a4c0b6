"""Small pieces every stage shares at run time: the device, global seeds, the cache folder.

The stage contract and its files live in :mod:`privimage.io.artifacts`, writes go through
:mod:`privimage.io.atomic`, and the run's ledger is :func:`privimage.dp.ledger.run_ledger`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cache_root(cache_dir: str) -> Path:
    return Path(os.path.expanduser(cache_dir))
