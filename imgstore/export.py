"""Export: one row per image with its current paths and, optionally, its nearest neighbours.

It sits above both the catalog (rows, paths) and search (neighbours), so neither imports the
other for it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import select

from .context import StoreContext
from .models import Image, ImagePath
from .paths import from_stored
from .search import search_many
from .types import SearchOptions


def export_rows(ctx: StoreContext, *, neighbours: int = 0) -> Iterator[dict[str, Any]]:
    """One dict per image: its row, current paths and, with ``neighbours``, the ids of its
    nearest stored images (itself excluded)."""
    with ctx.read("export") as conn:
        images = conn.execute(select(Image.__table__).order_by(Image.id)).mappings().all()
        paths: dict[int, list[str]] = {}
        for image_id, path in conn.execute(
            select(ImagePath.image_id, ImagePath.path).where(ImagePath.is_current.is_(True)).order_by(ImagePath.path)
        ):
            paths.setdefault(int(image_id), []).append(from_stored(path))
    for start in range(0, len(images), 256):
        chunk = images[start : start + 256]
        near = search_many(ctx, [int(r["id"]) for r in chunk], SearchOptions(k=neighbours + 1, cached=True)) if neighbours else []
        for n, row in enumerate(chunk):
            item = {k: v for k, v in row.items() if k != "signature"}  # binary, for dedup only
            item["paths"] = paths.get(int(row["id"]), [])
            if neighbours:
                item["neighbours"] = [r.image_id for r in near[n] if r.image_id != row["id"]][:neighbours]
            yield item
