"""Candidate pairs of codes by a join of band values, vectorised with numpy.

A pair (query row ``q``, data row ``d``) is a candidate when some band of the two codes is within
``probe_radius`` bits, and it is kept when the whole codes are within ``max_distance`` bits: what
probing a band index at that radius with every query code finds (each query band value and its
flips looked up in the data's sorted band values). Each pair comes once, from its first band
within the radius, and only in one direction (``q_keys[q] < d_keys[d]``), so a join of a set of
codes with itself yields every unordered pair once.

The one implementation of this join: dedup's candidate pairs (:class:`imgstore.dedup.IndexPairs`)
and the batch pairs over shards (:func:`imgstore.batch.pairs_block`) both call :func:`band_join`,
so a cluster finds exactly the candidates one process does. Pure numpy, no database.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import numpy.typing as npt

from .errors import ConfigError
from .hashing.bits import as_words, band_values

#: Candidate (query, data) entries gathered at once for one band value and flip: bounds the
#: join's memory whatever the buckets' sizes (a crowd of near-identical codes).
JOIN_HELD = 1 << 22


#: A piece of a join's result: query rows, data rows, their codes' Hamming distances.
Piece = tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.int64]]


def flip_masks(band_width: int, radius: int) -> list[int]:
    """XOR masks of every band value within ``radius`` bits (radius 0 first)."""
    return [sum(1 << b for b in bits) for r in range(radius + 1) for bits in combinations(range(band_width), r)]


@dataclass(frozen=True)
class BandTable:
    """The data side of a join: ``n`` codes' band values ``bands (n, n_bands)`` int64, their
    words ``(n, n_words)`` uint64, and per band the rows sorted by value, ``order (n_bands, n)``,
    with the values in that order, ``sorted_values (n_bands, n)`` (any integer dtype)."""

    bands: npt.NDArray[np.int64]
    words: npt.NDArray[np.uint64]
    order: npt.NDArray[np.integer]
    sorted_values: npt.NDArray[np.integer]

    @classmethod
    def build(cls, codes: npt.NDArray[np.uint8], n_bands: int, band_width: int) -> BandTable:
        """The table of packed codes ``(n, n_bytes)`` uint8."""
        bands = band_values(codes, n_bands, band_width) if len(codes) else np.zeros((0, n_bands), np.int64)
        order = np.argsort(bands, axis=0, kind="stable").T  # equal values keep row order
        return cls(bands, np.ascontiguousarray(as_words(codes)), np.ascontiguousarray(order),
                   np.ascontiguousarray(np.take_along_axis(bands, order.T, 0).T))

    def __len__(self) -> int:
        return len(self.bands)


def band_join(q_bands: npt.NDArray[np.int64], q_words: npt.NDArray[np.uint64], q_keys: npt.NDArray[np.int64],
              data: BandTable, d_keys: npt.NDArray[np.int64], band_width: int, probe_radius: int,
              max_distance: int, held: int = JOIN_HELD) -> Iterator[Piece]:
    """Candidate pairs of query rows ``(len(q_bands),)`` and ``data``'s rows (see the module):
    yields pieces ``(query rows, data rows, Hamming distances)``, in no particular order; each
    piece holds at most ``held`` entries before the distance filter (or one query row's)."""
    if not 0 <= probe_radius <= band_width:
        raise ConfigError(f"radius must be between 0 and band_width={band_width}, got {probe_radius}")
    m = q_bands.shape[1]
    if not len(q_bands) or not len(data):
        return
    flips = flip_masks(band_width, probe_radius)
    for j in range(m):
        sorted_j = data.sorted_values[j]
        for f in flips:
            v = (q_bands[:, j] ^ f).astype(sorted_j.dtype)
            lo = np.searchsorted(sorted_j, v, "left")
            sizes = np.searchsorted(sorted_j, v, "right") - lo
            ends = np.cumsum(sizes)
            if not len(ends) or not ends[-1]:
                continue
            # query rows in slices of at most ``held`` entries (a slice holds one row at least)
            first = 0
            while first < len(sizes):
                base = ends[first - 1] if first else 0
                last = max(int(np.searchsorted(ends, base + held, "right")), first + 1)
                total = int(ends[last - 1] - base)
                if total:
                    part = sizes[first:last]
                    qi = np.repeat(np.arange(first, last), part)
                    offsets = np.arange(total) - np.repeat(ends[first:last] - part - base, part)
                    di = data.order[j][np.repeat(lo[first:last], part) + offsets].astype(np.intp)
                    keep = q_keys[qi] < d_keys[di]  # each pair once
                    qi, di = qi[keep], di[keep]
                    if j:  # found once: at the first band within the probe radius
                        earlier = np.bitwise_count(q_bands[qi, :j] ^ data.bands[di, :j]) <= probe_radius
                        found = ~earlier.any(axis=1)
                        qi, di = qi[found], di[found]
                    dist = np.bitwise_count(q_words[qi] ^ data.words[di]).sum(axis=1, dtype=np.int64)
                    near = dist <= max_distance
                    yield qi[near], di[near], dist[near]
                first = last
