"""Which copy of a duplicate group to keep.

The default rule, ``original``, prefers the copy least likely to have been derived from another:

1. the most picture: pixels that show the picture, i.e. width x height less the uniform
   border that rotating (or padding) a copy adds (rotation keeps the picture's area, so a copy
   rotated with ``expand`` does not win on its larger canvas); compared in 2% steps, so
   estimation noise does not decide;
2. lossless over lossy (a PNG or TIFF over the JPEG re-encoded from it);
3. the least processed: no added border;
4. the earliest capture time (EXIF), where known;
5. the largest file, then the lowest id.

Other rules (``--keep``): ``largest`` (most pixels, then the largest file: the rule before
this one), ``oldest`` / ``newest`` (capture time, else first seen), ``smallest`` (fewest bytes).

The border is measured on the file, decoded small, only for members of near-copy groups: rows
are scanned from both sides for pixels of the colour all four corners share.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)

RULES = ("original", "largest", "oldest", "newest", "smallest")
#: Formats that store pixels exactly.
LOSSLESS = frozenset({"PNG", "TIFF", "BMP", "PPM", "PGM", "PBM", "QOI", "TGA", "GIF", "ICO", "SGI", "PCX", "DIB"})
#: Side of the thumbnail the border is measured on, and the colour tolerance (0-255).
BORDER_SIDE = 128
BORDER_TOLERANCE = 10
#: A border under this share of the picture is noise (JPEG ringing at a dark corner).
MIN_BORDER = 0.01
#: Picture areas within this ratio count as equal.
AREA_STEP = 0.02


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


def border_fraction(path: str | None) -> float:
    """Share of the image that is a uniform border (0 when the corners disagree, or unreadable)."""
    if path is None:
        return 0.0
    from .decode import load_image

    try:
        img = load_image(path, draft_size=(BORDER_SIDE, BORDER_SIDE)).image
    except Exception as exc:  # noqa: BLE001 - a file that moved or broke just gets no border
        log.debug("border of %s: %s", path, exc)
        return 0.0
    img.thumbnail((BORDER_SIDE, BORDER_SIDE))
    a = np.asarray(img.convert("L"), dtype=np.int16)
    h, w = a.shape
    if h < 4 or w < 4:
        return 0.0
    corners = np.array([a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]])
    if corners.max() - corners.min() > BORDER_TOLERANCE:
        return 0.0
    fill = np.abs(a - int(np.median(corners))) <= BORDER_TOLERANCE
    full = fill.all(axis=1)
    lead = np.where(full, w, np.argmin(fill, axis=1))  # first non-fill pixel from the left
    trail = np.where(full, 0, np.argmin(fill[:, ::-1], axis=1))
    frac = float(np.minimum(lead + trail, w).sum()) / (h * w)
    return frac if frac >= MIN_BORDER else 0.0


def choose(candidates: Sequence[Candidate], rule: str = "original") -> int:
    """The image id to keep among ``candidates`` under ``rule``."""
    if rule not in RULES:
        raise ConfigError(f"unknown keeper rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "largest":
        return max(candidates, key=lambda c: (c.width * c.height, c.byte_size, -c.image_id)).image_id
    if rule == "smallest":
        return min(candidates, key=lambda c: (c.byte_size, c.image_id)).image_id
    if rule in ("oldest", "newest"):
        def when(c: Candidate) -> float:
            t = c.captured_at or c.ingested_at
            return t.timestamp() if t is not None else float("inf")
        if rule == "oldest":
            return min(candidates, key=lambda c: (when(c), c.image_id)).image_id
        return max(candidates, key=lambda c: (when(c) if when(c) != float("inf") else float("-inf"), -c.image_id)).image_id
    borders = {c.image_id: border_fraction(c.path) for c in candidates}

    def key(c: Candidate) -> tuple[object, ...]:
        picture = c.width * c.height * (1.0 - borders[c.image_id])
        captured = -c.captured_at.timestamp() if c.captured_at is not None else float("-inf")
        return (round(np.log(max(picture, 1.0)) / np.log1p(AREA_STEP)), (c.format or "").upper() in LOSSLESS,
                borders[c.image_id] == 0.0, captured, c.byte_size, -c.image_id)

    return max(candidates, key=key).image_id
