"""Feature spaces and the float vectors stored in them (``feature_spaces``, ``features``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, Table, func, select

from .errors import NotFoundError
from .models import Feature, FeatureSpace
from .sqlhelpers import IN_CHUNK, chunks, insert_ignore
from .types import SpaceInfo

features_table: Table = Feature.__table__


def vector_to_bytes(vector: npt.ArrayLike) -> bytes:
    """A float vector as little-endian float32 bytes (the ``features.vector`` format)."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def vectors_from_bytes(blobs: Sequence[bytes], dim: int) -> npt.NDArray[np.float32]:
    """Inverse of :func:`vector_to_bytes` for many rows: (n, dim) float32."""
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    out = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim)
    return out.astype(np.float32, copy=False)


def get_or_create_space(conn: Connection, extractor: str, dim: int, version: str) -> int:
    """The id of the feature space (extractor, preprocessing version), created if new; safe when
    two processes create it at once."""
    table: Table = FeatureSpace.__table__
    insert_ignore(conn, table, [{"extractor": extractor, "dim": dim, "preprocess_version": version}])
    return int(
        conn.execute(
            select(FeatureSpace.id).where(
                FeatureSpace.extractor == extractor, FeatureSpace.preprocess_version == version
            )
        ).scalar_one()
    )


def list_spaces(conn: Connection) -> list[SpaceInfo]:
    counts = dict(conn.execute(select(Feature.space_id, func.count()).group_by(Feature.space_id)).all())
    rows = conn.execute(select(FeatureSpace.__table__).order_by(FeatureSpace.id)).mappings().all()
    return [SpaceInfo(id=r["id"], extractor=r["extractor"], dim=r["dim"], preprocess_version=r["preprocess_version"],
                      created_at=r["created_at"], n_features=int(counts.get(r["id"], 0))) for r in rows]


def get_space(conn: Connection, space_id: int) -> SpaceInfo:
    """One feature space by id, without counting its vectors (``n_features`` None): every
    search asks, and counting a million rows took 100 ms (benchmarks/results/serve.md)."""
    row = conn.execute(select(FeatureSpace.__table__).where(FeatureSpace.id == space_id)).mappings().first()
    if row is None:
        raise NotFoundError(f"no feature space with id {space_id}")
    return SpaceInfo(id=row["id"], extractor=row["extractor"], dim=row["dim"], preprocess_version=row["preprocess_version"],
                     created_at=row["created_at"], n_features=None)


def pick_space(conn: Connection, extractor: str | None) -> SpaceInfo:
    """The space of ``extractor``, or by default the one with the most stored vectors
    (:func:`largest_space`)."""
    spaces = list_spaces(conn)
    if extractor is not None:
        spaces = [s for s in spaces if s.extractor == extractor]
        if not spaces:
            raise NotFoundError(f"no images with {extractor} features; ingest with --extractor {extractor} first")
    if not spaces or max(s.n_features or 0 for s in spaces) == 0:  # list_spaces counts every space
        raise NotFoundError("the store has no images yet; run `imgstore ingest FOLDER` first")
    return largest_space(spaces)


def largest_space(spaces: Sequence[SpaceInfo]) -> SpaceInfo:
    """The space with the most stored vectors; on a tie the newest (an extractor's new
    preprocessing version, once its images are re-ingested)."""
    return max(spaces, key=lambda s: (s.n_features, s.id))


def iter_features(
    conn: Connection, space_id: int, dim: int, *, batch: int = 20_000, image_ids: Iterable[int] | None = None
) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
    """Stored vectors of one space in image-id order, ``batch`` rows at a time (bounded memory).

    Yields (image_ids (n,) int64, vectors (n, dim) float32).
    """
    if image_ids is not None:
        wanted = sorted(set(int(i) for i in image_ids))
        for part in chunks(wanted, IN_CHUNK):
            if conn.dialect.name == "postgresql":
                # one array parameter: an IN list of 100 placeholders cost more to bind and plan
                # than the look-up (every re-ranked search reads its candidates' vectors here)
                rows = conn.exec_driver_sql(
                    "SELECT image_id, vector FROM features"
                    " WHERE space_id = %s AND image_id = ANY(%s::bigint[]) ORDER BY image_id",
                    (space_id, part),
                ).all()
            else:  # driver level: SQLAlchemy's IN-list building cost more than SQLite's look-up
                marks = ",".join("?" * len(part))
                rows = conn.exec_driver_sql(
                    f"SELECT image_id, vector FROM features WHERE space_id = ? AND image_id IN ({marks}) ORDER BY image_id",
                    (space_id, *part),
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
    """Stored vectors of one space (all, or those of ``image_ids``), in image-id order."""
    parts = list(iter_features(conn, space_id, dim, image_ids=image_ids))
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
