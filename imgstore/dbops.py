"""SQLAlchemy Core building blocks shared by ingest, indexing and search.

Hot paths use Core statements with bound parameters (no ORM unit of work); everything here
takes an open ``Connection`` and leaves the transaction to the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, Table, select, update
from sqlalchemy.dialects import postgresql, sqlite

from .hashing.bits import band_values
from .models import BAND_COLUMNS, Code, Feature, FeatureSpace, Hasher

codes_table: Table = Code.__table__  # type: ignore[assignment]
features_table: Table = Feature.__table__  # type: ignore[assignment]

#: Rows per executemany chunk: large enough to amortise round trips, small enough that SQLite's
#: bound-parameter limit and PostgreSQL's message size stay far away.
WRITE_CHUNK = 2000


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


