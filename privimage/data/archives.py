"""Finding archives and image trees, and reading tar archives in place.

Tar archives are read as streams (``r|*``): a ``.tar.gz`` cannot be seeked cheaply, so
every read is one sequential pass, and a pass reads the bytes of only the members it is
asked for. A capped load therefore costs two passes (list the names, then read the
chosen members) instead of decoding the whole archive.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from privimage.errors import DataError

ENV_DATA_DIR = "PRIVIMAGE_DATA_DIR"
# Repository root when running from a checkout: privimage/data/archives.py -> parents[2].
_REPO_ROOT = Path(__file__).resolve().parents[2]

Image.init()
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())
TRAIN_DIRS = ("train",)
# Folders accepted as the held-out split.
TEST_DIRS = ("test", "val", "valid", "validation")


def path_hint(example: str) -> str:
    """The override that points a dataset at ``example`` (for either config group)."""
    return f"set data.path={example} (public.path=... for the public dataset)"


def default_data_dirs() -> list[tuple[str, Path | None]]:
    """Where archives are looked for when ``path`` is unset, as (description, folder)."""
    env = os.environ.get(ENV_DATA_DIR)
    return [
        (f"${ENV_DATA_DIR}", Path(env).expanduser() if env else None),
        ("./../shared/data", Path.cwd().parent / "shared" / "data"),
        ("<repo>/../shared/data", _REPO_ROOT.parent / "shared" / "data"),
    ]


def find_archive(path: str | None, filename: str, source: str) -> Path:
    """Resolve the archive ``filename`` of ``source`` from ``path`` or the default folders.

    ``path`` may be the archive itself or a folder that holds it.

    Raises:
        DataError: (one line) when no readable archive is found; names where it looked.
    """
    if path is not None:
        p = Path(path).expanduser()
        candidate = p / filename if p.is_dir() else p
        if candidate.is_file():
            return _readable(candidate, source)
        raise DataError(
            f"{source}: {candidate} does not exist; point data.path at {filename} or its "
            f"folder, e.g. data.path=/path/to/{filename} (public.path for the public dataset)"
        )
    looked = []
    for desc, folder in default_data_dirs():
        if folder is None:
            looked.append(f"{desc} (unset)")
            continue
        looked.append(f"{desc} ({folder})")
        if (folder / filename).is_file():
            return _readable((folder / filename).resolve(), source)
    raise DataError(
        f"{source}: {filename} not found in {', '.join(looked)}; "
        f"{path_hint(f'/path/to/{filename}')} or set ${ENV_DATA_DIR}"
    )


def _readable(path: Path, source: str) -> Path:
    if not os.access(path, os.R_OK):
        raise DataError(f"{source}: {path} is not readable (check its permissions)")
    return path


def check_tar(path: Path, source: str) -> None:
    """Fail fast (reads the first header only) when ``path`` is not a tar archive."""
    try:
        ok = tarfile.is_tarfile(path)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{source}: cannot read {path}: {exc}") from exc
    if not ok:
        raise DataError(
            f"{source}: {path} is not a .tar/.tar.gz/.tgz archive; "
            f"{path_hint('/path/to/images.tar.gz')}"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@functools.cache
def _memo_sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    # Hashing Tiny-ImageNet's 150 MB takes about 0.3 s; once per process is enough.
    return _sha256(Path(path))


def file_digest(path: Path) -> dict:
    """What identifies a file's content: its size and SHA-256.

    Not its path or mtime: a data folder re-mounted, copied or touched holds the same
    images, and every cache keyed on it (preprocessed data, query classifiers, shared
    stages) must survive that.
    """
    st = path.stat()
    digest = _memo_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    return {"size": st.st_size, "sha256": digest}


class _ProgressReader:
    """A file wrapper that advances a tqdm bar by the compressed bytes read."""

    def __init__(self, raw, bar: tqdm) -> None:
        self._raw = raw
        self._bar = bar

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        self._bar.update(len(chunk))
        return chunk


@dataclass
class TarScan:
    """One pass over a tar archive: every regular member's name, the bytes of some."""

    names: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    # Folder members: an empty class folder has no file to show it exists.
    dirs: list[str] = field(default_factory=list)


def scan_tar(
    path: Path,
    want: Callable[[str], bool],
    *,
    source: str,
    progress: bool,
    desc: str,
) -> TarScan:
    """List the regular files of the archive and read those for which ``want(name)``.

    Raises:
        DataError: (one line) when the archive is truncated or not a tar archive.
    """
    scan = TarScan()
    size = path.stat().st_size
    try:
        with (
            open(path, "rb") as raw,
            tqdm(
                total=size, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False
            ) as bar,
            tarfile.open(fileobj=_ProgressReader(raw, bar), mode="r|*") as tar,
        ):
            for member in tar:
                if member.isdir():
                    scan.dirs.append(member.name.rstrip("/"))
                if not member.isfile():
                    continue
                scan.names.append(member.name)
                if want(member.name):
                    handle = tar.extractfile(member)
                    if handle is not None:
                        scan.files[member.name] = handle.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{source}: cannot read {path}: {exc or type(exc).__name__}") from exc
    return scan


def is_image_name(name: str) -> bool:
    """An image file by extension, ignoring hidden files and macOS resource forks."""
    p = PurePosixPath(name)
    if any(part.startswith(".") or part == "__MACOSX" for part in p.parts):
        return False
    return p.suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class TreeLayout:
    """Images found in a ``<class>/<image>`` or ``train|test/<class>/<image>`` tree."""

    class_names: list[str]
    # "train"/"test" when the tree has both, else "all" (to be split deterministically).
    splits: dict[str, tuple[list[str], np.ndarray]]


def tree_layout(
    names: Iterable[str], where: str, source: str, dirs: Iterable[str] | None = None
) -> TreeLayout:
    """Find the class folders (and split folders) among relative POSIX file names.

    Wrapper folders common to every image (``cifar10/`` in ``cifar10.tar.gz``) are
    skipped. A name's class is its parent folder; with ``train/`` and ``test/`` (or
    ``val/``) folders at the top, those give the split. Other files are ignored.

    Args:
        names: the tree's files.
        where: the folder or archive, for messages.
        source: the source's name, for messages.
        dirs: the tree's folders, when known; a class folder among them without images
            is then an error rather than a class silently missing.

    Raises:
        DataError: (one line) when no image sits in a recognised layout, a class folder
            holds no images, or a class has test images but no training images.
    """
    # Sorted, so the result does not depend on the order of an archive's members.
    images = sorted(n for n in names if is_image_name(n))
    parts = [PurePosixPath(n).parts for n in images]
    split_names = {*TRAIN_DIRS, *TEST_DIRS}
    # Drop wrapper folders while every image is at least three levels deep under them.
    depth = 0
    while parts and all(len(p) - depth >= 3 for p in parts):
        first = {p[depth] for p in parts}
        if len(first) != 1 or next(iter(first)).lower() in split_names:
            break
        depth += 1
    by_split: dict[str, list[tuple[str, str]]] = {"train": [], "test": [], "all": []}
    for name, p in zip(images, parts, strict=True):
        rel = p[depth:]
        if len(rel) == 3 and rel[0].lower() in TRAIN_DIRS:
            by_split["train"].append((name, rel[1]))
        elif len(rel) == 3 and rel[0].lower() in TEST_DIRS:
            by_split["test"].append((name, rel[1]))
        elif len(rel) == 2:
            by_split["all"].append((name, rel[0]))
    if by_split["train"]:
        # Split folders win; loose class folders beside them are ignored.
        chosen = {"train": by_split["train"], "test": by_split["test"]}
        if not chosen["test"]:
            chosen = {"all": by_split["train"]}
    elif by_split["all"]:
        chosen = {"all": by_split["all"]}
    else:
        example = f" (found e.g. {images[0]})" if images else ""
        raise DataError(
            f"{source}: no images in {where} laid out as <class>/<image> or "
            f"train/<class>/<image> + test/<class>/<image>{example}"
        )
    if dirs is not None:
        wrapper = parts[0][:depth]
        _check_class_dirs(dirs, wrapper, parts, bool(by_split["train"]), where, source)
    if "test" in chosen:
        trained = {cls for _, cls in chosen["train"]}
        untrained = sorted({cls for _, cls in chosen["test"]} - trained)
        if untrained:
            # The model would be asked for a class it never saw an image of.
            raise DataError(
                f"{source}: class {untrained[0]!r} in {where} has test images but no "
                f"training images; add its images to train/{untrained[0]}/ or remove it "
                "from the test folder"
            )
    class_names = sorted({cls for items in chosen.values() for _, cls in items})
    index = {c: i for i, c in enumerate(class_names)}
    splits = {
        split: (
            [name for name, _ in items],
            np.array([index[cls] for _, cls in items], dtype=np.int64),
        )
        for split, items in chosen.items()
    }
    return TreeLayout(class_names, splits)


def _check_class_dirs(
    dirs: Iterable[str],
    wrapper: tuple[str, ...],
    image_parts: list[tuple[str, ...]],
    split_layout: bool,
    where: str,
    source: str,
) -> None:
    """Refuse a class folder that holds no images: left out, its class would vanish from
    the dataset without a word (a failed copy, a typo in a folder name)."""
    filled = {p[:-1] for p in image_parts}
    for name in sorted(dirs):
        p = PurePosixPath(name).parts
        if p[: len(wrapper)] != wrapper or any(x.startswith(".") or x == "__MACOSX" for x in p):
            continue
        rel = p[len(wrapper) :]
        # Class folders sit directly under the root, or under train/ and test/ folders.
        if split_layout:
            is_class = len(rel) == 2 and rel[0].lower() in (*TRAIN_DIRS, *TEST_DIRS)
        else:
            is_class = len(rel) == 1
        if is_class and p not in filled:
            raise DataError(
                f"{source}: class folder {'/'.join(rel)} in {where} holds no images; add "
                "its images (png, jpg, ...) or remove the folder"
            )


def walk_tree(root: Path) -> tuple[list[str], list[str]]:
    """Relative POSIX names of the files and of the folders under ``root``, sorted
    (hidden ones skipped)."""
    files, folders = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        files.extend((rel / f).as_posix() for f in filenames if not f.startswith("."))
        folders.extend((rel / d).as_posix() for d in dirnames)
    return sorted(files), sorted(folders)


def list_tree(root: Path) -> list[str]:
    """Relative POSIX names of the files under ``root``, sorted (hidden folders skipped)."""
    return walk_tree(root)[0]


def tree_digest(root: Path, names: list[str]) -> dict:
    """The content of the files ``names`` under ``root``: their count and one SHA-256
    over every name and file digest (content, not mtimes, as ``file_digest``)."""
    h = hashlib.sha256()
    for name in names:
        h.update(json.dumps([name, file_digest(root / name)["sha256"]]).encode())
    return {"files": len(names), "sha256": h.hexdigest()}
