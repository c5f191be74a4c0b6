"""The Hugging Face hub source (``data.source=hub``): a dataset name, loaded with
``datasets.load_dataset`` (needs network; offline runs use the other sources)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from privimage.config.schema import DataConfig
from privimage.data import archives
from privimage.data.preprocess import hf_progress
from privimage.data.sources import Catalog, Source, require_path
from privimage.errors import DataError


class Hub(Source):
    """A Hugging Face hub dataset: ``datasets.load_dataset(path)`` (needs network)."""

    name = "hub"

    def check(self, cfg: DataConfig) -> None:
        require_path(cfg, self.name, "uoft-cs/cifar10")

    def fingerprint(self, cfg: DataConfig) -> dict:
        self.check(cfg)
        spec: dict[str, Any] = {
            "name": cfg.path,
            "image_column": cfg.image_column,
            "label_column": cfg.label_column,
        }
        # load_dataset also takes local folders and files: notice when they change.
        local = Path(cfg.path).expanduser()
        if local.is_dir():
            spec["local"] = archives.tree_digest(local, archives.list_tree(local))
        elif local.is_file():
            spec["local"] = archives.file_digest(local)
        return spec

    def catalog(self, cfg: DataConfig, *, progress: bool) -> Catalog:
        self.check(cfg)
        import datasets

        try:
            with hf_progress(progress):
                loaded = datasets.load_dataset(cfg.path)
        except Exception as exc:  # noqa: BLE001 -- any failure means "cannot load it"
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise DataError(
                f"hub: cannot load {cfg.path!r} with datasets.load_dataset ({reason}); check "
                "the name and the network, or use source=folder/tar for local images"
            ) from exc
        if not isinstance(loaded, datasets.DatasetDict) or not loaded:
            raise DataError(f"hub: {cfg.path!r} has no splits")
        names = list(loaded)
        train_name = "train" if "train" in loaded else names[0]
        test_name = next((s for s in ("test", "validation") if s in loaded), None)
        used = {"train": loaded[train_name]}
        if test_name is not None:
            used["test"] = loaded[test_name]
        for ds in used.values():
            for col in (cfg.image_column, cfg.label_column):
                if col not in ds.column_names:
                    key = "image_column" if col == cfg.image_column else "label_column"
                    raise DataError(
                        f"hub: {cfg.path!r} has no column {col!r} (columns: "
                        f"{', '.join(ds.column_names)}); set data.{key}=<one of them>"
                    )
        class_names, labels = _hub_labels(used, cfg)
        if test_name is None:
            # No held-out split: the loader splits train by test_fraction.
            splits = {"all": (np.arange(len(used["train"])), labels["train"])}
        else:
            splits = {s: (np.arange(len(ds)), labels[s]) for s, ds in used.items()}
        # Without a held-out split both loader splits index into the one "train" split.
        pools = {"train": used["train"], "test": used.get("test", used["train"])}

        def fetch(refs: dict[str, Sequence[Any]]) -> dict[str, list[Any]]:
            out = {}
            for split, idx in refs.items():
                ds = (
                    pools[split]
                    .select(np.asarray(idx, dtype=np.int64))
                    .select_columns([cfg.image_column])
                )
                try:
                    ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
                except Exception as exc:  # noqa: BLE001 -- report the column, not the internals
                    raise DataError(
                        f"hub: column {cfg.image_column!r} of {cfg.path!r} does not hold images; "
                        "set data.image_column=<the image column>"
                    ) from exc
                out[split] = list(ds[:][cfg.image_column])
            return out

        return Catalog(class_names, splits, fetch)


def _hub_labels(used: dict, cfg: DataConfig) -> tuple[list[str], dict[str, np.ndarray]]:
    """Class names and int labels of hub splits, whatever the label column's type."""
    import datasets

    feature = used["train"].features[cfg.label_column]
    # Through Arrow, so reading the labels does not decode every image.
    raw = {
        split: ds.select_columns([cfg.label_column])
        .with_format("arrow")[:]
        .column(cfg.label_column)
        .to_pylist()
        for split, ds in used.items()
    }
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        labels = {s: np.asarray(v, dtype=np.int64) for s, v in raw.items()}
    else:
        values = sorted({v for vals in raw.values() for v in vals}, key=lambda v: (str(type(v)), v))
        if all(isinstance(v, int | np.integer) and v >= 0 for v in values):
            names = [str(i) for i in range(int(max(values, default=-1)) + 1)]
            labels = {s: np.asarray(v, dtype=np.int64) for s, v in raw.items()}
        else:
            names = [str(v) for v in values]
            index = {v: i for i, v in enumerate(values)}
            labels = {
                s: np.array([index[v] for v in vals], dtype=np.int64) for s, vals in raw.items()
            }
    return names, labels
