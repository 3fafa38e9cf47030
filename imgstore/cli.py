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


# --- ingest -----------------------------------------------------------------------------------


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--recursive/--no-recursive", default=True, show_default=True, help="Descend into sub-folders.")
@click.option("--extractor", default=None, metavar="NAME", help="Feature extractor [default: efficientnet-lite0].")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 4096), help="Images per model batch and per transaction.")
@click.option("--workers", default=None, type=click.IntRange(1, 64), help="Decoding threads [default: one per core].")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="Tag stored with every new image (repeatable).")
@click.option("--follow-symlinks", is_flag=True, help="Follow symbolic links (loops are detected).")
@click.option("--dry-run", is_flag=True, help="Only count what would be ingested.")
@click.option("--no-auto-index", is_flag=True, help="Do not build the default index automatically.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal].")
@click.pass_obj
@friendly_errors
def ingest(obj: Context, paths: tuple[str, ...], recursive: bool, extractor: str | None, batch_size: int,
           workers: int | None, tags: tuple[str, ...], follow_symlinks: bool, dry_run: bool,
           no_auto_index: bool, as_json: bool, progress: bool | None) -> None:
    """Add image files and folders to the store.

    Unchanged files (same path, size and mtime) are skipped without being read; content that is
    already stored only gets its new path recorded; bad files are recorded (see `imgstore
    errors`) and skipped. Safe to interrupt: run it again to finish.

    \b
    Example:
      imgstore ingest ~/Pictures --tag holidays
      imgstore --db postgresql://localhost/photos ingest /data/products --json
    """
    show = sys.stderr.isatty() if progress is None else progress
    bar = _ProgressBar() if show and not dry_run else None
    with obj.store() as store:
        try:
            summary = store.ingest(list(paths), recursive=recursive, extractor=extractor, batch_size=batch_size,
                                   workers=workers, tags=tags, dry_run=dry_run, follow_symlinks=follow_symlinks,
                                   auto_index=not no_auto_index, progress=bar)
        finally:
            if bar is not None:
                bar.close()
    if as_json:
        emit_json({**summary.as_dict(), "errors": [{"path": p, "reason": r} for p, r in summary.errors]})
        return
    verb = "would add at most" if dry_run else "added"
    click.echo(
        f"{summary.files_seen} files: {verb} {summary.added}, unchanged {summary.unchanged}, "
        f"duplicates {summary.duplicates}, failed {summary.failed} "
        f"({summary.elapsed_s:.1f} s, {summary.images_per_s:.1f} images/s)"
    )
    for path, reason in summary.errors[:10]:
        click.echo(f"  failed: {path}: {reason}", err=True)
    if len(summary.errors) > 10:
        click.echo(f"  ... and {len(summary.errors) - 10} more: see `imgstore errors`", err=True)


class _ProgressBar:
    """files done / total, images per second and time left, on stderr."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, p: Any) -> None:
        import time

        now = time.monotonic()
        if now - self._last < 0.2 and p.done < p.total:
            return
        self._last = now
        rate = p.done / p.elapsed_s if p.elapsed_s > 0 else 0.0
        left = (p.total - p.done) / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * p.done / max(p.total, 1))
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {p.done}/{p.total} files "
            f"{rate:.1f}/s, {int(left) // 60}:{int(left) % 60:02d} left, {p.failed} failed "
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self._last:
            sys.stderr.write("\n")


@cli.command()
@click.option("--limit", type=int, default=None, help="Show at most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
@friendly_errors
def errors(obj: Context, limit: int | None, as_json: bool) -> None:
    """List files that could not be ingested, and why.

    Example: imgstore errors --json
    """
    with obj.store() as store:
        rows = store.errors(limit)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no ingest errors")
    for row in rows:
        click.echo(f"{row['path']}\t{row['error_type']}\t{row['reason']}")


# --- indexes ------------------------------------------------------------------------------------


@cli.group()
def index() -> None:
    """Hash indexes: create, list, activate, drop.

    \b
    Example:
      imgstore index create --method itq --bits 64
      imgstore index list
    """


@index.command("create")
@click.option("--method", default="itq", show_default=True, help="Hashing method (lsh, itq, pca, ...).")
@click.option("--bits", "n_bits", default=64, show_default=True, type=int, help="Code length: a multiple of 8, 16..256.")
@click.option("--bands", "n_bands", default=None, type=click.IntRange(1, 8), help="Band columns to probe [default: about bits / log2(images)].")
@click.option("--sample", default=None, type=click.IntRange(1), help="Fit on a random sample of this many images.")
@click.option("--extractor", default=None, help="Feature space to index [default: the largest].")
@click.option("--labels", default=None, help="Supervision: 'folder' or 'tag:KEY'.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same codes).")
@click.option("--activate/--no-activate", default=True, show_default=True, help="Make it the index queries use.")
@click.pass_obj
@friendly_errors
def index_create(obj: Context, method: str, n_bits: int, n_bands: int | None, sample: int | None,
                 extractor: str | None, labels: str | None, seed: int, activate: bool) -> None:
    """Fit a hasher on the stored features and encode every image.

    Example: imgstore index create --method itq --bits 64 --bands 4
    """
    with obj.store() as store:
        index_id = store.create_index(method, n_bits, n_bands=n_bands, sample=sample, extractor=extractor,
                                      activate=activate, random_state=seed, labels=labels)
        info = next(i for i in store.indexes() if i.id == index_id)
    click.echo(f"index {info.id}: {info.method}, {info.n_bits} bits, {info.n_bands} bands of {info.band_width} bits, "
               f"{info.n_codes} images{' (active)' if info.is_active else ''}")


@index.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
@friendly_errors
def index_list(obj: Context, as_json: bool) -> None:
    """List indexes; the active one is marked with '*'.

    Example: imgstore index list
    """
    with obj.store() as store:
        infos = store.indexes()
    if as_json:
        emit_json([i.as_dict() for i in infos])
        return
    if not infos:
        click.echo("no index yet: queries scan the float features exactly (`imgstore index create` builds one)")
    for i in infos:
        rerank = "off" if i.config.get("supervised") else "on"
        click.echo(f"{'*' if i.is_active else ' '} {i.id:>3}  {i.method:<6} {i.n_bits:>3} bits  {i.n_bands} x {i.band_width}-bit bands  "
                   f"{i.n_codes} images  {i.extractor}  fitted on {i.n_fitted}  float re-rank {rerank}")


@index.command("activate")
@click.argument("index_id", type=int)
@click.pass_obj
@friendly_errors
def index_activate(obj: Context, index_id: int) -> None:
    """Make INDEX_ID the index queries use.

    Example: imgstore index activate 2
    """
    with obj.store() as store:
        store.activate_index(index_id)
    click.echo(f"index {index_id} is active")


@index.command("drop")
@click.argument("index_id", type=int)
@click.pass_obj
@friendly_errors
def index_drop(obj: Context, index_id: int) -> None:
    """Delete an index and its codes.

    Example: imgstore index drop 1
    """
    with obj.store() as store:
        store.drop_index(index_id)
    click.echo(f"index {index_id} dropped")


# --- query --------------------------------------------------------------------------------------


@cli.command()
@click.argument("images", nargs=-1, required=True)
@click.option("-k", default=10, show_default=True, type=click.IntRange(1, 10_000), help="Results per query.")
@click.option("--exact", is_flag=True, help="Exact Hamming kNN (equal to a full scan).")
@click.option("--probe-radius", default=1, show_default=True, type=click.IntRange(0, 8), help="Bits flipped per band when probing.")
@click.option("--rerank/--no-rerank", default=None, help="Re-rank by float features [default: per index kind].")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
@friendly_errors
def query(obj: Context, images: tuple[str, ...], k: int, exact: bool, probe_radius: int, rerank: bool | None, as_json: bool) -> None:
    """Find the stored images most similar to each IMAGE (a file, or a stored image id).

    \b
    Example:
      imgstore query cat.jpg -k 5
      imgstore query 42 --exact --json
    """
    import os

    queries: list[Any] = []
    for ref in images:
        if os.path.exists(ref):
            queries.append(ref)
        elif ref.isdigit():
            queries.append(int(ref))
        else:
            raise click.ClickException(f"{ref}: no such file (or stored image id)")
    with obj.store() as store:
        results = store.search_many(queries, k, exact=exact, probe_radius=probe_radius, rerank=rerank)
    if as_json:
        emit_json([{"query": q, "results": [r.as_dict() for r in res]} for q, res in zip(images, results)])
        return
    for ref, res in zip(images, results):
        click.echo(f"query: {ref}")
        click.echo(f"  {'rank':>4}  {'id':>6}  {'hamming':>7}  {'cosine':>7}  path")
        for n, r in enumerate(res, 1):
            dist = "-" if r.distance is None else str(r.distance)
            cos = "-" if r.cosine is None else f"{r.cosine:.4f}"
            path = r.paths[0] if r.paths else "(no current path)"
            more = f" (+{len(r.paths) - 1} more)" if len(r.paths) > 1 else ""
            click.echo(f"  {n:>4}  {r.image_id:>6}  {dist:>7}  {cos:>7}  {path}{more}")


@cli.command()
@click.argument("ref")
@click.pass_obj
@friendly_errors
def show(obj: Context, ref: str) -> None:
    """Show one stored image by id or path, as JSON.

    Example: imgstore show 42
    """
    with obj.store() as store:
        emit_json(store.image(int(ref) if ref.isdigit() else ref))


def main() -> None:  # pragma: no cover - console entry point alternative
    cli(prog_name="imgstore")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
