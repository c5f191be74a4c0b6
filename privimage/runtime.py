"""Small pieces every stage shares at run time: devices, seeds, the cache folder, the
run's ledger, and the ``stats.jsonl`` writer. The stage contract and its files live in
:mod:`privimage.io.artifacts`; writes go through :mod:`privimage.io.atomic`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from privimage import privacy
from privimage.io.artifacts import LEDGER

if TYPE_CHECKING:
    from privimage.config.schema import Config


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


def run_ledger(cfg: Config, run_dir: Path) -> privacy.Ledger:
    """The run's one privacy ledger (``privacy.json``) under the run's budget and accountant."""
    return privacy.Ledger(
        Path(run_dir) / LEDGER,
        target_epsilon=cfg.privacy.target_epsilon,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
    )
