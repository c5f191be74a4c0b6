"""The one way privimage writes a file: a temporary file beside it, fsync, then rename.

``os.replace`` is atomic on one file system, so a reader (and a resumed run after a
crash, even ``kill -9`` or a power cut) sees the old file or the new one, never a torn
one; the fsync before the rename makes the new content durable before its name is. The
temporary name is unique (``mkstemp``), so two writers never share one, and it is
removed when the write fails. Every writer below goes through :func:`atomic_file`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

TEMP_SUFFIX = ".tmp"


def is_leftover(path: Path) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_file` whose write was killed
    before its rename (``kill -9``, a power cut: no ``except`` runs to remove it). Such a
    file is never an output; a resumed stage writes the real one again."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


@contextlib.contextmanager
def atomic_file(path: Path | str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path | str, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: Path | str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def drop_json_keys(path: Path | str, *keys: str) -> None:
    """Rewrite the JSON object in ``path`` without ``keys``, when it holds any of them."""
    obj = json.loads(Path(path).read_text())
    if any([obj.pop(key, None) is not None for key in keys]):
        write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npy(path: Path | str, array: np.ndarray) -> None:
    with atomic_file(path) as f:
        np.save(f, array)


def save_npz(path: Path | str, **arrays: np.ndarray) -> None:
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def torch_save(obj: Any, path: Path | str) -> None:
    import torch  # here, so that the module stays importable without torch's start-up

    with atomic_file(path) as f:
        torch.save(obj, f)
