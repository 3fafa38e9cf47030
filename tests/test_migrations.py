"""The four migration tests (single head, upgrade, model/DDL match, up-down round trip) on
SQLite and PostgreSQL, plus schema-version checks, the CLI and the wheel's contents."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text

from imgstore import ImageStore
from imgstore.cli import cli
from imgstore.db import make_engine, resolve_url
from imgstore.errors import SchemaAheadError, SchemaOutdatedError
from imgstore.migrate import alembic_config, current_revision, head_revision, pending_changes
from imgstore.models import Base

REPO = Path(__file__).resolve().parent.parent
TABLES = {"images", "image_paths", "ingest_errors", "feature_spaces", "features", "hashers", "codes", "code_buckets",
          "pair_verdicts"}


def test_single_head() -> None:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1, heads


def test_every_revision_has_a_downgrade() -> None:
    for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions():
        source = Path(rev.path).read_text()
        body = source.split("def downgrade()", 1)[1]
        assert "pass" != body.strip().splitlines()[-1].strip(), f"{rev.revision} has an empty downgrade"


def test_upgrade_matches_models_and_round_trips(db_url: str) -> None:
    store = ImageStore(db_url, check_schema=False)
    try:
        store.upgrade()
        assert current_revision(store.engine) == head_revision()
        assert TABLES <= set(inspect(store.engine).get_table_names())
        assert pending_changes(store.engine) == []  # autogenerate finds no difference
        store.downgrade("base")
        assert not (set(inspect(store.engine).get_table_names()) & TABLES)
        store.upgrade()
        assert pending_changes(store.engine) == []
        assert store.schema_status().up_to_date
    finally:
        store.close()


def test_0004_drops_band_columns_and_downgrade_restores_them(db_url: str) -> None:
    """At head ``codes`` has no band columns or band indexes and every index has a uid; a
    downgrade to 0003 brings the columns back filled with each code's band values (and their
    covering indexes), and upgrading again drops them and gives each index a new uid."""
    import numpy as np

    from imgstore.hashing.bits import band_values
    from imgstore.indexing import create_index

    from .helpers import populate

    vectors = np.random.default_rng(4).standard_normal((300, 16)).astype(np.float32)
    with ImageStore(db_url) as store:
        index_id = store.transaction(lambda conn: create_index(conn, populate(conn, vectors), method="lsh", n_bits=32, n_bands=3))
        columns = {c["name"] for c in inspect(store.engine).get_columns("codes")}
        assert columns == {"hasher_id", "image_id", "code"}
        assert not [ix for ix in inspect(store.engine).get_indexes("codes") if "band" in ix["name"]]
        uid = store.indexes()[0].uid
        assert len(uid) == 32
        store.downgrade("0003")
        indexes = {ix["name"]: ix["column_names"] for ix in inspect(store.engine).get_indexes("codes")}
        for i in range(8):
            assert indexes[f"ix_codes_hasher_id_band_{i}"][:2] == ["hasher_id", f"band_{i}"]
        with store.engine.connect() as conn:
            rows = conn.execute(text("SELECT code, band_0, band_1, band_2, band_3 FROM codes WHERE hasher_id = :h"), {"h": index_id}).all()
        assert len(rows) == 300
        codes = np.frombuffer(b"".join(bytes(r[0]) for r in rows), dtype=np.uint8).reshape(300, 4)
        assert [list(r[1:4]) for r in rows] == band_values(codes, 3, 10).tolist()
        assert all(r[4] is None for r in rows)  # bands an index does not use stay NULL
        store.upgrade()
        assert {c["name"] for c in inspect(store.engine).get_columns("codes")} == {"hasher_id", "image_id", "code"}
        assert store.indexes()[0].uid not in ("", uid)
        assert store.verify(check_files=False).ok


def test_foreign_keys_cascade_on_sqlite(sqlite_url: str) -> None:
    with ImageStore(sqlite_url) as store, store.engine.begin() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_new_empty_database_is_created(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    with ImageStore(path) as store:
        assert store.schema_status().current == head_revision()


def test_database_behind_is_refused_with_the_fix(db_url: str) -> None:
    engine = make_engine(resolve_url(db_url))
    with engine.begin() as conn:  # a database with tables but no imgstore schema version
        conn.execute(text("CREATE TABLE images (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(SchemaOutdatedError, match="imgstore .*db upgrade"):
        ImageStore(db_url)


def test_database_ahead_is_refused(db_url: str) -> None:
    with ImageStore(db_url) as store, store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff_future'"))
    with pytest.raises(SchemaAheadError, match="ffff_future"):
        ImageStore(db_url)


def test_password_never_shown(pg_url: str) -> None:
    url = resolve_url(pg_url).set(password="s3cret-pw", port=1)
    runner = CliRunner()
    result = runner.invoke(cli, ["--db", url.render_as_string(hide_password=False), "info"])
    assert result.exit_code == 1
    assert "s3cret-pw" not in result.output
    assert "***" in result.output


def test_cli_db_commands_from_another_directory(db_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "IMGSTORE_DB": db_url}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "imgstore.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run("db", "upgrade").returncode == 0
    check = run("db", "check")
    assert check.returncode == 0, check.stderr
    current = run("db", "current", "--json")
    assert f'"current": "{head_revision()}"' in current.stdout
    assert run("db", "downgrade", "base").returncode == 0
    behind = run("db", "check")
    assert behind.returncode == 1 and "imgstore db upgrade" in behind.stderr


def test_plain_alembic_from_repo_root(db_url: str) -> None:
    alembic = Path(sys.executable).with_name("alembic")
    env = {**os.environ, "IMGSTORE_DB": db_url}
    for args in (["upgrade", "head"], ["check"], ["downgrade", "base"], ["upgrade", "head"]):
        result = subprocess.run([str(alembic), *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    engine = make_engine(resolve_url(db_url))
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_wheel_ships_migrations_and_they_run(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO)],
        check=True, capture_output=True,
    )
    wheel = next(out.glob("imgstore-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    revisions = sorted(p.name for p in (REPO / "migrations").glob("*.py"))
    for name in revisions:
        assert f"imgstore/_migrations/{name}" in names
    assert "imgstore/_alembic/env.py" in names and "imgstore/_alembic/script.py.mako" in names
    # the pages of `imgstore serve` need their templates and script in the wheel
    for name in ("templates/base.html", "templates/search.html", "templates/duplicates.html", "static/app.js", "static/style.css"):
        assert f"imgstore/web/{name}" in names
    # the label names and what the int8 extractor is made from and checked against
    for name in ("imagenet_classes.txt", "efficientnet-lite0-int8-ranges.json", "efficientnet-lite0-int8-reference.json"):
        assert f"imgstore/data/{name}" in names
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    db = tmp_path / "w.db"
    code = (
        "import imgstore, imgstore.migrate as m; from imgstore import ImageStore;"
        f"s = ImageStore({str(db)!r}); print(imgstore.__file__); print(s.schema_status().current)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(unpacked)},
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.split()
    assert first.startswith(str(unpacked))  # the wheel's copy was used, not the source tree
    assert second == head_revision()


def test_models_metadata_uses_naming_convention() -> None:
    assert Base.metadata.naming_convention["pk"] == "pk_%(table_name)s"
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    assert inspect(engine).get_pk_constraint("images")["name"] in ("pk_images", None)


def test_0003_fills_buckets_from_existing_codes(db_url: str) -> None:
    """A database at 0002 with an index gets its band buckets built by the upgrade, and the
    downgrade removes them again."""
    import numpy as np

    from imgstore.indexing import create_index

    from .helpers import assert_buckets_match_codes
    from .helpers import populate

    vectors = np.random.default_rng(5).standard_normal((700, 16)).astype(np.float32)
    with ImageStore(db_url) as store:
        index_id = store.transaction(lambda conn: create_index(conn, populate(conn, vectors), method="lsh", n_bits=32, n_bands=3))
        store.downgrade("0002")
        assert "code_buckets" not in inspect(store.engine).get_table_names()
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM codes")).scalar_one() == 700
        store.upgrade()
        with store.engine.connect() as conn:
            assert_buckets_match_codes(conn, index_id)
        assert store.verify(check_files=False).ok


def test_0009_adds_the_border_columns_and_downgrade_drops_them(db_url: str) -> None:
    """At head ``images`` keeps the keeper's border measure (fraction and version); a downgrade to
    0008 drops both columns and keeps the images, and upgrading again brings them back empty
    (the next dedup measures again)."""
    import numpy as np

    from .helpers import populate

    vectors = np.random.default_rng(9).standard_normal((20, 8)).astype(np.float32)
    with ImageStore(db_url) as store:
        store.transaction(lambda conn: populate(conn, vectors))
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE images SET border_fraction = 0.125, border_version = 1 WHERE id = 1"))
        columns = {c["name"] for c in inspect(store.engine).get_columns("images")}
        assert {"border_fraction", "border_version"} <= columns
        store.downgrade("0008")
        columns = {c["name"] for c in inspect(store.engine).get_columns("images")}
        assert not {"border_fraction", "border_version"} & columns
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM images")).scalar_one() == 20
        store.upgrade()
        with store.engine.connect() as conn:
            rows = conn.execute(text("SELECT border_fraction, border_version FROM images")).all()
        assert len(rows) == 20 and all(r == (None, None) for r in rows)
        assert pending_changes(store.engine) == []
