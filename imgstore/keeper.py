"""Which copy of a duplicate group to keep.

The default rule, ``original``, prefers the copy least likely to have been derived from another:

1. the most picture: width x height, less a uniform border that rotating or padding a copy
   added around the picture (counted only on a canvas larger than another member's, and
   only when the border accounts for the extra area over one of them, since rotation keeps the picture's area:
   so a copy rotated with ``expand`` does not win on its larger canvas, and a picture's own
   plain background is never taken for a border); compared in 2% steps;
2. lossless over lossy (a PNG or TIFF over the JPEG re-encoded from it);
3. the least processed: no added border;
4. the earliest capture time (EXIF), where known;
5. the largest file, then the lowest id.

Other rules (``--keep``): ``largest`` (most pixels, then the largest file: the rule before
this one), ``oldest`` / ``newest`` (capture time, else first seen), ``smallest`` (fewest bytes).

The border is measured on the file, decoded small, only for members of near-copy groups whose
canvas is larger than another member's. It counts only when it has a rotation's shape: the four
corners share one colour and each corner's fill is a right triangle with a straight hypotenuse,
adjacent hypotenuses at right angles (the rotated picture's edges) and opposite triangles
congruent (a rotation about the centre). A picture's own plain, starry or round-on-black
background is thereby not taken for a border, even where its area happens to match a crop's in
the group (the demo's ``logo`` and ``hubble_deep_field`` once kept a rotated JPEG over the PNG
original). A corner lost in a dark part of the picture is taken from its opposite. Padding
(whole rows or columns of one colour) is not told apart from a plain background on one image,
so a padded copy is not recognised as such.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt

from .decode import load_fitted
from .errors import ConfigError

log = logging.getLogger(__name__)

RULES = ("original", "largest", "oldest", "newest", "smallest")
#: Formats that store pixels exactly.
LOSSLESS = frozenset({"PNG", "TIFF", "BMP", "PPM", "PGM", "PBM", "QOI", "TGA", "GIF", "ICO", "SGI", "PCX", "DIB"})
#: Side of the thumbnail the border is measured on, and the colour tolerance (0-255).
BORDER_SIDE = 128
BORDER_TOLERANCE = 10
EDGE = 3
#: A border under this share of the picture is noise (JPEG ringing at a dark corner).
MIN_BORDER = 0.01
#: How far (pixels at BORDER_SIDE, mean) a corner triangle's edge may stray from a straight line,
#: and how far from a right angle (as a ratio of tangents) two adjacent triangles' edges may be.
TRIANGLE_STRAIGHT = 1.5
TRIANGLE_STRAIGHT_SHARE = 0.02
TRIANGLE_RIGHT_ANGLE = 1.6
#: Picture areas within this ratio count as equal.
AREA_STEP = 0.02
#: How closely a border must account for a canvas's extra area to count as added.
BORDER_MATCH = 0.08
#: The version of the border measure (:func:`measure_border`): a measure is a property of a
#: file's content, so a store keeps it (``images.border_fraction``) with this version and a
#: measure of another version is taken again. Bump it whenever the measure's result changes.
#: 2: a HEIC is measured on its embedded thumbnail when that covers BORDER_SIDE.
BORDER_VERSION = 2


@dataclass(frozen=True)
class Candidate:
    image_id: int
    width: int
    height: int
    format: str | None
    byte_size: int
    captured_at: datetime | None
    ingested_at: datetime | None
    path: str | None  # a current path to measure the border on (None: unknown, no border)


def border_fraction(path: str | None, max_pixels: int | None = None) -> float:
    """Share of the image that is a rotation's border: four corner triangles of one uniform
    colour whose long edges are straight and at right angles to each other (the rotated
    picture's edges). 0 when the corners disagree, when a corner's fill is not such a triangle
    (a picture's own plain or starry background, a round picture on black), or unreadable."""
    return measure_border(path, max_pixels) or 0.0


def measure_border(path: str | None, max_pixels: int | None = None) -> float | None:
    """:func:`border_fraction`, or None when there is no file to measure (no path, a file that
    moved or broke, one over ``max_pixels``): a None is about the file's whereabouts, not its
    content, so it is not kept."""
    if path is None:
        return None
    try:
        img = load_fitted(path, BORDER_SIDE, max_pixels=max_pixels)  # a HEIC's own thumbnail serves
    except Exception as exc:  # noqa: BLE001 - a file that moved or broke just gets no border
        log.debug("border of %s: %s", path, exc)
        return None
    return rotation_border(np.asarray(img.convert("L"), dtype=np.int16))


class Borders:
    """Border fractions by image id, each measured once: the ones ``known`` (kept by an earlier
    run, of :data:`BORDER_VERSION`) are used as they are, the others measured on their files;
    what was measured is also in ``fresh``, for the caller to keep. One per search: a path is
    read as it is now."""

    def __init__(self, known: dict[int, float] | None = None, max_pixels: int | None = None) -> None:
        self.known: dict[int, float] = dict(known or {})
        self.fresh: dict[int, float] = {}
        self.max_pixels = max_pixels

    def of(self, c: Candidate) -> float:
        got = self.known.get(c.image_id)
        if got is None:
            got = measure_border(c.path, self.max_pixels)
            if got is None:
                return 0.0
            self.known[c.image_id] = self.fresh[c.image_id] = got
        return got


def rotation_border(a: npt.NDArray[np.int16]) -> float:
    """:func:`border_fraction` of a greyscale image (h, w)."""
    h, w = a.shape
    if h < 4 * EDGE or w < 4 * EDGE:
        return 0.0
    corners = np.array([a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]])
    if corners.max() - corners.min() > BORDER_TOLERANCE:
        return 0.0
    fill = np.abs(a - int(np.median(corners))) <= BORDER_TOLERANCE
    inner = fill[EDGE:-EDGE, EDGE:-EDGE]  # a rotated picture's corner may vanish from the outermost rows at this size
    if inner.all(axis=1).any() or inner.all(axis=0).any():
        # a whole row or column of it: a plain background (a logo on white, a night sky) or
        # padding, which no measure on one image tells apart; only rotation borders count
        return 0.0
    found = [_triangle(fill[::dy, ::dx]) for dy, dx in ((1, 1), (1, -1), (-1, -1), (-1, 1))]  # TL, TR, BR, BL
    # a rotation about the centre leaves opposite corners congruent triangles: a corner lost in
    # a part of the picture of the border's colour is taken from its opposite (each opposite
    # pair needs one), and where both were found they must agree
    tris = [t if t is not None else found[(i + 2) % 4] for i, t in enumerate(found)]
    legs = [t for t in tris if t is not None]
    if len(legs) < 4:
        return 0.0
    for t, u in zip(legs[:2], legs[2:]):
        if not (_close(t.across, u.across) and _close(t.down, u.down)):
            return 0.0
    # around the corners the hypotenuses follow the picture's edges in turn, at right angles:
    # a rotation by t gives slopes (vertical over horizontal leg) tan t, cot t, tan t, cot t
    for t, u in zip(legs, legs[1:] + legs[:1]):
        if abs(np.log(t.slope * u.slope)) > np.log(TRIANGLE_RIGHT_ANGLE):
            return 0.0
    frac = sum(t.area for t in legs) / (h * w)
    return float(frac) if frac >= MIN_BORDER else 0.0


@dataclass(frozen=True)
class _Triangle:
    across: float  # horizontal leg, pixels
    down: float  # vertical leg
    area: float  # pixels of fill inside it

    @property
    def slope(self) -> float:
        return self.down / self.across


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= max(2.0, 0.2 * max(a, b))


def _triangle(fill: npt.NDArray[np.bool_]) -> _Triangle | None:
    """The fill triangle at the top-left corner of ``fill``, or None when the fill there is no
    right triangle with a straight hypotenuse."""
    h, w = fill.shape
    across = np.where(fill.all(axis=1), w, np.argmin(fill, axis=1))  # fill run from the left, per row
    down = np.where(fill.all(axis=0), h, np.argmin(fill, axis=0))  # fill run from the top, per column
    # legs from the runs just inside the corner (JPEG and anti-aliasing blur the outermost pixels)
    x, y = float(np.median(across[:EDGE])), float(np.median(down[:EDGE]))
    if x < 1 or y < 1 or (x >= w / 2 and y >= h / 2):
        return None
    # the runs along the longer leg must fall on the straight line between the legs' ends
    long, short, runs = (y, x, across) if y >= x else (x, y, down)
    n = int(long)
    ideal = short * (1 - np.arange(n) / long)
    if n < 2:
        return None
    # the picture's own pixels of the border's colour may lengthen runs past the edge, never
    # shorten them: a run well short of the line (a star, a curve bulging into the corner) is no
    # straight edge, and most runs must lie on the line
    off = runs[:n] - ideal
    tolerance = TRIANGLE_STRAIGHT + TRIANGLE_STRAIGHT_SHARE * long
    if (off < -tolerance).mean() > 0.1 or (np.abs(off) <= tolerance).mean() < 0.5:
        return None
    return _Triangle(x, y, float(runs[:n].sum()))


def choose(candidates: Sequence[Candidate], rule: str = "original", max_pixels: int | None = None,
           borders: Borders | None = None) -> int:
    """The image id to keep among ``candidates`` under ``rule``; files are decoded (to measure
    borders) up to ``max_pixels`` (None: the process's limit), except those whose border
    ``borders`` knows already (and it keeps what was measured)."""
    if rule not in RULES:
        raise ConfigError(f"unknown keeper rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "largest":
        return max(candidates, key=lambda c: (c.width * c.height, c.byte_size, -c.image_id)).image_id
    if rule == "smallest":
        return min(candidates, key=lambda c: (c.byte_size, c.image_id)).image_id
    if rule in ("oldest", "newest"):
        sign = 1.0 if rule == "oldest" else -1.0  # a copy with no time at all comes last either way

        def when(c: Candidate) -> tuple[float, int]:
            t = c.captured_at or c.ingested_at
            return (sign * t.timestamp() if t is not None else float("inf"), c.image_id)

        return min(candidates, key=when).image_id
    added = _added_borders(candidates, borders if borders is not None else Borders(max_pixels=max_pixels))

    def key(c: Candidate) -> tuple[object, ...]:
        picture = c.width * c.height * (1.0 - added[c.image_id])
        captured = -c.captured_at.timestamp() if c.captured_at is not None else float("-inf")
        return (round(np.log(max(picture, 1.0)) / np.log1p(AREA_STEP)), (c.format or "").upper() in LOSSLESS,
                added[c.image_id] == 0.0, captured, c.byte_size, -c.image_id)

    return max(candidates, key=key).image_id


def _added_borders(candidates: Sequence[Candidate], borders: Borders) -> dict[int, float]:
    """Per candidate, the share of its canvas that is a border added around the picture: only a
    canvas larger than another member's can hide one, and only a uniform border that accounts
    for the extra canvas over some smaller member (rotating a picture onto a bigger canvas keeps
    its area, so the border is 1 - smaller area / larger area) counts. A picture's own uniform
    background (a logo on white, a night sky) is thereby never mistaken for one. Any smaller
    member, not only the smallest: a group may also hold crops, smaller than the picture."""
    areas = [c.width * c.height for c in candidates]
    out = {}
    for c, area in zip(candidates, areas):
        out[c.image_id] = 0.0
        smaller = [other for other in areas if area > other * (1 + AREA_STEP)]
        if smaller:
            border = borders.of(c)
            match = min(smaller, key=lambda other: abs(border - (1.0 - other / area)))
            if border > 0 and abs(border - (1.0 - match / area)) <= BORDER_MATCH:
                # the picture inside is that member's picture (a rotation keeps the area); the
                # border measured on a thumbnail is a little short of it
                out[c.image_id] = 1.0 - match / area
    return out
