"""Alembic environment for imgstore.

Used three ways: by `imgstore db ...` and the library (which pass an open connection in
``config.attributes["connection"]``), and by plain `alembic` from the repository root (URL from
``-x db=URL``, then ``$IMGSTORE_DB``, then ``sqlalchemy.url`` in alembic.ini).
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from imgstore.db import make_engine, migration_connection, resolve_url
from imgstore.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def _url_text() -> str:
    x_args = context.get_x_argument(as_dictionary=True)
    return x_args.get("db") or os.environ.get("IMGSTORE_DB") or config.get_main_option("sqlalchemy.url") or ""


def run_migrations_offline() -> None:
    context.configure(
        url=resolve_url(_url_text()),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(resolve_url(_url_text()))
    try:
        with migration_connection(engine) as conn:  # foreign keys off on SQLite: batch mode rebuilds tables
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
