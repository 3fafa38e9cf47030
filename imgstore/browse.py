"""Browsing the collection: one page of its images in a chosen order, narrowed by a search
filter (the same conditions as every search: :func:`imgstore.filters.conditions`).

A page is one ``LIMIT``/``OFFSET`` statement (sorted by folder: joined to one aggregate of the
images' first current paths) and one count over ``images``, the filter's conditions inline (a
browse is one look, not a search repeated with the same filter, so the allowed sets
:mod:`imgstore.filters` keeps for searches are not used). Images whose every file went stale
are left out, as searches leave them out, unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Subquery, case, func, or_, select

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


def _not_stale(first_path: ColumnElement[Any] | None = None) -> ColumnElement[bool]:
    """Images with a current file, or added without any file (never stale), for a page (its
    LIMIT lets the database stop early). ``first_path``: the joined first current path, when the
    page has it (then not NULL is "has a current file", without a look-up)."""
    any_path = select(ImagePath.id).where(ImagePath.image_id == Image.id).exists()
    if first_path is not None:
        return or_(first_path.is_not(None), ~any_path)
    current = select(ImagePath.id).where(ImagePath.image_id == Image.id, ImagePath.is_current.is_(True)).exists()
    return or_(~any_path, current)


def _not_stale_count() -> ColumnElement[bool]:
    """:func:`_not_stale` for the count: not among the images whose every file is stale, one
    aggregate over ``image_paths`` the databases run once (a hashed set), where the two
    per-image look-ups joined by OR are run for every image."""
    current = case((ImagePath.is_current.is_(True), 1), else_=0)
    stale = select(ImagePath.image_id).group_by(ImagePath.image_id).having(func.max(current) == 0)
    return Image.id.not_in(stale)


def _first_paths(dialect: str) -> Subquery:
    """Each image's first current path (its bytewise smallest: folders together, then file
    names), one row per image with a current file. One aggregate over ``image_paths`` that a
    page joins, planned once (a hash or sorted aggregate), rather than a look-up per image."""
    path = ImagePath.path.collate("C") if dialect == "postgresql" else ImagePath.path  # SQLite compares bytes
    return (select(ImagePath.image_id.label("image_id"), func.min(path).label("path"))
            .where(ImagePath.is_current.is_(True)).group_by(ImagePath.image_id).subquery("first_path"))


def _order(key: ColumnElement[Any], descending: bool) -> list[ColumnElement[Any]]:
    """ORDER BY a sort's key: missing values last in either direction, then the id (a total
    order, so pages never repeat or skip an image)."""
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
    total = int(conn.scalar(select(func.count()).select_from(Image)
                            .where(*where, *([] if include_stale else [_not_stale_count()]))) or 0)
    stmt = select(Image.id, Image.width, Image.height, Image.captured_at, Image.ingested_at).select_from(Image)
    key: ColumnElement[Any]
    first: Subquery | None = None
    if sort == "folder":
        first = _first_paths(conn.dialect.name)
        stmt = stmt.outerjoin(first, first.c.image_id == Image.id)
        key = first.c.path
    else:
        key = (Image.captured_at if sort == "taken" else Image.ingested_at).expression
    if not include_stale:
        where.append(_not_stale(None if first is None else first.c.path))
    rows = conn.execute(
        stmt.where(*where).order_by(*_order(key, order == "desc")).limit(per_page).offset((page - 1) * per_page)
    ).all()
    paths = path_rows(conn, [int(r[0]) for r in rows])
    items = [BrowseItem(int(image_id), [p.path for p in paths.get(int(image_id), []) if p.is_current], int(width),
                        int(height), captured, ingested)
             for image_id, width, height, captured, ingested in rows]
    return BrowsePage(items, total, page, per_page, max(1, -(-total // per_page)), sort, order)
