"""From a source's images to fixed-size uint8 arrays, through Hugging Face ``datasets``.

A source's images become a ``datasets.DatasetDict`` with an ``image`` column
(``datasets.Image``) and a ``label`` column (``datasets.ClassLabel`` holding the class
names). :func:`preprocess` maps it to a ``pixels`` column of ``Array3D`` uint8
``(C, R, R)``: centre-cropped to a square, resized with Pillow's antialiased bicubic
filter, converted to L or RGB. That is the form cached on disk.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import datasets
import numpy as np
from PIL import Image, UnidentifiedImageError

from privimage.errors import DataError

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
PIXELS_COLUMN = "pixels"


@contextmanager
def hf_progress(enabled: bool):
    """Turn the ``datasets`` progress bars on or off for a block, then restore them."""
    was_enabled = datasets.is_progress_bar_enabled()
    if enabled:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
        else:
            datasets.disable_progress_bars()


def raw_dataset(images: Sequence[Any], labels: np.ndarray, class_names: list[str]):
    """A ``datasets.Dataset`` with the ``image`` and ``label`` columns.

    Args:
        images: values ``datasets.Image`` encodes: ``{"bytes", "path"}`` dicts of encoded
            files, uint8 arrays or PIL images.
        labels: int labels, indices into ``class_names``.
        class_names: human-readable, unique.
    """
    features = datasets.Features(
        {IMAGE_COLUMN: datasets.Image(), LABEL_COLUMN: datasets.ClassLabel(names=class_names)}
    )
    return datasets.Dataset.from_dict(
        {IMAGE_COLUMN: list(images), LABEL_COLUMN: [int(v) for v in labels]}, features=features
    )


def _decode(value: dict) -> Image.Image:
    """Open an encoded image from ``{"bytes", "path"}``; one-line DataError if it fails."""
    data, path = value.get("bytes"), value.get("path")
    try:
        with warnings.catch_warnings():
            # Palette-transparency notes are handled by the conversion below.
            warnings.simplefilter("ignore", UserWarning)
            img = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
            img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # Pillow's "cannot identify" text names an in-memory buffer, not the file.
        if isinstance(exc, UnidentifiedImageError):
            reason = "not an image file Pillow can read"
        else:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"cannot decode image {path or '<bytes>'} ({reason}); replace it with a readable "
            "image or delete it"
        ) from exc
    return img


def to_array(img: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """``img`` as uint8 ``(channels, resolution, resolution)``.

    Non-square images are centre-cropped to a square first so nothing is stretched; the
    resize is Pillow's bicubic filter, which antialiases when it shrinks.
    """
    mode = "L" if channels == 1 else "RGB"
    if img.mode not in ("L", "RGB"):
        # Palette, alpha, CMYK, 16-bit...: go through RGB(A) so every mode converts cleanly.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB").convert("RGB")
    if mode == "L" and img.mode != "L":
        # Convert before resizing: one channel is cheaper to resize than three.
        img = img.convert("L")
    w, h = img.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    if img.mode != mode:
        img = img.convert(mode)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _preprocess_batch(batch: dict, *, resolution: int, channels: int) -> dict:
    images = batch[IMAGE_COLUMN]
    out = np.empty((len(images), channels, resolution, resolution), dtype=np.uint8)
    for i, value in enumerate(images):
        out[i] = to_array(_decode(value), resolution, channels)
    return {PIXELS_COLUMN: out}


def preprocess(
    raw: datasets.DatasetDict,
    *,
    resolution: int,
    channels: int,
    fingerprint: str,
    progress: bool,
    desc: str,
) -> datasets.DatasetDict:
    """Map every split's images to the ``pixels`` column (and drop the ``image`` column).

    Args:
        raw: splits with ``image`` and ``label`` columns (see :func:`raw_dataset`).
        fingerprint: a unique string for this content; ``datasets`` would otherwise hash
            the mapped function and its inputs, which is slow and adds nothing here.
    """
    out = {}
    for split, ds in raw.items():
        features = datasets.Features(
            {
                LABEL_COLUMN: ds.features[LABEL_COLUMN],
                PIXELS_COLUMN: datasets.Array3D((channels, resolution, resolution), "uint8"),
            }
        )
        # Decode ourselves (decode=False) so a broken file is reported by name.
        ds = ds.cast_column(IMAGE_COLUMN, datasets.Image(decode=False))
        with hf_progress(progress and len(ds) > 0):
            out[split] = ds.map(
                _preprocess_batch,
                batched=True,
                batch_size=256,
                remove_columns=[IMAGE_COLUMN],
                features=features,
                fn_kwargs={"resolution": resolution, "channels": channels},
                new_fingerprint=f"{fingerprint}-{split}",
                desc=f"{desc}: decoding {split}",
            )
    return datasets.DatasetDict(out)
