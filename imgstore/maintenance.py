"""Store health and summaries: ``verify`` (consistency and files on disk) and ``info``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, and_, exists, func, select

from . import bandindex, migrate
from .catalog import Counts, counts
from .indexing import list_indexes
from .models import Code, Feature, HashIndex, Image, ImagePath
from .paths import from_stored
from .types import IndexInfo, SpaceInfo
from .vectors import list_spaces

if TYPE_CHECKING:  # pragma: no cover
    from .context import StoreContext


@dataclass(frozen=True)
class VerifyReport:
    """``ok`` is false when the database is inconsistent; files that vanished or changed on
    disk are reported but do not make it inconsistent."""

    images_without_features: list[int]
    missing_codes: dict[int, list[int]]  # index id -> image ids without a code
    bucket_mismatch: dict[int, bandindex.BucketMismatch]
    dangling_rows: int
    vanished_files: list[str]
    changed_files: list[str]

    @property
    def ok(self) -> bool:
        return not (self.images_without_features or self.missing_codes or self.dangling_rows or self.bucket_mismatch)

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["bucket_mismatch"] = {k: v.as_dict() for k, v in self.bucket_mismatch.items()}
        out["ok"] = self.ok
        return out


@dataclass(frozen=True)
class IndexSummary:
    index: IndexInfo
    bands: list[bandindex.BandOccupancy]

    def as_dict(self) -> dict[str, Any]:
        return {**self.index.as_dict(), "bands": [b.as_dict() for b in self.bands]}


@dataclass(frozen=True)
class StoreInfo:
    database: str
    revision: str | None
    counts: Counts
    database_bytes: int
    feature_spaces: list[SpaceInfo]
    indexes: list[IndexSummary]

    def as_dict(self) -> dict[str, Any]:
        return {"database": self.database, "revision": self.revision, **self.counts.as_dict(),
                "database_bytes": self.database_bytes,
                "feature_spaces": [s.as_dict() for s in self.feature_spaces],
                "indexes": [i.as_dict() for i in self.indexes]}


def verify(ctx: StoreContext, *, check_files: bool = True) -> VerifyReport:
    with ctx.read("verify") as conn:
        without = list(conn.scalars(
            select(Image.id).where(~exists().where(Feature.image_id == Image.id)).order_by(Image.id)
        ))
        missing: dict[int, list[int]] = {}
        for hasher_id, space_id in conn.execute(select(HashIndex.id, HashIndex.space_id)):
            ids = conn.scalars(
                select(Feature.image_id).where(
                    Feature.space_id == space_id,
                    ~exists().where(and_(Code.hasher_id == hasher_id, Code.image_id == Feature.image_id)),
                )
            ).all()
            if ids:
                missing[int(hasher_id)] = list(ids)
        dangling = sum(
            int(conn.scalar(select(func.count()).select_from(model).where(~exists().where(Image.id == model.image_id))) or 0)
            for model in (Feature, Code, ImagePath)
        )
        vanished, changed = _files(conn) if check_files else ([], [])
        return VerifyReport(without, missing, bandindex.check(conn), dangling, vanished, changed)


def _files(conn: Connection) -> tuple[list[str], list[str]]:
    vanished, changed = [], []
    for path, size, mtime in conn.execute(
        select(ImagePath.path, ImagePath.file_size, ImagePath.mtime_ns).where(ImagePath.is_current.is_(True))
    ):
        real = from_stored(path)
        try:
            st = os.stat(real)
        except OSError:
            vanished.append(real)
            continue
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            changed.append(real)
    return vanished, changed


def info(ctx: StoreContext) -> StoreInfo:
    with ctx.read("summarise the store") as conn:
        if ctx.dialect == "sqlite":
            size = conn.exec_driver_sql("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()").scalar()
        else:
            size = conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar()
        indexes = [IndexSummary(i, bandindex.occupancy(conn, i.id, i.n_bands, i.band_width)) for i in list_indexes(conn)]
        return StoreInfo(ctx.display_url, migrate.current_revision(conn.engine), counts(conn), int(size or 0),
                         list_spaces(conn), indexes)
