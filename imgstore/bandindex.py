"""The band index: ``code_buckets``, the only module that reads or writes it.

For every index, band ``j`` and band value ``v``, a bucket holds the image ids and packed
codes whose band ``j`` equals ``v`` (in chunk rows of at most :data:`BUCKET_CHUNK` entries).
This module stores codes with their bucket entries in the caller's transaction
(:func:`write_codes`, :func:`write_new_buckets`), removes them (:func:`remove_codes`), marks an
index changed (:func:`mark_changed`), probes buckets for search (:class:`SqlProbe`), and
reports occupancy (:func:`occupancy`) and consistency (:func:`check`). The ``codes`` table
stays the source of truth; buckets are derived from it and checked against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, Table, and_, bindparam, delete, func, select, update

from . import pgcopy
from .hashing.bits import band_values, rank_candidates
from .models import Code, CodeBucket, HashIndex
from .sqlhelpers import IN_CHUNK, WRITE_CHUNK, chunks, copy_binary, driver_rows, insert_stmt

if TYPE_CHECKING:  # pragma: no cover
    from .types import IndexInfo

codes_table: Table = Code.__table__
buckets_table: Table = CodeBucket.__table__

#: Entries per ``code_buckets`` row. A probe reads all chunks of its bucket; a write appends to
#: the last chunk, so a crowded bucket (many near-identical images) costs one bounded row
#: rewrite per write, not a rewrite of the whole bucket. 512 entries of a 64-bit code are 8 KiB.
BUCKET_CHUNK = 512


def mark_changed(conn: Connection, hasher_ids: Iterable[int]) -> None:
    """Bump the generation of indexes whose codes changed, so process-local code caches reload."""
    ids = sorted(set(hasher_ids))
    if ids:
        conn.execute(update(HashIndex).where(HashIndex.id.in_(ids)).values(generation=HashIndex.generation + 1))


def write_codes(
    conn: Connection, hasher_id: int, image_ids: npt.ArrayLike, codes: npt.NDArray[np.uint8], n_bands: int, band_width: int,
    defer: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]] | None = None, new_index: bool = False,
) -> int:
    """Store codes (keeping any code already stored for the same image) and add the new ones to
    their band buckets, in the caller's transaction. Returns how many were new.

    Only rows this statement actually inserted (``RETURNING``) enter the buckets, so two
    processes writing the same image at once cannot put it in a bucket twice. ``defer``
    (building a new index): collect the new codes there instead, for one
    :func:`write_new_buckets` at the end; appending batch by batch rewrote each bucket row
    once per batch, which on PostgreSQL left the bucket table many times its live size (dead
    row versions) and probes reading scattered pages.

    ``new_index`` (with ``defer``): the index was created in this transaction, so no code of it
    is stored and no other process can write one: the codes are inserted without the conflict
    check, on PostgreSQL by binary ``COPY`` (:mod:`imgstore.pgcopy`). ``image_ids`` must then
    be distinct.
    """
    ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if len(ids) == 0:
        return 0
    if new_index:
        if defer is None:
            raise ValueError("new_index needs defer: a new index's buckets are written once, by write_new_buckets")
        _insert_new_codes(conn, hasher_id, ids, codes)
        defer.append((ids, codes))
        return len(ids)
    inserted: list[int] = []
    if conn.dialect.name == "postgresql":
        # one statement of arrays per chunk: SQLAlchemy's multi-row VALUES with RETURNING had
        # psycopg parse 10,000 placeholders a statement
        sql = (
            "INSERT INTO codes (hasher_id, image_id, code) SELECT %s, * FROM unnest(%s::bigint[], %s::bytea[]) "
            "ON CONFLICT DO NOTHING RETURNING image_id"
        )
        for start in range(0, len(ids), WRITE_CHUNK):
            stop = start + WRITE_CHUNK
            params = (hasher_id, ids[start:stop].tolist(), [c.tobytes() for c in codes[start:stop]])
            inserted += conn.exec_driver_sql(sql, params).scalars().all()
    else:
        stmt = insert_stmt(conn, codes_table).on_conflict_do_nothing().returning(codes_table.c.image_id)
        rows = [{"hasher_id": hasher_id, "image_id": i, "code": c.tobytes()} for i, c in zip(ids.tolist(), codes)]
        for part in chunks(rows):
            inserted += conn.execute(stmt, list(part)).scalars().all()
    if not inserted:
        return 0
    keep = np.isin(ids, np.asarray(inserted, dtype=np.int64))
    if defer is not None:
        defer.append((ids[keep], codes[keep]))
    else:
        _append_to_buckets(conn, hasher_id, ids[keep], codes[keep], n_bands, band_width, new_index=False)
    return int(keep.sum())


def _insert_new_codes(conn: Connection, hasher_id: int, ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint8]) -> None:
    """Codes of a new index, no conflict possible: PostgreSQL binary COPY, SQLite a plain
    executemany (no RETURNING to read back)."""
    if conn.dialect.name == "postgresql":
        copy_binary(conn, "COPY codes (hasher_id, image_id, code) FROM STDIN (FORMAT BINARY)",
                    pgcopy.framed([pgcopy.codes_stream(hasher_id, ids, codes)]))
        return
    sql = "INSERT INTO codes (hasher_id, image_id, code) VALUES (?, ?, ?)"
    conn.exec_driver_sql(sql, [(hasher_id, i, c) for i, c in zip(ids.tolist(), map(bytes, codes))])


def write_new_buckets(
    conn: Connection, hasher_id: int, deferred: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]],
    n_bands: int, band_width: int,
) -> None:
    """The buckets of a new index (whose buckets nobody else writes) from the codes that
    :func:`write_codes` collected in ``deferred``: every bucket row written once."""
    if not deferred:
        return
    ids = np.concatenate([d[0] for d in deferred])
    codes = np.concatenate([d[1] for d in deferred])
    _append_to_buckets(conn, hasher_id, ids, codes, n_bands, band_width, new_index=True)


def append_deferred(
    conn: Connection, hasher_id: int, deferred: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]],
    n_bands: int, band_width: int,
) -> None:
    """Append the codes :func:`write_codes` collected in ``deferred`` to an existing index's
    buckets (rows locked in (band, value) order)."""
    if not deferred:
        return
    ids = np.concatenate([d[0] for d in deferred])
    codes = np.concatenate([d[1] for d in deferred])
    if len(ids):
        _append_to_buckets(conn, hasher_id, ids, codes, n_bands, band_width, new_index=False)


def _bucket_groups(
    ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint8], n_bands: int, band_width: int
) -> Iterator[tuple[int, int, npt.NDArray[np.intp]]]:
    """(band, value, rows with that band value, in id order) for every band value present."""
    bands = band_values(codes, n_bands, band_width)
    for j in range(n_bands):
        order = np.lexsort((ids, bands[:, j]))
        values = bands[order, j]
        starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
        ends = np.r_[starts[1:], len(values)]
        for a, b in zip(starts.tolist(), ends.tolist()):
            yield j, int(values[a]), order[a:b]


def _bucket_chunks(conn: Connection, hasher_id: int, keys: list[tuple[int, int]], full: bool) -> list[Any]:
    """Existing chunk rows of the (band, value) keys: (band, value, chunk, n[, image_ids, codes]).

    Driver-level SQL, one primary-key look-up per value: on PostgreSQL one array parameter per
    band and statement (an IN list of 500 placeholders cost more to parse than to run), with
    sequential scans off, since inside a long write transaction the table has no statistics yet.
    """
    by_band: dict[int, list[int]] = {}
    for band, value in keys:
        by_band.setdefault(band, []).append(value)
    cols = "band, value, chunk, n" + (", image_ids, codes" if full else "")
    out: list[Any] = []
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        sql = f"SELECT {cols} FROM code_buckets WHERE hasher_id = %s AND band = %s AND value = ANY(%s::bigint[])"
        for band, values in by_band.items():
            for part in chunks(sorted(values), 5000):
                out += conn.exec_driver_sql(sql, (hasher_id, band, "{" + ",".join(map(str, part)) + "}")).all()
        conn.exec_driver_sql("SET LOCAL enable_seqscan = on")
        return out
    for band, values in by_band.items():
        for part in chunks(sorted(values), 500):
            sql = f"SELECT {cols} FROM code_buckets WHERE hasher_id = ? AND band = ? AND value IN ({','.join('?' * len(part))})"
            out += conn.exec_driver_sql(sql, (hasher_id, band, *part)).all()
    return out


def _append_to_buckets(conn: Connection, hasher_id: int, ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint8], n_bands: int,
                       band_width: int, new_index: bool) -> None:
    """Add entries to their buckets, filling each bucket's last chunk before starting another.
    ``new_index``: the index has no buckets yet, so there are no last chunks to look up."""
    if new_index and conn.dialect.name == "postgresql":
        _copy_new_buckets(conn, hasher_id, ids, codes, n_bands, band_width)
        return
    groups = list(_bucket_groups(ids, codes, n_bands, band_width))
    tails: dict[tuple[int, int], tuple[int, int]] = {}  # (band, value) -> (last chunk, its entries)
    if not new_index:
        for band, value, chunk, n in _bucket_chunks(conn, hasher_id, [(j, v) for j, v, _ in groups], full=False):
            if (band, value) not in tails or chunk > tails[(band, value)][0]:
                tails[(band, value)] = (chunk, n)
    le_ids = ids.astype("<i8")
    rows: list[tuple[Any, ...]] = []  # (hasher_id, band, value, chunk, n, image_ids, codes)
    for j, v, sel in groups:
        chunk, have = tails.get((j, v), (-1, BUCKET_CHUNK))
        start = 0
        while start < len(sel):
            if have >= BUCKET_CHUNK:
                chunk, have = chunk + 1, 0
            take = sel[start : start + BUCKET_CHUNK - have]
            rows.append((hasher_id, j, v, chunk, len(take), le_ids[take].tobytes(), codes[take].tobytes()))
            have += len(take)
            start += len(take)
    # Append when the chunk exists (another writer may have added to it since we looked: the
    # chunk can then exceed BUCKET_CHUNK a little, which only costs a longer row). Driver-level
    # executemany: SQLAlchemy's per-row parameter processing cost a third of a bulk load.
    if conn.dialect.name == "postgresql":
        # one statement per chunk of rows, as arrays (a per-row executemany dominated bulk loads)
        for part in chunks(rows, WRITE_CHUNK):
            conn.exec_driver_sql(_APPEND_SQL["postgresql"], tuple(list(col) for col in zip(*part)))
    else:
        for part in chunks(rows, WRITE_CHUNK):
            conn.exec_driver_sql(_APPEND_SQL["sqlite"], list(part))


def _copy_new_buckets(conn: Connection, hasher_id: int, ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint8], n_bands: int,
                      band_width: int) -> None:
    """A new index's bucket rows on PostgreSQL: one binary COPY, built band by band with numpy
    (the same rows :func:`_append_to_buckets` writes: chunks of BUCKET_CHUNK in id order)."""
    bands = band_values(codes, n_bands, band_width)

    def per_band() -> Iterator[bytes]:
        for j in range(n_bands):
            order = np.lexsort((ids, bands[:, j]))
            yield pgcopy.bucket_stream(hasher_id, j, bands[order, j], ids[order], codes[order], BUCKET_CHUNK)

    copy_binary(conn, "COPY code_buckets (hasher_id, band, value, chunk, n, image_ids, codes) FROM STDIN (FORMAT BINARY)",
                pgcopy.framed(per_band()))


_APPEND_SQL = {
    "sqlite": "INSERT INTO code_buckets (hasher_id, band, value, chunk, n, image_ids, codes) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (hasher_id, band, value, chunk) DO UPDATE SET n = n + excluded.n, "
    # SQLite's || makes text; the cast gives the same bytes back as a blob
    "image_ids = CAST(image_ids || excluded.image_ids AS BLOB), codes = CAST(codes || excluded.codes AS BLOB)",
    "postgresql": "INSERT INTO code_buckets (hasher_id, band, value, chunk, n, image_ids, codes) "
    "SELECT * FROM unnest(%s::integer[], %s::integer[], %s::bigint[], %s::integer[], %s::integer[], %s::bytea[], %s::bytea[]) "
    "ON CONFLICT (hasher_id, band, value, chunk) DO UPDATE SET n = code_buckets.n + excluded.n, "
    "image_ids = code_buckets.image_ids || excluded.image_ids, codes = code_buckets.codes || excluded.codes",
}


def remove_codes(conn: Connection, image_ids: Sequence[int]) -> list[int]:
    """Delete the codes of these images from every index, and take them out of the buckets.
    Returns the ids of the indexes that changed."""
    if not image_ids:
        return []
    changed: set[int] = set()
    gone_all = np.asarray(sorted(set(image_ids)), dtype=np.int64)
    layouts = {h.id: h for h in conn.execute(select(HashIndex.id, HashIndex.n_bits, HashIndex.n_bands, HashIndex.band_width))}
    for part in chunks(list(gone_all.tolist()), IN_CHUNK):
        rows = conn.execute(select(Code.hasher_id, Code.image_id, Code.code).where(Code.image_id.in_(part))).all()
        by_hasher: dict[int, list[Any]] = {}
        for r in rows:
            by_hasher.setdefault(r[0], []).append(r)
        for hasher_id, hrows in by_hasher.items():
            h = layouts[hasher_id]
            ids = np.array([r[1] for r in hrows], dtype=np.int64)
            codes = np.frombuffer(b"".join(bytes(r[2]) for r in hrows), dtype=np.uint8).reshape(len(hrows), h.n_bits // 8)
            keys = sorted({(j, v) for j, v, _ in _bucket_groups(ids, codes, h.n_bands, h.band_width)})
            _remove_from_buckets(conn, hasher_id, keys, ids, h.n_bits // 8)
            changed.add(hasher_id)
        conn.execute(delete(Code).where(Code.image_id.in_(part)))
    return sorted(changed)


def _remove_from_buckets(
    conn: Connection, hasher_id: int, keys: list[tuple[int, int]], gone: npt.NDArray[np.int64], n_bytes: int
) -> None:
    t = buckets_table.c
    updates: list[dict[str, Any]] = []
    deletes: list[dict[str, Any]] = []
    for band, value, chunk, _n, blob_ids, blob_codes in _bucket_chunks(conn, hasher_id, keys, full=True):
        ids = np.frombuffer(bytes(blob_ids), dtype="<i8")
        keep = ~np.isin(ids, gone)
        if keep.all():
            continue
        key = {"h": hasher_id, "b": band, "v": value, "c": chunk}
        if not keep.any():
            deletes.append(key)
            continue
        codes = np.frombuffer(bytes(blob_codes), dtype=np.uint8).reshape(len(ids), n_bytes)
        updates.append({**key, "new_n": int(keep.sum()), "new_ids": ids[keep].tobytes(), "new_codes": codes[keep].tobytes()})
    where = and_(t.hasher_id == bindparam("h"), t.band == bindparam("b"), t.value == bindparam("v"), t.chunk == bindparam("c"))
    if updates:
        conn.execute(
            update(buckets_table)
            .where(where)
            .values(n=bindparam("new_n"), image_ids=bindparam("new_ids"), codes=bindparam("new_codes")),
            updates,
        )
    if deletes:
        conn.execute(delete(buckets_table).where(where), deletes)


# --- probes (search) -----------------------------------------------------------------------


class SqlProbe:
    """Band probes as one SQL statement over ``code_buckets``: a UNION ALL of one branch per band.

    Each branch is a primary-key look-up per probed value, and each row it returns holds a
    whole bucket (ids and codes packed), so a query reads one row per probed value (m bands x
    the values within the radius) instead of one row per candidate. The statement runs on the
    driver's cursor, without SQLAlchemy's result rows. PostgreSQL gets one array literal per band (``value = ANY(%s::bigint[])``;
    psycopg's dumping of Python lists cost more than formatting the literal),
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
        statement once (a generic plan) instead of re-planning it per query (re-planning was
        about half of a radius-0 query), and always as index look-ups."""
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
            # a probe is always a primary-key look-up; without this, a bucket table not yet
            # analysed (right after a bulk load) gets a sequential scan per band
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")

    def rank(
        self, conn: Connection, probes: list[npt.NDArray[np.int64]], query_code: npt.NDArray[np.uint8], k: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
        """Top-k (ids, distances) of the codes the probes find, and how many distinct ones."""
        ids, codes = self.fetch(conn, probes)
        if len(ids) == 0:
            return ids, np.zeros(0, dtype=np.int64), 0
        return rank_candidates(ids, codes, query_code, k)

    def fetch(self, conn: Connection, probes: list[npt.NDArray[np.int64]]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
        """Image ids whose band j is in ``probes[j]`` for some j, with codes, as the buckets
        hold them: a code once per band that found it."""
        n_bytes = self.index.n_bits // 8
        sql, params = self.statement(conn.dialect.name, probes)
        if not sql:
            return np.zeros(0, dtype=np.int64), np.zeros((0, n_bytes), dtype=np.uint8)
        rows = driver_rows(conn, sql, params, binary=True)  # bytea as raw bytes, not hex text to decode
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, n_bytes), dtype=np.uint8)
        ids = np.frombuffer(b"".join([r[0] for r in rows]), dtype="<i8").astype(np.int64, copy=False)
        codes = np.frombuffer(b"".join([r[1] for r in rows]), dtype=np.uint8).reshape(len(ids), n_bytes)
        return ids, codes


def scan_codes(conn: Connection, index: IndexInfo) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """Every code of an index, by image id (on the driver's cursor: SQLAlchemy's result rows
    cost more than the read when an exact search scans a store of 10,000-100,000 codes)."""
    ph = "%s" if conn.dialect.name == "postgresql" else "?"
    rows = driver_rows(
        conn, f"SELECT image_id, code FROM codes WHERE hasher_id = {ph} ORDER BY image_id", (index.id,), binary=True
    )
    n_bytes = index.n_bits // 8
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, n_bytes), dtype=np.uint8)
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    return ids, np.frombuffer(b"".join(r[1] for r in rows), dtype=np.uint8).reshape(len(rows), n_bytes)


def codes_of(
    conn: Connection, index: IndexInfo, image_ids: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """The codes of these images in an index (ids without one are absent), by image id: a
    filtered search over a narrow filter scans these instead of every code. One primary-key
    look-up per id, the ids sent as one parameter per chunk (a PostgreSQL array, an SQLite
    JSON array read by ``json_each``: the same speed as ``IN`` lists, without their limit)."""
    ids = np.unique(np.asarray(image_ids, dtype=np.int64))
    n_bytes = index.n_bits // 8
    rows: list[tuple[Any, ...]] = []
    pg = conn.dialect.name == "postgresql"
    sql = ("SELECT image_id, code FROM codes WHERE hasher_id = %s AND image_id = ANY(%s::bigint[])" if pg else
           "SELECT image_id, code FROM codes WHERE hasher_id = ? AND image_id IN (SELECT value FROM json_each(?))")
    for part in chunks(ids.tolist(), 100_000):
        listed = ",".join(map(str, part))
        rows += driver_rows(conn, sql, (index.id, "{" + listed + "}" if pg else "[" + listed + "]"), binary=True)
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, n_bytes), dtype=np.uint8)
    found = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    codes = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype=np.uint8).reshape(len(rows), n_bytes)
    order = np.argsort(found, kind="stable")
    return found[order], codes[order]


# --- occupancy and consistency ----------------------------------------------------------------


@dataclass(frozen=True)
class BandOccupancy:
    """How codes spread over one band's values. ``evenness`` is the entropy of the bucket
    distribution over its largest possible value, log2(min(2**width, n)): 1.0 when every code
    has its own bucket (or buckets are equal), near 0 when most share one."""

    buckets: int
    largest: int
    mean: float
    evenness: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def occupancy(conn: Connection, hasher_id: int, n_bands: int, band_width: int) -> list[BandOccupancy]:
    """Per band, bucket statistics, read from the bucket rows (entries summed over chunks)."""
    sizes: dict[int, list[int]] = {j: [] for j in range(n_bands)}
    for band, total in conn.execute(
        select(CodeBucket.band, func.sum(CodeBucket.n))
        .where(CodeBucket.hasher_id == hasher_id).group_by(CodeBucket.band, CodeBucket.value)
    ):
        if int(band) in sizes:
            sizes[int(band)].append(int(total))
    return [_occupancy(np.array(sizes[j], dtype=np.float64), band_width) for j in range(n_bands)]


def _occupancy(sizes: npt.NDArray[np.float64], band_width: int) -> BandOccupancy:
    n = float(sizes.sum())
    if n == 0:
        return BandOccupancy(0, 0, 0.0, 0.0)
    p = sizes / n
    entropy = float(-(p * np.log2(p)).sum())
    ceiling = np.log2(min(2.0**band_width, n)) if n > 1 else 1.0
    return BandOccupancy(len(sizes), int(sizes.max()), round(n / len(sizes), 2),
                         round(entropy / ceiling, 3) if ceiling > 0 else 1.0)


@dataclass(frozen=True)
class BucketMismatch:
    """An index whose buckets do not hold each of its codes once per band."""

    expected: int
    found: int

    def as_dict(self) -> dict[str, Any]:
        return {"expected": self.expected, "found": self.found}


def check(conn: Connection) -> dict[int, BucketMismatch]:
    """Indexes whose bucket entries do not number codes x bands."""
    have = dict(conn.execute(select(CodeBucket.hasher_id, func.sum(CodeBucket.n)).group_by(CodeBucket.hasher_id)).all())
    out: dict[int, BucketMismatch] = {}
    for hasher_id, n_bands, n_codes in conn.execute(
        select(HashIndex.id, HashIndex.n_bands, func.count(Code.image_id))
        .outerjoin(Code, Code.hasher_id == HashIndex.id).group_by(HashIndex.id, HashIndex.n_bands)
    ):
        found = int(have.get(hasher_id) or 0)
        if found != n_bands * n_codes:
            out[int(hasher_id)] = BucketMismatch(int(n_bands * n_codes), found)
    return out
