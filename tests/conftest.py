"""Shared fixtures: real SQLite files on tmp_path and real PostgreSQL databases.

PostgreSQL: ``IMGSTORE_TEST_PG_URL`` names a server and a maintenance database (default
``postgresql://postgres@127.0.0.1:5432/test``). Each test that needs it gets a new database,
``imgstore_test_<random>``, dropped afterwards; the user's databases are never touched. An
unreachable server makes those tests fail, never skip, unless ``IMGSTORE_TEST_SKIP_PG=1`` is
set outside CI.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def pg_admin_url() -> URL:
    url = make_url(os.environ.get("IMGSTORE_TEST_PG_URL", DEFAULT_PG))
    return url.set(drivername="postgresql+psycopg")


def _pg_skip_requested() -> bool:
    return os.environ.get("IMGSTORE_TEST_SKIP_PG") == "1" and os.environ.get("CI") != "true"


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported ONNX models go to a folder of this test session (and of the commands it runs),
    never the user's cache: the first test that needs one exports it, as a new user's first run does."""
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["IMGSTORE_CACHE_DIR"] = str(path)
    return path


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, as a URL string; dropped afterwards."""
    if _pg_skip_requested():
        pytest.skip("IMGSTORE_TEST_SKIP_PG=1: PostgreSQL tests skipped on request")
    admin = pg_admin_url()
    name = f"imgstore_test_{secrets.token_hex(6)}"
    # no pooled connection: a test may restart the server in between
    engine = create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any failure to reach the server fails the test
        engine.dispose()
        pytest.fail(
            f"PostgreSQL at {admin.render_as_string(hide_password=True)} is unreachable ({exc}); "
            "start it (pg_ctlcluster 15 main start) or set IMGSTORE_TEST_PG_URL",
            pytrace=False,
        )
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return str(tmp_path / "store.db")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: on an SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    return request.getfixturevalue("pg_url")
