"""SQLAlchemy Core building blocks shared by ingest, indexing and search.

Hot paths use Core statements with bound parameters (no ORM unit of work); everything here
takes an open ``Connection`` and leaves the transaction to the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, Table, and_, bindparam, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from .hashing.bits import band_values
from .models import BAND_COLUMNS, Code, CodeBucket, Feature, FeatureSpace, Hasher

codes_table: Table = Code.__table__  # type: ignore[assignment]
features_table: Table = Feature.__table__  # type: ignore[assignment]
buckets_table: Table = CodeBucket.__table__  # type: ignore[assignment]

#: Rows per executemany chunk: large enough to amortise round trips, small enough that SQLite's
#: bound-parameter limit and PostgreSQL's message size stay far away.
WRITE_CHUNK = 2000
#: Entries per ``code_buckets`` row. A probe reads all chunks of its bucket; a write appends to
#: the last chunk, so a crowded bucket (many near-identical images) costs one bounded row
#: rewrite per write, not a rewrite of the whole bucket. 512 entries of a 64-bit code are 8 KiB.
BUCKET_CHUNK = 512


def vector_to_bytes(vector: npt.ArrayLike) -> bytes:
    """A float vector as little-endian float32 bytes (the ``features.vector`` format)."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def vectors_from_bytes(blobs: Sequence[bytes], dim: int) -> npt.NDArray[np.float32]:
    """Inverse of :func:`vector_to_bytes` for many rows: (n, dim) float32."""
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    out = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim)
    return out.astype(np.float32, copy=False)


def insert_stmt(conn: Connection, table: Table) -> Any:
    """The dialect's INSERT (which has ``on_conflict_do_nothing`` / ``_do_update``)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def insert_ignore(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert rows, silently keeping the existing row on a unique/primary-key conflict.

    Two processes ingesting overlapping folders both try to insert the same image; the second
    insert must neither fail nor duplicate.
    """
    if not rows:
        return
    stmt = insert_stmt(conn, table).on_conflict_do_nothing()
    for start in range(0, len(rows), WRITE_CHUNK):
        conn.execute(stmt, list(rows[start : start + WRITE_CHUNK]))


def chunks(items: Sequence[Any], size: int = WRITE_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def get_or_create_space(conn: Connection, extractor: str, dim: int, version: str) -> int:
    """The id of the feature space (extractor, preprocessing version), created if new; safe when
    two processes create it at once."""
    table: Table = FeatureSpace.__table__  # type: ignore[assignment]
    insert_ignore(conn, table, [{"extractor": extractor, "dim": dim, "preprocess_version": version}])
    return int(
        conn.scalar(
            select(FeatureSpace.id).where(
                FeatureSpace.extractor == extractor, FeatureSpace.preprocess_version == version
            )
        )
    )


def iter_features(
    conn: Connection, space_id: int, dim: int, *, batch: int = 20_000, image_ids: Iterable[int] | None = None
) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
    """Stored vectors of one space in image-id order, ``batch`` rows at a time (bounded memory).

    Yields (image_ids (n,) int64, vectors (n, dim) float32).
    """
    if image_ids is not None:
        wanted = sorted(set(int(i) for i in image_ids))
        for part in chunks(wanted, 900):
            rows = conn.execute(
                select(Feature.image_id, Feature.vector)
                .where(Feature.space_id == space_id, Feature.image_id.in_(part))
                .order_by(Feature.image_id)
            ).all()
            if rows:
                yield (
                    np.array([r[0] for r in rows], dtype=np.int64),
                    vectors_from_bytes([r[1] for r in rows], dim),
                )
        return
    last = -1
    while True:
        rows = conn.execute(
            select(Feature.image_id, Feature.vector)
            .where(Feature.space_id == space_id, Feature.image_id > last)
            .order_by(Feature.image_id)
            .limit(batch)
        ).all()
        if not rows:
            return
        last = int(rows[-1][0])
        yield np.array([r[0] for r in rows], dtype=np.int64), vectors_from_bytes([r[1] for r in rows], dim)


def load_features(
    conn: Connection, space_id: int, dim: int, image_ids: Iterable[int] | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    parts = list(iter_features(conn, space_id, dim, image_ids=image_ids))
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def code_rows(
    hasher_id: int, image_ids: npt.ArrayLike, codes: npt.NDArray[np.uint8], n_bands: int, band_width: int
) -> list[dict[str, Any]]:
    """Rows for ``codes``: packed bytes plus the band columns (unused bands stay NULL)."""
    bands = band_values(codes, n_bands, band_width).tolist()
    ids = np.asarray(image_ids, dtype=np.int64).tolist()
    rows = []
    for image_id, code, values in zip(ids, codes, bands):
        row: dict[str, Any] = {"hasher_id": hasher_id, "image_id": image_id, "code": code.tobytes()}
        for name in BAND_COLUMNS:
            row[name] = None
        for j, value in enumerate(values):
            row[BAND_COLUMNS[j]] = value
        rows.append(row)
    return rows


def bump_generation(conn: Connection, hasher_ids: Iterable[int]) -> None:
    """Mark indexes as changed so process-local code caches reload them."""
    ids = list(hasher_ids)
    if ids:
        conn.execute(update(Hasher).where(Hasher.id.in_(ids)).values(generation=Hasher.generation + 1))




# --- codes and their band buckets ------------------------------------------------------------


def write_codes(
    conn: Connection, hasher_id: int, image_ids: npt.ArrayLike, codes: npt.NDArray[np.uint8], n_bands: int, band_width: int,
    defer: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]] | None = None,
) -> int:
    """Store codes (keeping any code already stored for the same image) and add the new ones to
    their band buckets, in the caller's transaction. Returns how many were new.

    Only rows this statement actually inserted (``RETURNING``) enter the buckets, so two
    processes writing the same image at once cannot put it in a bucket twice. ``defer``
    (building a new index): collect the new codes there instead, for one
    :func:`write_new_buckets` at the end; appending batch by batch rewrote each bucket row
    once per batch, which on PostgreSQL left the bucket table 9x its live size (588 MB for
    64 MB of entries at 1M codes) and probes reading scattered pages.
    """
    ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if len(ids) == 0:
        return 0
    inserted: list[int] = []
    if conn.dialect.name == "postgresql":
        # one statement of arrays per chunk: SQLAlchemy's multi-row VALUES with RETURNING had
        # psycopg parse 10,000 placeholders a statement (~0.1 s each)
        bands = band_values(codes, n_bands, band_width)
        band_cols = ", ".join(BAND_COLUMNS[:n_bands])
        sql = (
            f"INSERT INTO codes (hasher_id, image_id, code, {band_cols}) "
            f"SELECT %s, * FROM unnest(%s::bigint[], %s::bytea[], {', '.join(['%s::bigint[]'] * n_bands)}) "
            "ON CONFLICT DO NOTHING RETURNING image_id"
        )
        for start in range(0, len(ids), WRITE_CHUNK):
            stop = start + WRITE_CHUNK
            params = (hasher_id, ids[start:stop].tolist(), [c.tobytes() for c in codes[start:stop]],
                      *(bands[start:stop, j].tolist() for j in range(n_bands)))
            inserted += conn.exec_driver_sql(sql, params).scalars().all()
    else:
        stmt = insert_stmt(conn, codes_table).on_conflict_do_nothing().returning(codes_table.c.image_id)
        rows = code_rows(hasher_id, ids, codes, n_bands, band_width)
        for start in range(0, len(rows), WRITE_CHUNK):
            inserted += conn.execute(stmt, list(rows[start : start + WRITE_CHUNK])).scalars().all()
    if not inserted:
        return 0
    keep = np.isin(ids, np.asarray(inserted, dtype=np.int64))
    if defer is not None:
        defer.append((ids[keep], codes[keep]))
    else:
        _append_to_buckets(conn, hasher_id, ids[keep], codes[keep], n_bands, band_width, new_index=False)
    return int(keep.sum())


def write_new_buckets(
    conn: Connection, hasher_id: int, deferred: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]], n_bands: int, band_width: int
) -> None:
    """The buckets of a new index (whose buckets nobody else writes) from the codes that
    :func:`write_codes` collected in ``deferred``: every bucket row written once."""
    if not deferred:
        return
    ids = np.concatenate([d[0] for d in deferred])
    codes = np.concatenate([d[1] for d in deferred])
    _append_to_buckets(conn, hasher_id, ids, codes, n_bands, band_width, new_index=True)


def _bucket_groups(ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint8], n_bands: int, band_width: int) -> Iterator[tuple[int, int, npt.NDArray[np.intp]]]:
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
        # one statement per chunk of rows, as arrays (per-row executemany ran ~0.3 ms a row)
        for part in chunks(rows, WRITE_CHUNK):
            conn.exec_driver_sql(_APPEND_SQL["postgresql"], tuple(list(col) for col in zip(*part)))
    else:
        for part in chunks(rows, WRITE_CHUNK):
            conn.exec_driver_sql(_APPEND_SQL["sqlite"], list(part))


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
    layouts = {h.id: h for h in conn.execute(select(Hasher.id, Hasher.n_bits, Hasher.n_bands, Hasher.band_width))}
    for part in chunks(list(gone_all.tolist()), WRITE_CHUNK):
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


def _remove_from_buckets(conn: Connection, hasher_id: int, keys: list[tuple[int, int]], gone: npt.NDArray[np.int64], n_bytes: int) -> None:
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
            update(buckets_table).where(where).values(n=bindparam("new_n"), image_ids=bindparam("new_ids"), codes=bindparam("new_codes")),
            updates,
        )
    if deletes:
        conn.execute(delete(buckets_table).where(where), deletes)
