"""Engines and sessions: URL handling, SQLite pragmas, and safe display of URLs."""

from __future__ import annotations

import os
import random
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, QueuePool

from .errors import ConfigError

#: The default database: an SQLite file in the current directory.
DEFAULT_DB = "imgstore.db"
ENV_VAR = "IMGSTORE_DB"
#: How long an SQLite connection waits for a lock before "database is locked" (milliseconds).
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Bytes of the database file SQLite may map into memory for reads (address space, not RAM).
SQLITE_MMAP_BYTES = 1 << 30
#: Execution option that marks a connection's transactions as writes (see ``_sqlite_begin``).
WRITE_OPTION = "imgstore_write"
#: PostgreSQL advisory lock key held by a migration's transaction (any constant; "imgstore" in hex)
MIGRATION_LOCK = 0x696D6773746F7265


def resolve_url(db: str | os.PathLike[str] | URL | None = None) -> URL:
    """Turn ``--db`` / ``$IMGSTORE_DB`` / the default into a SQLAlchemy URL.

    A value without ``://`` is a path to an SQLite file. ``postgresql://`` URLs use psycopg 3.
    """
    if db is None or (isinstance(db, str) and not db.strip()):  # an empty $IMGSTORE_DB counts as unset
        db = os.environ.get(ENV_VAR, "").strip() or DEFAULT_DB
    if isinstance(db, URL):
        url = db
    else:
        text = os.fspath(db)
        if "://" not in text:
            return URL.create("sqlite", database=str(Path(text).expanduser().absolute()))
        try:
            url = make_url(text)
            url.port  # noqa: B018 - a non-numeric port fails here, not at connect time
        except (ArgumentError, ValueError) as exc:
            raise ConfigError(f"cannot parse database URL {safe_url_text(text)!r}: {exc}") from exc
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"unsupported database {url.get_backend_name()!r}; use an SQLite file path or a "
            "postgresql:// URL"
        )
    return url


def safe_url(url: URL) -> str:
    """The URL as text with any password masked: for messages, logs and ``imgstore info``."""
    return url.render_as_string(hide_password=True)


def safe_url_text(text: str) -> str:
    try:
        return safe_url(make_url(text))
    except (ArgumentError, ValueError):
        return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", text)  # mask a password by hand


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry, read_only: bool = False) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")  # first: the pragmas below may wait for a lock
        if not read_only:
            # WAL lets readers run while one writer writes; NORMAL sync is durable at each
            # checkpoint and consistent after a crash, which is what WAL is designed for.
            _journal_mode_wal(cursor)
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Read pages through a memory map instead of read() calls into SQLite's small (2 MB)
        # page cache: a radius-1 probe is a few dozen random B-tree seeks (the SQLite figures
        # in benchmarks/results/search.md are taken with it).
        cursor.execute(f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}")
    finally:
        cursor.close()


def _journal_mode_wal(cursor: sqlite3.Cursor) -> None:
    """Switch the database to WAL (a no-op once it is). Two connections switching a new file at
    once can each hold what the other waits for; SQLite then answers "database is locked" at
    once rather than call the busy handler (waiting could deadlock), so the statement, having
    released its lock, is run again until the busy timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.001
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay * (1 + random.random()))
        delay = min(2 * delay, 0.05)


def sqlite_file(url: URL) -> Path | None:
    """The file of an SQLite URL (None for PostgreSQL and in-memory databases)."""
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def read_only_file(path: Path) -> bool:
    """An existing SQLite file this process cannot write (a read-only mount, or no permission on
    the file or its folder, where SQLite keeps its -wal and -shm files)."""
    return path.exists() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))


def make_engine(url: URL, *, echo: bool = False) -> Engine:
    """An engine with imgstore's settings for the URL's backend.

    An SQLite file that cannot be written is opened read-only, so reading commands work on a
    read-only mount; without a pending -wal file it is opened ``immutable`` (SQLite then needs
    no -shm file either). Writes to it fail with SQLite's "readonly database" error.
    """
    if url.get_backend_name() == "sqlite":
        path = sqlite_file(url)
        if path is not None:
            parent = path.parent
            if not parent.is_dir():
                raise ConfigError(
                    f"cannot create database {url.database}: folder {parent} does not exist"
                )
        read_only = path is not None and read_only_file(path)
        if read_only:
            assert path is not None
            wal = Path(f"{path}-wal")
            flags = "mode=ro" if wal.exists() and wal.stat().st_size > 0 else "mode=ro&immutable=1"
            uri = f"file:{quote(str(path))}?{flags}"
            engine = create_engine("sqlite://", echo=echo, poolclass=QueuePool,
                                   creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False))
        else:
            engine = create_engine(url, echo=echo, poolclass=NullPool if url.database == ":memory:" else None)
        event.listen(engine, "connect", lambda conn, record: _sqlite_on_connect(conn, record, read_only))
        # pysqlite's own transaction handling defers BEGIN and breaks SAVEPOINT; let
        # SQLAlchemy emit BEGIN itself (the documented recipe for pysqlite).
        event.listen(engine, "connect", _disable_pysqlite_autobegin)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True)


def _sqlite_begin(conn: Connection) -> None:
    # A write transaction takes the write lock up front (BEGIN IMMEDIATE), so it waits on
    # busy_timeout instead of failing at once with "database is locked" when a read
    # transaction tries to upgrade to a write while another writer holds the lock.
    immediate = conn.get_execution_options().get(WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _disable_pysqlite_autobegin(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
    dbapi_connection.isolation_level = None



@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection in one transaction for schema migrations.

    On SQLite, foreign keys are off for its duration: Alembic's batch mode rebuilds a table
    by creating a copy and dropping the original, and with foreign keys on, dropping e.g.
    ``hashers`` would cascade-delete every code and bucket row that refers to it. The pragma
    only takes effect outside a transaction, so it is set on the driver connection before
    BEGIN; ``PRAGMA foreign_key_check`` must then find no violation before the commit.
    """
    with engine.connect() as conn:
        sqlite = engine.dialect.name == "sqlite"
        raw = cast(sqlite3.Connection, conn.connection.dbapi_connection) if sqlite else None  # pysqlite's
        if raw is not None:
            raw.execute("PRAGMA foreign_keys=OFF")
        # one migration at a time: SQLite's write lock taken up front (a second process waits on
        # the busy timeout instead of failing to upgrade its read lock), PostgreSQL's advisory lock
        conn = conn.execution_options(**{WRITE_OPTION: True})
        try:
            with conn.begin():
                if not sqlite:
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                yield conn
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")
        finally:
            if raw is not None:
                raw.execute("PRAGMA foreign_keys=ON")
