r"""A many-class image set rendered offline from the fonts matplotlib bundles.

The embedded digits set has 10 classes and raw pixels already retrieve it at R@1 ~ 0.99, so it
cannot show how triplet-loss collapse depends on the number of classes in a batch versus the
embedding dimension. This module renders a harder one, with no download: one class per
character, one *source* per (character, font file), several seeded random distortions per
source, 32 x 32 grayscale ``uint8`` images (white ink on black).

**Characters.** The candidates (:data:`CANDIDATES`, 177) are, in this order: Latin A-Z, a-z,
the digits 0-9, Greek capitals Α-Ω, Greek small α-ω (with final ς), Cyrillic capitals А-Я with Ё,
Cyrillic small а-я with ё.

**Look-alike rule.** Two candidates are look-alikes when, over the font files that render both,
the *median* of their normalised L1 distance
:math:`d(a, b) = \sum |a - b| / (\sum a + \sum b)` between the clean (undistorted) 32 x 32
renderings is below :data:`LOOKALIKE_TOL` (0.02): they are drawn with the same outline in at
least half of the fonts (DejaVu and STIX reuse one outline for Latin A, Greek Α and Cyrillic А).
Look-alikes form groups (connected components); each group keeps its member that comes first
in the candidate order above (so Latin beats Greek beats Cyrillic) and drops the others. The
measured groups are frozen in :data:`LOOKALIKES` (34 characters dropped, so
``NUM_CLASSES == 143``); ``find_lookalikes()`` recomputes them and the tests check that both
agree. The measured medians leave a wide gap around the tolerance: at most 0.010 inside a
group, at least 0.038 between kept classes. Similar but distinct characters therefore stay
separate classes; the closest kept pairs are Ш/Щ, И/Й, E/Ё, p/ρ, A/Λ, n/п, κ/к, O/Q and 3/З
(median distance 0.04-0.09). A character rendered by fewer than :data:`MIN_FONTS` (12) font
files would be dropped too; with matplotlib 3.11 every kept character has at least 16, and
generation raises if the installed fonts no longer give every class that many.

**Fonts.** Every ``*.ttf`` file in matplotlib's ``mpl-data/fonts/ttf`` (sorted by name) except
:data:`EXCLUDED_FONTS` (a placeholder font and two TeX symbol fonts whose letter code points
hold unrelated symbols) and the files without a Latin 'H' (display, non-Unicode and
size-variant fonts): 22 files. A file renders a character when its character map has it and
the glyph has ink. The Computer Modern
files have Greek at TeX positions (the BaKoMa encoding matplotlib's mathtext uses): capitals
Γ Δ Θ Λ Ξ Π Σ Υ Φ Ψ Ω in ``cm{r,b,ss,ti,tt,mi}10`` and the small letters in ``cmmi10``;
:data:`CM_GREEK_CODES` lists them. This gives 22 fonts for Latin, digits and Greek capitals,
17 for Greek small letters and 16 for Cyrillic.

**Rendering.** FreeType (matplotlib's ``FT2Font``, unhinted) renders each glyph at
:data:`SUPERSAMPLE` times the output resolution, scaled per font so that its cap height (the
height of 'H') is :data:`CAP_HEIGHT_PX` output pixels. The glyph keeps its baseline at row
:data:`BASELINE_ROW` and is centred horizontally on its ink, so case and ascender/descender
information survive (o vs O, p vs P). An instance applies, about the middle of the cap height,

- a random affine map: rotation in ±12°, isotropic scale in [0.85, 1.1] with an aspect jitter
  of ±10 %, horizontal shear in ±0.2 and a translation in ±1.5 px;
- a stroke-width change: none, or a grayscale dilation of the supersampled glyph by 1 or 2
  supersampled pixels (the stroke widens by 0.5 or 1 output pixel). Thinner strokes come from
  the regular-weight fonts only: erosion, even by one supersampled pixel, deletes the
  hairlines of the serif fonts (the thin left stroke of a STIX or Computer Modern 'A');
- additive Gaussian noise with a standard deviation drawn in [0, 12] grey levels;

then box-filters the supersampled bilinear resampling down to 32 x 32. Each (font, character)
source gets its own NumPy generator seeded from ``(seed, code point, font name)``, so the
arrays depend neither on iteration order nor on the directory listing, and are byte-identical
wherever matplotlib (FreeType) and NumPy have the same versions.

**Split (class-disjoint).** Class ids follow the candidate order with look-alikes removed;
even ids are the train classes (:data:`TRAIN_CLASSES`, 72), odd ids the test classes
(:data:`TEST_CLASSES`, 71), which spreads every script over both splits. Labels keep their
global class id in every split (``class_names()[label]`` is the character); remap them if a
model needs contiguous labels.

**Size.** ``instances_per_font`` images per (character, font): 2,744 sources, so the default
of 5 gives 13,720 images (6,900 train, 6,820 test). Generation takes 8-20 s on one core
(CPU-bound NumPy resampling) and is cached in ``cache_dir`` (default ``~/.cache/hnm``) as
``glyphs-<hash>.npz``, the hash covering every generation parameter and the matplotlib
version. Rows come in a fixed seeded random order, so the first n rows of a split are a
uniform sample of its classes and fonts.

**Floor.** Leave-one-out R@1 of raw pixels (flattened, L2-normalised, cosine, brute force):
0.752 on the test split at the defaults (0.741 on train; 0.636 on both splits together, 143
classes). A trained model must beat it; for comparison the 10-class digits set gives ~0.99.

References:
  Xuan, Stylianou, Liu, Pless. *Hard negative examples are hard, but useful.* ECCV 2020
  (arXiv 2007.12749): the collapse this set is meant to expose with many classes per batch.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from typing import Any

import numpy as np

GLYPHS_VERSION = 2  # bump whenever the rendered arrays change
IMAGE_SIZE = 32
SUPERSAMPLE = 4
CAP_HEIGHT_PX = 12.0
BASELINE_ROW = 22.0
MIN_FONTS = 12
LOOKALIKE_TOL = 0.02
DEFAULT_INSTANCES_PER_FONT = 5

MAX_ROTATION_DEG = 12.0
SCALE_RANGE = (0.85, 1.1)
MAX_LOG_ASPECT = 0.1
MAX_SHEAR = 0.2
MAX_SHIFT_PX = 1.5
STROKE_RADII = (0, 1, 2)  # dilation radius in supersampled pixels (quarters of a pixel)
MAX_NOISE_STD = 12.0  # grey levels

SPLITS = ("train", "test", "all")
ROW_ORDER_KEY = 0x0DE5  # second seed word of the row permutation

EXCLUDED_FONTS = {
    "LastResortHE-Regular.ttf": "maps every code point to a placeholder box",
    "cmex10.ttf": "TeX extension font: letter code points hold large delimiters",
    "cmsy10.ttf": "TeX symbol font: letter and digit code points hold math symbols",
}


def _chars(first: str, last: str, skip: str = "") -> str:
    return "".join(chr(c) for c in range(ord(first), ord(last) + 1) if chr(c) not in skip)


_CYRILLIC_UPPER = _chars("А", "Я")
_CYRILLIC_LOWER = _chars("а", "я")
SCRIPTS = {
    "latin_upper": _chars("A", "Z"),
    "latin_lower": _chars("a", "z"),
    "digits": _chars("0", "9"),
    "greek_upper": _chars("Α", "Ω", skip="\u03a2"),  # U+03A2 is unassigned
    "greek_lower": _chars("α", "ω"),                # includes final sigma ς
    "cyrillic_upper": _CYRILLIC_UPPER[:6] + "Ё" + _CYRILLIC_UPPER[6:],
    "cyrillic_lower": _CYRILLIC_LOWER[:6] + "ё" + _CYRILLIC_LOWER[6:],
}
CANDIDATES: tuple[str, ...] = tuple("".join(SCRIPTS.values()))

# Frozen output of ``find_lookalikes()`` with matplotlib 3.11 (dropped character -> the kept
# representative of its group); the tests recompute it.
LOOKALIKES: dict[str, str] = {
    "Α": "A", "А": "A", "Β": "B", "В": "B", "С": "C", "Ε": "E", "Е": "E", "Η": "H", "Н": "H",
    "Ι": "I", "Κ": "K", "Μ": "M", "М": "M", "Ν": "N", "Ο": "O", "О": "O", "Ρ": "P", "Р": "P",
    "Τ": "T", "Т": "T", "Χ": "X", "Х": "X", "Υ": "Y", "Ζ": "Z", "а": "a", "с": "c", "е": "e",
    "ο": "o", "о": "o", "р": "p", "х": "x", "у": "y", "Г": "Γ", "П": "Π",
}

CLASS_NAMES: tuple[str, ...] = tuple(c for c in CANDIDATES if c not in LOOKALIKES)
NUM_CLASSES = len(CLASS_NAMES)
TRAIN_CLASSES: tuple[int, ...] = tuple(range(0, NUM_CLASSES, 2))
TEST_CLASSES: tuple[int, ...] = tuple(range(1, NUM_CLASSES, 2))

# Greek in the BaKoMa Computer Modern files sits at TeX positions, not at its code points
# (matplotlib's ``_mathtext_data.latex_to_bakoma``). U+03B5 and U+03C6 are drawn like TeX's
# \varepsilon and \varphi in the Unicode charts, so those are the glyphs used.
_CM_GREEK_UPPER = dict(zip("ΓΔΘΛΞΠΣΥΦΨΩ", (161, 162, 163, 164, 165, 166, 167, 168, 169, 170,
                                             173)))
_CM_GREEK_LOWER = dict(zip(
    "αβγδεζηθικλμνξπρσςτυφχψω",
    (174, 175, 176, 177, 34, 179, 180, 181, 182, 8729, 184, 185, 186, 187, 188, 189, 190, 38,
     191, 192, 39, 194, 195, 33)))
CM_GREEK_CODES: dict[str, dict[str, int]] = {
    **{f: _CM_GREEK_UPPER for f in ("cmb10.ttf", "cmr10.ttf", "cmss10.ttf", "cmti10.ttf",
                                    "cmtt10.ttf")},
    "cmmi10.ttf": {**_CM_GREEK_UPPER, **_CM_GREEK_LOWER},
}


def class_names() -> list[str]:
    """The characters, indexed by global class id (``class_names()[label]``)."""
    return list(CLASS_NAMES)


def split_classes(split: str) -> tuple[int, ...]:
    """Global class ids of ``split`` ("train": even ids, "test": odd ids, "all").

    Raises:
      ValueError: if ``split`` is not one of :data:`SPLITS`.
    """
    _check_split(split)
    return {"train": TRAIN_CLASSES, "test": TEST_CLASSES,
            "all": tuple(range(NUM_CLASSES))}[split]


def _check_split(split: Any) -> None:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}; got {split!r}.")


def _check_instances(instances_per_font: Any) -> None:
    if (isinstance(instances_per_font, bool) or not isinstance(instances_per_font, int)
            or instances_per_font < 1):
        raise ValueError("`instances_per_font` must be a positive int; got "
                         f"{instances_per_font!r}.")


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int; got {seed!r}.")


# ---------------------------------------------------------------------------------------------
# Fonts and clean rendering.


def font_dir() -> str:
    """matplotlib's bundled TrueType directory (``mpl-data/fonts/ttf``)."""
    import matplotlib  # lazy: only generation needs it
    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def font_names() -> list[str]:
    """The font files used, sorted by name.

    Every bundled ``*.ttf`` except :data:`EXCLUDED_FONTS` and the files without a Latin 'H'
    (display, non-Unicode and size-variant fonts: they carry no letters to render).
    """
    from matplotlib.ft2font import FT2Font
    names = sorted(f for f in os.listdir(font_dir())
                   if f.endswith(".ttf") and f not in EXCLUDED_FONTS)
    return [f for f in names if FT2Font(os.path.join(font_dir(), f)).get_char_index(ord("H"))]


def _open_font(name: str) -> Any:
    """An FT2Font sized so that the cap height is ``CAP_HEIGHT_PX * SUPERSAMPLE`` pixels."""
    from matplotlib.ft2font import FT2Font, LoadFlags
    font = FT2Font(os.path.join(font_dir(), name))
    reference_size = 100.0
    font.set_size(reference_size, 72)  # 72 dpi: one point is one pixel
    cap = font.load_char(ord("H"), flags=LoadFlags.NO_HINTING).bbox[3] / 64.0
    font.set_size(reference_size * CAP_HEIGHT_PX * SUPERSAMPLE / cap, 72)
    return font


def _char_code(font_name: str, font: Any, char: str) -> int | None:
    code = CM_GREEK_CODES.get(font_name, {}).get(char, ord(char))
    return code if font.get_char_index(code) else None


def _render_source(font: Any, code: int) -> tuple[np.ndarray, float, float] | None:
    """Supersampled glyph in [0, 1], its baseline row and ink centre column (None: no ink)."""
    from matplotlib.ft2font import LoadFlags
    glyph = font.load_char(code, flags=LoadFlags.NO_HINTING)
    x_min, y_min, x_max, y_max = (v / 64.0 for v in glyph.bbox)  # 26.6 fixed point, y up
    # FreeType rounds the ink box outward and draws its bitmap at (x + floor(x_min), y).
    pad = 4  # room for dilation
    height = math.ceil(y_max) - math.floor(y_min) + 2 * pad
    width = math.ceil(x_max) - math.floor(x_min) + 2 * pad
    canvas = np.zeros((height, width), np.uint8)
    font.draw_glyph_to_bitmap(canvas, pad - math.floor(x_min), pad, glyph)
    if not canvas.any():
        return None
    if canvas[:pad].any() or canvas[-pad:].any() or canvas[:, :pad].any() \
            or canvas[:, -pad:].any():  # the margin must stay clear or the glyph was cut
        raise RuntimeError(f"glyph {code} of {font.fname} overflows its canvas")
    cols = np.nonzero(canvas.any(axis=0))[0]
    baseline = pad + math.ceil(y_max)
    return canvas.astype(np.float64) / 255.0, baseline, (cols[0] + cols[-1]) / 2.0


def _sources(chars: tuple[str, ...]) -> dict[tuple[str, str], tuple[np.ndarray, float, float]]:
    """Every (font name, character) source that renders; iteration in sorted font order."""
    out = {}
    for name in font_names():
        font = _open_font(name)
        for char in chars:
            code = _char_code(name, font, char)
            source = None if code is None else _render_source(font, code)
            if source is not None:
                out[name, char] = source
    return out


# ---------------------------------------------------------------------------------------------
# Distortion and resampling (float64 elementwise arithmetic and fixed-order sums: exact).

_SUB = (np.arange(IMAGE_SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5  # sub-pixel centres
_ANCHOR_OUT = np.array([BASELINE_ROW - CAP_HEIGHT_PX / 2, (IMAGE_SIZE - 1) / 2])


def _bilinear(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Samples ``image`` at fractional (rows, cols); zero outside."""
    height, width = image.shape
    padded = np.pad(image, 2)
    # Clipped coordinates land in the two-pixel zero border, never on the edge pixels.
    rows = np.clip(rows + 2.0, 0.0, height + 2.0)
    cols = np.clip(cols + 2.0, 0.0, width + 2.0)
    r0 = np.floor(rows).astype(np.intp)
    c0 = np.floor(cols).astype(np.intp)
    fr, fc = rows - r0, cols - c0
    return ((padded[r0, c0] * (1 - fc) + padded[r0, c0 + 1] * fc) * (1 - fr)
            + (padded[r0 + 1, c0] * (1 - fc) + padded[r0 + 1, c0 + 1] * fc) * fr)


def _resample(source: np.ndarray, baseline: float, centre: float,
              inverse: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Renders a source through the output->glyph map ``inverse`` into [IMAGE_SIZE]^2 floats.

    An output point q maps to the glyph point ``inverse @ (q - anchor - shift)`` (output
    pixels, relative to the middle of the cap height), then to supersampled source pixels.
    """
    dr = (_SUB[:, None] - _ANCHOR_OUT[0] - shift[0])
    dc = (_SUB[None, :] - _ANCHOR_OUT[1] - shift[1])
    src_r = (inverse[0, 0] * dr + inverse[0, 1] * dc) * SUPERSAMPLE
    src_c = (inverse[1, 0] * dr + inverse[1, 1] * dc) * SUPERSAMPLE
    fine = _bilinear(source, src_r + (baseline - CAP_HEIGHT_PX * SUPERSAMPLE / 2),
                     src_c + centre)
    fine = fine.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE)
    total = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    for i in range(SUPERSAMPLE):  # explicit order: no SIMD-dependent reduction
        for j in range(SUPERSAMPLE):
            total = total + fine[:, i, :, j]
    return total / (SUPERSAMPLE * SUPERSAMPLE)


def _dilate(source: np.ndarray, radius: int) -> np.ndarray:
    """Grayscale dilation (a max filter) with a (2 radius + 1)^2 window; radius 0: identity."""
    if radius == 0:
        return source
    padded = np.pad(source, radius)
    height, width = source.shape
    windows = [padded[i:i + height, j:j + width]
               for i in range(2 * radius + 1) for j in range(2 * radius + 1)]
    return np.max(windows, axis=0)


def _random_inverse(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of a random glyph->output affine map (rows, cols) and a random shift."""
    angle = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    scale = rng.uniform(*SCALE_RANGE)
    log_aspect = rng.uniform(-MAX_LOG_ASPECT, MAX_LOG_ASPECT)
    shear = rng.uniform(-MAX_SHEAR, MAX_SHEAR)
    shift = rng.uniform(-MAX_SHIFT_PX, MAX_SHIFT_PX, size=2)
    # math.cos/sin/exp on Python floats: no vectorised libm variant can change a bit.
    cos, sin = math.cos(angle), math.sin(angle)
    s_row, s_col = scale * math.exp(log_aspect / 2), scale * math.exp(-log_aspect / 2)
    rotation = np.array([[cos, -sin], [sin, cos]])
    shearing = np.array([[1.0, 0.0], [shear, 1.0]])  # col += shear * row: slant
    forward = rotation @ shearing @ np.diag([s_row, s_col])
    det = forward[0, 0] * forward[1, 1] - forward[0, 1] * forward[1, 0]
    inverse = np.array([[forward[1, 1], -forward[0, 1]], [-forward[1, 0], forward[0, 0]]]) / det
    return inverse, shift


def _source_rng(seed: int, char: str, font_name: str) -> np.random.Generator:
    font_key = int.from_bytes(hashlib.sha256(font_name.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, ord(char), font_key])


def _instances(source: tuple[np.ndarray, float, float], count: int,
               rng: np.random.Generator) -> np.ndarray:
    image, baseline, centre = source
    out = np.empty((count, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for k in range(count):
        inverse, shift = _random_inverse(rng)
        radius = STROKE_RADII[rng.integers(len(STROKE_RADII))]
        noise_std = rng.uniform(0.0, MAX_NOISE_STD)
        ink = _resample(_dilate(image, radius), baseline, centre, inverse, shift)
        noisy = ink * 255.0 + noise_std * rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE))
        out[k] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return out


def render_clean(chars: tuple[str, ...] = CANDIDATES) -> dict[tuple[str, str], np.ndarray]:
    """Undistorted renderings, float64 [32, 32] in [0, 1], keyed by (font name, character)."""
    identity = np.eye(2)
    return {key: _resample(image, baseline, centre, identity, np.zeros(2))
            for key, (image, baseline, centre) in _sources(chars).items()}


def find_lookalikes(tol: float = LOOKALIKE_TOL,
                    clean: dict[tuple[str, str], np.ndarray] | None = None) -> dict[str, str]:
    r"""Recomputes the look-alike groups among :data:`CANDIDATES` (see the module docstring).

    .. math:: a \sim b \iff \operatorname{median}_{f}\,
        \frac{\sum |x_{f,a} - x_{f,b}|}{\sum x_{f,a} + \sum x_{f,b}} < \mathrm{tol}

    over the fonts f rendering both; groups are connected components and keep their first
    member in candidate order.

    Args:
      tol: the median normalised L1 distance below which two characters are look-alikes.
      clean: optional output of :func:`render_clean` (to reuse a rendering).

    Returns:
      Dropped character -> kept representative (what :data:`LOOKALIKES` freezes).
    """
    clean = render_clean() if clean is None else clean
    fonts = sorted({f for f, _ in clean})
    n = len(CANDIDATES)
    dists = [[[] for _ in range(n)] for _ in range(n)]
    for font in fonts:
        idx = [i for i, c in enumerate(CANDIDATES) if (font, c) in clean]
        x = np.stack([clean[font, CANDIDATES[i]].ravel() for i in idx])
        mass = x.sum(axis=1)
        for a, i in enumerate(idx):
            d = np.abs(x[a + 1:] - x[a]).sum(axis=1) / (mass[a + 1:] + mass[a])
            for b, j in enumerate(idx[a + 1:]):
                dists[i][j].append(d[b])
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if dists[i][j] and np.median(dists[i][j]) < tol:
                ri, rj = root(i), root(j)
                parent[max(ri, rj)] = min(ri, rj)  # the earlier candidate represents
    return {CANDIDATES[i]: CANDIDATES[root(i)] for i in range(n) if root(i) != i}


# ---------------------------------------------------------------------------------------------
# Generation, cache and loading.


def _generation_params(instances_per_font: int, seed: int) -> dict[str, Any]:
    import matplotlib
    return dict(
        version=GLYPHS_VERSION, matplotlib=matplotlib.__version__,
        instances_per_font=instances_per_font, seed=seed, image_size=IMAGE_SIZE,
        supersample=SUPERSAMPLE, cap_height_px=CAP_HEIGHT_PX, baseline_row=BASELINE_ROW,
        min_fonts=MIN_FONTS, rotation=MAX_ROTATION_DEG, scale=SCALE_RANGE,
        log_aspect=MAX_LOG_ASPECT, shear=MAX_SHEAR, shift=MAX_SHIFT_PX,
        stroke_radii=STROKE_RADII, noise_std=MAX_NOISE_STD, classes="".join(CLASS_NAMES),
        fonts=font_names())


def cache_path(cache_dir: str | os.PathLike | None = None, *,
               instances_per_font: int = DEFAULT_INSTANCES_PER_FONT, seed: int = 0) -> str:
    """``<cache_dir>/glyphs-<hash of the generation parameters>.npz``."""
    cache_dir = os.path.join("~", ".cache", "hnm") if cache_dir is None else cache_dir
    params = json.dumps(_generation_params(instances_per_font, seed), sort_keys=True)
    digest = hashlib.sha256(params.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(os.fspath(cache_dir)), f"glyphs-{digest}.npz")


def _generate(instances_per_font: int, seed: int) -> dict[str, np.ndarray]:
    """Renders the whole set: images [N, 32, 32, 1] uint8, labels [N] int32, fonts [N] int16."""
    sources = _sources(CLASS_NAMES)
    fonts = font_names()
    images, labels, font_ids = [], [], []
    for label, char in enumerate(CLASS_NAMES):
        available = [f for f in fonts if (f, char) in sources]
        if len(available) < MIN_FONTS:
            raise RuntimeError(  # the frozen class list no longer matches the installed fonts
                f"class {char!r} renders in only {len(available)} fonts (< MIN_FONTS = "
                f"{MIN_FONTS}); update CLASS_NAMES for this matplotlib version.")
        for font in available:
            rng = _source_rng(seed, char, font)
            images.append(_instances(sources[font, char], instances_per_font, rng))
            labels += [label] * instances_per_font
            font_ids += [fonts.index(font)] * instances_per_font
    # A fixed seeded row order: any prefix (a capped loader) is a uniform sample of classes
    # and fonts, not the first few classes.
    order = np.random.default_rng([seed, ROW_ORDER_KEY]).permutation(len(labels))
    return dict(images=np.concatenate(images)[order][..., None],
                labels=np.asarray(labels, np.int32)[order],
                fonts=np.asarray(font_ids, np.int16)[order],
                font_names=np.asarray(fonts))


def _load_all(cache_dir: str | os.PathLike | None, instances_per_font: int,
              seed: int) -> dict[str, np.ndarray]:
    _check_instances(instances_per_font)
    _check_seed(seed)
    path = cache_path(cache_dir, instances_per_font=instances_per_font, seed=seed)
    if os.path.exists(path):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    arrays = _generate(instances_per_font, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Write then rename: concurrent test workers never see a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return arrays


def load_glyphs(split: str = "train", cache_dir: str | os.PathLike | None = None, *,
                instances_per_font: int = DEFAULT_INSTANCES_PER_FONT,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The glyph set, or its class-disjoint ``split``; generated once, then read from cache.

    Args:
      split: "train" (even class ids), "test" (odd class ids) or "all".
      cache_dir: directory of the ``glyphs-<hash>.npz`` cache (default ``~/.cache/hnm``).
      instances_per_font: distorted images per (character, font); 5 gives 13,720 images.
      seed: seeds the distortions (not the split, which is fixed).

    Returns:
      ``(images, labels)``: uint8 [N, 32, 32, 1] (ink is bright) and int32 [N] global class
      ids (``class_names()[label]``), in a fixed seeded random order (so a prefix is a
      uniform sample over classes and fonts).

    Raises:
      ValueError: for an unknown ``split`` or a bad ``instances_per_font`` or ``seed``.

    Examples:
      >>> images, labels = load_glyphs("test")  # doctest: +SKIP
      >>> images.shape, sorted(set(labels.tolist())) == list(TEST_CLASSES)  # doctest: +SKIP
      ((6820, 32, 32, 1), True)
    """
    _check_split(split)
    data = _load_all(cache_dir, instances_per_font, seed)
    keep = np.isin(data["labels"], split_classes(split))
    return data["images"][keep], data["labels"][keep]


# ---------------------------------------------------------------------------------------------
# The raw-pixel floor and a contact sheet.


def recall_at_1(features: np.ndarray, labels: np.ndarray, block: int = 2048) -> float:
    r"""Leave-one-out R@1 with cosine similarity, brute force in NumPy.

    .. math:: \mathrm{R@1} = \frac{1}{N}\sum_i
        \bigl[y_{\arg\max_{j \ne i} \hat f_i \cdot \hat f_j} = y_i\bigr]

    Args:
      features: [N, D] floats (L2-normalised here; zero rows stay zero).
      labels: [N] integers.
      block: query rows per matrix product (memory bound).

    Returns:
      The fraction of queries whose most similar other sample shares their label.

    Raises:
      ValueError: if the shapes disagree or N < 2.

    Examples:
      >>> recall_at_1(np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), np.array([0, 0, 1]))
      0.6666666666666666
    """
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"`features` must be [N, D] with N >= 2; got {features.shape}.")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"`labels` must have shape ({features.shape[0]},); got "
                         f"{labels.shape}.")
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = features / np.maximum(norms, 1e-12)
    hits = 0
    for start in range(0, len(unit), block):
        sim = unit[start:start + block] @ unit.T
        rows = np.arange(sim.shape[0])
        sim[rows, start + rows] = -np.inf  # leave the query itself out
        hits += int((labels[sim.argmax(axis=1)] == labels[start:start + block]).sum())
    return hits / len(unit)


def raw_pixel_recall_at_1(split: str = "test", cache_dir: str | os.PathLike | None = None, *,
                          instances_per_font: int = DEFAULT_INSTANCES_PER_FONT,
                          seed: int = 0) -> float:
    """Leave-one-out R@1 of raw pixels (flattened, L2-normalised) on ``split``: the floor.

    Measured at the defaults with matplotlib 3.11.2: 0.752 (test), 0.741 (train).
    """
    images, labels = load_glyphs(split, cache_dir, instances_per_font=instances_per_font,
                                 seed=seed)
    return recall_at_1(images.reshape(len(images), -1), labels)


def plot_samples(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
                 classes: tuple[int, ...] | None = None, max_fonts: int = 22,
                 instances_per_font: int = DEFAULT_INSTANCES_PER_FONT, seed: int = 0) -> str:
    """Saves a contact sheet: one row per class, one column per font (its first instance).

    Args:
      path: the PNG to write.
      cache_dir: as in :func:`load_glyphs`.
      classes: class ids to show (default: 16 spread over all scripts).
      max_fonts: at most this many font columns.
      instances_per_font: as in :func:`load_glyphs`.
      seed: as in :func:`load_glyphs`.

    Returns:
      ``path`` as a string.
    """
    import matplotlib
    matplotlib.use("Agg")  # no display needed; a no-op once a backend is in use
    import matplotlib.pyplot as plt

    data = _load_all(cache_dir, instances_per_font, seed)
    classes = tuple(np.linspace(0, NUM_CLASSES - 1, 16).astype(int)) if classes is None \
        else classes
    fonts = [str(f) for f in data["font_names"]][:max_fonts]
    fig, axes = plt.subplots(len(classes), len(fonts), squeeze=False,
                             figsize=(0.55 * len(fonts) + 1.2, 0.6 * len(classes) + 1.0))
    for row, label in enumerate(classes):
        for col, _ in enumerate(fonts):
            ax = axes[row, col]
            hit = np.nonzero((data["labels"] == label) & (data["fonts"] == col))[0]
            if hit.size:
                ax.imshow(data["images"][hit[0], ..., 0], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"{label}: {CLASS_NAMES[label]}", rotation=0, ha="right",
                              va="center", fontsize=7)
            if row == 0:
                ax.set_title(fonts[col].removesuffix(".ttf"), rotation=90, fontsize=6)
    fig.savefig(os.fspath(path), dpi=100, bbox_inches="tight")
    plt.close(fig)
    return os.fspath(path)
