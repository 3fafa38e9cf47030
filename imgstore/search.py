"""Search: one flow over candidate sources, popcount re-rank, float re-rank.

Candidate generation is multi-index hashing (Norouzi, Punjani & Fleet 2012): a code is cut into
``m`` disjoint bands; any code within Hamming distance ``< m * (s + 1)`` of the query agrees with
it to within ``s`` bits on at least one band. So probing every band at its own value and at
every value up to ``s`` bits away finds all of them; the survivors are re-ranked by their full
Hamming distance (XOR + popcount over 64-bit words) and top-k is taken by counting.

* approximate (default): probe radius 0 or 1 once;
* exact: grow the radius until the k-th best distance found is below ``m * (s + 1)`` (no unseen
  code can beat it), or scan everything when that is cheaper. Equal to a brute-force scan,
  ties broken by image id.

Where candidates come from is a :class:`CandidateSource`: the database's band buckets
(:class:`SqlSource`), an index's codes held in memory (:class:`CodeCache`, through
:class:`HammingCandidates` like the SQL buckets), or, for a store without an index, an exact
cosine scan of the stored features (:class:`FloatScan`). :func:`search_many` is the one flow
over them: embed and encode the queries, ask the source, re-rank by cosine, attach paths.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, func, select

from .bandindex import SqlProbe, scan_codes
from .errors import ConfigError, NotFoundError
from .hashing.bits import as_words, band_values, band_word_masks, flip_neighbours, hamming_distances, topk_smallest
from .indexing import IndexInfo, find_index
from .models import Code, HashIndex
from .paths import from_stored
from .sqlhelpers import IN_CHUNK, chunks, driver_rows
from .vectors import SpaceInfo, iter_features, load_features, pick_space

if TYPE_CHECKING:  # pragma: no cover
    from .context import StoreContext

log = logging.getLogger(__name__)

#: Probe at most this many values per band before exact mode switches to a scan.
MAX_PROBES_PER_BAND = 4096
#: Exact mode scans instead of probing once the work (candidates plus probe values) would exceed
#: this share of the index. Through SQL a scan ships every row, so probing stays cheaper for
#: long; in memory a scan is one popcount pass, far cheaper per code than gathering probed
#: candidates, so the cache switches early.
SCAN_FRACTION = 0.25
CACHE_SCAN_FRACTION = 0.02
#: Float re-rank looks at this many Hamming candidates per result wanted.
RERANK_DEPTH_PER_K = 10


@dataclass(frozen=True)
class SearchResult:
    """One search hit. ``distance``: Hamming distance of the codes (None for an exact float
    search without index); ``cosine``: similarity of the float features when they were used."""

    image_id: int
    paths: list[str]
    distance: int | None
    cosine: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "distance": self.distance, "cosine": plain(self.cosine), "paths": self.paths}


def plain(value: float | None, digits: int = 6) -> float | None:
    """A similarity as a person reads it: float32 noise rounded away (1.0, not 1.0000001192)."""
    return None if value is None else round(float(value), digits)


@dataclass(frozen=True)
class Ranked:
    """Best-first image ids with Hamming distances, and how many candidates were examined."""

    image_ids: npt.NDArray[np.int64]
    distances: npt.NDArray[np.int64]
    n_candidates: int
    radius: int
    scanned: bool


def probe_values(band: int | npt.NDArray[np.int64], band_width: int, radius_from: int, radius_to: int) -> npt.NDArray[np.int64]:
    """Band values at Hamming distance ``radius_from..radius_to`` from ``band`` (a scalar gives
    ``(n_values,)``; an array of ``m`` bands gives ``(m, n_values)``)."""
    values = flip_neighbours(band, band_width, radius_to)
    skip = sum(math.comb(band_width, r) for r in range(radius_from))
    return values[..., skip:]


def rank(image_ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint8], query_code: npt.NDArray[np.uint8], k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Top-k of candidates by (Hamming distance, image id). ``image_ids`` must be ascending."""
    if len(image_ids) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    dist = hamming_distances(as_words(query_code.reshape(1, -1))[0], as_words(codes))
    top = topk_smallest(dist, k)
    return image_ids[top], dist[top].astype(np.int64)


# --- where Hamming candidates come from -----------------------------------------------------


class HammingSource(Protocol):
    """Codes of one index that :func:`hamming_search` can probe by band radius or scan."""

    #: exact mode scans once the expected work exceeds this share of the index
    scan_fraction: float
    #: True when a round at radius s_lo..s_hi reports only codes no earlier round found
    disjoint_rounds: bool

    @property
    def total(self) -> int: ...

    def expected(self, query_code: npt.NDArray[np.uint8], s: int) -> float:
        """Index entries that probing every band at radius exactly ``s`` would visit."""
        ...

    def rank_round(self, query_code: npt.NDArray[np.uint8], k: int, s_lo: int, s_hi: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
        """Top-k (ids, distances) of codes found at band radius ``s_lo..s_hi``, and how many."""
        ...

    def scan(self, query_code: npt.NDArray[np.uint8], k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Top-k (ids, distances) over every code."""
        ...


class SqlSource:
    """The band buckets in the database, probed through one open connection."""

    scan_fraction = SCAN_FRACTION
    disjoint_rounds = False

    def __init__(self, conn: Connection, index: IndexInfo, n_codes: int | None = None) -> None:
        self.conn = conn
        self.index = index
        self._total = index.n_codes if n_codes is None else n_codes
        self.probe = SqlProbe(index)
        self.probe.begin(conn)

    @property
    def total(self) -> int:
        """Codes in the index: counted on first need (an approximate query that finds k
        results in its first round never needs it; counting reads the whole primary key)."""
        if self._total < 0:
            self._total = int(self.conn.scalar(select(func.count()).select_from(Code).where(Code.hasher_id == self.index.id)) or 0)
        return self._total

    def expected(self, query_code: npt.NDArray[np.uint8], s: int) -> float:
        w = self.index.band_width
        return self.index.n_bands * math.comb(w, s) * self.total / 2.0**w

    def rank_round(self, query_code: npt.NDArray[np.uint8], k: int, s_lo: int, s_hi: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
        bands = band_values(query_code.reshape(1, -1), self.index.n_bands, self.index.band_width)[0]
        probes = list(probe_values(bands, self.index.band_width, s_lo, s_hi))
        return self.probe.rank(self.conn, probes, query_code, k)

    def scan(self, query_code: npt.NDArray[np.uint8], k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        all_ids, all_codes = scan_codes(self.conn, self.index)
        return rank(all_ids, all_codes, query_code, k)


def directory(seg_keys: npt.NDArray[np.uint32], n: int, n_bands: int, band_width: int) -> tuple[npt.NDArray[np.int32], int]:
    """A directory of the sorted band segments: for band ``j`` and each value ``t`` of a band's
    top ``p = min(band_width, floor(log2 n))`` bits, ``dir[j, t]`` is where keys with those top
    bits start in the segment (``dir[j, 2**p] = n``); returns ``(dir, band_width - p)``.

    A probe then finds its bucket by one look-up and, when ``p < band_width``, a binary search
    over the few keys sharing the top bits, instead of a binary search over all ``n`` keys (23
    dependent cache misses at 10M codes: most of a query's time). ``p <= log2 n`` keeps the
    directory at most 4 bytes per code and band."""
    p = min(band_width, max(n.bit_length() - 1, 0))
    shift = band_width - p
    out = np.empty((n_bands, (1 << p) + 1), dtype=np.int32)
    for j in range(n_bands):
        counts = np.bincount(seg_keys[j * n : (j + 1) * n] >> np.uint32(shift), minlength=1 << p)
        out[j, 0] = 0
        np.cumsum(counts, out=out[j, 1:])
    return out, shift


@dataclass
class CodeCache:
    """All codes of one index in memory, laid out for the compiled probes of :mod:`imgstore.kernels`.

    ``generation`` is the index's generation when loaded; a mismatch with the database means
    another process (or this one) wrote codes since: the store's context then appends what was
    added (:meth:`appended`) or, when codes went away, reloads. Memory per code:
    its bytes and words, plus per band a uint32 key, an int32 row and a copy of the code words
    (for 64-bit codes in 4 bands, about 90 bytes), and a directory of the band values (at most
    4 bytes per code and band).
    """

    index: IndexInfo
    generation: int
    image_ids: npt.NDArray[np.int64]  # (n,) ascending
    codes: npt.NDArray[np.uint8]  # (n, n_bytes)
    #: the float features of the same rows (float32, as stored), when they were attached
    #: (:meth:`StoreContext.attach_vectors`, under its memory budget): the re-rank and a search
    #: by stored id then read them here instead of from the database
    vectors: npt.NDArray[np.float32] | None = None
    words: npt.NDArray[np.uint64] = field(init=False)  # (n, n_words)
    seg_keys: npt.NDArray[np.uint32] = field(init=False)  # (n_bands * n,) band j sorted in [j*n, (j+1)*n)
    seg_rows: npt.NDArray[np.int32] = field(init=False)  # (n_bands * n,) row of each key
    seg_words: npt.NDArray[np.uint64] = field(init=False)  # (n_bands * n, n_words) code of each key
    #: per band, where each value of the top ``band_width - dir_shift`` bits starts in its
    #: segment: ``(n_bands, 2**p + 1)`` int32 (see :func:`directory`)
    seg_dir: npt.NDArray[np.int32] = field(init=False)
    dir_shift: int = field(init=False)
    band_masks: npt.NDArray[np.uint64] = field(init=False)  # (n_bands, n_words)
    _flips: dict[tuple[int, int], npt.NDArray[np.int64]] = field(init=False, default_factory=dict)
    _row_of: npt.NDArray[np.int32] | None = field(init=False, default=None)  # image id -> row (-1: none), when dense

    def __post_init__(self) -> None:
        self.words = np.ascontiguousarray(as_words(self.codes))
        n, m, w = len(self.codes), self.index.n_bands, self.index.band_width
        bands = band_values(self.codes, m, w) if n else np.zeros((0, m), dtype=np.int64)
        order = np.argsort(bands, axis=0, kind="stable")  # per band; equal values keep row order
        self.seg_keys = np.ascontiguousarray(np.take_along_axis(bands, order, 0).T).reshape(-1).astype(np.uint32)
        self.seg_rows = np.ascontiguousarray(order.T).reshape(-1).astype(np.int32)
        self.seg_words = np.ascontiguousarray(self.words[self.seg_rows])
        self.band_masks = band_word_masks(self.codes.shape[1] * 8, m, w)
        self.seg_dir, self.dir_shift = directory(self.seg_keys, n, m, w)

    @classmethod
    def load(cls, conn: Connection, index: IndexInfo) -> CodeCache:
        generation = int(conn.scalar(select(HashIndex.generation).where(HashIndex.id == index.id)) or 0)
        ids, codes = scan_codes(conn, index)
        return cls(index, generation, ids, codes)

    def appended(self, image_ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint8], generation: int,
                 vectors: npt.NDArray[np.float32] | None = None) -> CodeCache:
        """A new cache: this one plus codes of images whose ids are all above this one's (an
        ingest appending). Each band's sorted segment gets the new keys merged in (O(n) copies,
        no re-sort); this cache is left as it is, so a search running on it is unaffected.
        The attached vectors carry over when ``vectors`` gives the new rows' (else they go)."""
        ids = np.asarray(image_ids, dtype=np.int64)
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if len(ids) == 0:
            out = copy.copy(self)
            out.generation = generation
            return out
        if len(self) and ids[0] <= self.image_ids[-1]:
            raise ValueError("appended codes must have larger image ids than the cache holds")
        n0, m, w = len(self), self.index.n_bands, self.index.band_width
        new_words = np.ascontiguousarray(as_words(codes))
        bands = band_values(codes, m, w)
        keys, rows, words = [], [], []
        for j in range(m):
            order = np.argsort(bands[:, j], kind="stable")
            new_keys = bands[order, j].astype(np.uint32)
            old = slice(j * n0, (j + 1) * n0)
            at = np.searchsorted(self.seg_keys[old], new_keys, side="right")  # after equal keys: rows stay in order
            keys.append(np.insert(self.seg_keys[old], at, new_keys))
            rows.append(np.insert(self.seg_rows[old], at, (n0 + order).astype(np.int32)))
            words.append(np.insert(self.seg_words[old], at, new_words[order], axis=0))
        out = copy.copy(self)
        out.generation = generation
        out.image_ids = np.concatenate([self.image_ids, ids])
        out.codes = np.concatenate([self.codes, codes])
        out.words = np.ascontiguousarray(np.concatenate([self.words, new_words]))
        out.seg_keys = np.ascontiguousarray(np.concatenate(keys))
        out.seg_rows = np.ascontiguousarray(np.concatenate(rows))
        out.seg_words = np.ascontiguousarray(np.concatenate(words))
        out.seg_dir, out.dir_shift = directory(out.seg_keys, len(out.image_ids), m, w)
        out._flips = self._flips
        out._row_of = None
        out.vectors = None
        if self.vectors is not None and vectors is not None and len(vectors) == len(ids):
            out.vectors = np.concatenate([self.vectors, np.asarray(vectors, dtype=np.float32)])
        return out

    def with_vectors(self, vectors: npt.NDArray[np.float32]) -> CodeCache:
        """This cache with the float features of its rows attached (a new object; searches
        running on this one are unaffected)."""
        if vectors.shape[0] != len(self):
            raise ValueError(f"{vectors.shape[0]} vectors for {len(self)} codes")
        out = copy.copy(self)
        out.vectors = vectors
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held for the codes (not the attached vectors)."""
        return int(sum(a.nbytes for a in (self.image_ids, self.codes, self.words, self.seg_keys, self.seg_rows, self.seg_words,
                                          self.seg_dir)))

    def rows_of(self, image_ids: npt.NDArray[np.int64]) -> npt.NDArray[np.intp] | None:
        """The rows of ``image_ids`` (in that order), or None when one is not in the cache.
        Ids are mostly dense (1..n with few gaps), so an id -> row table (4 bytes per id up to
        the largest, made on first use) answers with one memory access per id; a binary search
        of a million ids cost 20 (a tenth of a search). Sparse ids use the binary search."""
        n = len(self)
        ids = np.asarray(image_ids, dtype=np.int64)
        if n == 0 or len(ids) == 0:
            return None if len(ids) else np.zeros(0, dtype=np.intp)
        top = int(self.image_ids[-1])
        if top < 4 * n + 1024:
            table = self._row_of
            if table is None:
                table = np.full(top + 1, -1, dtype=np.int32)
                table[self.image_ids] = np.arange(n, dtype=np.int32)
                self._row_of = table
            if ids.min() < 0 or ids.max() > top:
                return None
            rows = table[ids].astype(np.intp)
            return None if rows.min() < 0 else rows
        rows = np.searchsorted(self.image_ids, ids)
        if rows.max() >= n or not np.array_equal(self.image_ids[rows], ids):
            return None
        return rows

    def vectors_of(self, image_ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32] | None:
        """The attached vectors of ``image_ids`` (in that order), or None when there are none
        attached or one of the ids is not in the cache."""
        if self.vectors is None:
            return None
        rows = self.rows_of(image_ids)
        return None if rows is None else self.vectors[rows]

    # the HammingSource interface
    scan_fraction = CACHE_SCAN_FRACTION
    disjoint_rounds = True

    @property
    def total(self) -> int:
        return len(self)

    def expected(self, query_code: npt.NDArray[np.uint8], s: int) -> float:
        return float(self.count(query_code, s))

    def rank_round(self, query_code: npt.NDArray[np.uint8], k: int, s_lo: int, s_hi: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
        return self.rank_probes(query_code, k, s_lo, s_hi)

    def __len__(self) -> int:
        return len(self.image_ids)

    def flips(self, s_lo: int, s_hi: int) -> npt.NDArray[np.int64]:
        """XOR masks of band values ``s_lo..s_hi`` bits away (cached)."""
        got = self._flips.get((s_lo, s_hi))
        if got is None:
            got = self._flips[(s_lo, s_hi)] = probe_values(0, self.index.band_width, s_lo, s_hi)
        return got

    def rank_probes(self, query_code: npt.NDArray[np.uint8], k: int, s_lo: int, s_hi: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
        """Top-k (ids, distances) of the codes first found at band radius ``s_lo..s_hi``, and
        how many such codes there were (each code once; none found at a radius below ``s_lo``)."""
        from . import kernels

        n = len(self)
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0
        rows, dist, found = kernels.probe_rank(
            self.seg_keys, self.seg_dir, self.dir_shift, self.seg_rows, self.seg_words, n, query_code,
            as_words(query_code.reshape(1, -1))[0],
            self.band_masks, self.index.band_width, self.flips(s_lo, s_hi), s_lo, s_hi, k,
        )
        return self.image_ids[rows], dist, int(found)

    def count(self, query_code: npt.NDArray[np.uint8], s: int) -> int:
        """Index entries that probing every band at radius exactly ``s`` would visit."""
        from . import kernels

        if len(self) == 0:
            return 0
        return int(kernels.probe_count(self.seg_keys, self.seg_dir, self.dir_shift, len(self), query_code, self.index.n_bands,
                                       self.index.band_width, self.flips(s, s)))

    def probe(self, probes: list[npt.NDArray[np.int64]]) -> npt.NDArray[np.intp]:
        """Rows whose band j is in ``probes[j]`` for some j; sorted, unique."""
        n = len(self)
        found = []
        for j, values in enumerate(probes):
            seg = self.seg_keys[j * n : (j + 1) * n]
            values = np.asarray(values, dtype=np.int64)
            lo = np.searchsorted(seg, values, "left")
            hi = np.searchsorted(seg, values, "right")
            sizes = hi - lo
            if sizes.sum():
                starts = np.repeat(lo - np.concatenate(([0], np.cumsum(sizes)[:-1])), sizes)
                found.append(self.seg_rows[j * n + starts + np.arange(int(sizes.sum()))])
        if not found:
            return np.zeros(0, dtype=np.intp)
        return np.unique(np.concatenate(found)).astype(np.intp)

    def scan(self, query_code: npt.NDArray[np.uint8], k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        from . import kernels

        if len(self) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        rows, dist = kernels.scan_rank(self.words, as_words(query_code.reshape(1, -1))[0], k)
        return self.image_ids[rows], dist


# --- the Hamming search loop ----------------------------------------------------------------


def _merge(ids: npt.NDArray[np.int64], dist: npt.NDArray[np.int64], new_ids: npt.NDArray[np.int64],
           new_dist: npt.NDArray[np.int64], k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Top-k by (distance, id) of two best-first lists; an id in both counts once."""
    if len(ids) == 0:
        return new_ids, new_dist
    if len(new_ids) == 0:
        return ids, dist
    all_ids = np.concatenate([ids, new_ids])
    all_dist = np.concatenate([dist, new_dist])
    order = np.lexsort((all_ids, all_dist))
    all_ids, all_dist = all_ids[order], all_dist[order]
    keep = np.ones(len(all_ids), dtype=bool)
    keep[1:] = all_ids[1:] != all_ids[:-1]  # equal ids have equal distances, so they are adjacent
    return all_ids[keep][:k], all_dist[keep][:k]


def hamming_search(
    query_code: npt.NDArray[np.uint8],
    index: IndexInfo,
    k: int,
    source: HammingSource,
    *,
    exact: bool = False,
    probe_radius: int = 1,
) -> Ranked:
    """k nearest codes by Hamming distance among the codes of ``source``.

    The first round probes every band at radius ``0..probe_radius`` at once (one SQL statement
    or one compiled call). Approximate mode stops there once it has k results; exact mode
    stops once the k-th distance found is below ``m * (probe_radius + 1)`` (no unseen code can
    be closer). Otherwise further rounds probe radius ``s = probe_radius + 1, ...`` one at a
    time; before each, a cost model (index entries expected plus values to probe, against a
    share of the whole index) decides whether scanning everything is cheaper. The scan is exact.
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if probe_radius < 0 or probe_radius > index.band_width:
        raise ConfigError(f"probe radius must be between 0 and {index.band_width}, got {probe_radius}")
    q = np.ascontiguousarray(query_code, dtype=np.uint8).reshape(-1)
    m, w = index.n_bands, index.band_width

    ids = dist = np.zeros(0, dtype=np.int64)
    n_seen = 0  # candidates examined (through SQL a code found again in a later round counts again)
    values_so_far = 0
    s_lo, s_hi = 0, probe_radius
    while s_hi <= w:
        values_so_far += m * sum(math.comb(w, r) for r in range(s_lo, s_hi + 1))
        if s_lo > 0:
            expected = source.expected(q, s_lo)
            budget = source.scan_fraction * max(source.total, 1)
            if values_so_far > m * MAX_PROBES_PER_BAND or n_seen + expected + values_so_far > budget:
                break
        new_ids, new_dist, found = source.rank_round(q, k, s_lo, s_hi)
        ids, dist = _merge(ids, dist, new_ids, new_dist, k)
        n_seen += found
        if source.disjoint_rounds and n_seen >= source.total:  # every code seen once: nothing is left
            return Ranked(ids, dist, n_seen, s_hi, False)
        if len(ids) == k and (not exact or dist[-1] < m * (s_hi + 1)):  # no unseen code is closer than m(s+1)
            return Ranked(ids, dist, n_seen, s_hi, False)
        s_lo = s_hi = s_hi + 1
    ids, dist = source.scan(q, k)  # cheaper (or necessary) from here on
    return Ranked(ids, dist, source.total, -1, True)


# --- float features -------------------------------------------------------------------------


def cosine_similarities(query: npt.NDArray[np.floating], vectors: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    qn = np.asarray(query, dtype=np.float32).reshape(-1)
    qn = qn / max(float(np.linalg.norm(qn)), 1e-12)
    norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
    return ((vectors @ qn) / norms).astype(np.float32)


def cosine_rerank(
    conn: Connection, space: SpaceInfo, query_vector: npt.NDArray[np.float32], image_ids: npt.NDArray[np.int64],
    cache: CodeCache | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Order candidates by cosine similarity of their stored float features (best first; ties
    by image id): the vectors attached to ``cache`` when it holds them all, else read."""
    held = cache.vectors_of(image_ids) if cache is not None else None
    if held is not None:
        ids, vectors = np.asarray(image_ids, dtype=np.int64), held
    else:
        ids, vectors = load_features(conn, space.id, space.dim, image_ids.tolist())
    if len(ids) == 0:
        return ids, np.zeros(0, dtype=np.float32)
    sims = cosine_similarities(query_vector, vectors)
    order = np.lexsort((ids, -sims))
    return ids[order], sims[order]


def exact_float_search(
    conn: Connection, space: SpaceInfo, query_vector: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Exact cosine kNN over every stored vector of a space (the answer when there is no index)."""
    best_ids = np.zeros(0, dtype=np.int64)
    best_sims = np.zeros(0, dtype=np.float32)
    for ids, vectors in iter_features(conn, space.id, space.dim):
        sims = cosine_similarities(query_vector, vectors)
        best_ids = np.concatenate([best_ids, ids])
        best_sims = np.concatenate([best_sims, sims])
        if len(best_ids) > k:
            order = np.lexsort((best_ids, -best_sims))[:k]
            best_ids, best_sims = best_ids[order], best_sims[order]
    order = np.lexsort((best_ids, -best_sims))[:k]
    return best_ids[order], best_sims[order]


# --- the search flow --------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """What a candidate source returns for one query: best-first ids with Hamming distances
    (None without an index) and cosines (None when the source did not compute them)."""

    image_ids: npt.NDArray[np.int64]
    distances: npt.NDArray[np.int64] | None
    cosines: npt.NDArray[np.float32] | None


class CandidateSource(Protocol):
    """The nearest stored images of a query, by the best measure the source has."""

    def nearest(self, vector: npt.NDArray[np.float32] | None, code: npt.NDArray[np.uint8] | None, k: int) -> Found: ...


@dataclass
class HammingCandidates:
    """An index's codes (in the database or in memory) ranked by Hamming distance."""

    index: IndexInfo
    source: HammingSource
    exact: bool = False
    probe_radius: int = 1

    def nearest(self, vector: npt.NDArray[np.float32] | None, code: npt.NDArray[np.uint8] | None, k: int) -> Found:
        assert code is not None
        ranked = hamming_search(code, self.index, k, self.source, exact=self.exact, probe_radius=self.probe_radius)
        return Found(ranked.image_ids, ranked.distances, None)


@dataclass
class FloatScan:
    """Every stored vector of a space ranked by cosine: exact, for stores without an index."""

    conn: Connection
    space: SpaceInfo

    def nearest(self, vector: npt.NDArray[np.float32] | None, code: npt.NDArray[np.uint8] | None, k: int) -> Found:
        assert vector is not None
        ids, sims = exact_float_search(self.conn, self.space, vector, k)
        return Found(ids, None, sims)


def search_many(
    ctx: StoreContext,
    queries: Sequence[Any],
    k: int,
    *,
    exact: bool = False,
    probe_radius: int = 1,
    rerank: bool | None = None,
    rerank_depth: int | None = None,
    cached: bool = False,
    index_id: int | None = None,
    include_stale: bool = False,
) -> list[list[SearchResult]]:
    """The k nearest stored images of each query, best first (see ``ImageStore.search``)."""
    from .context import is_disconnect
    from .errors import DatabaseError

    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    queries = as_queries(queries)
    args = (ctx, queries, k, exact, probe_radius, rerank, rerank_depth, cached, index_id, include_stale)
    if not (cached and ctx.answers_from_memory(index_id, rerank=rerank is not False)):
        return _search_many(ctx.read("search"), *args)
    # codes and vectors in memory: one statement (the paths), no transaction needed
    try:
        return _search_many(ctx.quick_read("search"), *args)
    except DatabaseError as exc:
        if not is_disconnect(exc):
            raise
        ctx.drop_quick_connections()
        return _search_many(ctx.quick_read("search"), *args)  # a pooled connection had died: once more, on a fresh one


def _search_many(reading: Any, ctx: StoreContext, queries: list[Any], k: int, exact: bool, probe_radius: int,
                 rerank: bool | None, rerank_depth: int | None, cached: bool, index_id: int | None,
                 include_stale: bool) -> list[list[SearchResult]]:
    with reading as conn:
        index = find_index(ctx.indexes(conn), index_id)
        space = ctx.space(conn, index.space_id) if index is not None else pick_space(conn, None)
        cache = ctx.code_cache(conn, index, current=True) if cached and index is not None else None
        vectors, codes = query_vectors(ctx, conn, queries, space, index, cache)
        source: CandidateSource
        if index is None:
            source = FloatScan(conn, space)
        else:
            hamming: HammingSource = cache if cache is not None else SqlSource(conn, index)
            source = HammingCandidates(index, hamming, exact=exact, probe_radius=probe_radius)
        # Re-rank is on by default for every kind of index (benchmarks/results/deep.md and
        # hashing.md: it raises P@10 without lowering mAP, since the codes chose the candidates).
        do_rerank = index is not None and (True if rerank is None else rerank)
        want = max(k, rerank_depth or RERANK_DEPTH_PER_K * k) if do_rerank else k
        out: list[list[SearchResult]] = []
        for vec, code in zip(vectors, codes):
            ask = want
            for attempt in range(STALE_RETRIES + 1):
                found = source.nearest(vec, code, ask)
                ranked = found
                if do_rerank and vec is not None and found.cosines is None:
                    ids, sims = cosine_rerank(conn, space, vec, found.image_ids, cache)
                    dist_of = dict(zip(found.image_ids.tolist(), found.distances.tolist())) if found.distances is not None else {}
                    ranked = Found(ids, np.array([dist_of[i] for i in ids.tolist()], dtype=np.int64), sims)
                hits = _visible(conn, ranked, k, include_stale)
                exhausted = len(found.image_ids) < ask  # the source had no more to give
                if len(hits) >= k or exhausted or attempt == STALE_RETRIES:
                    break
                ask *= 4  # stale images were left out: ask for more candidates
            out.append(hits)
        return out


#: Rounds of asking a source for more candidates when stale images were left out.
STALE_RETRIES = 4


def _visible(conn: Connection, ranked: Found, k: int, include_stale: bool) -> list[SearchResult]:
    """The first k of ``ranked`` with their current paths, leaving out stale images (seen at
    paths, none current) unless asked: one query for the usual case of none stale."""
    out: list[SearchResult] = []
    ids = ranked.image_ids.tolist()
    pos = 0
    while len(out) < k and pos < len(ids):
        part = [int(i) for i in ids[pos : pos + max(2 * (k - len(out)), 16)]]
        rows = _path_rows(conn, part)
        for n, image_id in enumerate(part, start=pos):
            current, any_path = rows.get(image_id, ([], False))
            if any_path and not current and not include_stale:
                continue
            out.append(SearchResult(
                image_id=image_id, paths=current,
                distance=None if ranked.distances is None else int(ranked.distances[n]),
                cosine=None if ranked.cosines is None else float(ranked.cosines[n]),
            ))
            if len(out) == k:
                break
        pos += len(part)
    return out


def _path_rows(conn: Connection, image_ids: list[int]) -> dict[int, tuple[list[str], bool]]:
    """Per image: its current paths (sorted) and whether it has any path row at all."""
    out: dict[int, tuple[list[str], bool]] = {}
    for part in chunks(sorted(set(image_ids)), IN_CHUNK):
        if conn.dialect.name == "postgresql":  # one array parameter (see vectors.iter_features)
            rows = driver_rows(conn, "SELECT image_id, path, is_current FROM image_paths "
                                     "WHERE image_id = ANY(%s::bigint[]) ORDER BY path", (list(part),))
        else:
            marks = ",".join("?" * len(part))
            rows = driver_rows(conn, f"SELECT image_id, path, is_current FROM image_paths WHERE image_id IN ({marks}) "
                                     "ORDER BY path", tuple(part))
        for image_id, path, is_current in rows:
            current, _ = out.setdefault(int(image_id), ([], True))
            if is_current:
                current.append(from_stored(path))
    return out


def as_queries(queries: Any) -> list[Any]:
    """A list of queries from what ``search_many`` was given: any iterable of queries, or one
    query on its own (a path, bytes, a file-like object, an image, a feature vector, an id)
    rather than its characters, bytes or pixel rows."""
    import io

    from PIL import Image

    single = (str, bytes, bytearray, memoryview, os.PathLike, io.IOBase, Image.Image, int, np.integer)
    if isinstance(queries, single) or (isinstance(queries, np.ndarray) and queries.ndim != 2) or (
        isinstance(queries, np.ndarray) and queries.dtype == np.uint8
    ):
        return [queries]
    return list(queries)


def query_vectors(
    ctx: StoreContext, conn: Connection, queries: Sequence[Any], space: SpaceInfo, index: IndexInfo | None,
    cache: CodeCache | None = None,
) -> tuple[list[npt.NDArray[np.float32] | None], list[npt.NDArray[np.uint8] | None]]:
    """Float vectors and codes (None without an index) of each query: a stored image id (its
    vector from ``cache`` when attached there, else read), a feature vector, or an image
    (path, bytes, PIL) embedded by the space's extractor."""
    from .catalog import names_an_id
    from .decode import as_source, load_image

    vectors: list[npt.NDArray[np.float32] | None] = [None] * len(queries)
    stored: dict[int, npt.NDArray[np.uint8]] = {}
    to_embed: list[tuple[int, Any]] = []
    for i, q in enumerate(queries):
        if isinstance(q, str) and names_an_id(q):
            q = int(q)
        if isinstance(q, (int, np.integer)) and not isinstance(q, bool):
            rows = cache.rows_of(np.array([int(q)], dtype=np.int64)) if cache is not None else None
            if rows is not None and cache is not None and cache.vectors is not None:
                vectors[i] = cache.vectors[rows[0]]
                stored[i] = cache.codes[rows[0]]  # its stored code: no need to encode it again
                continue
            ids, vecs = load_features(conn, space.id, space.dim, [int(q)])
            if len(ids) == 0:
                raise NotFoundError(f"no image with id {int(q)} and {space.extractor} features")
            vectors[i] = vecs[0]
        elif isinstance(q, np.ndarray) and q.dtype.kind == "f" and q.ndim == 1:
            vec = np.asarray(q, dtype=np.float32).reshape(-1)
            if vec.shape[0] != space.dim:
                raise ConfigError(f"query vector has {vec.shape[0]} values; {space.extractor} features have {space.dim}")
            vectors[i] = vec
        else:
            to_embed.append((i, as_source(q)))
    if to_embed:
        ex = ctx.extractor(space.extractor)
        if ex.preprocess_version != space.preprocess_version:
            raise ConfigError(
                f"stored {space.extractor} features were made with preprocessing "
                f"{space.preprocess_version}, this imgstore makes {ex.preprocess_version}; "
                f"re-ingest the folders (imgstore ingest FOLDER --extractor {space.extractor}) and index the new "
                f"features (imgstore index create --extractor {space.extractor}), or query by stored image id"
            )
        images = [load_image(q, draft_size=ex.draft_size).image for _, q in to_embed]
        for (i, _), f in zip(to_embed, ex.extract(images)):
            vectors[i] = f
    codes: list[npt.NDArray[np.uint8] | None] = [stored.get(i) for i in range(len(queries))]
    todo = [i for i in range(len(queries)) if i not in stored]
    if index is not None and todo:
        for i, code in zip(todo, ctx.hasher(conn, index).encode(np.stack([vectors[i] for i in todo]))):  # type: ignore[misc]
            codes[i] = code
    return vectors, codes


