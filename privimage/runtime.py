"""Small pieces every stage shares: stage folders, DONE markers, atomic writes, devices.

The stage contract: a stage writes only ``run_dir/<stage>/``, writes ``DONE`` last, and
is skipped when ``DONE`` exists. Files are written atomically (temp file + rename) so a
crash never leaves a file that looks complete but is not.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from privimage import privacy
from privimage.errors import PrivImageError

if TYPE_CHECKING:
    from privimage.config import Config

DONE = "DONE"
LEDGER_FILE = "privacy.json"
# The audit stage's folder and result, here so that privimage.results can read them
# without importing the audit stage (and with it the whole DP stack).
AUDIT_STAGE = "audit"
AUDIT_RESULT_FILE = "audit.json"


def stage_dir(run_dir: Path, stage: str) -> Path:
    """The folder a stage owns inside the run directory."""
    return Path(run_dir) / stage


def is_done(run_dir: Path, stage: str) -> bool:
    return (stage_dir(run_dir, stage) / DONE).exists()


def read_done_json(run_dir: Path, stage: str, name: str) -> dict | None:
    """``<stage>/<name>`` of a finished stage (its DONE written), else None."""
    path = stage_dir(run_dir, stage) / name
    if not is_done(run_dir, stage) or not path.exists():
        return None
    return json.loads(path.read_text())


def mark_done(out_dir: Path) -> None:
    """Write the DONE marker; call it last, after every output is in place."""
    atomic_write_text(out_dir / DONE, time.strftime("%Y-%m-%dT%H:%M:%S\n"))


def require_upstream(run_dir: Path, stage: str, needed_by: str) -> Path:
    """Return the finished folder of an upstream stage or explain how to produce it."""
    folder = stage_dir(run_dir, stage)
    if not (folder / DONE).exists():
        raise PrivImageError(
            f"stage {needed_by!r} needs the finished {stage!r} stage in {folder}; "
            f"run it first (stages=[{stage},{needed_by}])"
        )
    return folder


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_npy(path: Path, array: np.ndarray) -> None:
    """Atomic ``np.save``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, then rename over ``path``.

    A crash (even ``kill -9``) mid-write leaves the previous file intact, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def truncate_jsonl(path: Path, *, max_step: int) -> None:
    """Keep only the lines of a ``stats.jsonl`` whose ``step`` is at most ``max_step``.

    A resumed stage replays the steps after its checkpoint; their lines from the crashed
    attempt are dropped first so every step is logged exactly once.
    """
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by the crash
        if record.get("step", 0) <= max_step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class StatsWriter:
    """Append one JSON object per line to ``stats.jsonl`` (flushed, so a crash loses little)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")  # noqa: SIM115 (closed by close())

    def write(self, **stats: Any) -> None:
        self._f.write(json.dumps(stats) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


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
        Path(run_dir) / LEDGER_FILE,
        target_epsilon=cfg.privacy.target_epsilon,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
    )
