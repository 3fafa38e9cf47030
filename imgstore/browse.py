"""Browsing the collection: one page of its images in a chosen order, narrowed by a search
filter (the same conditions as every search: :func:`imgstore.filters.conditions`).

A page is one ``LIMIT``/``OFFSET`` statement and one count over ``images``, the filter's
conditions inline (a browse is one look, not a search repeated with the same filter, so the
allowed sets :mod:`imgstore.filters` keeps for searches are not used). Images whose every file
went stale are left out, as searches leave them out, unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, case, func, or_, select

from .catalog import path_rows
from .errors import ConfigError
from .filters import conditions
from .models import Image, ImagePath
from .types import SearchFilter

#: What a page may be sorted by: EXIF capture time (images without one last, in either order),
#: when the image was added, its folder (its first current file's path: folders together, then
#: file names; images without a current file last).
SORTS = ("taken", "added", "folder")
ORDERS = ("asc", "desc")
#: The most images one page holds, and the furthest page (an offset a database takes).
MAX_PER_PAGE = 500
MAX_PAGE = 10_000_000


@dataclass(frozen=True)
class BrowseItem:
    """One image of a page: its current files (sorted), size in pixels, when it was taken
    (EXIF, None when unknown) and when it was added."""

    image_id: int
    paths: list[str]
    width: int
    height: int
    captured_at: datetime | None
    ingested_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class BrowsePage:
    """One page of a browse: its images, and where it stands (``total`` images allowed by the
    filter in all, ``pages`` pages of ``per_page``; a page past the last is empty)."""

    items: list[BrowseItem]
    total: int
    page: int
    per_page: int
    pages: int
    sort: str
    order: str

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["items"] = [item.as_dict() for item in self.items]
        return out


def _whole(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high:,}, got {value!r}")
    return value


def _not_stale() -> ColumnElement[bool]:
    """Images with a current file, or added without any file (never stale)."""
    any_path = select(ImagePath.id).where(ImagePath.image_id == Image.id).exists()
    current = select(ImagePath.id).where(ImagePath.image_id == Image.id, ImagePath.is_current.is_(True)).exists()
    return or_(~any_path, current)


def _order(dialect: str, sort: str, descending: bool) -> list[ColumnElement[Any]]:
    """ORDER BY of a sort: missing values last in either direction, then the id (a total order,
    so pages never repeat or skip an image)."""
    key: Any  # a column, or the correlated first path
    if sort == "taken":
        key = Image.captured_at
    elif sort == "added":
        key = Image.ingested_at
    else:
        path = ImagePath.path.collate("C") if dialect == "postgresql" else ImagePath.path  # bytewise: folders together
        key = (select(func.min(path)).where(ImagePath.image_id == Image.id, ImagePath.is_current.is_(True))
               .correlate(Image).scalar_subquery())
    missing = case((key.is_(None), 1), else_=0)
    return [missing.asc(), key.desc() if descending else key.asc(), Image.id.desc() if descending else Image.id.asc()]


def browse(conn: Connection, search_filter: SearchFilter | None = None, *, sort: str = "taken", order: str = "desc",
           page: int = 1, per_page: int = 60, include_stale: bool = False) -> BrowsePage:
    """Page ``page`` (from 1) of the images ``search_filter`` allows, ``per_page`` of them,
    sorted by ``sort`` (:data:`SORTS`) in ``order`` (``asc`` or ``desc``)."""
    if sort not in SORTS:
        raise ConfigError(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
    if order not in ORDERS:
        raise ConfigError(f"order must be asc or desc, got {order!r}")
    page = _whole(page, "page", 1, MAX_PAGE)
    per_page = _whole(per_page, "per_page", 1, MAX_PER_PAGE)
    where = conditions(conn.dialect.name, search_filter) if search_filter else []
    if not include_stale:
        where.append(_not_stale())
    total = int(conn.scalar(select(func.count()).select_from(Image).where(*where)) or 0)
    rows = conn.execute(
        select(Image.id, Image.width, Image.height, Image.captured_at, Image.ingested_at).where(*where)
        .order_by(*_order(conn.dialect.name, sort, order == "desc")).limit(per_page).offset((page - 1) * per_page)
    ).all()
    paths = path_rows(conn, [int(r[0]) for r in rows])
    items = [BrowseItem(int(image_id), [p.path for p in paths.get(int(image_id), []) if p.is_current], int(width),
                        int(height), captured, ingested)
             for image_id, width, height, captured, ingested in rows]
    return BrowsePage(items, total, page, per_page, max(1, -(-total // per_page)), sort, order)
