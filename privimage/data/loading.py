"""``check_available`` and ``load``: from a :class:`DataConfig` to cached uint8 tensors."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import datasets
import numpy as np

from privimage.config.schema import DataConfig
from privimage.data import cache, splits
from privimage.data.containers import ImageDataset
from privimage.data.preprocess import hf_progress, preprocess, raw_dataset
from privimage.data.registry import get_source
from privimage.data.sources import Source
from privimage.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def _check_values(cfg: DataConfig) -> None:
    for key in ("max_train_images", "max_test_images"):
        value = getattr(cfg, key)
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ConfigError(f"{key}={value!r} must be a positive integer or null (no cap)")
    if cfg.channels not in (1, 3):
        raise ConfigError(f"channels={cfg.channels} must be 1 (grayscale) or 3 (RGB)")
    if cfg.resolution < 1:
        raise ConfigError(f"resolution={cfg.resolution} must be > 0")
    if not 0 < cfg.test_fraction < 1:
        raise ConfigError(f"test_fraction={cfg.test_fraction} must be in (0, 1)")


def check_available(cfg: DataConfig) -> None:
    """Check quickly (no decoding) that the source of ``cfg`` can be read.

    Raises:
        ConfigError: unknown source or invalid values (one line, lists the choices).
        DataError: a missing or unreadable path (one line naming the path and how to set
            it, e.g. ``data.path=/path/to/cifar10.tar.gz``).
    """
    _check_values(cfg)
    get_source(cfg.source).check(cfg)


def check_classes(ds: ImageDataset, cfg: DataConfig, *, key: str = "data") -> None:
    """Refuse a dataset with fewer than two classes as the sensitive data.

    Every stage works per class (the query's votes, the class-conditional UNet, the
    downstream classifiers), so a single class would run to the end and report numbers
    that mean nothing. Public data may have one class (``pretrain.public_subset=all``
    ignores its labels), which is why the loader itself allows it.

    Raises:
        DataError: (one line) naming the class found and how to give more.
    """
    if ds.num_classes >= 2:
        return
    found = f"one class ({ds.class_names[0]!r})" if ds.class_names else "no class"
    where = f"{key}.path={cfg.path}" if cfg.path else f"{key}.source={cfg.source}"
    if cfg.source in ("folder", "tar"):
        fix = f"put each class's images in its own sub-folder, {key}.path/<class>/<image>"
    elif cfg.source == "hub":
        fix = f"set {key}.label_column to the column that holds the classes"
    else:
        fix = f"choose another {key}.source"
    raise DataError(
        f"{where} holds {found}; the synthetic data is made per class and needs at least "
        f"2 classes: {fix}"
    )


def _spec(cfg: DataConfig, source: Source) -> dict:
    """Everything that changes the preprocessed result (the cache key's input)."""
    spec = {
        "source": cfg.source,
        "input": source.fingerprint(cfg),
        "resolution": cfg.resolution,
        "channels": cfg.channels,
        "split_seed": cfg.split_seed,
        "max_train_images": cfg.max_train_images,
        "max_test_images": cfg.max_test_images,
    }
    if not source.ships_split:
        spec["test_fraction"] = cfg.test_fraction
    return spec


def _build(cfg: DataConfig, source: Source, key: str, progress: bool) -> datasets.DatasetDict:
    """Decode and preprocess only the images the split and caps keep."""
    catalog = source.catalog(cfg, progress=progress)
    parts = dict(catalog.splits)
    if "all" in parts:
        refs, labels = parts.pop("all")
        train_idx, test_idx = splits.stratified_split(labels, cfg.test_fraction, cfg.split_seed)
        parts = {
            "train": ([refs[i] for i in train_idx], labels[train_idx]),
            "test": ([refs[i] for i in test_idx], labels[test_idx]),
        }
    chosen = {}
    for split, cap, stream in (
        ("train", cfg.max_train_images, splits.STREAM_TRAIN_CAP),
        ("test", cfg.max_test_images, splits.STREAM_TEST_CAP),
    ):
        refs, labels = parts[split]
        keep = splits.random_subset(len(labels), cap, cfg.split_seed, stream)
        chosen[split] = ([refs[i] for i in keep], np.asarray(labels)[keep])
    images = catalog.fetch({split: refs for split, (refs, _) in chosen.items()})
    with hf_progress(False):
        raw = datasets.DatasetDict(
            {
                split: raw_dataset(images[split], labels, catalog.class_names)
                for split, (_, labels) in chosen.items()
            }
        )
    return preprocess(
        raw,
        resolution=cfg.resolution,
        channels=cfg.channels,
        fingerprint=f"privimage-{cfg.source}-{key}",
        progress=progress,
        desc=cfg.source,
    )


def content_key(cfg: DataConfig) -> str:
    """The key of the preprocessed dataset ``cfg`` describes, input files included.

    Anything derived from a dataset (a query classifier, reference statistics) keys its
    own cache on this, so it is rebuilt whenever the images themselves would be.
    """
    _check_values(cfg)
    source = get_source(cfg.source)
    return cache.cache_key(_spec(cfg, source))


def load(cfg: DataConfig, *, cache_dir: str | os.PathLike, progress: bool = True) -> ImageDataset:
    """Load the dataset of ``cfg``: preprocessed, split, capped, and cached on disk.

    The first call decodes the needed images (resized to ``cfg.resolution`` with
    antialiased bicubic, converted to ``cfg.channels``) and saves them under
    ``<cache_dir>/datasets/<source>-<hash>/``; later calls with the same settings and
    unchanged input files only read that folder back.

    Args:
        cfg: what to load.
        cache_dir: cache root (``~`` allowed); datasets go under ``datasets/``.
        progress: show progress bars while reading and decoding.

    Raises:
        ConfigError: unknown source or invalid values.
        DataError: missing, empty or unreadable input (one line).
    """
    _check_values(cfg)
    source = get_source(cfg.source)
    spec = _spec(cfg, source)
    key = cache.cache_key(spec)
    path = cache.entry_path(cache_dir, cfg.source, key)
    if not cache.is_complete(path):
        start = time.perf_counter()
        dsd = _build(cfg, source, key, progress)
        meta = {
            "spec": spec,
            "class_names": dsd["train"].features["label"].names,
            "num_images": {split: len(ds) for split, ds in dsd.items()},
            "build_seconds": round(time.perf_counter() - start, 2),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        cache.save_atomic(dsd, path, meta)
        log.info(
            "data: %s preprocessed in %.1f s, cached in %s", cfg.source, meta["build_seconds"], path
        )
    else:
        log.info("data: %s read from cache %s", cfg.source, path)
    return cache.read_entry(Path(path), cfg.source)
