"""One store's context: its engine, every database access (read or write) and its caches.

Every module that touches the database takes a :class:`StoreContext` and goes through
:meth:`StoreContext.read` or :meth:`StoreContext.write`, so no access can skip the retry of
lock and serialization conflicts or the translation of driver errors into
:class:`~imgstore.errors.DatabaseError`.

Caches live here, on the store that filled them, never in module globals: extractors by name and
options, fitted hashers by the index's ``uid`` (a random token written when the index is
created, so an id that SQLite reuses after ``index drop`` never serves the old hasher), and
in-memory code caches by ``uid`` and ``generation`` (bumped on every change to the index's
codes). Two stores never share an entry.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from .db import WRITE_OPTION, make_engine, resolve_url, safe_url
from .errors import DatabaseError, NotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from .hashing import Hasher
    from .indexing import IndexInfo
    from .search import CodeCache
    from .vectors import SpaceInfo

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Write transactions that hit a lock or a serialization failure are retried this many times,
#: with exponential back-off from RETRY_BASE_S (plus jitter), then the error is raised.
RETRY_ATTEMPTS = 8
RETRY_BASE_S = 0.05
#: Memory a code cache may spend on its rows' float features (1M 128-d vectors, or 100k of
#: EfficientNet-Lite0's 1280-d, take 512 MB); ``ImageStore(vector_cache_mb=...)`` changes it.
VECTOR_CACHE_BYTES = 1 << 30


class StoreContext:
    """The engine of one database and what this process has computed from it."""

    def __init__(self, db: Any = None, *, echo: bool = False,
                 extractor_options: dict[str, dict[str, Any]] | None = None) -> None:
        self.url: URL = resolve_url(db)
        self.display_url = safe_url(self.url)
        #: per extractor name, options used whenever this store builds it (e.g. a weights file)
        self.extractor_options = dict(extractor_options or {})
        self.engine: Engine = make_engine(self.url, echo=echo)
        self._quick_engine: Engine | None = None  # see quick_read
        self._extractors: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
        self._hashers: dict[str, Hasher] = {}  # by index uid
        self._code_caches: dict[int, CodeCache] = {}  # by index id; entry checked against uid + generation
        #: how code caches were brought up to date: full loads, and appends of new codes
        self.cache_refreshes = {"loads": 0, "appends": 0}
        #: write transactions rerun after a lock conflict, deadlock or serialization failure
        self.write_retries = 0
        self._refresher: tuple[threading.Thread, threading.Event] | None = None
        self._refresh_lock = threading.Lock()
        #: with a refresher running: (when read, the indexes) as of its last tick
        self._indexes_seen: tuple[float, list[IndexInfo]] | None = None
        self._spaces: dict[int, SpaceInfo] = {}  # feature spaces never change once made
        #: memory a code cache may spend on its rows' float features (see :meth:`attach_vectors`)
        self.vector_cache_bytes = VECTOR_CACHE_BYTES
        self._vectors_tried: set[tuple[str, int]] = set()  # (index uid, cache size) that did not fit or match
        #: the geometric check's verdicts on pairs of contents (sha256, sha256), COPY or DIFFERENT:
        #: a content never changes, so a second dedup (the duplicates page) re-reads nothing
        self.pair_verdicts: dict[tuple[str, str], int] = {}

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    def close(self) -> None:
        self.stop_refresher()
        self.engine.dispose()
        if self._quick_engine is not None:
            self._quick_engine.dispose()
        self._hashers.clear()
        self._code_caches.clear()

    # -- keeping code caches fresh off the request path ----------------------------------------

    def start_refresher(self, interval_s: float = 0.25) -> None:
        """Bring this store's code caches up to date in a background thread, every
        ``interval_s``, so that searches never wait for a refresh: they use the cache as of the
        last refresh (at most about ``interval_s`` plus one refresh behind the database). An
        index that was dropped or rebuilt is still noticed by the search itself."""
        if self._refresher is not None:
            return
        stop = threading.Event()

        def loop() -> None:
            from .indexing import list_indexes

            while not stop.wait(interval_s):
                try:
                    with self.read("list the indexes") as conn:
                        self._indexes_seen = (time.monotonic(), list_indexes(conn, with_counts=False))
                except Exception as exc:  # noqa: BLE001 - a refresher must outlive a bad moment
                    self._indexes_seen = None
                    log.info("index list: %s", exc)
                for index_id, cache in list(self._code_caches.items()):
                    try:
                        with self.read("refresh the code cache") as conn:
                            self.attach_vectors(conn, self.code_cache(conn, cache.index, refresh=True))
                    except Exception as exc:  # noqa: BLE001 - a refresher must outlive a bad moment
                        log.info("code cache %d: %s", index_id, exc)

        thread = threading.Thread(target=loop, name="imgstore-cache-refresher", daemon=True)
        self._refresher = (thread, stop)
        thread.start()

    def stop_refresher(self) -> None:
        if self._refresher is not None:
            thread, stop = self._refresher
            stop.set()
            thread.join(timeout=30)
            self._refresher = None
        self._indexes_seen = None

    def indexes(self, conn: Connection) -> list[IndexInfo]:
        """The indexes (without counts). With a refresher running, its list as of its last tick
        (at most a second old), so a search needs no look-up of its own; else read now."""
        from .indexing import list_indexes

        seen = self._indexes_seen
        if self._refresher is not None and seen is not None and time.monotonic() - seen[0] < 1.0:
            return seen[1]
        return list_indexes(conn, with_counts=False)

    def answers_from_memory(self, index_id: int | None = None, *, rerank: bool = True) -> bool:
        """Whether a cached search of ``index_id`` (default: the active index) would find its
        codes, and for the re-rank its vectors, already in memory: then it is CPU work of a
        millisecond or less (and one look-up of paths), which a server runs at once instead of
        handing it to a thread. False while anything would have to be loaded first."""
        from .indexing import find_index

        seen = self._indexes_seen
        if self._refresher is None or seen is None or time.monotonic() - seen[0] >= 1.0:
            return False
        try:
            index = find_index(seen[1], index_id)
        except NotFoundError:
            return False
        if index is None:
            return False
        cache = self._code_caches.get(index.id)
        return cache is not None and cache.index.uid == index.uid and (not rerank or cache.vectors is not None)

    def forget_indexes(self) -> None:
        """This process changed the indexes (created, activated, dropped): read them afresh."""
        self._indexes_seen = None

    def space(self, conn: Connection, space_id: int) -> SpaceInfo:
        """A feature space by id, read once per process (spaces never change once made)."""
        from .vectors import get_space

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
            from sqlalchemy import create_engine

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

    def extractor(self, name: str | None = None, **options: Any) -> Any:
        """The extractor ``name`` (default EfficientNet-Lite0), built once per store and options."""
        from .features import DEFAULT_EXTRACTOR, get_extractor

        name = name or DEFAULT_EXTRACTOR
        options = {**self.extractor_options.get(name, {}), **options}
        key = (name, tuple(sorted(options.items())))
        if key not in self._extractors:
            self._extractors[key] = get_extractor(name, **options)
        return self._extractors[key]

    def hasher(self, conn: Connection, index: IndexInfo) -> Hasher:
        """The fitted hasher of ``index``, decoded once per store and index uid."""
        from .hashing import hasher_from_bytes
        from .models import HashIndex

        cached = self._hashers.get(index.uid)
        if cached is None:
            blob = conn.scalar(select(HashIndex.params).where(HashIndex.id == index.id, HashIndex.uid == index.uid))
            if blob is None:
                raise NotFoundError(f"index {index.id} was dropped or rebuilt meanwhile; `imgstore index list` shows the indexes")
            cached = self._hashers[index.uid] = hasher_from_bytes(blob)
        return cached

    def code_cache(self, conn: Connection, index: IndexInfo, *, refresh: bool | None = None, current: bool = False) -> CodeCache:
        """The index's codes in memory, reloaded when the database says they changed: another
        uid (the id was reused by a new index) or another generation (codes written since).
        With a background refresher running (``refresh`` left None), a newer generation is left
        to it and the cache as of its last refresh is returned at once. ``current``: ``index``
        was read in this transaction, so its uid and generation need no second look-up."""
        from .models import HashIndex

        if current:
            row: Any = index
        else:
            row = conn.execute(select(HashIndex.uid, HashIndex.generation).where(HashIndex.id == index.id)).first()
        if row is None:
            self._code_caches.pop(index.id, None)
            raise NotFoundError(f"no index with id {index.id}; `imgstore index list` shows them")
        cache = self._code_caches.get(index.id)
        generation = int(row.generation)
        if cache is not None and cache.index.uid == row.uid and cache.generation == generation:
            return cache
        if cache is not None and cache.index.uid == row.uid and self._refresher is not None and refresh is None:
            return cache  # the refresher brings it up to date
        with self._refresh_lock:  # one refresh at a time; a second caller finds it done
            current = self._code_caches.get(index.id)
            if current is not None and current is not cache and current.index.uid == row.uid and current.generation >= generation:
                return current  # another thread refreshed it meanwhile
            fresh = self._refreshed(conn, index, current, row.uid, generation)
        if self._refresher is None:  # no background thread to attach the vectors later
            fresh = self.attach_vectors(conn, fresh)
        return fresh

    def cache_state(self) -> list[dict[str, Any]]:
        """What this process holds in memory per index: codes, whether the float features are
        attached, and the bytes of both."""
        out = []
        for index_id, cache in sorted(self._code_caches.items()):
            vectors = cache.vectors
            out.append({"index_id": index_id, "codes": len(cache), "generation": cache.generation,
                        "vectors": vectors is not None,
                        "bytes": cache.nbytes + (0 if vectors is None else int(vectors.nbytes))})
        return out

    def warm(self) -> None:
        """Load the active index's codes and attach their vectors now (a server calls this at
        start, in a thread, so that the first search does not pay it). Quietly does nothing for
        a store without images or an index."""
        from .indexing import find_index

        try:
            with self.read("load the code cache") as conn:
                index = find_index(self.indexes(conn), None)
                if index is not None:
                    self.attach_vectors(conn, self.code_cache(conn, index, refresh=True))
        except Exception as exc:  # noqa: BLE001 - the first search will say what is wrong
            log.info("warming the code cache: %s", exc)

    def attach_vectors(self, conn: Connection, cache: CodeCache) -> CodeCache:
        """``cache`` with its rows' float features held beside the codes, when they fit in
        ``vector_cache_bytes`` (float32, as stored: the re-rank then gives exactly what reading
        them gives): a re-ranked search then reads no vectors from the database (at 1M codes
        that read was half of a search's time, benchmarks/results/serve.md). One full read of
        the space's features; appends carry them forward. A cache whose codes lack a stored
        vector, or that does not fit, is left as it is (and not tried again at that size)."""
        from .vectors import iter_features

        if cache.vectors is not None or len(cache) == 0:
            return cache
        key = (cache.index.uid, len(cache))
        space = self.space(conn, cache.index.space_id)
        if key in self._vectors_tried or len(cache) * space.dim * 4 > self.vector_cache_bytes:
            self._vectors_tried.add(key)
            return cache
        self._vectors_tried.add(key)
        vectors = np.zeros((len(cache), space.dim), dtype=np.float32)
        filled = 0
        for ids, part in iter_features(conn, space.id, space.dim):
            rows = np.searchsorted(cache.image_ids, ids)
            inside = rows < len(cache)
            inside[inside] = cache.image_ids[rows[inside]] == ids[inside]
            vectors[rows[inside]] = part[inside]
            filled += int(inside.sum())
        if filled != len(cache):
            log.info("index %d: %d of %d codes have vectors; the re-rank reads them", cache.index.id, filled, len(cache))
            return cache
        with self._refresh_lock:
            if self._code_caches.get(cache.index.id) is not cache:
                return cache  # refreshed meanwhile: attach to the new one next time
            attached = self._code_caches[cache.index.id] = cache.with_vectors(vectors)
        return attached

    def _refreshed(self, conn: Connection, index: IndexInfo, cache: CodeCache | None, uid: str, generation: int) -> CodeCache:
        from .search import CodeCache

        if cache is not None and cache.index.uid == uid:
            grown = self._appended(conn, cache, generation)
            if grown is not None:
                self.cache_refreshes["appends"] += 1
                self._code_caches[index.id] = grown
                return grown
        self.cache_refreshes["loads"] += 1
        cache = self._code_caches[index.id] = CodeCache.load(conn, index)
        return cache

    @staticmethod
    def _appended(conn: Connection, cache: CodeCache, generation: int) -> CodeCache | None:
        """The cache plus the codes written since, when they are all appends (an ingest adds
        images with new, larger ids); None when anything else changed (a removal, or ids that
        committed out of order), which the count of codes reveals: then the caller reloads."""
        from .models import Code

        last = int(cache.image_ids[-1]) if len(cache) else 0
        rows = conn.execute(
            select(Code.image_id, Code.code).where(Code.hasher_id == cache.index.id, Code.image_id > last).order_by(Code.image_id)
        ).all()
        total = int(conn.scalar(select(func.count()).select_from(Code).where(Code.hasher_id == cache.index.id)) or 0)
        if total != len(cache) + len(rows):
            return None
        n_bytes = cache.codes.shape[1]
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        codes = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype=np.uint8).reshape(len(rows), n_bytes)
        vectors = None
        if cache.vectors is not None and len(ids):
            from .vectors import load_features

            space = cache.index.space_id
            got, vectors = load_features(conn, space, cache.vectors.shape[1], ids.tolist())
            if not np.array_equal(got, ids):
                vectors = None  # a code without a stored vector: the re-rank reads from the database
        return cache.appended(ids, codes, generation, vectors)

    def forget_index(self, index_id: int) -> None:
        self._indexes_seen = None
        cache = self._code_caches.pop(index_id, None)
        if cache is not None:
            self._hashers.pop(cache.index.uid, None)


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
    return type(cause).__module__.startswith("psycopg") and any(kind.__name__ == "OperationalError" for kind in type(cause).__mro__)


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

