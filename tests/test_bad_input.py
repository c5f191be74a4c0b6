"""Bad inputs through the command line: one line that names the value and the fix.

Each case runs ``python -m privimage experiment=smoke ...`` in a subprocess, as a user
would, and must end with a non-zero exit status, exactly one ``error:`` line on stderr
(its last line, so nothing of the message spills onto another), no Python traceback in
the output, and no stage folder marked ``DONE``. Every case fails before any training:
config values when the config is built, data problems when the pipeline reads the data
before its first stage.

Mixed image sizes and channel counts in one folder are not an error: the loader brings
every image to ``data.resolution`` and ``data.channels`` by design (centre crop, bicubic
resize, conversion to L or RGB), so that case asserts the folder loads correctly.

Run with ``-s`` to see the tally, e.g. ``bad inputs: 10 kinds, ...``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privimage import data

# Folder datasets at the public glyphs' shape, so only the data is wrong.
FOLDER = ["data=folder", "data.resolution=28", "data.channels=1"]

# Per kind of bad input: how each run ended (filled by the tests, tallied at the end).
TALLY: dict[str, list[dict]] = {}


def _images(folder: Path, count: int, *, value: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    for i in range(count):
        pixels = rng.integers(0, 256, (12, 12), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """One folder per bad input (small: a few 12x12 images per class)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    for name in ("corrupt", "empty", "mixed"):
        _images(root / name / "a", 6, value=1)
        _images(root / name / "b", 6, value=2)
    # A PNG signature followed by garbage: it passes as an image by name only.
    (root / "corrupt" / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x07" * 40)
    (root / "empty" / "c").mkdir()
    # Odd sizes (non-square, smaller and larger than 28 px) in every common mode.
    mixed = root / "mixed" / "a"
    Image.new("L", (40, 30), 100).save(mixed / "gray_wide.png")
    Image.new("RGBA", (7, 9), (255, 255, 255, 255)).save(mixed / "rgba_small.png")
    Image.new("RGB", (64, 64), (255, 0, 0)).convert("P").save(mixed / "palette_red.png")
    Image.new("LA", (28, 50), (30, 255)).save(mixed / "gray_alpha_tall.png")
    Image.new("RGB", (31, 31), (0, 0, 255)).save(mixed / "rgb_blue.jpg", quality=100)
    _images(root / "one" / "a", 6)
    np.savez(root / "label.npz", images=np.zeros((4, 28, 28), np.uint8), labels=[0, 1, 2, 99])
    nan = np.full((4, 1, 28, 28), 0.5, np.float32)
    nan[1, 0, 3, 3] = np.nan
    np.savez(root / "nan.npz", images=nan, labels=[0, 1, 2, 3])
    return root


@pytest.fixture(scope="module", autouse=True)
def tally(request):
    """Print how many kinds of bad input were covered and how they ended."""
    yield
    if not TALLY:
        return
    runs = [r for results in TALLY.values() for r in results]
    errors = [r for r in runs if r["outcome"] == "error"]
    accepted = [k for k, results in TALLY.items() if results[0]["outcome"] == "loads"]
    lines = [f"  {r['kind']}: {r['message']}" for r in errors]
    lines.append(
        f"bad inputs: {len(TALLY)} kinds, {sum(r['one_line'] for r in errors)} one-line "
        f"errors in {len(errors)} CLI runs, {len(accepted)} accepted by design "
        f"({', '.join(accepted) or 'none'}: loaded correctly), "
        f"{sum(r['traceback'] for r in runs)} tracebacks, "
        f"{sum(bool(r['partial_done']) for r in runs)} partial DONE"
    )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line)


# (kind, CLI overrides, what the error line must contain); paths relative to `inputs`
# are written as {root}.
CASES = [
    (
        "corrupt image",
        [*FOLDER, "data.path={root}/corrupt"],
        ["{root}/corrupt/a/x.png", "replace it"],
    ),
    (
        "empty class folder",
        [*FOLDER, "data.path={root}/empty"],
        ["class folder c", "{root}/empty", "remove the folder"],
    ),
    (
        "one class",
        [*FOLDER, "data.path={root}/one"],
        ["data.path={root}/one", "one class ('a')", "<class>/<image>"],
    ),
    (
        "label outside the classes",
        ["stages=[evaluate]", "evaluate.synthetic={root}/label.npz"],
        ["{root}/label.npz", "label 99", "0..9"],
    ),
    (
        "NaN in .npz",
        ["stages=[evaluate]", "evaluate.synthetic={root}/nan.npz"],
        ["{root}/nan.npz", "1 NaN", "uint8"],
    ),
    (
        "epsilon = inf",
        ["privacy.target_epsilon=inf"],
        ["privacy.target_epsilon=inf", "privacy.target_epsilon=10"],
    ),
    ("delta = 0", ["privacy.delta=0"], ["privacy.delta=0.0", "privacy.delta=1e-5"]),
    (
        "batch size 0",
        ["finetune.batch_size=0"],
        ["finetune.batch_size=0 must be > 0", "finetune.batch_size=256"],
    ),
    (
        "batch size 0",
        ["pretrain.batch_size=0"],
        ["pretrain.batch_size=0 must be > 0", "pretrain.batch_size=64"],
    ),
    (
        "missing data path",
        [*FOLDER, "data.path={root}/no/such/folder"],
        ["{root}/no/such/folder does not exist", "point data.path"],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,overrides,needles", CASES, ids=[f"{k}: {o[-1]}" for k, o, _ in CASES]
)
def test_bad_input_ends_with_one_line(
    kind, overrides, needles, inputs, tmp_path, cache_dir, run_cli
):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "experiment=smoke",
        "device=cpu",
        f"hydra.run.dir={run_dir}",
        f"cache_dir={cache_dir}",
        *(o.format(root=inputs) for o in overrides),
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    traceback = "Traceback" in output or "HYDRA_FULL_ERROR" in output
    done = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("DONE"))
    one_line = len(errors) == 1 and lines[-1] == errors[0]
    TALLY.setdefault(kind, []).append(
        {
            "kind": kind,
            "outcome": "error",
            "message": errors[-1] if errors else f"(no error line; exit {proc.returncode})",
            "one_line": one_line,
            "traceback": traceback,
            "partial_done": done,
        }
    )
    assert proc.returncode != 0, output[-2000:]
    assert not traceback, output[-4000:]
    assert one_line, proc.stderr[-2000:]
    for needle in needles:
        assert needle.format(root=inputs) in errors[0], errors[0]
    assert not done, f"stages marked DONE: {done}"


@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_sizes_and_channels_load_by_design(channels, inputs, cache_dir, compose):
    """Not an error: every image is centre-cropped, resized and converted."""
    mixed = inputs / "mixed" / "a"
    overrides = ["experiment=smoke", *FOLDER, f"data.path={inputs / 'mixed'}"]
    channel_overrides = [f"data.channels={channels}", f"public.channels={channels}"]
    cfg = compose([*overrides, *channel_overrides]).data
    data.check_available(cfg)
    ds = data.load(cfg, cache_dir=cache_dir, progress=False)
    data.check_classes(ds, cfg)
    assert ds.class_names == ["a", "b"]
    assert len(ds.train) + len(ds.test) == 6 + 5 + 6
    for split in (ds.train, ds.test):
        assert split.images.shape[1:] == (channels, 28, 28)
    # A whole-image colour survives the crop, resize and conversion.
    images = {
        name: _find(ds, Image.open(mixed / name), channels)
        for name in (
            "gray_wide.png",
            "rgba_small.png",
            "palette_red.png",
            "gray_alpha_tall.png",
            "rgb_blue.jpg",
        )
    }
    if channels == 1:
        assert (images["gray_wide.png"] == 100).all()
        # Alpha goes through RGB, whose integer luminance can round one level down.
        assert (abs(images["gray_alpha_tall.png"].astype(int) - 30) <= 1).all()
        assert (images["rgba_small.png"] == 255).all()
        assert (abs(images["palette_red.png"].astype(int) - 76) <= 1).all()  # L of red
    else:
        assert (images["gray_wide.png"] == 100).all()
        assert (images["palette_red.png"][0] == 255).all()
        assert (images["palette_red.png"][1:] == 0).all()
        assert (images["rgb_blue.jpg"][2] > 240).all() and (images["rgb_blue.jpg"][:2] < 15).all()
    TALLY.setdefault("mixed sizes and channels", []).append(
        {
            "kind": "mixed sizes and channels",
            "outcome": "loads",
            "traceback": False,
            "partial_done": [],
        }
    )


def _find(ds: data.ImageDataset, img: Image.Image, channels: int) -> np.ndarray:
    """The loaded image whose mean matches ``img``'s colour (each is one flat colour)."""
    mode = "L" if channels == 1 else "RGB"
    colour = np.asarray(img.convert("RGB").convert(mode), dtype=float).reshape(-1, channels)
    target = colour.mean(axis=0)
    for split in (ds.train, ds.test):
        for image in split.images.numpy():
            flat = image.reshape(channels, -1)
            if np.abs(flat.mean(axis=1) - target).max() < 2 and flat.std(axis=1).max() < 2:
                return image
    raise AssertionError(f"no loaded image of colour {target}")
