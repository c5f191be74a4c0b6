"""The on-disk cache of preprocessed datasets.

A preprocessed dataset lives in ``<cache_dir>/datasets/<source>-<key>/`` as a
``datasets.DatasetDict.save_to_disk`` folder plus ``privimage.json`` (what it was built
from). The key hashes everything that changes the pixels, so a changed archive, size or
cap gets a new folder instead of stale data. Folders are written under a temporary name
and renamed into place, so an interrupted run never leaves a half-written cache that a
later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch

from privimage.data.containers import ImageDataset, ImageSplit
from privimage.data.preprocess import LABEL_COLUMN, PIXELS_COLUMN, hf_progress

log = logging.getLogger(__name__)

# Bump when the cached layout or the preprocessing changes: old folders are then ignored.
FORMAT_VERSION = 1
META_FILE = "privimage.json"
_TMP_PREFIX = ".tmp-"
# Temporary folders older than this are left over from killed runs and are removed.
_STALE_SECONDS = 24 * 3600


def cache_key(spec: dict) -> str:
    """A short stable hash of a JSON-able ``spec``."""
    blob = json.dumps({"format": FORMAT_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def datasets_root(cache_dir: str | os.PathLike) -> Path:
    """``<cache_dir>/datasets`` with ``~`` expanded."""
    return Path(os.path.expanduser(os.fspath(cache_dir))) / "datasets"


def entry_path(cache_dir: str | os.PathLike, source: str, key: str) -> Path:
    """Where the dataset of ``source`` with ``key`` is cached."""
    return datasets_root(cache_dir) / f"{source}-{key}"


def is_complete(path: Path) -> bool:
    """A finished cache entry (only complete entries ever get their final name)."""
    return (path / META_FILE).is_file()


def _remove_stale(root: Path) -> None:
    now = time.time()
    for tmp in root.glob(f"{_TMP_PREFIX}*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def save_atomic(dsd: datasets.DatasetDict, path: Path, meta: dict) -> None:
    """Save ``dsd`` and ``meta`` to ``path`` via a temporary folder and one rename.

    When another process finished the same entry first, its copy is kept.
    """
    root = path.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{path.name}-", dir=root))
    try:
        with hf_progress(False):
            dsd.save_to_disk(str(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        try:
            tmp.rename(path)
        except OSError:
            if not is_complete(path):
                raise
            log.info("cache entry %s was written by another process; using it", path)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pixels(table: pa.Table, shape: tuple[int, ...]) -> np.ndarray:
    """The Array3D column as one uint8 array, straight from Arrow (no per-row Python)."""
    column = table.column(PIXELS_COLUMN).combine_chunks()
    values = column.storage if isinstance(column, pa.ExtensionArray) else column
    for _ in range(len(shape)):
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(-1, *shape)


def read_entry(path: Path, source: str) -> ImageDataset:
    """Load a cache entry as tensors (memory-mapped Arrow read, then one copy)."""
    with hf_progress(False):
        dsd = datasets.load_from_disk(str(path))
    splits = {}
    class_names: list[str] = []
    for split in ("train", "test"):
        ds = dsd[split]
        class_names = list(ds.features[LABEL_COLUMN].names)
        shape = tuple(ds.features[PIXELS_COLUMN].shape)
        table = ds.with_format("arrow")[:]
        images = np.array(_pixels(table, shape), dtype=np.uint8, copy=True)
        labels = table.column(LABEL_COLUMN).to_numpy().astype(np.int64)
        splits[split] = ImageSplit(torch.from_numpy(images), torch.from_numpy(labels))
    return ImageDataset(splits["train"], splits["test"], class_names, source)
