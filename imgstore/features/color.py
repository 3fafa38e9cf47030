"""A fast handcrafted descriptor: colour, shape and texture histograms (pure numpy).

No weights, hundreds of images per second. Far weaker than CNN features for semantic search, but
good for near-duplicates and colour/layout queries, and a baseline for the benchmarks.

Layout (dim = 464), every block L1-normalised, square-rooted (Hellinger), the whole L2-normalised:
- 128: joint HSV histogram of the whole image (8 hue x 4 saturation x 4 value bins);
- 128: HSV histograms of the 4 quadrants (8 hue x 2 saturation x 2 value bins each);
- 128: gradient orientation histograms (8 unsigned orientations, magnitude-weighted) on a 4x4 grid
  (shape);
- 80: texture: rotation-invariant uniform local binary patterns (Ojala et al. 2002, "riu2": 8
  neighbours, 10 codes) at radius 1 and 2 on a 2x2 grid. Each pixel's code says how many of its
  neighbours are at least as bright when they form one arc (edges, corners, spots, flat), else
  "non-uniform"; the histogram of codes is invariant to monotonic brightness changes and, being
  rotation-invariant per pixel, changes little when the photo is rotated.
Version 2 added the texture block; a store made with version 1 is told to re-extract.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image

from .base import stack_preprocessed

_SIZE = 64
_EPS = 1e-12


def _hsv_hist(hsv: npt.NDArray[np.uint8], bins: tuple[int, int, int]) -> npt.NDArray[np.float32]:
    h = (hsv[..., 0].astype(np.int32) * bins[0]) >> 8
    s = (hsv[..., 1].astype(np.int32) * bins[1]) >> 8
    v = (hsv[..., 2].astype(np.int32) * bins[2]) >> 8
    idx = (h * bins[1] + s) * bins[2] + v
    return np.bincount(idx.ravel(), minlength=bins[0] * bins[1] * bins[2]).astype(np.float32)


def _hellinger(block: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = np.sqrt(block / max(float(block.sum()), _EPS))
    return out


#: the 8 neighbours in circular order (unit steps; scaled by the radius)
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _riu2_table() -> npt.NDArray[np.intp]:
    """riu2 code of each 8-bit neighbour pattern (bit i = neighbour i of :data:`_RING`): the
    number of set bits when the circular pattern has at most 2 transitions, else 9."""
    out = np.empty(256, dtype=np.intp)
    for p in range(256):
        bits = [(p >> i) & 1 for i in range(8)]
        transitions = sum(bits[i] != bits[i - 1] for i in range(8))
        out[p] = sum(bits) if transitions <= 2 else 9
    return out


_RIU2 = _riu2_table()
_CELLS: dict[tuple[int, int, int], npt.NDArray[np.intp]] = {}


def _lbp_grid(gray: npt.NDArray[np.float32], radius: int) -> npt.NDArray[np.float32]:
    """Histograms of riu2 LBP codes (0..8 uniform, 9 non-uniform) on a 2x2 grid: (40,).

    Each pixel's 8 comparisons are packed into a byte and mapped through a 256-entry table."""
    h, w = gray.shape
    centre = gray[radius : h - radius, radius : w - radius]
    pattern = np.zeros(centre.shape, dtype=np.uint8)
    for bit, (dy, dx) in enumerate(_RING):
        neighbour = gray[radius + dy * radius : h - radius + dy * radius, radius + dx * radius : w - radius + dx * radius]
        pattern |= (neighbour >= centre).view(np.uint8) << np.uint8(bit)
    cells = _CELLS.get((h, w, radius))
    if cells is None:
        rows = (np.arange(radius, h - radius)[:, None] * 2) // h
        cols = (np.arange(radius, w - radius)[None, :] * 2) // w
        cells = _CELLS[(h, w, radius)] = ((rows * 2 + cols) * 10).ravel()
    return np.bincount(cells + _RIU2[pattern.ravel()], minlength=40).astype(np.float32)


class ColorExtractor:
    """Colour + gradient + texture histogram descriptor, 464-d float32; ``preprocess`` does all the work."""

    name = "color"
    dim = 464
    preprocess_version = "hsv8x4x4-q8x2x2-hog8g4-lbp10r12g2-s64-v2"
    draft_size: tuple[int, int] | None = (2 * _SIZE, 2 * _SIZE)
    thumbnail_size: tuple[int, int] | None = (_SIZE, _SIZE)

    def __repr__(self) -> str:
        return "ColorExtractor()"

    def preprocess(self, img: Image.Image) -> npt.NDArray[np.float32]:
        """RGB image -> (464,) float32 descriptor (thread-safe; numpy and Pillow release the GIL)."""
        small = img.convert("RGB").resize((_SIZE, _SIZE), Image.Resampling.BILINEAR)
        hsv = np.asarray(small.convert("HSV"), dtype=np.uint8)
        half = _SIZE // 2
        parts = [_hellinger(_hsv_hist(hsv, (8, 4, 4)))]
        for r in (0, half):
            for c in (0, half):
                parts.append(_hellinger(_hsv_hist(hsv[r : r + half, c : c + half], (8, 2, 2))))
        gray = np.asarray(small.convert("L"), dtype=np.float32)
        gy, gx = np.gradient(gray)
        magnitude = np.hypot(gx, gy)
        angle = np.mod(np.arctan2(gy, gx), np.pi)  # unsigned orientation, 0..pi
        obin = np.minimum((angle * (8 / np.pi)).astype(np.int32), 7)
        cell = _SIZE // 4
        cell_id = (np.arange(_SIZE)[:, None] // cell) * 4 + (np.arange(_SIZE)[None, :] // cell)
        hog = np.bincount((cell_id * 8 + obin).ravel(), weights=magnitude.ravel(), minlength=128)
        parts.append(_hellinger(hog.astype(np.float32)))
        parts.append(_hellinger(np.concatenate([_lbp_grid(gray, r) for r in (1, 2)])))
        out = np.concatenate(parts).astype(np.float32)
        return out / max(float(np.linalg.norm(out)), _EPS)

    def extract_arrays(self, batch: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        """(n, 464) descriptors from ``preprocess`` -> the same, as float32."""
        arr = np.asarray(batch, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"expected a (n, {self.dim}) batch, got shape {arr.shape}")
        return arr

    def extract(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        return self.extract_arrays(stack_preprocessed(self, images))
