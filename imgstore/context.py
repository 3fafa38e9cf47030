"""One store's context: its engine, every database access (read or write) and its caches.

Every module that touches the database takes a :class:`StoreContext` and goes through
:meth:`StoreContext.read` or :meth:`StoreContext.write`, so no access can skip the retry of
lock and serialization conflicts or the translation of driver errors into
:class:`~imgstore.errors.DatabaseError`.

Caches live here, on the store that filled them, never in module globals: extractors by name and
options, fitted hashers by the index's ``uid`` (a random token written when the index is
created, so an id that SQLite reuses after ``index drop`` never serves the old hasher), and a
registry of the store's *parts* (:meth:`StoreContext.part`): state that a higher module keeps
per store (the in-memory code caches of :mod:`imgstore.codecache`, the geometric check's
verdicts) without this module importing it. Two stores never share an entry.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, Engine, create_engine, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from .db import WRITE_OPTION, make_engine, resolve_url, safe_url
from .decode import resolve_max_pixels
from .errors import DatabaseError, NotFoundError, SchemaError
from .features import DEFAULT_EXTRACTOR, Extractor, get_extractor, resolve_runtime
from .hashing import Hasher, hasher_from_bytes
from .migrate import ensure_current
from .models import HashIndex
from .types import IndexInfo, SpaceInfo
from .vectors import get_space

T = TypeVar("T")
P = TypeVar("P", bound="StorePart")

log = logging.getLogger(__name__)

#: Write transactions that hit a lock or a serialization failure are retried this many times,
#: with exponential back-off from RETRY_BASE_S (plus jitter), then the error is raised.
RETRY_ATTEMPTS = 8
RETRY_BASE_S = 0.05
#: Memory a code cache may spend on its rows' float features (1M 128-d vectors, or 100k of
#: EfficientNet-Lite0's 1280-d, take 512 MB); ``ImageStore(vector_cache_mb=...)`` changes it.
VECTOR_CACHE_BYTES = 1 << 30


class StorePart(Protocol):
    """State a module keeps per store in the context's registry (:meth:`StoreContext.part`):
    made with the context, told when an index changes, closed with the store."""

    def __init__(self, ctx: StoreContext) -> None: ...

    def forget_index(self, index_id: int) -> None: ...

    def close(self) -> None: ...


class StoreContext:
    """The engine of one database and what this process has computed from it."""

    def __init__(self, db: Any = None, *, echo: bool = False,
                 extractor_options: dict[str, dict[str, Any]] | None = None, max_pixels: int | None = None,
                 runtime: str | None = None) -> None:
        #: what runs the CNN extractors: "auto", "torch" or "onnx" (None: $IMGSTORE_RUNTIME, else auto);
        #: see :func:`imgstore.features.resolve_runtime`
        self.runtime = runtime
        if runtime is not None:
            resolve_runtime(runtime)  # a bad name fails here, not at the first image
        #: largest image (pixels) this store decodes, on every path: ingest, queries, thumbnails
        self.max_pixels = resolve_max_pixels(max_pixels)
        self.url: URL = resolve_url(db)
        self.display_url = safe_url(self.url)
        #: per extractor name, options used whenever this store builds it (e.g. a weights file)
        self.extractor_options = dict(extractor_options or {})
        self.engine: Engine = make_engine(self.url, echo=echo)
        self._quick_engine: Engine | None = None  # see quick_read
        self._extractors: dict[tuple[str, tuple[tuple[str, Any], ...]], Extractor] = {}
        self._hashers: dict[str, Hasher] = {}  # by index uid
        self._hasher_uids: dict[int, str] = {}  # index id -> uid of the hasher held for it
        #: write transactions rerun after a lock conflict, deadlock or serialization failure
        self.write_retries = 0
        self._parts: dict[type[Any], Any] = {}
        self._parts_lock = threading.Lock()
        self._spaces: dict[int, SpaceInfo] = {}  # feature spaces never change once made
        #: memory a code cache may spend on its rows' float features (``codecache.CodeCaches``)
        self.vector_cache_bytes = VECTOR_CACHE_BYTES

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    def close(self) -> None:
        self.engine.dispose()
        if self._quick_engine is not None:
            self._quick_engine.dispose()
        self._hashers.clear()
        for part in list(self._parts.values()):
            part.close()
        self._parts.clear()

    def part(self, kind: type[P]) -> P:
        """This store's one instance of ``kind``, made on first use as ``kind(self)``: where a
        module keeps what it computed for this store (code caches, dedup verdicts)."""
        found = self._parts.get(kind)
        if found is None:
            with self._parts_lock:
                found = self._parts.get(kind)
                if found is None:
                    found = self._parts[kind] = kind(self)
        return found

    def forget_index(self, index_id: int) -> None:
        """The index changed in this process (created, rebuilt, activated, dropped): every part
        forgets what it holds of it."""
        uid = self._hasher_uids.pop(index_id, None)
        if uid is not None:
            self._hashers.pop(uid, None)
        for part in list(self._parts.values()):
            part.forget_index(index_id)

    def space(self, conn: Connection, space_id: int) -> SpaceInfo:
        """A feature space by id, read once per process (spaces never change once made)."""
        found = self._spaces.get(space_id)
        if found is None:
            found = self._spaces[space_id] = get_space(conn, space_id)
        return found

    # -- database access --------------------------------------------------------------------

    @property
    def driver_errors(self) -> tuple[type[BaseException], ...]:
        """What a failing statement raises: SQLAlchemy's errors, and the driver's own from the
        raw cursors that the hot paths use (``bandindex.SqlProbe``)."""
        return (SQLAlchemyError, self.engine.dialect.loaded_dbapi.Error)

    @contextmanager
    def translate(self, doing: str) -> Iterator[None]:
        """Driver errors raised inside become :class:`DatabaseError` naming what was being done."""
        try:
            yield
        except self.driver_errors as exc:
            raise DatabaseError(f"cannot {doing} on {self.display_url}: {driver_message(exc)}") from exc

    @contextmanager
    def read(self, doing: str) -> Iterator[Connection]:
        """A connection for reads; any driver error (connecting included) is translated."""
        with self.translate(doing), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def quick_read(self, doing: str) -> Iterator[Connection]:
        """A connection for a read of one or two independent statements on the hot path (a
        search answered from the code cache reads only paths). On PostgreSQL it comes from a
        second pool, in autocommit and without the checkout ping: BEGIN, the ping and the
        ROLLBACK were three of a cached search's four round trips. A connection that died
        meanwhile (a server restart) fails that one read; :func:`is_disconnect` tells the
        caller to run it again, on a fresh connection. SQLite: :meth:`read`."""
        if self.dialect != "postgresql":
            with self.read(doing) as conn:
                yield conn
            return
        if self._quick_engine is None:
            self._quick_engine = create_engine(self.url, isolation_level="AUTOCOMMIT", pool_pre_ping=False)
        with self.translate(doing), self._quick_engine.connect() as conn:
            yield conn

    def drop_quick_connections(self) -> None:
        """Close every pooled :meth:`quick_read` connection (after one was found dead: the
        others, opened before the same restart, are likely dead too)."""
        if self._quick_engine is not None:
            self._quick_engine.dispose()

    def write(self, work: Callable[[Connection], T], *, doing: str = "write") -> T:
        """Run ``work(conn)`` in one write transaction, retrying lock and serialization
        conflicts with a bounded exponential back-off (the whole body is rerun on retry)."""
        delay = RETRY_BASE_S
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                with self.engine.connect() as conn:
                    conn = conn.execution_options(**{WRITE_OPTION: True})
                    with conn.begin():
                        return work(conn)
            except self.driver_errors as exc:
                # conflicts with other writers, and a connection the server ended (a restart):
                # the transaction was rolled back (or, lost in its commit, is idempotent: every
                # write is an insert-or-ignore), so it is run again from the start, counted
                retry = is_retryable(exc) if isinstance(exc, DBAPIError) else False
                if attempt == RETRY_ATTEMPTS or not (retry or is_disconnect(exc)):
                    raise DatabaseError(f"cannot {doing} on {self.display_url}: {driver_message(exc)}") from exc
                log.info("%s: %s; retry %d in %.2fs", doing, driver_message(exc), attempt, delay)
                self.write_retries += 1
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    # -- caches -----------------------------------------------------------------------------

    def extractor(self, name: str | None = None, **options: Any) -> Extractor:
        """The extractor ``name`` (default EfficientNet-Lite0), built once per store and options."""
        name = name or DEFAULT_EXTRACTOR
        options = {**self.extractor_options.get(name, {}), **options}
        key = (name, tuple(sorted(options.items())))
        if key not in self._extractors:
            self._extractors[key] = get_extractor(name, runtime=self.runtime, **options)
        return self._extractors[key]

    def hasher(self, conn: Connection, index: IndexInfo) -> Hasher:
        """The fitted hasher of ``index``, decoded once per store and index uid."""
        cached = self._hashers.get(index.uid)
        if cached is None:
            blob = conn.scalar(select(HashIndex.params).where(HashIndex.id == index.id, HashIndex.uid == index.uid))
            if blob is None:
                raise NotFoundError(f"index {index.id} was dropped or rebuilt meanwhile; `imgstore index list` shows the indexes")
            cached = self._hashers[index.uid] = hasher_from_bytes(blob)
            self._hasher_uids[index.id] = index.uid
        return cached


def open_context(db: Any = None, *, check_schema: bool = True, echo: bool = False,
                 extractor_options: dict[str, dict[str, Any]] | None = None,
                 max_pixels: int | None = None, runtime: str | None = None) -> StoreContext:
    """A store's context, its schema checked (a brand-new database gets it created; one behind
    the code's migrations raises :class:`SchemaOutdatedError` naming the command that fixes
    it): what ``ImageStore`` opens, and what a cluster worker opens to write its batches."""
    ctx = StoreContext(db, echo=echo, extractor_options=extractor_options, max_pixels=max_pixels, runtime=runtime)
    if check_schema:
        try:
            ensure_current(ctx.engine, ctx.url)
        except SchemaError:
            ctx.close()
            raise
        except SQLAlchemyError as exc:
            ctx.close()
            raise DatabaseError(f"cannot open {ctx.display_url}: {driver_message(exc)}") from exc
    return ctx


def is_disconnect(exc: BaseException) -> bool:
    """``exc`` (a :class:`DatabaseError` or what it wraps) says the connection was lost: the
    server restarted or closed it. A read may be run again on a fresh connection."""
    cause = exc.__cause__ if isinstance(exc, DatabaseError) else exc
    if isinstance(cause, DBAPIError):
        if cause.connection_invalidated:
            return True
        cause = cause.orig
    # psycopg's OperationalError and its kinds (AdminShutdown, "the connection is lost"); not
    # SQLite's, which also names a missing table or a full disk
    kinds = type(cause).__mro__
    return type(cause).__module__.startswith("psycopg") and any(kind.__name__ == "OperationalError" for kind in kinds)


def is_retryable(exc: DBAPIError) -> bool:
    """Lock timeouts (SQLite), serialization failures and deadlocks (PostgreSQL)."""
    code = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if code in ("40001", "40P01", "55P03"):
        return True
    text = str(getattr(exc, "orig", exc)).lower()
    return "database is locked" in text or "database table is locked" in text


def driver_message(exc: BaseException) -> str:
    """The driver's own message, first line only, without SQLAlchemy's statement dump."""
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__

