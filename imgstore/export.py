"""Export: one row per image with its current paths and, optionally, its nearest neighbours.

It sits above both the catalog (rows, paths) and search (neighbours), so neither imports the
other for it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from sqlalchemy import select

from .batch import Neighbours
from .context import StoreContext
from .filters import conditions
from .models import Image, ImagePath
from .paths import from_stored
from .search import search_many
from .types import SearchFilter, SearchOptions


def export_rows(ctx: StoreContext, *, neighbours: int = 0, search_filter: SearchFilter | None = None,
                graph: Neighbours | None = None) -> Iterator[dict[str, Any]]:
    """One dict per image (those ``search_filter`` allows, when given), by id: its row, current
    paths and, with ``neighbours``, the ids of its nearest stored images (itself excluded): the
    store's search (float re-rank), or with ``graph`` (:func:`imgstore.batch.neighbours`, exact
    Hamming neighbours of the index's codes) that graph's lists and their ``distances``."""
    if graph is not None:
        yield from _with_graph(ctx, search_filter, graph)
        return
    with ctx.read("export") as conn:
        where = conditions(conn.dialect.name, search_filter) if search_filter else []
        images = conn.execute(select(Image.__table__).where(*where).order_by(Image.id)).mappings().all()
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


def _with_graph(ctx: StoreContext, search_filter: SearchFilter | None, graph: Neighbours) -> Iterator[dict[str, Any]]:
    ids = graph.image_ids
    for item in export_rows(ctx, search_filter=search_filter):
        row = int(np.searchsorted(ids, item["id"]))
        if row < len(ids) and ids[row] == item["id"]:
            keep = graph.neighbours[row] >= 0
            item["neighbours"] = graph.neighbours[row][keep].tolist()
            item["distances"] = graph.distances[row][keep].tolist()
        else:  # no code in the index (yet)
            item["neighbours"], item["distances"] = [], []
        yield item
