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

A filter (:class:`~imgstore.types.SearchFilter`) narrows every source to the images it allows
(:mod:`imgstore.filters` reads and keeps that set): the SQL buckets keep only allowed
candidates, the in-memory codes consult a row mask (:class:`~imgstore.codecache.NarrowedCodes`),
the float scan skips the rest; :func:`hamming_search` stays exact over them and, approximate,
probes wider as the filter narrows.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image
from sqlalchemy import Connection, func, select

from .bandindex import SqlProbe, codes_of, scan_codes
from .catalog import existing_ids, path_rows
from .codecache import CodeCache, caches, probe_values
from .context import is_disconnect
from .decode import as_source, load_image
from .errors import ConfigError, DatabaseError, NotFoundError
from .filters import Allowed, allowed
from .hashing.bits import as_words, band_values, hamming_distances, rank_candidates, topk_smallest
from .indexing import find_index
from .models import Code
from .paths import is_storable_id, names_an_id, printable
from .types import IndexInfo, Ranking, RoundRanking, SearchFilter, SearchOptions, SearchResult, SpaceInfo
from .vectors import iter_features, load_features, pick_space

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
#: Results one search may ask for.
MAX_K = 1_000_000
#: Float re-rank looks at this many Hamming candidates per result wanted.
RERANK_DEPTH_PER_K = 10
#: Under a filter that allows a share p of the codes, approximate mode probes on (past k
#: results) until it has visited (1/p) x this share of the index entries the unfiltered first
#: round visits: it meets about as many allowed candidates as an unfiltered search meets
#: candidates, so its recall stays near the unfiltered one as the filter narrows. Below 1, so
#: that a filter allowing most codes (p near 1) stops after the same first round.
APPROX_ENTRY_SHARE = 0.5
#: A filtered exact search through SQL reads the allowed images' codes by id while they are
#: fewer than this share of the index; more, and it reads every code (sequential) instead.
BY_ID_SHARE = 0.125


@dataclass(frozen=True)
class Ranked:
    """Best-first image ids with Hamming distances, and how many candidates were examined."""

    image_ids: npt.NDArray[np.int64]
    distances: npt.NDArray[np.int64]
    n_candidates: int
    radius: int
    scanned: bool


def rank(image_ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint8], query_code: npt.NDArray[np.uint8], k: int) -> Ranking:
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
    def narrowed(self) -> bool:
        """Whether a filter narrows the codes (``total`` is then the allowed ones)."""
        ...

    @property
    def share(self) -> float:
        """The share of the index's codes a search may return (1.0 without a filter)."""
        ...

    @property
    def total(self) -> int: ...

    def expected(self, query_code: npt.NDArray[np.uint8], s: int) -> float:
        """Index entries that probing every band at radius exactly ``s`` would visit."""
        ...

    def rank_round(self, query_code: npt.NDArray[np.uint8], k: int, s_lo: int, s_hi: int) -> RoundRanking:
        """Top-k (ids, distances) of codes found at band radius ``s_lo..s_hi``, and how many."""
        ...

    def scan(self, query_code: npt.NDArray[np.uint8], k: int) -> Ranking:
        """Top-k (ids, distances) over every code."""
        ...


class SqlSource:
    """The band buckets in the database, probed through one open connection. ``allowed``: the
    images a filter allows; a probe then keeps only those of its candidates, and a scan reads
    only their codes (by id while they are few, else every code, of which it keeps theirs)."""

    scan_fraction = SCAN_FRACTION
    disjoint_rounds = False

    def __init__(self, conn: Connection, index: IndexInfo, n_codes: int | None = None, allowed: Allowed | None = None) -> None:
        self.conn = conn
        self.index = index
        self.allowed = allowed
        self._n_codes = index.n_codes if n_codes is None else n_codes
        self.probe = SqlProbe(index)
        self.probe.begin(conn)

    @property
    def narrowed(self) -> bool:
        return self.allowed is not None

    @property
    def n_codes(self) -> int:
        """Codes in the index: counted on first need (an approximate query that finds k
        results in its first round never needs it; counting reads the whole primary key)."""
        if self._n_codes < 0:
            counted = select(func.count()).select_from(Code).where(Code.hasher_id == self.index.id)
            self._n_codes = int(self.conn.scalar(counted) or 0)
        return self._n_codes

    @property
    def total(self) -> int:
        """Codes a search may return: the index's, or at most the allowed images'."""
        return self.n_codes if self.allowed is None else len(self.allowed)

    @property
    def share(self) -> float:
        return 1.0 if self.allowed is None else min(1.0, len(self.allowed) / max(self.n_codes, 1))

    def expected(self, query_code: npt.NDArray[np.uint8], s: int) -> float:
        w = self.index.band_width
        return self.index.n_bands * math.comb(w, s) * self.n_codes / 2.0**w

    def rank_round(self, query_code: npt.NDArray[np.uint8], k: int, s_lo: int, s_hi: int) -> RoundRanking:
        bands = band_values(query_code.reshape(1, -1), self.index.n_bands, self.index.band_width)[0]
        probes = list(probe_values(bands, self.index.band_width, s_lo, s_hi))
        if self.allowed is None:
            return self.probe.rank(self.conn, probes, query_code, k)
        ids, codes = self.probe.fetch(self.conn, probes)
        keep = self.allowed.contains(ids)
        return rank_candidates(ids[keep], codes[keep], query_code, k)

    def scan(self, query_code: npt.NDArray[np.uint8], k: int) -> Ranking:
        if self.allowed is None:
            all_ids, all_codes = scan_codes(self.conn, self.index)
        elif len(self.allowed) <= BY_ID_SHARE * self.n_codes:
            all_ids, all_codes = codes_of(self.conn, self.index, self.allowed.ids)
        else:
            all_ids, all_codes = scan_codes(self.conn, self.index)
            keep = self.allowed.contains(all_ids)
            all_ids, all_codes = all_ids[keep], all_codes[keep]
        return rank(all_ids, all_codes, query_code, k)


# --- the Hamming search loop ----------------------------------------------------------------


def _merge(ids: npt.NDArray[np.int64], dist: npt.NDArray[np.int64], new_ids: npt.NDArray[np.int64],
           new_dist: npt.NDArray[np.int64], k: int) -> Ranking:
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

    A source narrowed by a filter (``source.narrowed``) counts only the allowed codes: its
    rounds report only allowed candidates, its scan reads only allowed codes, and ``total`` is
    their number. Exact mode is then exact over the allowed codes by the same bound. Two rules
    change: the first round is skipped for the scan when scanning the allowed codes costs less
    than it (a narrow filter), and approximate mode goes on past k results until it has met
    about as many allowed candidates as the unfiltered first round meets candidates (see
    :data:`APPROX_ENTRY_SHARE`): the allowed neighbours of a query lie further out as the filter
    narrows, so it probes wider instead of returning worse results, or fewer (a round short of
    k results always goes on, to the scan if need be).
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if probe_radius < 0 or probe_radius > index.band_width:
        raise ConfigError(f"probe radius must be between 0 and {index.band_width}, got {probe_radius}")
    q = np.ascontiguousarray(query_code, dtype=np.uint8).reshape(-1)
    m, w = index.n_bands, index.band_width
    narrowed = source.narrowed

    ids = dist = np.zeros(0, dtype=np.int64)
    if narrowed and source.total == 0:  # the filter allows no image
        return Ranked(ids, dist, 0, -1, False)
    n_seen = 0  # candidates examined (through SQL a code found again in a later round counts again)
    values_so_far = 0
    first_entries = visited = 0.0  # narrowed: index entries of the first round, and visited so far
    s_lo, s_hi = 0, probe_radius
    while s_hi <= w:
        values = m * sum(math.comb(w, r) for r in range(s_lo, s_hi + 1))
        values_so_far += values
        budget = source.scan_fraction * max(source.total, 1)
        if s_lo > 0:
            expected = source.expected(q, s_lo)
            if values_so_far > m * MAX_PROBES_PER_BAND or n_seen + expected + values_so_far > budget:
                break
            visited += expected
        elif narrowed:
            first_entries = visited = sum(source.expected(q, r) for r in range(s_hi + 1))
            if values + first_entries > budget:
                break  # scanning the few allowed codes costs less than the first round
        new_ids, new_dist, found = source.rank_round(q, k, s_lo, s_hi)
        ids, dist = _merge(ids, dist, new_ids, new_dist, k)
        n_seen += found
        if source.disjoint_rounds and n_seen >= source.total:  # every code seen once: nothing is left
            return Ranked(ids, dist, n_seen, s_hi, False)
        if len(ids) == k and (dist[-1] < m * (s_hi + 1)  # no unseen code is closer than m(s+1): exact
                              or (not exact and (not narrowed or visited * source.share >= APPROX_ENTRY_SHARE * first_entries))):
            return Ranked(ids, dist, n_seen, s_hi, False)
        s_lo = s_hi = s_hi + 1
    ids, dist = source.scan(q, k)  # cheaper (or necessary) from here on
    return Ranked(ids, dist, source.total, -1, True)


# --- float features -------------------------------------------------------------------------


def cosine_similarities(query: npt.NDArray[np.floating], vectors: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    qn = np.asarray(query, dtype=np.float32).reshape(-1)
    qn = qn / max(float(np.linalg.norm(qn)), 1e-12)
    norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
    return np.asarray((vectors @ qn) / norms, dtype=np.float32)


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
    conn: Connection, space: SpaceInfo, query_vector: npt.NDArray[np.float32], k: int, allowed: Allowed | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Exact cosine kNN over every stored vector of a space (the answer when there is no
    index), or over those of the ``allowed`` images."""
    best_ids = np.zeros(0, dtype=np.int64)
    best_sims = np.zeros(0, dtype=np.float32)
    for ids, vectors in iter_features(conn, space.id, space.dim):
        if allowed is not None:
            keep = allowed.contains(ids)
            ids, vectors = ids[keep], vectors[keep]
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
    """Every stored vector of a space (or of the ``allowed`` images) ranked by cosine: exact,
    for stores without an index."""

    conn: Connection
    space: SpaceInfo
    allowed: Allowed | None = None

    def nearest(self, vector: npt.NDArray[np.float32] | None, code: npt.NDArray[np.uint8] | None, k: int) -> Found:
        assert vector is not None
        ids, sims = exact_float_search(self.conn, self.space, vector, k, self.allowed)
        return Found(ids, None, sims)


def check_options(options: SearchOptions) -> None:
    """Refuse options a search cannot run with, by type first (a str ``"5"`` is a caller's
    mistake, not five), with what to give instead."""
    for name in ("k", "probe_radius"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
    for name in ("rerank_depth", "index_id"):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise ConfigError(f"{name} must be a whole number or None, got {value!r}")
    if not 1 <= options.k <= MAX_K:
        raise ConfigError(f"k must be 1 to {MAX_K:,}, got {options.k} (imgstore export lists every image)")
    if options.probe_radius < 0:
        raise ConfigError(f"probe radius must be 0 or more, got {options.probe_radius}")
    if options.rerank_depth is not None and options.rerank_depth < 1:
        raise ConfigError(f"rerank depth must be at least 1, got {options.rerank_depth}")
    if options.filter is not None and not isinstance(options.filter, SearchFilter):
        raise ConfigError(f"filter must be an imgstore.types.SearchFilter or None, got {type(options.filter).__name__}")


def search_many(ctx: StoreContext, queries: Iterable[Any], options: SearchOptions, *,
                cached: bool | None = None) -> list[list[SearchResult]]:
    """The ``options.k`` nearest stored images of each query, best first (see
    ``ImageStore.search``). ``cached``: answer from the in-memory codes (default
    ``options.cached``, None counting as False)."""
    check_options(options)
    listed = as_queries(queries)
    use_cache = bool(options.cached if cached is None else cached)
    if not (use_cache and caches(ctx).answers_from_memory(options.index_id, rerank=options.rerank is not False)):
        return _search_many(ctx.read("search"), ctx, listed, options, use_cache)
    # codes and vectors in memory: one statement (the paths), no transaction needed
    try:
        return _search_many(ctx.quick_read("search"), ctx, listed, options, use_cache)
    except DatabaseError as exc:
        if not is_disconnect(exc):
            raise
        ctx.drop_quick_connections()
        return _search_many(ctx.quick_read("search"), ctx, listed, options, use_cache)  # a pooled connection had died


def _search_many(reading: AbstractContextManager[Connection], ctx: StoreContext, queries: list[Any],
                 options: SearchOptions, cached: bool) -> list[list[SearchResult]]:
    k = options.k
    with reading as conn:
        part = caches(ctx)
        index = find_index(part.indexes(conn), options.index_id)
        space = ctx.space(conn, index.space_id) if index is not None else pick_space(conn, None)
        cache = part.code_cache(conn, index, current=True) if cached and index is not None else None
        vectors, codes = query_vectors(ctx, conn, queries, space, index, cache)
        allow = allowed(ctx, conn, options.filter)
        if allow is not None and len(allow) == 0:
            return [[] for _ in queries]  # the filter allows no image (the queries were valid)
        source: CandidateSource
        if index is None:
            source = FloatScan(conn, space, allow)
        else:
            hamming: HammingSource
            if cache is not None:
                hamming = cache if allow is None else cache.allowing(allow.ids, allow.serial)
            else:
                hamming = SqlSource(conn, index, allowed=allow)
            source = HammingCandidates(index, hamming, exact=options.exact, probe_radius=options.probe_radius)
        # Re-rank is on by default for every kind of index (benchmarks/results/deep.md and
        # hashing.md: it raises P@10 without lowering mAP, since the codes chose the candidates).
        do_rerank = index is not None and options.rerank is not False
        want = max(k, options.rerank_depth or RERANK_DEPTH_PER_K * k) if do_rerank else k
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
                hits = _visible(conn, ranked, k, options.include_stale)
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
    paths, none current) unless asked, and images removed since the candidates were found (a
    code cache that has not caught up with a removal yet): one query for the usual case of
    every image with a path."""
    out: list[SearchResult] = []
    ids = ranked.image_ids.tolist()
    pos = 0
    while len(out) < k and pos < len(ids):
        part = [int(i) for i in ids[pos : pos + max(2 * (k - len(out)), 16)]]
        rows = path_rows(conn, part)
        pathless = [i for i in part if i not in rows]
        removed = set(pathless) - existing_ids(conn, pathless) if pathless else set()
        for n, image_id in enumerate(part, start=pos):
            seen = rows.get(image_id, [])
            current = [r.path for r in seen if r.is_current]
            if (seen and not current and not include_stale) or image_id in removed:
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


def as_queries(queries: Any) -> list[Any]:
    """A list of queries from what ``search_many`` was given: any iterable of queries, or one
    query on its own (a path, bytes, a file-like object, an image, a feature vector, an id)
    rather than its characters, bytes or pixel rows."""
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
            ids, vecs = load_features(conn, space.id, space.dim, [int(q)] if is_storable_id(int(q)) else [])
            if len(ids) == 0:
                raise NotFoundError(f"no image with id {int(q)} and {space.extractor} features")
            vectors[i] = vecs[0]
        elif isinstance(q, np.ndarray) and q.dtype.kind == "f" and q.ndim == 1:
            vec = np.asarray(q, dtype=np.float32).reshape(-1)
            if vec.shape[0] != space.dim:
                raise ConfigError(f"query vector has {vec.shape[0]} values; {space.extractor} features have {space.dim}")
            vectors[i] = vec
        else:
            source = as_source(q)
            if isinstance(source, str) and not os.path.lexists(source):
                raise NotFoundError(f"no such file: {printable(source)} (a query is a file, a stored image id, "
                                    "an image or a feature vector)")
            to_embed.append((i, source))
    if to_embed:
        ex = ctx.extractor(space.extractor)
        if ex.preprocess_version != space.preprocess_version:
            raise ConfigError(
                f"stored {space.extractor} features were made with preprocessing "
                f"{space.preprocess_version}, this imgstore makes {ex.preprocess_version}; "
                f"re-ingest the folders (imgstore ingest FOLDER --extractor {space.extractor}) and index the new "
                f"features (imgstore index create --extractor {space.extractor}), or query by stored image id"
            )
        images = [load_image(q, max_pixels=ctx.max_pixels, draft_size=ex.draft_size, thumbnail_size=ex.thumbnail_size).image
                  for _, q in to_embed]
        for (i, _), f in zip(to_embed, ex.extract(images)):
            vectors[i] = f
    codes: list[npt.NDArray[np.uint8] | None] = [stored.get(i) for i in range(len(queries))]
    todo = [i for i in range(len(queries)) if i not in stored]
    if index is not None and todo:
        for i, code in zip(todo, ctx.hasher(conn, index).encode(np.stack([_known(vectors[i]) for i in todo]))):
            codes[i] = code
    return vectors, codes




def _known(vector: npt.NDArray[np.float32] | None) -> npt.NDArray[np.float32]:
    if vector is None:  # every query was embedded, read or given above
        raise AssertionError("a query without a vector")
    return vector
