"""The ``imgstore`` command: a thin click layer over :class:`imgstore.ImageStore`.

Library errors (:class:`ImgStoreError`) become one-line messages and exit status 1; heavy
modules (torch) are imported inside the commands that need them, so ``--help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from .db import ENV_VAR
from .errors import ImgStoreError
from .repository import ImageStore

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    def __init__(self, db: str | None) -> None:
        self.db = db

    @contextmanager
    def store(self, *, check_schema: bool = True) -> Iterator[ImageStore]:
        with ImageStore(self.db, check_schema=check_schema) as store:
            yield store


def friendly_errors(func: F) -> F:
    """Turn library errors into click errors: one line, non-zero exit, no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ImgStoreError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    envvar=ENV_VAR,
    metavar="URL",
    help=f"SQLite file path or postgresql:// URL [env {ENV_VAR}; default ./imgstore.db].",
)
@click.version_option(package_name="imgstore")
@click.pass_context
def cli(ctx: click.Context, db: str | None) -> None:
    """imgstore: a database-backed image search store.

    \b
    Example:
      imgstore db upgrade
      imgstore --db postgresql://user@host/photos info
    """
    ctx.obj = Context(db)


# --- db ---------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Schema migrations (Alembic): upgrade, downgrade, current, check.

    \b
    Example:
      imgstore db upgrade
      imgstore --db postgresql://localhost/photos db check
    """


@db.command("upgrade")
@click.argument("revision", default="head")
@click.pass_obj
@friendly_errors
def db_upgrade(obj: Context, revision: str) -> None:
    """Migrate the database up to REVISION (default: head).

    Example: imgstore db upgrade
    """
    with obj.store(check_schema=False) as store:
        store.upgrade(revision)
        click.echo(f"{store.display_url}: at revision {store.schema_status().current}")


@db.command("downgrade")
@click.argument("revision")
@click.pass_obj
@friendly_errors
def db_downgrade(obj: Context, revision: str) -> None:
    """Migrate the database down to REVISION ('base' removes every table).

    Example: imgstore db downgrade base
    """
    with obj.store(check_schema=False) as store:
        store.downgrade(revision)
        click.echo(f"{store.display_url}: at revision {store.schema_status().current or 'base'}")


@db.command("current")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
@friendly_errors
def db_current(obj: Context, as_json: bool) -> None:
    """Print the database's schema revision and the code's newest one.

    Example: imgstore db current
    """
    with obj.store(check_schema=False) as store:
        status = store.schema_status()
        if as_json:
            emit_json({"database": store.display_url, "current": status.current, "head": status.head})
        else:
            click.echo(f"database: {store.display_url}")
            click.echo(f"current:  {status.current or 'none (empty database)'}")
            click.echo(f"head:     {status.head}")


@db.command("check")
@click.pass_obj
@friendly_errors
def db_check(obj: Context) -> None:
    """Exit 0 when the schema is at head and matches the models; else say what to run.

    Example: imgstore db check
    """
    with obj.store(check_schema=False) as store:
        status = store.schema_status()
        if status.current != status.head:
            raise click.ClickException(
                f"{store.display_url} is at revision {status.current or 'none'}, head is "
                f"{status.head}: run `imgstore db upgrade`"
            )
        if status.differences:
            lines = "\n  ".join(status.differences)
            raise click.ClickException(f"schema differs from the models:\n  {lines}")
        click.echo(f"{store.display_url}: schema at head ({status.head}), matches the models")


# --- info -------------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
@friendly_errors
def info(obj: Context, as_json: bool) -> None:
    """Summarise the store: database, schema revision and row counts.

    Example: imgstore info --json
    """
    with obj.store() as store:
        data = {"database": store.display_url, "revision": store.schema_status().current, **store.counts()}
    if as_json:
        emit_json(data)
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        click.echo(f"{key:<{width}}  {value}")


def main() -> None:  # pragma: no cover - console entry point alternative
    cli(prog_name="imgstore")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
