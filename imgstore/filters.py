"""Search filters in SQL: which images a :class:`~imgstore.types.SearchFilter` allows, and those
sets kept per store while the database is unchanged.

A filtered search needs the set of allowed images before it ranks anything: the in-memory path
turns it into a mask of its rows (:meth:`imgstore.codecache.CodeCache.allowing`), the SQL path
keeps the probed candidates that are in it and, when the filter is narrow, reads the codes of
exactly those images. Reading the set is one statement over ``images`` (and ``image_paths``
for a folder, ``labels`` for what the classifier sees), a scan of the table at worst
(metadata lives in a JSON column without an index), so :class:`FilterSets` keeps the last
few sets per store and serves one again while the database says nothing was committed since
it was read: SQLite's ``PRAGMA data_version`` on a connection kept for that, PostgreSQL's
``pg_current_snapshot()`` (any transaction that completes changes it). A write anywhere in
the database makes the next filtered search read its set again; a read never does.

With the store's background refresher running (``ImageStore.start_refresher``, what
``imgstore serve`` runs), searches skip that check: the refresher makes it every tick and reads
again, in its own thread, the sets searched with lately, so no search waits for them, at the
price the code cache already pays there: answers up to a refresh (plus a read) behind a write.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from sqlalchemy import ColumnElement, Connection, and_, func, or_, select, text

from .labels import class_ids
from .models import FeatureSpace, Image, ImagePath, Label
from .paths import to_stored
from .sqlhelpers import driver_rows
from .types import SearchFilter

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.pool import PoolProxiedConnection

    from .context import StoreContext

log = logging.getLogger(__name__)

#: Filters whose allowed sets a store keeps (the most recently used).
KEPT_SETS = 16
#: With a refresher: a kept set searched with within this many seconds is read again by the
#: refresher after a commit; an older one is dropped (the next search with it reads it).
WARM_S = 60.0
#: Ids up to this many times the set's size (plus a little) are looked up through a dense
#: table (one byte per id); sparser ids through a binary search.
DENSE_FACTOR = 8

_serials = itertools.count(1)


class Allowed:
    """The images a filter allows, as of one state of the database: ``ids`` sorted, distinct.
    ``serial`` names this set (a cache of what was derived from it, a row mask, keys on it)."""

    def __init__(self, ids: npt.NDArray[np.int64], token: object = None) -> None:
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.token = token
        self.serial = next(_serials)
        self._table: npt.NDArray[np.bool_] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    def contains(self, image_ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Which of ``image_ids`` are allowed (a mask in their order)."""
        ids = np.asarray(image_ids, dtype=np.int64)
        n = len(self.ids)
        if n == 0 or len(ids) == 0:
            return np.zeros(len(ids), dtype=bool)
        top = int(self.ids[-1])
        if top < DENSE_FACTOR * n + 4096:
            table = self._table
            if table is None:
                with self._lock:
                    table = np.zeros(top + 1, dtype=bool)
                    table[self.ids] = True
                    self._table = table
            inside = (ids >= 0) & (ids <= top)
            out = np.zeros(len(ids), dtype=bool)
            out[inside] = table[ids[inside]]
            return out
        at = np.minimum(np.searchsorted(self.ids, ids), n - 1)
        return np.asarray(self.ids[at] == ids)


# --- the SQL of each condition ------------------------------------------------------------------

#: A JSON value as text, the way the filter compares it: a string as it is, a number as written,
#: true/false as words (SQLite's ``atom`` of true is 1). ``{x}`` is a json_each row's alias.
_SQLITE_TEXT = ("CASE {x}.type WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' "
                "WHEN 'text' THEN {x}.atom WHEN 'integer' THEN CAST({x}.atom AS TEXT) "
                "WHEN 'real' THEN CAST({x}.atom AS TEXT) END")
#: SQLite: the field's value, or an item of it when it is a list. ``json_each`` over the whole
#: object compares keys as they are (no JSON path to quote: any key works, dots and quotes too).
_SQLITE_FIELD = (
    "EXISTS (SELECT 1 FROM json_each(images.meta) AS f WHERE f.key = :{key} AND ("
    f"({_SQLITE_TEXT.format(x='f')}) = :{{value}} OR (f.type = 'array' AND EXISTS ("
    f"SELECT 1 FROM json_each(f.value) AS e WHERE ({_SQLITE_TEXT.format(x='e')}) = :{{value}}))))"
)
#: PostgreSQL (``meta`` is ``json``): the same, the CASE keeping json_array_elements off scalars.
_PG_FIELD = (
    "CASE json_typeof(images.meta -> CAST(:{key} AS TEXT)) "
    "WHEN 'array' THEN EXISTS (SELECT 1 FROM json_array_elements(images.meta -> CAST(:{key} AS TEXT)) AS e(v) "
    "WHERE json_typeof(e.v) IN ('string', 'number', 'boolean') AND e.v #>> '{{}}' = CAST(:{value} AS TEXT)) "
    "WHEN 'string' THEN images.meta ->> CAST(:{key} AS TEXT) = CAST(:{value} AS TEXT) "
    "WHEN 'number' THEN images.meta ->> CAST(:{key} AS TEXT) = CAST(:{value} AS TEXT) "
    "WHEN 'boolean' THEN images.meta ->> CAST(:{key} AS TEXT) = CAST(:{value} AS TEXT) "
    "ELSE false END"
)


def _field_equals(dialect: str, n: int, key: str, value: str) -> ColumnElement[bool]:
    names = {"key": f"fk{n}", "value": f"fv{n}"}
    sql = (_PG_FIELD if dialect == "postgresql" else _SQLITE_FIELD).format(**names)
    return text(sql).bindparams(**{names["key"]: key, names["value"]: value})  # type: ignore[return-value]


def _under(dialect: str, folder: str) -> ColumnElement[bool]:
    """Images with a current path in ``folder`` (at any depth) or equal to it. SQLite compares
    text bytewise, so a range on the (path, image_id) index selects a folder; PostgreSQL's
    collation need not order paths that way, so it asks ``starts_with``."""
    stored = to_stored(folder)
    lo = stored.rstrip(os.sep) + os.sep
    inside: ColumnElement[bool]
    if dialect == "postgresql":
        inside = func.starts_with(ImagePath.path, lo)
    else:
        inside = and_(ImagePath.path >= lo, ImagePath.path < lo[:-1] + chr(ord(os.sep) + 1))
    current = select(ImagePath.image_id).where(ImagePath.is_current.is_(True), or_(inside, ImagePath.path == stored))
    return Image.id.in_(current)


def conditions(dialect: str, search_filter: SearchFilter) -> list[ColumnElement[bool]]:
    """The filter's conditions on ``images`` (all must hold)."""
    out: list[ColumnElement[bool]] = []
    fields = [*search_filter.where, *(("tags", tag) for tag in search_filter.tags)]
    for n, (key, value) in enumerate(fields):
        out.append(_field_equals(dialect, n, key, value))
    if search_filter.under is not None:
        out.append(_under(dialect, search_filter.under))
    if search_filter.taken_after is not None:
        out.append(Image.captured_at >= search_filter.taken_after)
    if search_filter.taken_before is not None:
        out.append(Image.captured_at < search_filter.taken_before)
    for name in search_filter.labels:
        out.append(_labelled(class_ids(name)))
    return out


def _labelled(classes: tuple[int, ...]) -> ColumnElement[bool]:
    """Images that keep one of ``classes`` among their labels, in any feature space (the
    space condition lets the (space, class) index answer it)."""
    spaces = select(FeatureSpace.id).scalar_subquery()
    return Image.id.in_(select(Label.image_id).where(Label.space_id.in_(spaces), Label.class_id.in_(classes)))


def allowed_ids(conn: Connection, search_filter: SearchFilter) -> npt.NDArray[np.int64]:
    """The ids of the images ``search_filter`` allows, ascending (every image for an empty one)."""
    stmt = select(Image.id).where(*conditions(conn.dialect.name, search_filter)).order_by(Image.id)
    return np.fromiter(conn.execute(stmt).scalars(), dtype=np.int64)


# --- sets kept per store --------------------------------------------------------------------------


class FilterSets:
    """One store's allowed sets, by filter, each kept while the database is unchanged since it
    was read. A store part (:meth:`StoreContext.part`): made on first use, closed with the store."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        self._sets: OrderedDict[SearchFilter, Allowed] = OrderedDict()
        self._lock = threading.Lock()
        self._monitor: PoolProxiedConnection | None = None  # SQLite: a connection that only reads data_version
        self._monitor_lock = threading.Lock()
        self._used: dict[SearchFilter, float] = {}  # when each kept set was last searched with
        #: True while a background refresher keeps the sets fresh (:meth:`refresh`): searches
        #: then use a kept set without checking the database themselves
        self.background = False
        #: allowed sets read from the database, and served again from memory
        self.reads = 0
        self.reuses = 0

    def allowed(self, conn: Connection, search_filter: SearchFilter) -> Allowed:
        """The images ``search_filter`` allows now: the set kept for it when nothing was
        committed since it was read, else read again (in a transaction that starts after the
        check, so the set is at least as new as the state the check saw). With a refresher
        (``background``), a kept set as the refresher last left it."""
        if self.background:
            with self._lock:
                kept = self._sets.get(search_filter)
                if kept is not None:
                    return self._reused(search_filter, kept)
        token = self.token(conn)
        with self._lock:
            kept = self._sets.get(search_filter)
            if kept is not None and kept.token == token:
                return self._reused(search_filter, kept)
        return self._read(search_filter, token)

    def _reused(self, search_filter: SearchFilter, kept: Allowed) -> Allowed:
        self._sets.move_to_end(search_filter)
        self._used[search_filter] = time.monotonic()
        self.reuses += 1
        return kept

    def _read(self, search_filter: SearchFilter, token: object, *, used: bool = True) -> Allowed:
        with self.ctx.read("read the images a filter allows") as fresh:
            found = Allowed(allowed_ids(fresh, search_filter), token)
        with self._lock:
            self.reads += 1
            self._sets[search_filter] = found
            if used:  # a search's read, not the refresher's
                self._sets.move_to_end(search_filter)
                self._used[search_filter] = time.monotonic()
            while len(self._sets) > KEPT_SETS:
                gone, _ = self._sets.popitem(last=False)
                self._used.pop(gone, None)
        return found

    def refresh(self) -> None:
        """After a commit, read again the sets searched with in the last :data:`WARM_S`
        seconds and drop the others: the refresher's tick (its thread, not a search's)."""
        with self._lock:
            if not self._sets:
                return
        with self.ctx.read("check the filters' sets") as conn:
            token = self.token(conn)
        now = time.monotonic()
        with self._lock:
            stale = [f for f, kept in self._sets.items() if kept.token != token]
            for f in [f for f in stale if now - self._used.get(f, 0.0) > WARM_S]:
                del self._sets[f]
                self._used.pop(f, None)
        for f in stale:
            if f in self._sets:
                self._read(f, token, used=False)

    def token(self, conn: Connection) -> object:
        """What changes whenever a transaction commits anywhere in the database (None: nothing
        to go by, so never reuse)."""
        if conn.dialect.name == "postgresql":
            return driver_rows(conn, "SELECT pg_current_snapshot()::text", ())[0][0]
        with self._monitor_lock:
            try:
                if self._monitor is None:
                    self._monitor = self.ctx.engine.raw_connection()
                cursor = self._monitor.cursor()
                try:
                    cursor.execute("PRAGMA data_version")
                    row = cursor.fetchone()
                finally:
                    cursor.close()
            except self.ctx.driver_errors as exc:
                log.info("data_version: %s", exc)
                self._close_monitor()
                return object()  # unique: the set is read again
        return None if row is None else ("sqlite", row[0])

    def forget_index(self, index_id: int) -> None:
        """Allowed sets are of images, not of an index: nothing to forget."""

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            try:
                self._monitor.close()
            except Exception:  # closing a broken connection must not fail the store
                log.debug("closing the data_version connection", exc_info=True)
            self._monitor = None

    def close(self) -> None:
        self.background = False
        with self._monitor_lock:
            self._close_monitor()
        with self._lock:
            self._sets.clear()
            self._used.clear()


def filter_sets(ctx: StoreContext) -> FilterSets:
    """The allowed sets of the store ``ctx`` belongs to (made on first use)."""
    return ctx.part(FilterSets)


def allowed(ctx: StoreContext, conn: Connection, search_filter: SearchFilter | None) -> Allowed | None:
    """The images a filter allows (None: no filter, or an empty one: every image)."""
    if not search_filter:
        return None
    return filter_sets(ctx).allowed(conn, search_filter)
