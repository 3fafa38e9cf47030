"""Binary codes: packing, Hamming distances, top-k by counting, and bands. Pure numpy.

Bit order (defined here once, used everywhere)
----------------------------------------------
A code of ``n_bits`` bits is stored packed as ``(n_bits // 8,)`` uint8. Bit ``i`` of the code
lives in byte ``i // 8`` at bit position ``7 - i % 8``: the first bit is the most significant
bit of the first byte. This is ``numpy.packbits``' default (``bitorder="big"``), and it means
byte strings (and the big-endian integers :func:`codes_to_int64` and :func:`band_values`
produce) compare in bit order, so ``codes[0] < codes[1]`` lexicographically iff the first
differing bit is 0 in ``codes[0]``.

Hamming distances use :func:`as_words`, a zero-padded uint64 view for XOR + popcount. Those
words are in native byte order and are for popcount only, never for ordering or storage.

Bands (multi-index hashing)
---------------------------
Band ``j`` of a code is bits ``[j * band_width, (j + 1) * band_width)`` read as an unsigned
integer, bit ``j * band_width`` the most significant. The database keys one bucket per
(index, band, value) on it (``imgstore.bandindex``). By the pigeonhole
principle two codes at Hamming distance ``< n_bands * (radius + 1)`` agree, within Hamming
``radius``, on at least one band; so looking up every band value and its
:func:`flip_neighbours` finds every code that close (Norouzi, Punjani & Fleet, "Fast search in
Hamming space with multi-index hashing", CVPR 2012).
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from imgstore.errors import ConfigError, HasherError

__all__ = [
    "MAX_BAND_WIDTH",
    "MIN_BAND_WIDTH",
    "as_words",
    "band_layout",
    "band_values",
    "band_word_masks",
    "codes_from_int64",
    "codes_to_int64",
    "default_n_bands",
    "flip_neighbours",
    "hamming_distances",
    "hamming_distances_batch",
    "pack_bits",
    "rank_candidates",
    "topk_smallest",
]

#: Band values must fit a non-negative BIGINT and keep radius-2 probing small (1 + w + w(w-1)/2).
MAX_BAND_WIDTH = 32
#: Narrower bands match so many rows per value that the prefilter stops filtering.
MIN_BAND_WIDTH = 8

CodeArray = npt.NDArray[np.uint8]
WordArray = npt.NDArray[np.uint64]


def _as_codes(codes: npt.ArrayLike) -> CodeArray:
    """Validate packed codes: (n, n_bytes) uint8; a single (n_bytes,) code becomes (1, n_bytes)."""
    arr = np.asarray(codes)
    if arr.dtype != np.uint8:
        raise HasherError(f"packed codes must be uint8, got {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise HasherError(f"packed codes must be 2-D (n, n_bytes), got shape {arr.shape}")
    return arr


# --- packing --------------------------------------------------------------------------------


def pack_bits(bits: npt.ArrayLike) -> CodeArray:
    """Pack ``bits: (n, n_bits)`` bool (or 0/1) into ``codes: (n, n_bits // 8)`` uint8.

    ``n_bits`` must be a multiple of 8, so no code carries padding bits.
    """
    arr = np.asarray(bits)
    if arr.ndim != 2:
        raise HasherError(f"bits must be 2-D (n, n_bits), got shape {arr.shape}")
    if arr.shape[1] % 8:
        raise HasherError(f"n_bits must be a multiple of 8, got {arr.shape[1]}")
    return np.packbits(arr.astype(bool, copy=False), axis=1, bitorder="big")


def as_words(codes: npt.ArrayLike) -> WordArray:
    """View codes as ``(n, ceil(n_bytes / 8))`` uint64 words, zero padded, C-contiguous.

    For XOR + popcount only (native byte order; do not sort or store these).
    """
    arr = _as_codes(codes)
    n, n_bytes = arr.shape
    n_words = -(-n_bytes // 8)
    if n_bytes == n_words * 8 and arr.flags.c_contiguous:
        return arr.view(np.uint64)
    padded = np.zeros((n, n_words * 8), dtype=np.uint8)
    padded[:, :n_bytes] = arr
    return padded.view(np.uint64)


def codes_to_int64(codes: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Codes of at most 64 bits as one signed int64 each, for a BIGINT column.

    The code is read big-endian (bit 0 is the most significant bit of the 64) and right-padded
    with zero bits, then reinterpreted as two's complement: codes whose first bit is set come out
    negative. The mapping is a bijection; :func:`codes_from_int64` inverts it.
    """
    arr = _as_codes(codes)
    n, n_bytes = arr.shape
    if n_bytes > 8:
        raise HasherError(f"codes_to_int64 needs codes of at most 64 bits, got {n_bytes * 8}")
    padded = np.zeros((n, 8), dtype=np.uint8)
    padded[:, :n_bytes] = arr
    return padded.view(">i8")[:, 0].astype(np.int64)


def codes_from_int64(values: npt.ArrayLike, n_bits: int) -> CodeArray:
    """Inverse of :func:`codes_to_int64`: ``(n,)`` int64 -> ``(n, n_bits // 8)`` uint8."""
    if n_bits % 8 or not 8 <= n_bits <= 64:
        raise HasherError(f"n_bits must be a multiple of 8 in 8..64, got {n_bits}")
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.int64).reshape(-1))
    return arr.astype(">i8").view(np.uint8).reshape(-1, 8)[:, : n_bits // 8].copy()


# --- Hamming distances ----------------------------------------------------------------------


def hamming_distances(query_words: npt.ArrayLike, db_words: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    """Hamming distance from one query to every database code.

    query_words: (n_words,) uint64, db_words: (n, n_words) uint64 (both from :func:`as_words`).
    Returns (n,) uint16 (codes are at most a few hundred bits).
    """
    q = np.asarray(query_words, dtype=np.uint64).reshape(-1)
    db = np.asarray(db_words, dtype=np.uint64)
    if db.ndim != 2 or db.shape[1] != q.shape[0]:
        raise HasherError(f"db_words must be (n, {q.shape[0]}) uint64 words, got shape {db.shape}")
    dist: npt.NDArray[np.uint16]
    if q.shape[0] == 1:
        dist = np.bitwise_count(db[:, 0] ^ q[0]).astype(np.uint16)
    else:
        dist = np.bitwise_count(db ^ q).sum(axis=1, dtype=np.uint16)
    return dist


def hamming_distances_batch(
    query_words: npt.ArrayLike, db_words: npt.ArrayLike, chunk_size: int = 256
) -> npt.NDArray[np.uint16]:
    """All-pairs Hamming distances, ``(m, n_words)`` x ``(n, n_words)`` -> ``(m, n)`` uint16.

    Works ``chunk_size`` queries at a time so the XOR temporary stays at
    ``chunk_size * n * n_words * 8`` bytes.
    """
    q = np.asarray(query_words, dtype=np.uint64)
    db = np.asarray(db_words, dtype=np.uint64)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise HasherError(f"word arrays must be (m, w) and (n, w), got {q.shape} and {db.shape}")
    out = np.empty((q.shape[0], db.shape[0]), dtype=np.uint16)
    for start in range(0, q.shape[0], chunk_size):
        block = q[start : start + chunk_size]
        x = np.bitwise_count(block[:, None, :] ^ db[None, :, :])
        out[start : start + chunk_size] = x.sum(axis=2, dtype=np.uint16)
    return out


def topk_smallest(
    distances: npt.ArrayLike, k: int, max_distance: int | None = None
) -> npt.NDArray[np.intp]:
    """Indices of the ``k`` smallest distances, ordered by (distance, index).

    distances: (n,) small non-negative integers (Hamming distances). Works by counting: a
    histogram gives the threshold distance ``t`` at which the cumulative count reaches ``k``;
    everything below ``t`` is taken, then the first (lowest-index) items at exactly ``t``.
    That is O(n) with no sort over all n, and ties break by index, so results are deterministic.
    Entries with distance ``> max_distance`` are never returned (so fewer than ``k`` may be).
    """
    dist = np.asarray(distances).reshape(-1)
    if dist.size and not np.issubdtype(dist.dtype, np.integer):
        raise HasherError(f"distances must be integers, got {dist.dtype}")
    if k <= 0 or dist.size == 0:
        return np.empty(0, dtype=np.intp)
    if dist.min() < 0:
        raise HasherError("distances must be non-negative")
    counts = np.bincount(dist)
    if max_distance is not None:
        if max_distance < 0:
            return np.empty(0, dtype=np.intp)
        counts = counts[: max_distance + 1]
    cumulative = np.cumsum(counts)
    if cumulative.size == 0:
        return np.empty(0, dtype=np.intp)
    if cumulative[-1] <= k:
        # Everything eligible fits; threshold is the last distance kept, take all of it.
        threshold = cumulative.size - 1
        need_at_threshold = int(counts[threshold])
    else:
        threshold = int(np.searchsorted(cumulative, k))  # first t with cumulative[t] >= k
        need_at_threshold = k - (int(cumulative[threshold - 1]) if threshold > 0 else 0)
    below = np.flatnonzero(dist < threshold)
    below = below[np.argsort(dist[below], kind="stable")]  # < k items; stable keeps index order
    at = np.flatnonzero(dist == threshold)[:need_at_threshold]
    return np.concatenate([below, at]).astype(np.intp, copy=False)


def rank_candidates(
    ids: npt.ArrayLike, codes: npt.ArrayLike, query_code: npt.ArrayLike, k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
    """Top-k (ids, distances) by (distance, id) of candidates that may repeat (a code found
    through several bands), and how many distinct ids there were.

    ids: (n,) int64 image ids in [0, 2**40); codes: (n, n_bytes) uint8, one per id (a repeated
    id comes with the same code); query_code: (n_bytes,) uint8. A handful of numpy calls: the
    SQL path's candidates (hundreds to a few thousand) arrive once per query, and compiling a
    loop would cost a one-shot CLI query more than it saves.
    """
    id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    words = as_words(codes)
    q = as_words(np.asarray(query_code, dtype=np.uint8).reshape(1, -1))[0]
    if words.shape[0] != id_arr.shape[0]:
        raise HasherError(f"{id_arr.shape[0]} ids but {words.shape[0]} codes")
    if k < 0:
        raise HasherError(f"k must be >= 0, got {k}")
    if id_arr.size and (id_arr.min() < 0 or id_arr.max() >= 1 << 40):
        raise HasherError("image ids must lie in [0, 2**40)")
    dist = np.bitwise_count(words ^ q).sum(axis=1, dtype=np.int64)
    keys = np.unique((dist << 40) | id_arr)  # sorted by (distance, id), each id once
    top = keys[:k]
    return top & ((1 << 40) - 1), top >> 40, int(keys.shape[0])


# --- bands ----------------------------------------------------------------------------------


def band_layout(n_bits: int, n_bands: int) -> int:
    """Band width for ``n_bands`` bands over an ``n_bits`` code: ``n_bits // n_bands``, at most 32.

    Bands start at bit 0 and are contiguous; trailing bits beyond ``n_bands * band_width``
    are in no band (they still count in the Hamming re-rank).
    """
    if n_bands < 1:
        raise ConfigError(f"n_bands must be at least 1, got {n_bands}")
    band_width = min(n_bits // n_bands, MAX_BAND_WIDTH)
    if band_width < MIN_BAND_WIDTH:
        raise ConfigError(
            f"{n_bands} bands of a {n_bits}-bit code are {n_bits // n_bands} bits wide; bands narrower than "
            f"{MIN_BAND_WIDTH} bits match too many codes to filter: use at most {max(1, n_bits // MIN_BAND_WIDTH)} bands"
        )
    return band_width


def default_n_bands(n_bits: int, n_items: int) -> int:
    """Number of bands for multi-index hashing over ``n_items`` codes of ``n_bits`` bits.

    Norouzi et al. choose substrings of about ``log2(N)`` bits, i.e. ``m = n_bits / log2(N)``
    bands: then each band value is shared by about one item, so an exact band lookup returns
    few candidates while ``m`` bands still catch every code within Hamming distance ``m - 1``.
    Rounded up, so that no band is wider than ``log2(N)`` bits: a wider band leaves most probed
    buckets empty (``2**w`` values for ``N`` codes) while a probe radius costs ``C(w, r)``
    look-ups, and more bands reach a given recall at a smaller radius. Measured on 64-bit codes
    (benchmarks/results/scale.md, both databases and the in-memory cache): at 1M codes 4 bands
    (``64 / 19.9 = 3.2``, rounded up) answer 2.4-3.3x faster than 3 at recall >= 0.99; at 10M
    3 bands (``2.75``) 3.8-5.0x faster than 4. We clamp so that ``band_width = n_bits // m`` stays
    in 8..32 (narrower bands match too many rows; wider ones overflow a non-negative BIGINT and
    rarely match exactly). There is no other cap: bands are bucket keys, not columns (the 8 band
    columns went with migration 0004).
    """
    if n_bits < MIN_BAND_WIDTH:
        raise ConfigError(f"n_bits must be at least {MIN_BAND_WIDTH} to form a band, got {n_bits}")
    log_n = math.log2(max(int(n_items), 2))
    m = max(1, math.ceil(n_bits / log_n - 1e-9))
    m = max(m, -(-n_bits // MAX_BAND_WIDTH))  # band_width <= 32
    m = min(m, n_bits // MIN_BAND_WIDTH)  # band_width >= 8
    return int(max(m, 1))


def band_values(codes: npt.ArrayLike, n_bands: int, band_width: int) -> npt.NDArray[np.int64]:
    """Band values of packed codes: ``(n, n_bytes)`` uint8 -> ``(n, n_bands)`` int64, all >= 0.

    Band ``j`` is bits ``[j * band_width, (j + 1) * band_width)``, the first the most significant.
    Each band spans at most 5 bytes (``band_width <= 32``): the bytes it touches are gathered,
    one byte position at a time for every row and band, into a big-endian integer, then shifted
    and masked. (Gathering all 5 bytes into an ``(n, bands, 5)`` array instead took 4.8x as long
    and ~160 bytes a code: 0.62 s against 0.13 s for 2.5M 64-bit codes in 16-bit bands; the code
    cache, dedup and batch pairs compute these for every code.)
    """
    arr = _as_codes(codes)
    n, n_bytes = arr.shape
    if not 1 <= band_width <= MAX_BAND_WIDTH:
        raise ConfigError(f"band_width must be between 1 and {MAX_BAND_WIDTH}, got {band_width}")
    if n_bands < 1:
        raise ConfigError(f"n_bands must be at least 1, got {n_bands}")
    if n_bands * band_width > n_bytes * 8:
        raise ConfigError(f"{n_bands} bands of {band_width} bits exceed the {n_bytes * 8}-bit code")
    starts = np.arange(n_bands) * band_width  # first bit of each band
    first_byte = starts // 8
    span = int(((starts % 8) + band_width + 7).max() // 8)  # bytes a band touches, at most 5
    window = np.zeros((n, n_bands), dtype=np.uint64)
    for i in range(span):
        at = first_byte + i
        inside = at < n_bytes  # the last band may end before this byte position
        byte = arr[:, np.minimum(at, n_bytes - 1)].astype(np.uint64)
        if not inside.all():
            byte[:, ~inside] = 0
        window <<= np.uint64(8)
        window |= byte
    right_shift = (8 * span - (starts % 8) - band_width).astype(np.uint64)
    mask = np.uint64((1 << band_width) - 1)
    window >>= right_shift
    window &= mask
    return window.astype(np.int64)


def band_word_masks(n_bits: int, n_bands: int, band_width: int) -> npt.NDArray[np.uint64]:
    """``(n_bands, n_words)`` uint64: band ``j``'s bits set, in the :func:`as_words` layout.

    ``popcount((a ^ b) & mask[j])`` summed over words is the Hamming distance of band ``j``.
    """
    bits = np.zeros((n_bands, -(-n_bits // 64) * 64), dtype=bool)
    for j in range(n_bands):
        bits[j, j * band_width : (j + 1) * band_width] = True
    return np.ascontiguousarray(as_words(pack_bits(bits)))


@lru_cache(maxsize=64)
def _flip_masks(band_width: int, radius: int) -> npt.NDArray[np.int64]:
    """XOR masks with popcount 0..radius over ``band_width`` bits, by radius then position."""
    masks: list[int] = []
    for r in range(radius + 1):
        for positions in itertools.combinations(range(band_width), r):
            masks.append(sum(1 << (band_width - 1 - p) for p in positions))
    out = np.array(masks, dtype=np.int64)
    out.setflags(write=False)
    return out


def flip_neighbours(
    value: int | npt.ArrayLike, band_width: int, radius: int
) -> npt.NDArray[np.int64]:
    """Every band value within Hamming ``radius`` of ``value``, the value itself first.

    A scalar gives ``(n_masks,)``; an array of shape ``(k,)`` gives ``(k, n_masks)``, with
    ``n_masks = sum(C(band_width, r) for r <= radius)`` (1, then 1 + band_width, ...).
    Order: radius 0, then single flips from the most significant bit, then pairs, ...
    """
    if not 1 <= band_width <= MAX_BAND_WIDTH:
        raise ConfigError(f"band_width must be between 1 and {MAX_BAND_WIDTH}, got {band_width}")
    if not 0 <= radius <= band_width:
        raise ConfigError(f"radius must be between 0 and band_width={band_width}, got {radius}")
    values = np.asarray(value, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() >= 1 << band_width):
        raise HasherError(f"band values must be in [0, 2**{band_width}), got {value!r}")
    masks = _flip_masks(band_width, radius)
    if values.ndim == 0:
        return values ^ masks
    return values.reshape(-1)[:, None] ^ masks[None, :]
