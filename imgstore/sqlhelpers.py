"""Dialect-aware SQL building blocks: inserts that ignore or update on conflict, and chunking.

Hot paths use Core statements with bound parameters (no ORM unit of work); everything here
takes an open ``Connection`` and leaves the transaction to the caller.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite

if TYPE_CHECKING:
    import psycopg

#: Rows per executemany chunk: large enough to amortise round trips, small enough that SQLite's
#: bound-parameter limit and PostgreSQL's message size stay far away.
WRITE_CHUNK = 2000
#: Values per ``IN (...)`` list: below SQLite's default limit of 999 bound parameters.
IN_CHUNK = 900


def insert_stmt(conn: Connection, table: Table) -> postgresql.Insert | sqlite.Insert:
    """The dialect's INSERT (which has ``on_conflict_do_nothing`` / ``_do_update``)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def insert_ignore(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert rows, silently keeping the existing row on a unique/primary-key conflict.

    Two processes ingesting overlapping folders both try to insert the same image; the second
    insert must neither fail nor duplicate.
    """
    if not rows:
        return
    stmt = insert_stmt(conn, table).on_conflict_do_nothing()
    for part in chunks(rows):
        conn.execute(stmt, list(part))


def chunks(items: Sequence[Any], size: int = WRITE_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def driver_rows(conn: Connection, sql: str, params: Sequence[Any], *, binary: bool = False) -> list[tuple[Any, ...]]:
    """Rows of one statement run on the driver's own cursor, in the connection's transaction:
    for the few statements on every search, where SQLAlchemy's result machinery cost more than
    the look-up. ``sql`` uses the driver's placeholders (``%s`` for psycopg, ``?`` for
    SQLite); on PostgreSQL the statement is prepared once per connection, and ``binary`` gets
    bytea as bytes."""
    raw = conn.connection.dbapi_connection
    assert raw is not None
    if conn.dialect.name == "postgresql":
        pg_cursor = cast("psycopg.Connection[tuple[Any, ...]]", raw).cursor(binary=binary)
        try:
            pg_cursor.execute(sql, params, prepare=True)
            return pg_cursor.fetchall()
        finally:
            pg_cursor.close()
    cursor = cast(sqlite3.Connection, raw).cursor()
    try:
        cursor.execute(sql, params)
        rows: list[tuple[Any, ...]] = cursor.fetchall()
        return rows
    finally:
        cursor.close()


def copy_binary(conn: Connection, sql: str, parts: Iterable[bytes]) -> None:
    """Run a PostgreSQL ``COPY ... FROM STDIN (FORMAT BINARY)`` in the connection's transaction,
    sending ``parts`` (a whole binary stream: :func:`imgstore.pgcopy.framed`) as they come."""
    raw = cast("psycopg.Connection[tuple[Any, ...]] | None", conn.connection.dbapi_connection)
    assert raw is not None
    with raw.cursor() as cursor, cursor.copy(sql) as copy:
        for part in parts:
            if part:
                copy.write(part)
