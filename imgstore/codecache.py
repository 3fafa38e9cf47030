"""An index's codes in memory, and one store's set of them kept fresh.

:class:`CodeCache` is the structure (modelled on faiss' ``IndexBinaryMultiHash``: the codes with
one sorted segment per band, searched by probing, grown by :meth:`CodeCache.appended`, never
written back): add, search, nothing about persistence. :class:`CodeCaches` is its life cycle
for one store: one cache per index, checked against the index's ``uid`` and ``generation``
(bumped on every change to its codes), brought up to date by appends or a reload, its float
features attached under a memory budget, and (:class:`Refresher`) a background thread that
does this off the request path (and keeps the store's filters' allowed sets fresh, see
:mod:`imgstore.filters`). A store reaches its caches through :func:`caches`; the store's
context holds them without importing this module.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, func, select

from .bandindex import scan_codes
from .bandjoin import sort_keys
from .errors import NotFoundError
from .filters import filter_sets
from .hashing.bits import as_words, band_values, band_word_masks, flip_neighbours
from .indexing import find_index, list_indexes
from .models import Code, HashIndex
from .types import CacheState, IndexInfo, Ranking, RoundRanking
from .vectors import iter_features, load_features

if TYPE_CHECKING:  # pragma: no cover
    from .context import StoreContext

log = logging.getLogger(__name__)

#: In memory a scan is one popcount pass, far cheaper per code than gathering probed candidates,
#: so exact mode switches to it early (see ``search.SCAN_FRACTION`` for the SQL path).
CACHE_SCAN_FRACTION = 0.02
#: How long the refresher's list of indexes stands in for a look-up of the search's own.
INDEXES_FRESH_S = 1.0
#: The mask of "every row": an empty one.
NO_MASK = np.zeros(0, dtype=np.uint8)
#: Row masks of allowed sets a cache keeps (see :meth:`CodeCache.allowing`).
NARROWED_KEPT = 8


def probe_values(band: int | npt.NDArray[np.int64], band_width: int, radius_from: int, radius_to: int) -> npt.NDArray[np.int64]:
    """Band values at Hamming distance ``radius_from..radius_to`` from ``band`` (a scalar gives
    ``(n_values,)``; an array of ``m`` bands gives ``(m, n_values)``)."""
    values = flip_neighbours(band, band_width, radius_to)
    skip = sum(math.comb(band_width, r) for r in range(radius_from))
    return values[..., skip:]




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
    another process (or this one) wrote codes since: :class:`CodeCaches` then appends what was
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
    #: (:meth:`CodeCaches.attach_vectors`, under its memory budget): the re-rank and a search
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
    #: the row masks of allowed sets (:meth:`allowing`), by the set's serial, most recent last
    _narrowed: dict[int, NarrowedCodes] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.words = np.ascontiguousarray(as_words(self.codes))
        n, m, w = len(self.codes), self.index.n_bands, self.index.band_width
        bands = band_values(self.codes, m, w) if n else np.zeros((0, m), dtype=np.int64)
        self.seg_keys = np.empty(m * n, dtype=np.uint32)
        self.seg_rows = np.empty(m * n, dtype=np.int32)
        for j in range(m):  # per band; equal values keep row order
            rows, keys = sort_keys(bands[:, j].astype(np.uint64), w)
            self.seg_rows[j * n : (j + 1) * n] = rows
            self.seg_keys[j * n : (j + 1) * n] = keys
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
        out._narrowed = {}  # masks are of this cache's rows; the new one has more
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
        table = self._row_table()
        if table is not None:
            if ids.min() < 0 or ids.max() >= len(table):
                return None
            rows = table[ids].astype(np.intp)
            return None if rows.min() < 0 else rows
        rows = np.searchsorted(self.image_ids, ids)
        if rows.max() >= n or not np.array_equal(self.image_ids[rows], ids):
            return None
        return rows

    def _row_table(self) -> npt.NDArray[np.int32] | None:
        """image id -> row (-1: none), when ids are dense enough for one (made on first use)."""
        n = len(self)
        top = int(self.image_ids[-1]) if n else -1
        if n == 0 or top >= 4 * n + 1024:
            return None
        table = self._row_of
        if table is None:
            table = np.full(top + 1, -1, dtype=np.int32)
            table[self.image_ids] = np.arange(n, dtype=np.int32)
            self._row_of = table
        return table

    def allowing(self, allowed_ids: npt.NDArray[np.int64], key: int) -> NarrowedCodes:
        """These codes searched only at the rows of ``allowed_ids`` (ascending image ids; ids
        without a code here are ignored). ``key`` names the allowed set (its serial): the mask
        made for it is kept with this cache (the last :data:`NARROWED_KEPT`; each one byte per
        code plus 12 bytes per allowed 64-bit code), so a search repeating a filter pays one
        look-up."""
        found = self._narrowed.get(key)
        if found is not None:
            return found
        ids = np.asarray(allowed_ids, dtype=np.int64)
        table = self._row_table()
        if len(ids) == 0 or len(self) == 0:
            rows = np.zeros(0, dtype=np.int32)
        elif table is not None:
            inside = ids[(ids >= 0) & (ids < len(table))]
            rows = table[inside]
            rows = rows[rows >= 0]
        else:
            at = np.minimum(np.searchsorted(self.image_ids, ids), len(self) - 1)
            rows = at[self.image_ids[at] == ids].astype(np.int32)
        allow = np.zeros(len(self), dtype=np.uint8)
        allow[rows] = 1
        rows = np.ascontiguousarray(rows, dtype=np.int32)
        view = NarrowedCodes(self, allow, rows, np.ascontiguousarray(self.words[rows]))
        for old in list(self._narrowed)[: max(0, len(self._narrowed) - NARROWED_KEPT + 1)]:
            self._narrowed.pop(old, None)  # another search may have dropped it meanwhile
        self._narrowed[key] = view
        return view

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
    narrowed: ClassVar[bool] = False
    share: ClassVar[float] = 1.0

    @property
    def total(self) -> int:
        return len(self)

    def expected(self, query_code: npt.NDArray[np.uint8], s: int) -> float:
        return float(self.count(query_code, s))

    def rank_round(self, query_code: npt.NDArray[np.uint8], k: int, s_lo: int, s_hi: int) -> RoundRanking:
        return self.rank_probes(query_code, k, s_lo, s_hi)

    def __len__(self) -> int:
        return len(self.image_ids)

    def flips(self, s_lo: int, s_hi: int) -> npt.NDArray[np.int64]:
        """XOR masks of band values ``s_lo..s_hi`` bits away (cached)."""
        got = self._flips.get((s_lo, s_hi))
        if got is None:
            got = self._flips[(s_lo, s_hi)] = probe_values(0, self.index.band_width, s_lo, s_hi)
        return got

    def rank_probes(self, query_code: npt.NDArray[np.uint8], k: int, s_lo: int, s_hi: int,
                    allow: npt.NDArray[np.uint8] = NO_MASK) -> RoundRanking:
        """Top-k (ids, distances) of the codes first found at band radius ``s_lo..s_hi``, and
        how many such codes there were (each code once; none found at a radius below ``s_lo``).
        ``allow``: a ``(n,)`` mask of the rows that may be found (empty: all)."""
        from . import kernels

        n = len(self)
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0
        rows, dist, found = kernels.probe_rank(
            self.seg_keys, self.seg_dir, self.dir_shift, self.seg_rows, self.seg_words, n, query_code,
            as_words(query_code.reshape(1, -1))[0],
            self.band_masks, self.index.band_width, self.flips(s_lo, s_hi), s_lo, s_hi, k, allow,
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

    def scan(self, query_code: npt.NDArray[np.uint8], k: int) -> Ranking:
        from . import kernels

        if len(self) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        rows, dist = kernels.scan_rank(self.words, as_words(query_code.reshape(1, -1))[0], k)
        return self.image_ids[rows], dist


@dataclass(eq=False)
class NarrowedCodes:
    """A :class:`CodeCache` searched only at the rows a filter allows: probes skip every other
    row before reading its code, and a scan reads a compact copy of the allowed rows' codes
    (8 bytes a 64-bit code: gathering them from the whole cache cost a cache miss each), so its
    cost follows their number. The search loop (:func:`imgstore.search.hamming_search`) sees a
    source of ``total`` = the allowed rows, so a narrow filter makes the scan the cheaper plan."""

    cache: CodeCache
    allow: npt.NDArray[np.uint8]  # (n,) 1 where allowed
    rows: npt.NDArray[np.int32]  # the allowed rows, ascending
    words: npt.NDArray[np.uint64]  # (len(rows), n_words): their codes, in the same order

    scan_fraction = CACHE_SCAN_FRACTION
    disjoint_rounds = True
    narrowed: ClassVar[bool] = True

    @property
    def total(self) -> int:
        return len(self.rows)

    @property
    def share(self) -> float:
        return len(self.rows) / max(len(self.cache), 1)

    def expected(self, query_code: npt.NDArray[np.uint8], s: int) -> float:
        """Index entries the probes visit (allowed or not: each costs a look at the mask)."""
        return float(self.cache.count(query_code, s))

    def rank_round(self, query_code: npt.NDArray[np.uint8], k: int, s_lo: int, s_hi: int) -> RoundRanking:
        if len(self.rows) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0
        return self.cache.rank_probes(query_code, k, s_lo, s_hi, self.allow)

    def scan(self, query_code: npt.NDArray[np.uint8], k: int) -> Ranking:
        from . import kernels

        if len(self.rows) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        at, dist = kernels.scan_rank(self.words, as_words(query_code.reshape(1, -1))[0], k)  # ties: row order
        return self.cache.image_ids[self.rows[at]], dist


class Refresher:
    """A background thread that brings one store's caches up to date every ``interval_s`` and
    keeps the list of indexes as of its last tick (uid and generation of each), so that a
    search neither waits for a refresh nor looks the indexes up itself."""

    def __init__(self, caches: CodeCaches, interval_s: float) -> None:
        self.caches = caches
        self.interval_s = interval_s
        self.stop_event = threading.Event()
        #: (when read, the indexes) as of the last tick
        self.seen: tuple[float, list[IndexInfo]] | None = None
        self.thread = threading.Thread(target=self._loop, name="imgstore-cache-refresher", daemon=True)
        #: the store's filters' allowed sets, which it keeps fresh too (searches then skip their check)
        self.filters = filter_sets(caches.ctx)

    def start(self) -> None:
        self.thread.start()
        self.filters.background = True

    def stop(self) -> None:
        self.filters.background = False
        self.stop_event.set()
        self.thread.join(timeout=30)
        self.seen = None

    def fresh_indexes(self) -> list[IndexInfo] | None:
        """The indexes as of the last tick, when that is recent; None when not."""
        seen = self.seen
        if seen is None or time.monotonic() - seen[0] >= INDEXES_FRESH_S:
            return None
        return seen[1]

    def _loop(self) -> None:
        ctx = self.caches.ctx
        while not self.stop_event.wait(self.interval_s):
            try:
                with ctx.read("list the indexes") as conn:
                    self.seen = (time.monotonic(), list_indexes(conn, with_counts=False))
            except Exception as exc:  # noqa: BLE001 - a refresher must outlive a bad moment
                self.seen = None
                log.info("index list: %s", exc)
            for index_id, cache in self.caches.held():
                try:
                    with ctx.read("refresh the code cache") as conn:
                        self.caches.attach_vectors(conn, self.caches.code_cache(conn, cache.index, refresh=True))
                except Exception as exc:  # noqa: BLE001 - a refresher must outlive a bad moment
                    log.info("code cache %d: %s", index_id, exc)
            try:
                self.filters.refresh()
            except Exception as exc:  # noqa: BLE001 - a refresher must outlive a bad moment
                log.info("filter sets: %s", exc)


class CodeCaches:
    """One store's in-memory code caches, by index id, each checked against the index's uid
    and generation. Made once per store by :func:`caches` (the context's registry of parts)."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        self._caches: dict[int, CodeCache] = {}
        self._lock = threading.Lock()  # one refresh at a time; a second caller finds it done
        self._refresher: Refresher | None = None
        self._vectors_tried: set[tuple[str, int]] = set()  # (index uid, cache size) that did not fit or match
        #: how caches were brought up to date: full loads, and appends of new codes
        self.refreshes = {"loads": 0, "appends": 0}

    def held(self) -> list[tuple[int, CodeCache]]:
        """The caches held now, by index id."""
        return sorted(self._caches.items())

    # -- the refresher ----------------------------------------------------------------------

    def start_refresher(self, interval_s: float = 0.25) -> None:
        """Bring the caches up to date in a background thread, every ``interval_s``, so that
        searches never wait for a refresh: they use the cache as of the last refresh (at most
        about ``interval_s`` plus one refresh behind the database). An index that was dropped
        or rebuilt is still noticed by the search itself."""
        if self._refresher is None:
            self._refresher = Refresher(self, interval_s)
            self._refresher.start()

    def stop_refresher(self) -> None:
        if self._refresher is not None:
            self._refresher.stop()
            self._refresher = None

    def indexes(self, conn: Connection) -> list[IndexInfo]:
        """The indexes (without counts). With a refresher running, its list as of its last tick
        (at most a second old), so a search needs no look-up of its own; else read now."""
        seen = self._refresher.fresh_indexes() if self._refresher is not None else None
        return seen if seen is not None else list_indexes(conn, with_counts=False)

    def answers_from_memory(self, index_id: int | None = None, *, rerank: bool = True) -> bool:
        """Whether a cached search of ``index_id`` (default: the active index) would find its
        codes, and for the re-rank its vectors, already in memory: then it is CPU work of a
        millisecond or less (and one look-up of paths), which a server runs at once instead of
        handing it to a thread. False while anything would have to be loaded first."""
        seen = self._refresher.fresh_indexes() if self._refresher is not None else None
        if seen is None:
            return False
        try:
            index = find_index(seen, index_id)
        except NotFoundError:
            return False
        if index is None:
            return False
        cache = self._caches.get(index.id)
        return cache is not None and cache.index.uid == index.uid and (not rerank or cache.vectors is not None)

    def forget_index(self, index_id: int) -> None:
        """The index changed in this process (created, activated, dropped): read the indexes
        afresh, and drop its cache."""
        if self._refresher is not None:
            self._refresher.seen = None
        self._caches.pop(index_id, None)

    def close(self) -> None:
        self.stop_refresher()
        self._caches.clear()

    # -- caches -----------------------------------------------------------------------------

    def code_cache(self, conn: Connection, index: IndexInfo, *, refresh: bool | None = None, current: bool = False) -> CodeCache:
        """The index's codes in memory, reloaded when the database says they changed: another
        uid (the id was reused by a new index) or another generation (codes written since).
        With a background refresher running (``refresh`` left None), a newer generation is left
        to it and the cache as of its last refresh is returned at once. ``current``: ``index``
        was read in this transaction, so its uid and generation need no second look-up."""
        if current:
            uid, generation = index.uid, int(index.generation)
        else:
            row = conn.execute(select(HashIndex.uid, HashIndex.generation).where(HashIndex.id == index.id)).first()
            if row is None:
                self._caches.pop(index.id, None)
                raise NotFoundError(f"no index with id {index.id}; `imgstore index list` shows them")
            uid, generation = str(row.uid), int(row.generation)
        cache = self._caches.get(index.id)
        if cache is not None and cache.index.uid == uid and cache.generation == generation:
            return cache
        if cache is not None and cache.index.uid == uid and self._refresher is not None and refresh is None:
            return cache  # the refresher brings it up to date
        with self._lock:
            now = self._caches.get(index.id)
            if now is not None and now is not cache and now.index.uid == uid and now.generation >= generation:
                return now  # another thread refreshed it meanwhile
            fresh = self._refreshed(conn, index, now, uid, generation)
        if self._refresher is None:  # no background thread to attach the vectors later
            fresh = self.attach_vectors(conn, fresh)
        return fresh

    def state(self) -> list[CacheState]:
        """What this process holds in memory per index: codes, whether the float features are
        attached, and the bytes of both."""
        out = []
        for index_id, cache in self.held():
            vectors = cache.vectors
            out.append(CacheState(index_id=index_id, codes=len(cache), generation=cache.generation,
                                  vectors=vectors is not None,
                                  bytes=cache.nbytes + (0 if vectors is None else int(vectors.nbytes))))
        return out

    def warm(self) -> None:
        """Load the active index's codes and attach their vectors now (a server calls this at
        start, in a thread, so that the first search does not pay it). Quietly does nothing for
        a store without images or an index."""
        try:
            with self.ctx.read("load the code cache") as conn:
                index = find_index(self.indexes(conn), None)
                if index is not None:
                    self.attach_vectors(conn, self.code_cache(conn, index, refresh=True))
        except Exception as exc:  # noqa: BLE001 - the first search will say what is wrong
            log.info("warming the code cache: %s", exc)

    def attach_vectors(self, conn: Connection, cache: CodeCache) -> CodeCache:
        """``cache`` with its rows' float features held beside the codes, when they fit in the
        context's ``vector_cache_bytes`` (float32, as stored: the re-rank then gives exactly what reading
        them gives): a re-ranked search then reads no vectors from the database (at 1M codes
        that read was half of a search's time, benchmarks/results/serve.md). One full read of
        the space's features; appends carry them forward. A cache whose codes lack a stored
        vector, or that does not fit, is left as it is (and not tried again at that size)."""
        if cache.vectors is not None or len(cache) == 0:
            return cache
        key = (cache.index.uid, len(cache))
        space = self.ctx.space(conn, cache.index.space_id)
        if key in self._vectors_tried or len(cache) * space.dim * 4 > self.ctx.vector_cache_bytes:
            self._vectors_tried.add(key)
            return cache
        self._vectors_tried.add(key)
        vectors = np.zeros((len(cache), space.dim), dtype=np.float32)
        filled = 0
        for ids, part in iter_features(conn, space.id, space.dim):
            rows = np.searchsorted(cache.image_ids, ids)
            inside = rows < len(cache)
            inside[inside] = cache.image_ids[rows[inside]] == ids[inside]
            vectors[rows[inside]] = part[inside]
            filled += int(inside.sum())
        if filled != len(cache):
            log.info("index %d: %d of %d codes have vectors; the re-rank reads them", cache.index.id, filled, len(cache))
            return cache
        with self._lock:
            if self._caches.get(cache.index.id) is not cache:
                return cache  # refreshed meanwhile: attach to the new one next time
            attached = self._caches[cache.index.id] = cache.with_vectors(vectors)
        return attached

    def _refreshed(self, conn: Connection, index: IndexInfo, cache: CodeCache | None, uid: str, generation: int) -> CodeCache:
        if cache is not None and cache.index.uid == uid:
            grown = _appended(conn, cache, generation)
            if grown is not None:
                self.refreshes["appends"] += 1
                self._caches[index.id] = grown
                return grown
        self.refreshes["loads"] += 1
        cache = self._caches[index.id] = CodeCache.load(conn, index)
        return cache


def _appended(conn: Connection, cache: CodeCache, generation: int) -> CodeCache | None:
    """The cache plus the codes written since, when they are all appends (an ingest adds images
    with new, larger ids); None when anything else changed (a removal, or ids that committed
    out of order), which the count of codes reveals: then the caller reloads."""
    last = int(cache.image_ids[-1]) if len(cache) else 0
    rows = conn.execute(
        select(Code.image_id, Code.code).where(Code.hasher_id == cache.index.id, Code.image_id > last).order_by(Code.image_id)
    ).all()
    total = int(conn.scalar(select(func.count()).select_from(Code).where(Code.hasher_id == cache.index.id)) or 0)
    if total != len(cache) + len(rows):
        return None
    n_bytes = cache.codes.shape[1]
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    codes = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype=np.uint8).reshape(len(rows), n_bytes)
    vectors = None
    if cache.vectors is not None and len(ids):
        got, vectors = load_features(conn, cache.index.space_id, cache.vectors.shape[1], ids.tolist())
        if not np.array_equal(got, ids):
            vectors = None  # a code without a stored vector: the re-rank reads from the database
    return cache.appended(ids, codes, generation, vectors)


def caches(ctx: StoreContext) -> CodeCaches:
    """The code caches of the store ``ctx`` belongs to (made on first use)."""
    return ctx.part(CodeCaches)
