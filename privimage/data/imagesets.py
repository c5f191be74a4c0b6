"""Read a set of images to evaluate: a privimage ``samples.npz``, any ``.npz``, or a folder.

Accepted layouts:

- ``.npz`` with ``images`` (uint8, ``(N, C, H, W)`` or ``(N, H, W, C)`` or ``(N, H, W)``) and
  optionally ``labels`` (int, indices into the sensitive dataset's classes);
- a folder of ``<class>/<image>`` where ``<class>`` is a class name of the sensitive
  dataset (spelt as the sample stage writes folder names) or its index; or a flat folder
  of images, which is unlabelled.

Images are brought to the sensitive dataset's resolution and channels the way the data
loader brings every dataset there (centre crop, bicubic resize), so pixel-space
comparisons with the training set are well defined.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from privimage.data.archives import is_image_name
from privimage.data.containers import ImageSplit
from privimage.data.preprocess import to_array
from privimage.errors import DataError
from privimage.io.names import safe_name

#: Label of an image whose class is unknown (a flat folder, an .npz without labels).
UNLABELLED = -1


def _resize_all(images: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    if images.shape[1:] == (channels, resolution, resolution):
        return images
    out = np.empty((len(images), channels, resolution, resolution), dtype=np.uint8)
    for i, img in enumerate(images):
        hwc = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
        out[i] = to_array(Image.fromarray(hwc), resolution, channels)
    return out


def _from_npz(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f:
                raise DataError(f"{path} has no 'images' array (it has {sorted(f.files)})")
            images = np.asarray(f["images"])
            labels = np.asarray(f["labels"]) if "labels" in f else None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as .npz: {e}") from None
    if images.dtype != np.uint8:
        if images.dtype.kind == "f" and not np.isfinite(images).all():
            # Say what is wrong with the values: a NaN from a diverged model is the
            # likely cause, and converting the dtype would only hide it.
            what = "NaN" if np.isnan(images).any() else "infinite"
            raise DataError(
                f"{path}: images hold {int((~np.isfinite(images)).sum())} {what} value(s); "
                "save finite uint8 images in [0, 255]"
            )
        raise DataError(
            f"{path}: images must be uint8 in [0, 255], got {images.dtype}; convert them, "
            "e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise DataError(f"{path}: images must be (N, C, H, W) or (N, H, W, C), got {images.shape}")
    if images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
        images = np.transpose(images, (0, 3, 1, 2))
    fix = f"use class indices 0..{num_classes - 1} (-1: unlabelled)"
    if labels is None:
        labels = np.full(len(images), UNLABELLED, dtype=np.int64)
    elif labels.dtype.kind == "f":
        # A cast would turn NaN into a huge negative label and 1.5 into 1.
        if not np.isfinite(labels).all():
            raise DataError(f"{path}: labels hold NaN or infinite values; {fix}")
        if (labels != np.round(labels)).any():
            odd = labels[labels != np.round(labels)][0]
            raise DataError(f"{path}: label {odd:g} is not a whole number; {fix}")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{path}: labels must be integers, got {labels.dtype}; {fix}")
    labels = labels.astype(np.int64).reshape(-1)
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    bad = labels[(labels != UNLABELLED) & ((labels < 0) | (labels >= num_classes))]
    if len(bad):
        raise DataError(
            f"{path}: label {int(bad[0])} is outside the sensitive dataset's {num_classes} "
            f"classes; {fix}"
        )
    return images, labels


def _from_folder(
    root: Path, class_names: list[str], resolution: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_name(p.name))
    if not files:
        raise DataError(f"no images (png, jpg, ...) under {root}")
    # Class names win over indices: a dataset whose classes are "1", "10", "2" names its
    # folders by class name, and "10" must not be read as index 10.
    lookup = {str(i): i for i in range(len(class_names))}
    lookup.update({safe_name(n): i for i, n in enumerate(class_names)})
    lookup.update({n: i for i, n in enumerate(class_names)})
    images = np.empty((len(files), channels, resolution, resolution), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    for i, f in enumerate(files):
        rel = f.relative_to(root).parts
        if len(rel) == 1:
            labels[i] = UNLABELLED
        elif rel[0] in lookup:
            labels[i] = lookup[rel[0]]
        else:
            raise DataError(
                f"{root}/{rel[0]} names no class of the sensitive dataset "
                f"(classes: {', '.join(class_names[:12])}{'...' if len(class_names) > 12 else ''})"
                "; use class names or indices as folder names"
            )
        try:
            with Image.open(f) as img:
                images[i] = to_array(img, resolution, channels)
        except OSError as e:
            raise DataError(f"cannot read image {f}: {e}") from None
    return images, labels


def load_image_set(
    path: str | Path, *, class_names: list[str], resolution: int, channels: int
) -> ImageSplit:
    """Images to evaluate as an :class:`ImageSplit` (label :data:`UNLABELLED` if unknown).

    Raises:
        DataError: Missing path, unreadable file, or a class the sensitive data lacks.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"evaluate.synthetic={path}: no such file or folder")
    if p.is_dir():
        images, labels = _from_folder(p, class_names, resolution, channels)
    elif p.suffix == ".npz":
        images, labels = _from_npz(p, len(class_names))
        images = _resize_all(images, resolution, channels)
    else:
        raise DataError(f"evaluate.synthetic={path}: give a folder of images or an .npz file")
    return ImageSplit(torch.from_numpy(images), torch.from_numpy(labels))
