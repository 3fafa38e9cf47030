"""Alembic, driven from the package: works from any directory, editable or wheel install.

The Alembic environment (``alembic/``) and revisions (``migrations/``) live at the repository
top level, where plain ``alembic upgrade head`` finds them through ``alembic.ini``. A built
wheel carries copies at ``imgstore/_alembic`` and ``imgstore/_migrations``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.engine import URL

from .db import migration_connection, safe_url
from .errors import ConfigError, SchemaAheadError, SchemaOutdatedError

_PACKAGE_DIR = Path(__file__).resolve().parent


def _script_dirs() -> tuple[Path, Path]:
    installed = (_PACKAGE_DIR / "_alembic", _PACKAGE_DIR / "_migrations")
    if installed[0].is_dir() and installed[1].is_dir():
        return installed
    source = (_PACKAGE_DIR.parent / "alembic", _PACKAGE_DIR.parent / "migrations")
    if source[0].is_dir() and source[1].is_dir():
        return source
    raise ConfigError(
        "imgstore's migration scripts are missing from this installation; reinstall imgstore"
    )


def alembic_config(url: URL | None = None, connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` for imgstore's scripts, bound to a URL or an open connection."""
    env_dir, versions_dir = _script_dirs()
    cfg = Config()
    cfg.set_main_option("script_location", str(env_dir))
    cfg.set_main_option("version_locations", str(versions_dir))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        # '%' must be doubled for ConfigParser interpolation
        cfg.set_main_option(
            "sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%")
        )
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "imgstore ships at least one migration"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_empty_database(engine: Engine) -> bool:
    """True when the database holds no imgstore tables (an empty Alembic version table, left by
    ``imgstore db downgrade base``, does not count): safe to create the schema unasked."""
    return not (set(inspect(engine).get_table_names()) - {"alembic_version"})


def upgrade(engine: Engine, revision: str = "head") -> None:
    with migration_connection(engine) as conn:
        command.upgrade(alembic_config(connection=conn), revision)


def downgrade(engine: Engine, revision: str) -> None:
    with migration_connection(engine) as conn:
        command.downgrade(alembic_config(connection=conn), revision)


@contextmanager
def known_revision(revision: str) -> Iterator[None]:
    """Alembic's "can't locate revision" (a typo, or a revision from a newer imgstore) becomes a
    :class:`ConfigError` that lists the revisions this imgstore knows."""
    try:
        yield
    except (CommandError, ResolutionError) as exc:
        script = ScriptDirectory.from_config(alembic_config())
        known = ", ".join(["base", *reversed([r.revision for r in script.walk_revisions()]), "head"])
        raise ConfigError(f"unknown schema revision {revision!r} ({exc}); this imgstore knows {known}") from exc


def describe(diff: Any) -> str:
    """One line for one autogenerate difference (Alembic gives nested tuples with objects)."""
    if isinstance(diff, list):  # column modifications come grouped
        return "; ".join(describe(d) for d in diff)
    if not isinstance(diff, tuple) or not diff:
        return str(diff)
    op, args = str(diff[0]), diff[1:]
    if op in ("add_table", "remove_table"):
        return f"{op.replace('_', ' ')} {args[0].name}"
    if op in ("add_column", "remove_column"):
        return f"{op.replace('_', ' ')} {args[1]}.{args[2].name}"
    if op in ("add_index", "remove_index", "add_constraint", "remove_constraint"):
        obj = args[0]
        return f"{op.replace('_', ' ')} {getattr(obj, 'name', obj)} on {getattr(getattr(obj, 'table', None), 'name', '?')}"
    if op.startswith("modify_"):
        return f"{op.replace('_', ' ')} {args[1]}.{args[2]}: {args[-2]!s} in the database, {args[-1]!s} in the models"
    return f"{op.replace('_', ' ')} {' '.join(str(getattr(a, 'name', a)) for a in args if a is not None)}"


def pending_changes(engine: Engine) -> list[object]:
    """Differences between the models and the database schema (empty when they agree)."""
    from alembic.autogenerate import compare_metadata

    from .models import Base

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


def ensure_current(engine: Engine, url: URL, *, auto_create: bool = True) -> None:
    """Refuse a database that is behind (or ahead of) the code; create a brand-new one.

    A database with no tables at all is upgraded to head when ``auto_create``; one that holds
    tables but is at an older revision is never migrated silently.
    """
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return
    if current is None and auto_create and is_empty_database(engine):
        with migration_connection(engine) as conn:  # one process at a time creates it
            if MigrationContext.configure(conn).get_current_revision() == head:
                return  # another process created it while this one waited
            command.upgrade(alembic_config(connection=conn), "head")
        return
    script = ScriptDirectory.from_config(alembic_config())
    if current is not None:
        try:
            known = script.get_revision(current) is not None
        except (ResolutionError, CommandError):
            known = False
        if not known:
            raise SchemaAheadError(current, head, safe_url(url))
    raise SchemaOutdatedError(current, head, safe_url(url))
