"""The data layer on real data: embedded sources, folder/tar trees, the shared archives.

Every test caches into its own ``tmp_path``; archive tests load small capped subsets and
are skipped when ``../shared/data`` lacks the archive.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from privimage import data
from privimage.config.schema import DataConfig
from privimage.data import archives, glyphs, loading
from privimage.errors import ConfigError, DataError

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CIFAR10 = SHARED_DATA / "cifar10.tar.gz"
TINY = SHARED_DATA / "tiny-imagenet-200.tar.gz"
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, message
    return message


def _same(a: data.ImageDataset, b: data.ImageDataset) -> bool:
    return (
        torch.equal(a.train.images, b.train.images)
        and torch.equal(a.train.labels, b.train.labels)
        and torch.equal(a.test.images, b.test.images)
        and torch.equal(a.test.labels, b.test.labels)
        and a.class_names == b.class_names
    )


def _entries(cache: Path) -> list[str]:
    root = cache / "datasets"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_sources() -> None:
    assert {
        "mnist5k",
        "digits",
        "glyphs",
        "cifar10",
        "tinyimagenet",
        "folder",
        "tar",
        "hub",
    } == data.SOURCES


def test_mnist5k_shapes_range_labels(tmp_path: Path) -> None:
    ds = data.load(DataConfig(source="mnist5k"), cache_dir=tmp_path, progress=False)
    assert ds.source == "mnist5k"
    assert ds.class_names == [str(d) for d in range(10)] and ds.num_classes == 10
    assert ds.train.images.shape == (4000, 1, 28, 28) and len(ds.train) == 4000
    assert ds.test.images.shape == (1000, 1, 28, 28) and len(ds.test) == 1000
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    # Stratified: 20 % of each class's 500 digits held out.
    assert ds.train.labels.bincount().tolist() == [400] * 10
    assert ds.test.labels.bincount().tolist() == [100] * 10
    x = ds.train.as_float()
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    # Real MNIST: dark background, bright strokes, about 13 % ink.
    assert 0.08 < (ds.train.images > 128).float().mean() < 0.2


def test_mnist5k_split_is_deterministic(tmp_path: Path) -> None:
    cfg = DataConfig(source="mnist5k", max_train_images=300, max_test_images=100)
    a = data.load(cfg, cache_dir=tmp_path / "a", progress=False)
    b = data.load(cfg, cache_dir=tmp_path / "b", progress=False)
    assert _same(a, b)
    assert len(a.train) == 300 and len(a.test) == 100
    other = data.load(
        DataConfig(source="mnist5k", max_train_images=300, max_test_images=100, split_seed=1),
        cache_dir=tmp_path / "a",
        progress=False,
    )
    assert not torch.equal(a.test.images, other.test.images)
    assert len(_entries(tmp_path / "a")) == 2


def test_second_load_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = DataConfig(source="mnist5k", max_train_images=200, max_test_images=50)
    first = data.load(cfg, cache_dir="~/cache", progress=False)
    assert _entries(tmp_path / "cache") and _entries(tmp_path / "cache")[0].startswith("mnist5k-")

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cached dataset was decoded again")

    monkeypatch.setattr(loading, "_build", no_decoding)
    second = data.load(cfg, cache_dir="~/cache", progress=False)
    assert _same(first, second)
    assert len(_entries(tmp_path / "cache")) == 1
    # A setting that changes the pixels is a different entry, so it must decode.
    with pytest.raises(AssertionError, match="decoded again"):
        data.load(
            DataConfig(source="mnist5k", resolution=16, max_train_images=200, max_test_images=50),
            cache_dir="~/cache",
            progress=False,
        )


def test_interrupted_save_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig(source="digits", max_train_images=50, max_test_images=20)
    real_save = datasets.DatasetDict.save_to_disk

    def save_then_die(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        data.load(cfg, cache_dir=tmp_path, progress=False)
    assert _entries(tmp_path) == []
    monkeypatch.undo()
    ds = data.load(cfg, cache_dir=tmp_path, progress=False)
    assert len(ds.train) == 50 and len(_entries(tmp_path)) == 1


def test_digits(tmp_path: Path) -> None:
    ds = data.load(DataConfig(source="digits", resolution=8), cache_dir=tmp_path, progress=False)
    assert ds.num_classes == 10
    assert len(ds.train) + len(ds.test) == 1797
    assert abs(len(ds.test) - 0.2 * 1797) < 10
    assert ds.train.images.shape[1:] == (1, 8, 8)
    # Intensities 0..16 scaled to 0..255.
    assert ds.train.images.max() == 255
    up = data.load(DataConfig(source="digits", resolution=16), cache_dir=tmp_path, progress=False)
    assert up.train.images.shape[1:] == (1, 16, 16)
    assert torch.equal(up.train.labels, ds.train.labels)


def test_glyph_fonts() -> None:
    names = {p.name for p in glyphs.usable_fonts()}
    assert len(names) >= 15
    assert {"DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "STIXGeneral.ttf", "cmr10.ttf"} <= names
    for symbol_font in ("cmsy10.ttf", "cmex10.ttf", "cmmi10.ttf", "LastResortHE-Regular.ttf"):
        assert symbol_font not in names
    assert not any(n.startswith(("STIXSiz", "STIXNonUni")) for n in names)
    # cmmi10 would also fail on its own merits: old-style digits.
    problem = glyphs._font_problem(glyphs.font_dir() / "cmmi10.ttf")
    assert problem is not None and "lining" in problem


def test_glyphs_classes_and_determinism(tmp_path: Path) -> None:
    cfg = DataConfig(source="glyphs", max_train_images=620, max_test_images=124)
    a = data.load(cfg, cache_dir=tmp_path / "a", progress=False)
    b = data.load(cfg, cache_dir=tmp_path / "b", progress=False)
    assert _same(a, b)
    assert a.num_classes == 62
    assert a.class_names[:2] == ["digit 0", "digit 1"]
    assert a.class_names[10] == "upper A" and a.class_names[36] == "lower a"
    assert a.train.images.shape == (620, 1, 28, 28)
    assert a.test.images.shape == (124, 1, 28, 28)
    assert int(a.train.labels.max()) < 62
    x = a.train.images[:, 0].float()
    # Every glyph has ink; white on black like MNIST.
    assert (x.amax(dim=(1, 2)) > 200).all()
    assert x[:, 0, :].mean() < 5 and x[:, :, 0].mean() < 5
    # Digits fill about 20 of 28 px and sit near the centre (centre of mass).
    digits = x[a.train.labels < 10]
    heights = ((digits > 64).any(dim=2)).sum(dim=1).float()
    assert 17 <= heights.median() <= 23
    grid = torch.arange(28, dtype=torch.float32)
    com_y = (digits.sum(2) * grid).sum(1) / digits.sum((1, 2))
    com_x = (digits.sum(1) * grid).sum(1) / digits.sum((1, 2))
    assert abs(com_y.mean() - 13.5) < 1.0 and abs(com_x.mean() - 13.5) < 1.0
    # A different seed draws different jitter.
    other = data.load(
        DataConfig(source="glyphs", max_train_images=620, max_test_images=124, split_seed=1),
        cache_dir=tmp_path / "a",
        progress=False,
    )
    assert not torch.equal(a.train.images, other.train.images)


def _write_tree(root: Path, split_dirs: bool) -> None:
    """Three classes of small images in varied modes and sizes."""
    colours = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}
    for split, n in (("train", 4), ("test", 2)) if split_dirs else ((None, 5),):
        for cls, colour in colours.items():
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.new("RGB", (20 + 4 * i, 20), colour)
                if i == 1:
                    img = img.convert("L")
                if i == 2:
                    img = img.convert("RGBA")
                ext = "jpg" if i == 3 else "png"
                img.save(folder / f"{i}.{ext}")
    (root / "README.txt").write_text("not an image")


def test_folder_source(tmp_path: Path) -> None:
    _write_tree(tmp_path / "flat", split_dirs=False)
    cfg = DataConfig(source="folder", path=str(tmp_path / "flat"), resolution=8, channels=3)
    data.check_available(cfg)
    ds = data.load(cfg, cache_dir=tmp_path / "cache", progress=False)
    assert ds.class_names == ["cat", "dog", "emu"]
    assert ds.train.images.shape == (12, 3, 8, 8) and ds.test.images.shape == (3, 3, 8, 8)
    assert ds.test.labels.sort().values.tolist() == [0, 1, 2]
    # Colour survives crop + resize (RGB images of class "cat" are pure red).
    red = ds.train.images[ds.train.labels == 0].float().mean(dim=(0, 2, 3))
    assert red[0] > 150 and red[1] < 60 and red[2] < 60

    _write_tree(tmp_path / "split", split_dirs=True)
    cfg = DataConfig(source="folder", path=str(tmp_path / "split"), resolution=8, channels=1)
    ds = data.load(cfg, cache_dir=tmp_path / "cache", progress=False)
    assert ds.train.images.shape == (12, 1, 8, 8) and ds.test.images.shape == (6, 1, 8, 8)
    assert ds.test.labels.bincount().tolist() == [2, 2, 2]


def test_tar_source_matches_folder(tmp_path: Path) -> None:
    _write_tree(tmp_path / "tree" / "mydata", split_dirs=True)
    folder = data.load(
        DataConfig(source="folder", path=str(tmp_path / "tree" / "mydata"), resolution=8),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    for suffix, mode in ((".tar.gz", "w:gz"), (".tar", "w")):
        archive = tmp_path / f"images{suffix}"
        with tarfile.open(archive, mode) as tar:
            # With a wrapper folder, as archives usually have.
            tar.add(tmp_path / "tree" / "mydata", arcname="mydata")
        cfg = DataConfig(source="tar", path=str(archive), resolution=8)
        data.check_available(cfg)
        ds = data.load(cfg, cache_dir=tmp_path / "cache", progress=False)
        assert _same(ds, folder)
        # Capped loads read only the chosen members (a second pass) and agree too.
        capped = data.load(
            DataConfig(source="tar", path=str(archive), resolution=8, max_train_images=5),
            cache_dir=tmp_path / "cache",
            progress=False,
        )
        assert len(capped.train) == 5 and torch.equal(capped.test.images, folder.test.images)


def test_cache_key_follows_content_not_place_or_mtime(tmp_path: Path) -> None:
    # Shared data is re-mounted with new mtimes each session; that must not throw away
    # the preprocessed data, query classifiers and shared stages keyed on it.
    def folder_key(name: str) -> str:
        return data.content_key(DataConfig(source="folder", path=str(tmp_path / name)))

    def tar_key(name: str) -> str:
        return data.content_key(DataConfig(source="tar", path=str(tmp_path / name)))

    _write_tree(tmp_path / "a", split_dirs=False)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        tar.add(tmp_path / "a", arcname="data")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.copyfile(tmp_path / "a.tar", tmp_path / "b.tar")
    for path in [tmp_path / "b.tar", *(tmp_path / "b").rglob("*")]:
        os.utime(path, ns=(10**18, 10**18))
    assert folder_key("a") == folder_key("b") and tar_key("a.tar") == tar_key("b.tar")

    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "b" / "cat" / "0.png")
    with open(tmp_path / "b.tar", "ab") as f:
        f.write(b"\0" * 512)
    assert folder_key("a") != folder_key("b"), "a changed image must change the key"
    assert tar_key("a.tar") != tar_key("b.tar"), "a changed archive must change the key"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10.is_file(), reason=f"{CIFAR10} is absent (shared data)")
def test_cifar10_capped(tmp_path: Path) -> None:
    cfg = DataConfig(
        source="cifar10",
        path=str(SHARED_DATA),
        resolution=32,
        channels=3,
        max_train_images=300,
        max_test_images=100,
    )
    data.check_available(cfg)
    ds = data.load(cfg, cache_dir=tmp_path, progress=False)
    assert ds.class_names == CIFAR10_CLASSES
    assert ds.train.images.shape == (300, 3, 32, 32) and ds.test.images.shape == (100, 3, 32, 32)
    assert int(ds.train.labels.max()) == 9 and len(ds.train.labels.unique()) == 10
    # Natural colour photos: not grayscale, full range.
    assert (ds.train.images[:, 0] != ds.train.images[:, 2]).float().mean() > 0.5


@pytest.mark.slow
@pytest.mark.skipif(not TINY.is_file(), reason=f"{TINY} is absent (shared data)")
def test_tinyimagenet_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found through the environment variable (path unset).
    monkeypatch.setenv(archives.ENV_DATA_DIR, str(SHARED_DATA))
    cfg = DataConfig(
        source="tinyimagenet", resolution=32, channels=3, max_train_images=200, max_test_images=50
    )
    data.check_available(cfg)
    ds = data.load(cfg, cache_dir=tmp_path, progress=False)
    assert ds.num_classes == 200 and len(set(ds.class_names)) == 200
    assert "Egyptian cat" in ds.class_names and "school bus" in ds.class_names
    assert ds.train.images.shape == (200, 3, 32, 32) and ds.test.images.shape == (50, 3, 32, 32)
    assert int(ds.test.labels.max()) < 200


def test_unknown_source_is_a_config_error(tmp_path: Path) -> None:
    for call in (
        lambda: data.check_available(DataConfig(source="imagenet")),
        lambda: data.load(DataConfig(source="imagenet"), cache_dir=tmp_path),
    ):
        with pytest.raises(ConfigError) as exc:
            call()
        message = _one_line(exc)
        assert "'imagenet'" in message and "mnist5k" in message and "tinyimagenet" in message


def test_bad_cap_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        data.load(DataConfig(max_train_images=0), cache_dir=tmp_path)
    assert "max_train_images=0" in _one_line(exc)


def test_missing_archive_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        data.check_available(DataConfig(source="cifar10", path=str(tmp_path / "nowhere")))
    message = _one_line(exc)
    assert str(tmp_path / "nowhere") in message and "data.path=" in message


def test_missing_archive_in_default_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(archives.ENV_DATA_DIR, str(empty))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(archives, "_REPO_ROOT", tmp_path / "repo")
    with pytest.raises(DataError) as exc:
        data.load(DataConfig(source="tinyimagenet"), cache_dir=tmp_path / "cache")
    message = _one_line(exc)
    assert "tiny-imagenet-200.tar.gz" in message and str(empty) in message
    assert "data.path=" in message and archives.ENV_DATA_DIR in message


def test_folder_errors(tmp_path: Path) -> None:
    cases = [
        (DataConfig(source="folder"), "data.path="),
        (DataConfig(source="folder", path=str(tmp_path / "missing")), "does not exist"),
        (DataConfig(source="folder", path=str(tmp_path)), "no images"),
        (DataConfig(source="tar", path=str(tmp_path / "missing.tar")), "does not exist"),
    ]
    for cfg, expected in cases:
        with pytest.raises(DataError) as exc:
            data.check_available(cfg)
        message = _one_line(exc)
        assert expected in message
        if cfg.path:
            assert cfg.path in message


def test_unreadable_inputs(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(os.urandom(4096))
    cfg = DataConfig(source="tar", path=str(broken))
    with pytest.raises(DataError) as exc:
        data.check_available(cfg)
    assert str(broken) in _one_line(exc)
    with pytest.raises(DataError) as exc:
        data.load(cfg, cache_dir=tmp_path / "cache", progress=False)
    assert str(broken) in _one_line(exc)

    # A truncated archive passes the quick check but fails on reading, still one line.
    _write_tree(tmp_path / "tree", split_dirs=False)
    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="tree")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError) as exc:
        data.load(
            DataConfig(source="tar", path=str(truncated)),
            cache_dir=tmp_path / "cache",
            progress=False,
        )
    assert str(truncated) in _one_line(exc)

    # An image file that does not decode is named.
    (tmp_path / "tree" / "cat" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as exc:
        data.load(
            DataConfig(source="folder", path=str(tmp_path / "tree")),
            cache_dir=tmp_path / "cache",
            progress=False,
        )
    assert "bad.png" in _one_line(exc)
    # Nothing half-written is left behind.
    assert _entries(tmp_path / "cache") == []


def test_class_folders_without_images(tmp_path: Path) -> None:
    # An empty class folder would otherwise drop its class without a word.
    _write_tree(tmp_path / "flat" / "mydata", split_dirs=False)
    (tmp_path / "flat" / "mydata" / "fox").mkdir()
    archive = tmp_path / "flat.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "flat", arcname="flat")
    for cfg in (
        DataConfig(source="folder", path=str(tmp_path / "flat")),
        DataConfig(source="tar", path=str(archive)),
    ):
        with pytest.raises(DataError) as exc:
            # The folder's layout is checked before anything is decoded; the archive's
            # on its one reading pass.
            data.check_available(cfg)
            data.load(cfg, cache_dir=tmp_path / "cache", progress=False)
        message = _one_line(exc)
        assert "class folder fox" in message and "remove the folder" in message
        assert cfg.path in message
    # In a split tree: a class with test images but no training images.
    _write_tree(tmp_path / "split", split_dirs=True)
    shutil.rmtree(tmp_path / "split" / "train" / "emu")
    cfg = DataConfig(source="folder", path=str(tmp_path / "split"))
    with pytest.raises(DataError) as exc:
        data.check_available(cfg)
    assert "'emu'" in _one_line(exc) and "train/emu/" in _one_line(exc)
    (tmp_path / "split" / "train" / "emu").mkdir()
    with pytest.raises(DataError, match="class folder train/emu"):
        data.check_available(cfg)
    assert _entries(tmp_path / "cache") == []


def test_one_class_is_refused_as_sensitive_data(tmp_path: Path) -> None:
    _write_tree(tmp_path / "tree", split_dirs=False)
    for cls in ("dog", "emu"):
        shutil.rmtree(tmp_path / "tree" / cls)
    cfg = DataConfig(source="folder", path=str(tmp_path / "tree"), resolution=8)
    # The loader takes it (a one-class public set is fine for public_subset=all) ...
    ds = data.load(cfg, cache_dir=tmp_path / "cache", progress=False)
    assert ds.class_names == ["cat"]
    # ... the sensitive data needs two classes.
    with pytest.raises(DataError) as exc:
        data.check_classes(ds, cfg, key="data")
    message = _one_line(exc)
    assert f"data.path={cfg.path}" in message and "one class ('cat')" in message
    assert "<class>/<image>" in message
    data.check_classes(data.load(DataConfig(source="digits"), cache_dir=tmp_path), cfg)


def test_hub_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # What HF_HUB_OFFLINE=1 sets at import time: fail at once instead of retrying.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = DataConfig(source="hub", path="privimage-tests/no-such-dataset")
    data.check_available(cfg)  # nothing to check offline beyond the name
    with pytest.raises(DataError) as exc:
        data.load(cfg, cache_dir=tmp_path, progress=False)
    message = _one_line(exc)
    assert "privimage-tests/no-such-dataset" in message
    with pytest.raises(DataError) as exc:
        data.check_available(DataConfig(source="hub"))
    assert "data.path=" in _one_line(exc)


def test_hub_source_on_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # load_dataset also reads local image folders (its "imagefolder" builder): the hub
    # path end to end, without network. Its own cache goes to tmp_path too.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    _write_tree(tmp_path / "split", split_dirs=True)
    ds = data.load(
        DataConfig(source="hub", path=str(tmp_path / "split"), resolution=8),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert ds.class_names == ["cat", "dog", "emu"]
    assert len(ds.train) == 12 and len(ds.test) == 6
    with pytest.raises(DataError) as exc:
        data.load(
            DataConfig(source="hub", path=str(tmp_path / "split"), label_column="class"),
            cache_dir=tmp_path / "cache",
            progress=False,
        )
    assert "label_column" in _one_line(exc)


def test_embedded_sources_are_available() -> None:
    """No path and no network: each embedded source checks out and lists its images."""
    from privimage.data.registry import get_source

    expected = {"mnist5k": (10, 5000), "digits": (10, 1797), "glyphs": (62, 62 * 360)}
    for source, (classes, images) in expected.items():
        cfg = DataConfig(source=source)
        data.check_available(cfg)
        catalog = get_source(source).catalog(cfg, progress=False)
        assert len(catalog.class_names) == classes, source
        assert sum(len(labels) for _, labels in catalog.splits.values()) == images, source


def test_stratified_split_and_subset_are_seeded() -> None:
    from privimage.data import splits

    labels = np.repeat(np.arange(3), [10, 20, 5])
    train, test = splits.stratified_split(labels, 0.2, seed=3)
    assert np.bincount(labels[test]).tolist() == [2, 4, 1]
    assert sorted([*train, *test]) == list(range(35))
    again = splits.stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(test, again[1])
    sub = splits.random_subset(100, 10, seed=0, stream=1)
    assert len(sub) == 10 and np.array_equal(sub, np.sort(sub))
    assert np.array_equal(sub, splits.random_subset(100, 10, seed=0, stream=1))
    assert not np.array_equal(sub, splits.random_subset(100, 10, seed=0, stream=2))
