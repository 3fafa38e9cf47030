"""Search: band prefilter (in SQL or in a process-local cache), popcount re-rank, float re-rank.

Candidate generation is multi-index hashing (Norouzi, Punjani & Fleet 2012): a code is cut into
``m`` disjoint bands; any code within Hamming distance ``< m * (s + 1)`` of the query agrees with
it to within ``s`` bits on at least one band. So probing every band at its own value and at
every value up to ``s`` bits away finds all of them; the survivors are re-ranked by their full
Hamming distance (XOR + popcount over 64-bit words) and top-k is taken by counting.

* approximate (default): probe radius 0 or 1 once;
* exact: grow the radius until the k-th best distance found is below ``m * (s + 1)`` (no unseen
  code can beat it), or scan everything when that is cheaper. Equal to a brute-force scan,
  ties broken by image id.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, select

from .dbops import iter_features, load_features
from .errors import ConfigError
from .hashing.bits import as_words, band_values, band_word_masks, flip_neighbours, hamming_distances, topk_smallest
from .indexing import IndexInfo
from .models import Code, Hasher

log = logging.getLogger(__name__)

#: Probe at most this many values per band before exact mode switches to a scan.
MAX_PROBES_PER_BAND = 4096
#: Exact mode scans instead of probing once the work (candidates plus probe values) would exceed
#: this share of the index. Through SQL a scan ships every row, so probing stays cheaper for
#: long; in memory a scan is one popcount pass (~1 ns a code), far cheaper per code than
#: gathering probed candidates, so the cache switches early.
SCAN_FRACTION = 0.25
CACHE_SCAN_FRACTION = 0.02


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


# --- SQL prefilter ---------------------------------------------------------------------------


class SqlProbe:
    """Band probes as one SQL statement over ``code_buckets``: a UNION ALL of one branch per band.

    Each branch is a primary-key look-up per probed value, and each row it returns holds a
    whole bucket (ids and codes packed), so a radius-1 query at 1M codes reads 68 rows instead
    of ~1,500 candidate rows. The statement runs on the driver's cursor, without SQLAlchemy's
    result rows. PostgreSQL gets one array literal per band (``value = ANY(%s::bigint[])``;
    psycopg's dumping of Python lists took ~0.4 ms a query, formatting the literal ~0.02 ms),
    so the SQL text is constant and psycopg prepares it once; SQLite gets ``IN (?, ?, ...)``
    text cached per list length.
    """

    def __init__(self, index: IndexInfo) -> None:
        self.index = index
        self._sqlite_text: dict[tuple[int, ...], str] = {}
        branches = [
            f"SELECT image_ids, codes FROM code_buckets WHERE hasher_id = %s AND band = {j} AND value = ANY(%s::bigint[])"
            for j in range(index.n_bands)
        ]
        self._pg_text = " UNION ALL ".join(branches)

    def _sqlite_sql(self, lengths: tuple[int, ...]) -> str:
        text_ = self._sqlite_text.get(lengths)
        if text_ is None:
            branches = [
                f"SELECT image_ids, codes FROM code_buckets WHERE hasher_id = ? AND band = {j} AND value IN ({','.join('?' * n)})"
                for j, n in enumerate(lengths)
                if n
            ]
            text_ = self._sqlite_text[lengths] = " UNION ALL ".join(branches)
        return text_

    def statement(self, dialect: str, probes: list[npt.NDArray[np.int64]]) -> tuple[str, list[object]]:
        """The driver-level SQL text and parameters for ``probes`` (empty text: nothing to probe)."""
        params: list[object] = []
        if dialect == "postgresql":
            for values in probes:
                params += [self.index.id, "{" + ",".join(map(str, values.tolist())) + "}"]
            return self._pg_text, params
        for values in probes:
            if len(values):
                params += [self.index.id, *values.tolist()]
        if not params:
            return "", []
        return self._sqlite_sql(tuple(len(v) for v in probes)), params

    @staticmethod
    def begin(conn: Connection) -> None:
        """Per-transaction settings for a run of probes: on PostgreSQL, plan the prepared probe
        statement once (a generic plan) instead of re-planning it per query (re-planning took
        ~0.4 ms of a ~0.75 ms radius-0 query at 1M codes), and always as index look-ups."""
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
            # a probe is always a primary-key look-up; without this, a bucket table not yet
            # analysed (right after a bulk load) gets a sequential scan per band (~80 ms a query)
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")

    def rank(self, conn: Connection, probes: list[npt.NDArray[np.int64]], query_code: npt.NDArray[np.uint8], k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
        """Top-k (ids, distances) of the codes the probes find, and how many distinct ones."""
        from . import kernels

        ids, codes = self.fetch(conn, probes)
        if len(ids) == 0:
            return ids, np.zeros(0, dtype=np.int64), 0
        top, dist, found = kernels.rank_candidates(ids, as_words(codes), as_words(query_code.reshape(1, -1))[0], k)
        return top, dist, int(found)

    def fetch(self, conn: Connection, probes: list[npt.NDArray[np.int64]]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
        """Image ids whose band j is in ``probes[j]`` for some j, with codes, as the buckets
        hold them: a code once per band that found it."""
        n_bytes = self.index.n_bits // 8
        sql, params = self.statement(conn.dialect.name, probes)
        if not sql:
            return np.zeros(0, dtype=np.int64), np.zeros((0, n_bytes), dtype=np.uint8)
        raw = conn.connection.dbapi_connection
        assert raw is not None
        pg = conn.dialect.name == "postgresql"
        # binary results: bytea arrives as raw bytes, not hex text (0.8 against 1.3 ms a radius-1 query)
        cursor = raw.cursor(binary=True) if pg else raw.cursor()  # type: ignore[call-arg]
        try:
            if pg:
                cursor.execute(sql, params, prepare=True)
            else:
                cursor.execute(sql, params)
            rows = cursor.fetchall()
        finally:
            cursor.close()
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, n_bytes), dtype=np.uint8)
        ids = np.frombuffer(b"".join([r[0] for r in rows]), dtype="<i8").astype(np.int64, copy=False)
        codes = np.frombuffer(b"".join([r[1] for r in rows]), dtype=np.uint8).reshape(len(ids), n_bytes)
        return ids, codes


def scan_codes(conn: Connection, index: IndexInfo) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """Every code of an index, by image id."""
    rows = conn.execute(
        select(Code.image_id, Code.code).where(Code.hasher_id == index.id).order_by(Code.image_id)
    ).all()
    n_bytes = index.n_bits // 8
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, n_bytes), dtype=np.uint8)
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    return ids, np.frombuffer(b"".join(r[1] for r in rows), dtype=np.uint8).reshape(len(rows), n_bytes)


# --- in-memory cache -------------------------------------------------------------------------


@dataclass
class CodeCache:
    """All codes of one index in memory, laid out for the compiled probes of :mod:`imgstore.kernels`.

    ``generation`` is the index's generation when loaded; a mismatch with the database means
    another process (or this one) wrote codes since, and the cache reloads. Memory per code:
    its bytes and words, plus per band a uint32 key, an int32 row and a copy of the code words
    (for 64-bit codes in 4 bands, about 80 bytes).
    """

    index: IndexInfo
    generation: int
    image_ids: npt.NDArray[np.int64]  # (n,) ascending
    codes: npt.NDArray[np.uint8]  # (n, n_bytes)
    words: npt.NDArray[np.uint64] = field(init=False)  # (n, n_words)
    seg_keys: npt.NDArray[np.uint32] = field(init=False)  # (n_bands * n,) band j sorted in [j*n, (j+1)*n)
    seg_rows: npt.NDArray[np.int32] = field(init=False)  # (n_bands * n,) row of each key
    seg_words: npt.NDArray[np.uint64] = field(init=False)  # (n_bands * n, n_words) code of each key
    band_masks: npt.NDArray[np.uint64] = field(init=False)  # (n_bands, n_words)
    _flips: dict[tuple[int, int], npt.NDArray[np.int64]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.words = np.ascontiguousarray(as_words(self.codes))
        n, m, w = len(self.codes), self.index.n_bands, self.index.band_width
        bands = band_values(self.codes, m, w) if n else np.zeros((0, m), dtype=np.int64)
        order = np.argsort(bands, axis=0, kind="stable")  # per band; equal values keep row order
        self.seg_keys = np.ascontiguousarray(np.take_along_axis(bands, order, 0).T).reshape(-1).astype(np.uint32)
        self.seg_rows = np.ascontiguousarray(order.T).reshape(-1).astype(np.int32)
        self.seg_words = np.ascontiguousarray(self.words[self.seg_rows])
        self.band_masks = band_word_masks(self.codes.shape[1] * 8, m, w)

    @classmethod
    def load(cls, conn: Connection, index: IndexInfo) -> CodeCache:
        generation = int(conn.scalar(select(Hasher.generation).where(Hasher.id == index.id)) or 0)
        ids, codes = scan_codes(conn, index)
        return cls(index, generation, ids, codes)

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
            self.seg_keys, self.seg_rows, self.seg_words, n, query_code, as_words(query_code.reshape(1, -1))[0],
            self.band_masks, self.index.band_width, self.flips(s_lo, s_hi), s_lo, s_hi, k,
        )
        return self.image_ids[rows], dist, int(found)

    def count(self, query_code: npt.NDArray[np.uint8], s: int) -> int:
        """Index entries that probing every band at radius exactly ``s`` would visit."""
        from . import kernels

        if len(self) == 0:
            return 0
        return int(kernels.probe_count(self.seg_keys, len(self), query_code, self.index.n_bands,
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


# --- the search loop -------------------------------------------------------------------------


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
    *,
    exact: bool = False,
    probe_radius: int = 1,
    conn: Connection | None = None,
    cache: CodeCache | None = None,
    sql: SqlProbe | None = None,
    n_codes: int | None = None,
) -> Ranked:
    """k nearest codes by Hamming distance, through the cache when given, else through SQL.

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
    if cache is None and (conn is None or sql is None):
        raise ValueError("hamming_search needs a cache, or a connection and an SqlProbe")
    q = np.ascontiguousarray(query_code, dtype=np.uint8).reshape(-1)
    m, w = index.n_bands, index.band_width
    total = len(cache) if cache is not None else (n_codes if n_codes is not None else index.n_codes)
    budget = (CACHE_SCAN_FRACTION if cache is not None else SCAN_FRACTION) * max(total, 1)
    bands = None if cache is not None else band_values(q.reshape(1, -1), m, w)[0]

    ids = dist = np.zeros(0, dtype=np.int64)
    n_seen = 0  # candidates examined (through SQL a code found again in a later round counts again)
    values_so_far = 0
    s_lo, s_hi = 0, probe_radius
    while s_hi <= w:
        values_so_far += m * sum(math.comb(w, r) for r in range(s_lo, s_hi + 1))
        if s_lo > 0:
            expected = cache.count(q, s_lo) if cache is not None else m * math.comb(w, s_lo) * total / 2.0**w
            if values_so_far > m * MAX_PROBES_PER_BAND or n_seen + expected + values_so_far > budget:
                break
        if cache is not None:
            new_ids, new_dist, found = cache.rank_probes(q, k, s_lo, s_hi)
        else:
            probes = list(probe_values(bands, w, s_lo, s_hi))  # type: ignore[arg-type]
            new_ids, new_dist, found = sql.rank(conn, probes, q, k)  # type: ignore[union-attr,arg-type]
        ids, dist = _merge(ids, dist, new_ids, new_dist, k)
        n_seen += found
        if cache is not None and n_seen >= total:  # rounds are disjoint in the cache: all seen
            return Ranked(ids, dist, n_seen, s_hi, False)
        if len(ids) == k and (not exact or dist[-1] < m * (s_hi + 1)):  # no unseen code is closer than m(s+1)
            return Ranked(ids, dist, n_seen, s_hi, False)
        s_lo = s_hi = s_hi + 1
    # scan: cheaper (or necessary) from here on
    if cache is not None:
        ids, dist = cache.scan(q, k)
        return Ranked(ids, dist, len(cache), -1, True)
    all_ids, all_codes = scan_codes(conn, index)  # type: ignore[arg-type]
    ids, dist = rank(all_ids, all_codes, q, k)
    return Ranked(ids, dist, len(all_ids), -1, True)


def cosine_rerank(
    conn: Connection,
    space_id: int,
    dim: int,
    query_vector: npt.NDArray[np.float32],
    image_ids: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Order candidates by cosine similarity of their stored float features (best first; ties
    by image id)."""
    ids, vectors = load_features(conn, space_id, dim, image_ids.tolist())
    if len(ids) == 0:
        return ids, np.zeros(0, dtype=np.float32)
    sims = cosine_similarities(query_vector, vectors)
    order = np.lexsort((ids, -sims))
    return ids[order], sims[order]


def cosine_similarities(query: npt.NDArray[np.floating], vectors: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    qn = np.asarray(query, dtype=np.float32).reshape(-1)
    qn = qn / max(float(np.linalg.norm(qn)), 1e-12)
    norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
    return ((vectors @ qn) / norms).astype(np.float32)


def exact_float_search(
    conn: Connection, space_id: int, dim: int, query_vector: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Exact cosine kNN over every stored vector of a space (the answer when there is no index)."""
    best_ids = np.zeros(0, dtype=np.int64)
    best_sims = np.zeros(0, dtype=np.float32)
    for ids, vectors in iter_features(conn, space_id, dim):
        sims = cosine_similarities(query_vector, vectors)
        best_ids = np.concatenate([best_ids, ids])
        best_sims = np.concatenate([best_sims, sims])
        if len(best_ids) > k:
            order = np.lexsort((best_ids, -best_sims))[:k]
            best_ids, best_sims = best_ids[order], best_sims[order]
    order = np.lexsort((best_ids, -best_sims))[:k]
    return best_ids[order], best_sims[order]
