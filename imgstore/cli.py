"""The ``imgstore`` command: a thin click layer over :class:`imgstore.ImageStore`.

Library errors (:class:`ImgStoreError`) become one-line messages and exit status 1; heavy
modules (torch) are imported inside the commands that need them, so ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .db import ENV_VAR, resolve_url, sqlite_file
from .decode import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, parse_pixels, quiet_pillow_warnings
from .errors import ImgStoreError, NotFoundError
from .features import RUNTIME_ENV, RUNTIMES, embeds_text, space_name
from .ingest import IngestSummary
from .labels import ImageLabel, class_ids
from .paths import counted, printable
from .repository import ImageStore
from .types import SearchFilter

if TYPE_CHECKING:  # imported by the commands that watch (watchdog is not needed by the others)
    from .watch import WatchBatch

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    def __init__(self, db: str | None, max_pixels: int | None = None, runtime: str | None = None) -> None:
        self.db = db
        self.max_pixels = max_pixels  # None: the library's default ($IMGSTORE_MAX_PIXELS, else 200 MP)
        self.runtime = runtime  # None: $IMGSTORE_RUNTIME, else auto
        self.extractor_options: dict[str, dict[str, Any]] = {}

    @contextmanager
    def store(self, *, check_schema: bool = True, create: bool = False) -> Iterator[ImageStore]:
        """The store of ``--db``. Only commands that write pass ``create``: a mistyped SQLite
        path must not leave an empty database behind a read command."""
        url = resolve_url(self.db)
        path = sqlite_file(url)
        if path is not None and not create and not path.exists():
            raise ImgStoreError(
                f"no database at {path}: check --db or ${ENV_VAR} (`imgstore ingest FOLDER` creates one)"
            )
        with ImageStore(url, check_schema=check_schema, extractor_options=self.extractor_options,
                        max_pixels=self.max_pixels, runtime=self.runtime) as store:
            yield store


def _weights_option(func: F) -> F:
    return click.option(
        "--weights", type=click.Path(exists=True, dir_okay=False), default=None,
        help="Weights file for the resnet50 extractor (or set IMGSTORE_RESNET50_WEIGHTS).",
    )(func)


def friendly_errors(func: F) -> F:
    """Turn library errors into click errors: one line, non-zero exit, no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ImgStoreError as exc:
            raise click.ClickException(str(exc)) from exc
        except BrokenPipeError:  # `imgstore info | head -1`: the reader has what it wanted
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
            raise SystemExit(141) from None  # as a process killed by SIGPIPE: what `set -o pipefail` expects
        except OSError as exc:  # an output file or folder that cannot be written, a full device
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from exc
        except KeyboardInterrupt as exc:
            journal = getattr(exc, "journal", None)  # dedup --apply: where its moves so far are written
            if journal:
                click.echo(f"\ninterrupted: the files moved so far are recorded in {printable(journal)}; run the same "
                           f"command again to finish into that journal, or `imgstore dedup --undo {printable(journal)}` "
                           "to put them back", err=True)
            else:
                click.echo("\ninterrupted: every finished batch is kept; run the same command again to resume", err=True)
            raise SystemExit(130) from None

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
@click.option(
    "--max-pixels",
    envvar=MAX_PIXELS_ENV,
    metavar="N",
    callback=lambda _ctx, _param, value: _pixel_count(value),
    help="Largest image read (ingest, queries, the server's uploads), in pixels or megapixels (250M); a larger "
         f"one is refused before it is decoded [env {MAX_PIXELS_ENV}; default {DEFAULT_MAX_PIXELS // 10**6}M].",
)
@click.option(
    "--runtime",
    envvar=RUNTIME_ENV,
    type=click.Choice(RUNTIMES, case_sensitive=False),
    default=None,
    help="What runs the CNN: onnx (ONNX Runtime, the torch model's features several times faster on a CPU; "
         "exported on first use into ~/.cache/imgstore), torch (bf16, CUDA), or auto: onnx on a CPU, torch for "
         f"--device cuda [env {RUNTIME_ENV}; default auto].",
)
@click.version_option(package_name="imgstore")
@click.pass_context
def cli(ctx: click.Context, db: str | None, max_pixels: int | None, runtime: str | None) -> None:
    """imgstore: a database-backed image search store.

    \b
    Example:
      imgstore db upgrade
      imgstore --db postgresql://user@host/photos info
    """
    # every image this process reads is decoded by imgstore.decode, whose own limit decides:
    # Pillow's warning above its 89 MP default is noise here (see decode._open)
    quiet_pillow_warnings()
    ctx.obj = Context(db, max_pixels, runtime.lower() if runtime else None)


def _pixel_count(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_pixels(value)
    except ImgStoreError:
        raise click.BadParameter(f"{value!r} is not a pixel count: give pixels (250000000) or megapixels (250M)",
                                 param_hint=f"--max-pixels / ${MAX_PIXELS_ENV}") from None


# --- search filters ---------------------------------------------------------------------------


def _filter_part(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A callback that checks one filter option's values as ``SearchFilter`` reads them: a bad
    one is a usage error (exit 2) that says what to give."""
    label = {"tags": "tag", "labels": "label"}.get(name, name)  # how SearchFilter's messages name it

    def check(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        try:
            checked = SearchFilter(**{name: value})
            for label_name in checked.labels:  # a name that is no ImageNet class: the closest ones
                class_ids(label_name)
        except (ValueError, ImgStoreError) as exc:
            raise click.BadParameter(str(exc).removeprefix(f"{label}: ")) from None
        return value
    return check


#: The filter options of every command that searches or lists images (made one SearchFilter).
_FILTER_OPTIONS = (
    click.option("--where", "where", multiple=True, metavar="KEY=VALUE", callback=_filter_part("where"),
                 help="Only images whose metadata field KEY is VALUE (or a list holding it); repeatable, all must hold."),
    click.option("--tag", "tags", multiple=True, metavar="TAG", callback=_filter_part("tags"),
                 help="Only images with this tag (repeatable: every one)."),
    click.option("--label", "labels", multiple=True, metavar="NAME", callback=_filter_part("labels"),
                 help='Only images the classifier labelled NAME (an ImageNet name, e.g. "golden retriever"; '
                      "`imgstore labels` lists them); repeatable: every one."),
    click.option("--under", metavar="FOLDER", default=None, callback=_filter_part("under"),
                 help="Only images with a current file under FOLDER."),
    click.option("--taken-after", metavar="WHEN", default=None, callback=_filter_part("taken_after"),
                 help="Only images taken (EXIF) at or after WHEN: a date (2024-06-01, 2024-06, 2024) or ISO time."),
    click.option("--taken-before", metavar="WHEN", default=None, callback=_filter_part("taken_before"),
                 help="Only images taken (EXIF) before WHEN."),
)
_FILTER_NAMES = ("where", "tags", "labels", "under", "taken_after", "taken_before")


def filter_options(func: F) -> F:
    """Add the filter options (--where, --tag, --label, --under, --taken-after/--taken-before);
    the command gets them as one ``search_filter`` (None when none was given)."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        parts = {name: kwargs.pop(name) for name in _FILTER_NAMES}
        kwargs["search_filter"] = SearchFilter(**parts) or None
        return func(*args, **kwargs)

    for option in reversed(_FILTER_OPTIONS):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


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
    with obj.store(check_schema=False, create=True) as store:
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
            raise click.ClickException(f"schema differs from the models: {'; '.join(status.differences)}")
        click.echo(f"{store.display_url}: schema at head ({status.head}), matches the models")


# --- managing the store -----------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
@friendly_errors
def info(obj: Context, as_json: bool) -> None:
    """Summarise the store: database, counts, size, feature spaces, indexes and band occupancy.

    Example: imgstore info --json
    """
    with obj.store() as store:
        data = store.info()
    if as_json:
        emit_json(data.as_dict())
        return
    counts = data.counts
    for key, value in (("database", data.database), ("revision", data.revision), ("images", counts.images),
                       ("paths", counts.paths), ("features", counts.features), ("codes", counts.codes),
                       ("errors", counts.errors)):
        click.echo(f"{key:<15} {value}")
    click.echo(f"{'size':<15} {data.database_bytes / 1e6:.1f} MB")
    for space in data.feature_spaces:
        click.echo(f"feature space {space.id}: {space.extractor} ({space.dim}-d, preprocessing "
                   f"{space.preprocess_version}), {counted(space.n_features or 0, 'image')}")
    for summary in data.indexes:
        ix = summary.index
        click.echo(f"index {ix.id}{' (active)' if ix.is_active else ''}: {ix.method} {ix.n_bits} bits, "
                   f"{counted(ix.n_codes, 'code')}, {counted(ix.n_bands, 'band')} of {ix.band_width} bits")
        for j, band in enumerate(summary.bands):
            click.echo(f"  band {j}: {counted(band.buckets, 'bucket')}, largest {band.largest}, "
                       f"mean {band.mean}, evenness {band.evenness}")


@cli.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
@friendly_errors
def rm(obj: Context, refs: tuple[str, ...], dry_run: bool, as_json: bool) -> None:
    """Remove paths and images from the store (never a file on disk).

    A PATH removes that path; its image goes too when no other current path is left. An ID
    (digits that name no existing file) removes the image with all its paths.

    \b
    Example:
      imgstore rm photos/old.jpg
      imgstore rm 42 --dry-run
    """
    with obj.store() as store:
        removal = store.remove(list(refs), dry_run=dry_run)  # digits naming no file are ids (catalog.names_an_id)
    if as_json:
        emit_json(removal.as_dict())
        return
    verb = "would remove" if dry_run else "removed"
    for path in removal.paths:
        click.echo(f"{verb} path {printable(path)}")
    click.echo(f"{verb} {counted(len(removal.images), 'image')}{': ' if removal.images else ''}"
               f"{', '.join(map(str, removal.images))}")


def _pairs(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        out[key.strip()] = value
    return out


@cli.command()
@click.argument("ref")
@click.argument("pairs", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--unset", multiple=True, metavar="KEY", help="Remove a field (repeatable).")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="Add a tag (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
@click.pass_obj
@friendly_errors
def meta(obj: Context, ref: str, pairs: tuple[str, ...], unset: tuple[str, ...], tags: tuple[str, ...], as_json: bool) -> None:
    """Set (or show) metadata fields of one image, by id or path.

    Fields are what `index create --labels tag:KEY` learns from; tags are a list that grows.

    \b
    Example:
      imgstore meta photos/cat.jpg species=cat
      imgstore meta 42 --tag favourite --unset species
    """
    changes: dict[str, Any] = {**_pairs(pairs), **{key: None for key in unset}}
    if tags:
        changes["tags"] = sorted(set(tags))
    with obj.store(create=False) as store:
        current = store.set_meta(ref, changes) if changes else store.image(ref).meta
    if as_json:
        emit_json(current)
        return
    if not current:
        click.echo("no metadata")
    for key, value in sorted(current.items()):
        click.echo(f"{key}={', '.join(map(str, value)) if isinstance(value, list) else value}")


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only list the paths that would be marked.")
@click.option("--moved", is_flag=True, help="Instead forget the files `dedup --apply` moved away (ends their undo).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
@friendly_errors
def prune(obj: Context, dry_run: bool, moved: bool, as_json: bool) -> None:
    """Mark stored paths whose file no longer exists as not current (kept as history).

    An ingest does this itself for the folders it rescans; prune covers every other path. An
    image left without a current path is hidden from query results (query --include-stale).
    With --moved, the rows of files that `dedup --apply` moved away are forgotten instead (the
    files stay where they were moved; no undo after this).

    Example: imgstore prune --dry-run
    """
    if moved:
        with obj.store() as store:
            removal = store.prune_moved(dry_run=dry_run)
        if as_json:
            emit_json(removal.as_dict())
            return
        click.echo(f"{'would forget' if dry_run else 'forgot'} {counted(len(removal.paths), 'moved path')} and "
                   f"{counted(len(removal.images), 'image')} left without a path")
        return
    with obj.store() as store:
        gone = store.prune(dry_run=dry_run)
    if as_json:
        emit_json({"paths": gone, "dry_run": dry_run})
        return
    _echo_marked(gone, dry_run)


def _echo_marked(gone: list[str], dry_run: bool = False) -> None:
    """What a prune marked not current: each path, then the count (prune, verify --prune)."""
    for path in gone:
        click.echo(f"{'would mark' if dry_run else 'marked'} gone: {printable(path)}")
    click.echo(f"{counted(len(gone), 'path')}{' would be' if dry_run else ''} marked not current")


@cli.command()
@click.option("--no-files", is_flag=True, help="Do not check the files on disk.")
@click.option("--prune", "do_prune", is_flag=True,
              help="Then mark vanished files' paths not current and list them (as `imgstore prune`; JSON: \"pruned\").")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
@friendly_errors
def verify(obj: Context, no_files: bool, do_prune: bool, as_json: bool) -> None:
    """Check every image has its features and codes; list files that vanished or changed.

    Exits 1 when the database is inconsistent (not for files that moved on disk).

    Example: imgstore verify --prune
    """
    if do_prune and no_files:
        raise click.UsageError("--prune marks the vanished files that the file check finds: drop --no-files")
    pruned: list[str] = []
    with obj.store() as store:
        report = store.verify(check_files=not no_files)
        if do_prune and report.vanished_files:
            pruned = store.prune()
    if as_json:
        emit_json({**report.as_dict(), **({"pruned": pruned} if do_prune else {})})
    else:
        click.echo(f"images without features: {len(report.images_without_features)}")
        for hasher_id, ids in report.missing_codes.items():
            click.echo(f"index {hasher_id}: {counted(len(ids), 'image')} without a code")
        for hasher_id, b in report.bucket_mismatch.items():
            click.echo(f"index {hasher_id}: band buckets hold {b.found} entries, {b.expected} expected")
        click.echo(f"dangling rows: {report.dangling_rows}")
        click.echo(f"vanished files: {len(report.vanished_files)}, changed files: {len(report.changed_files)}")
        for path in report.vanished_files[:20]:
            click.echo(f"  vanished: {printable(path)}")
        if len(report.vanished_files) > 20:
            click.echo(f"  ... and {len(report.vanished_files) - 20} more vanished: --json lists them all")
        for path in report.changed_files[:20]:
            click.echo(f"  changed:  {printable(path)}")
        if len(report.changed_files) > 20:
            click.echo(f"  ... and {len(report.changed_files) - 20} more changed: --json lists them all")
        if do_prune:
            _echo_marked(pruned)
        click.echo("ok" if report.ok else "INCONSISTENT")
    if not report.ok:
        raise SystemExit(1)


def batch_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--cluster and --shards: batch work over an index's shards (imgstore.batch)."""
    fn = click.option("--shards", "shards_dir", type=click.Path(file_okay=False), default=None,
                      help="Folder of the index's shards, exported or brought up to date first; every worker must read it "
                           "[default: DB.shards beside an SQLite store].")(fn)
    return click.option("--cluster", default=None, metavar="ADDRESS",
                        help="Compute over the index's shards on a Dask cluster: tcp://host:8786, or local[:N] for N "
                             "worker processes here; a rerun keeps the finished blocks.")(fn)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["jsonl", "json", "csv"]), default="jsonl", show_default=True,
              help="jsonl: one JSON object per line; json: one JSON array (the same as --json); csv: a header, then a row "
                   "per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array (the same as --format json).")
@click.option("--neighbours", default=0, type=click.IntRange(0, 100), help="Add the ids of this many nearest images.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="File to write [default: stdout].")
@filter_options
@batch_options
@click.pass_obj
@friendly_errors
def export(obj: Context, fmt: str, as_json: bool, neighbours: int, output: str | None,
           search_filter: SearchFilter | None, cluster: str | None, shards_dir: str | None) -> None:
    """Export image metadata (and optionally nearest neighbours) as JSON lines, a JSON array or CSV:
    every image, or those the filters allow (the options of `query`), by id.

    With --cluster, the neighbours are the exact nearest codes of the active index by Hamming
    distance (with their "distances"), computed block by block over its shards on the cluster.

    \b
    Example:
      imgstore export --format csv --neighbours 5 -o images.csv
      imgstore export --json > images.json
      imgstore export --label "golden retriever" --under ~/Pictures/2024 --format csv
      imgstore export --neighbours 10 --cluster local:2 -o graph.jsonl
    """
    import csv

    if as_json:
        fmt = "json"
    if (cluster or shards_dir) and not neighbours:
        raise click.UsageError("--cluster and --shards compute neighbours: add --neighbours K")
    with obj.store() as store, contextlib.ExitStack() as closing:
        out = closing.enter_context(open(output, "w", newline="", encoding="utf-8")) if output else sys.stdout
        writer = None
        n_rows = 0
        if fmt == "json":  # written row by row, laid out as emit_json lays out a list
            out.write("[")
        for row in store.export_rows(neighbours=neighbours, filter=search_filter, cluster=cluster,
                                     shards=shards_dir):
            n_rows += 1
            if fmt == "json":
                item = json.dumps(row, indent=2, default=str).replace("\n", "\n  ")
                out.write(f"{',' if n_rows > 1 else ''}\n  {item}")
                continue
            if fmt == "jsonl":
                out.write(json.dumps(row, default=str) + "\n")
                continue
            flat = {k: (json.dumps(v, default=str) if isinstance(v, (dict, list)) else v) for k, v in row.items()}
            flat["paths"] = json.dumps([printable(p) for p in row["paths"]])
            if writer is None:
                writer = csv.DictWriter(out, fieldnames=list(flat))
                writer.writeheader()
            writer.writerow(flat)
        if fmt == "json":
            out.write("\n]\n" if n_rows else "]\n")


# --- ingest -----------------------------------------------------------------------------------


def ingest_options(*, recursive_help: str, extractor_help: str, meta_help: str) -> Callable[[F], F]:
    """Add the options of the commands that ingest (``ingest``, ``watch``): sub-folders, the
    extractor, batch size, decoding threads, tags and fields added to every image found, the
    automatic index and the resnet50 weights. Each command says in its own words what
    sub-folders, the extractor's default and a field mean for it."""
    options = (
        click.option("--recursive/--no-recursive", default=True, show_default=True, help=recursive_help),
        click.option("--extractor", default=None, metavar="NAME", help=extractor_help),
        click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 4096),
                     help="Images per model batch and per transaction."),
        click.option("--workers", default=None, type=click.IntRange(1, 64), help="Decoding threads [default: one per core]."),
        click.option("--tag", "tags", multiple=True, metavar="TAG",
                     help="Add a tag to every image found (repeatable; joins its tags list)."),
        click.option("--meta", "meta", multiple=True, metavar="KEY=VALUE", callback=lambda c, p, v: _pairs(v),
                     help=meta_help),
        click.option("--no-auto-index", is_flag=True, help="Do not build the default index automatically."),
        _weights_option,
    )

    def add(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func
    return add


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@ingest_options(recursive_help="Descend into sub-folders.",
                extractor_help="Feature extractor [default: the one the store searches with, else efficientnet-lite0], "
                               "or clip:ARCH:PATH: a CLIP model of open_clip with its weights file "
                               "(clip:ViT-B-32:/models/vit_b32.bin).",
                meta_help="Set a metadata field on every image found, stored before or not (repeatable).")
@click.option("--follow-symlinks", is_flag=True, help="Follow symbolic links (loops are detected).")
@click.option("--dry-run", is_flag=True, help="Only count what would be ingested.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Where the CNN runs: auto = a CUDA device when there is one [default], else the CPU.")
@click.option("--cluster", default=None, metavar="ADDRESS",
              help="Read and extract on a Dask cluster: tcp://host:8786, or local[:N] for N worker processes here.")
@click.option("--worker-db", default=None, metavar="URL",
              help="The database URL as the cluster's workers reach it [default: --db]; never 127.0.0.1 for remote workers.")
@click.pass_obj
@friendly_errors
def ingest(obj: Context, paths: tuple[str, ...], recursive: bool, extractor: str | None, batch_size: int,
           workers: int | None, tags: tuple[str, ...], meta: dict[str, str], follow_symlinks: bool, dry_run: bool,
           no_auto_index: bool, as_json: bool, progress: bool | None, device: str | None, cluster: str | None,
           worker_db: str | None, weights: str | None) -> None:
    """Add image files and folders to the store.

    Unchanged files (same path, size and mtime) are skipped without being read; content that is
    already stored only gets its new path recorded; bad files are recorded (see `imgstore
    errors`) and skipped. Safe to interrupt: run it again to finish.

    \b
    Example:
      imgstore ingest ~/Pictures --tag holidays
      imgstore ingest ~/Pictures/2024 --meta trip=alps
      imgstore --db postgresql://localhost/photos ingest /data/products --json
      imgstore --db postgresql://dbhost/photos ingest /shared/photos --cluster tcp://scheduler:8786
    """
    if worker_db and not cluster:
        raise click.UsageError("--worker-db is the URL for --cluster's workers: add --cluster")
    if weights:
        obj.extractor_options["resnet50"] = {"weights": weights}
    missing = [p for p in paths if not os.path.lexists(os.path.expanduser(p))]
    if missing:  # said before the store is opened: a typo in both must not leave an empty database behind
        raise NotFoundError(f"no such file or folder: {', '.join(printable(p) for p in missing)}")
    show = sys.stderr.isatty() if progress is None else progress
    bar = _ProgressBar() if show and not dry_run else None
    with obj.store(create=not dry_run) as store:
        try:
            summary = store.ingest(list(paths), recursive=recursive, extractor=extractor, batch_size=batch_size,
                                   workers=workers, tags=tags, metadata=meta, dry_run=dry_run, follow_symlinks=follow_symlinks,
                                   auto_index=not no_auto_index, progress=bar, device=device, cluster=cluster,
                                   worker_db=worker_db)
        finally:
            if bar is not None:
                bar.close()
    if as_json:
        emit_json({**summary.as_dict(), "errors": [{"path": p, "reason": r} for p, r in summary.errors]})
        return
    verb = "would add at most" if dry_run else "added"
    click.echo(
        f"{counted(summary.files_seen, 'file')}: {verb} {summary.added}, unchanged {summary.unchanged}, "
        f"duplicates {summary.duplicates}, failed {summary.failed}, {'would mark gone' if dry_run else 'gone'} "
        f"{summary.gone} ({summary.elapsed_s:.1f} s, {summary.images_per_s:.1f} images/s)"
    )
    if not summary.files_seen:
        click.echo(_nothing_found(paths, summary))
    for path, reason in summary.errors[:10]:
        click.echo(f"  failed: {printable(path)}: {reason}", err=True)
    if len(summary.errors) > 10:
        click.echo(f"  ... and {len(summary.errors) - 10} more: see `imgstore errors`", err=True)


def _nothing_found(paths: tuple[str, ...], summary: IngestSummary) -> str:
    """Why an ingest found no image file, in one line: what the walk passed over, and the option
    that would have taken it."""
    why = []
    if summary.skipped_symlinks:
        why.append(f"{counted(summary.skipped_symlinks, 'symbolic link')} skipped: add --follow-symlinks to follow them")
    if summary.skipped_folders:
        why.append(f"{counted(summary.skipped_folders, 'sub-folder')} not searched: drop --no-recursive")
    if summary.skipped_non_images:
        why.append(f"{counted(summary.skipped_non_images, 'file')} without an image extension such as .jpg ignored")
    if not why and not summary.failed:
        why.append("the folder is empty" if len(paths) == 1 else "the folders are empty")
    return f"no image files found in {', '.join(printable(p) for p in paths)}" + (f" ({'; '.join(why)})" if why else "")


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
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=str))
@ingest_options(recursive_help="Watch sub-folders too.",
                extractor_help="Feature extractor [default: the one the store searches with, else efficientnet-lite0].",
                meta_help="Set a metadata field on every image found (repeatable).")
@click.option("--settle", default=2.0, show_default=True, type=click.FloatRange(0.1, 3600), metavar="SECONDS",
              help="How long a file never closed after writing (moved in from another disk) must stay unchanged "
                   "before it is read; also how long a new folder settles before it is walked.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per batch (JSON lines).")
@click.pass_obj
@friendly_errors
def watch(obj: Context, folders: tuple[str, ...], recursive: bool, extractor: str | None, batch_size: int,
          workers: int | None, tags: tuple[str, ...], meta: dict[str, str], settle: float, no_auto_index: bool,
          as_json: bool, weights: str | None) -> None:
    """Keep the store up to date with folders: new, changed, moved and deleted images, as they happen.

    First rescans the folders (what changed while nothing watched them), then ingests each new or
    changed image once its file is complete, in batches: one line per batch. A deleted file's path
    is marked not current, so its image leaves search results (as `ingest` marks a vanished file);
    a renamed file keeps its image. Ctrl-C stops (exit 130); every finished batch is kept.

    \b
    Example:
      imgstore watch ~/Pictures
      imgstore watch ~/Pictures ~/Phone --tag phone --json
    """
    from .watch import Watcher, watched_folders  # watchdog: ~50 ms to import, for this and serve --watch only

    if weights:
        obj.extractor_options["resnet50"] = {"weights": weights}
    roots = watched_folders(folders)  # before the store is opened: a mistyped folder leaves no empty database behind
    with obj.store(create=True) as store:
        watcher = Watcher(store, roots, recursive=recursive, extractor=extractor, batch_size=batch_size, workers=workers,
                          tags=tags, metadata=meta, settle_s=settle, auto_index=not no_auto_index,
                          on_batch=functools.partial(_echo_watch_batch, as_json=as_json),
                          on_message=lambda text: click.echo(text, err=True))
        click.echo(f"watching {', '.join(printable(r) for r in roots)} for {store.display_url} (Ctrl-C stops)", err=True)
        watcher.run()


def _echo_watch_batch(batch: WatchBatch, *, as_json: bool = False, prefix: str = "", err: bool = False) -> None:
    """One line per watched batch (``imgstore watch``, ``serve --watch``); its failures on stderr."""
    if as_json:
        click.echo(json.dumps(batch.as_dict(), default=str), err=err)
        return
    line = (f"added {len(batch.added)}, updated {len(batch.updated)}, moved {len(batch.moved)}, "
            f"removed {len(batch.removed)}" + (f", failed {len(batch.failed)}" if batch.failed else "")
            + f" ({batch.elapsed_s:.1f} s)")
    if batch.rescanned:
        line = f"rescanned {', '.join(printable(p) for p in batch.rescanned)}: {line}"
    click.echo(prefix + line, err=err)
    for path, reason in batch.failed[:10]:
        click.echo(f"{prefix}  failed: {printable(path)}: {reason}", err=True)
    if len(batch.failed) > 10:
        click.echo(f"{prefix}  ... and {len(batch.failed) - 10} more: see `imgstore errors`", err=True)


@cli.command()
@click.option("--limit", type=click.IntRange(1), default=None, help="Show at most this many.")
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
        emit_json([row.as_dict() for row in rows])
        return
    if not rows:
        click.echo("no ingest errors")
    for row in rows:
        click.echo(f"{printable(row.path)}\t{row.error_type}\t{row.reason}")


# --- shards -------------------------------------------------------------------------------------


@cli.group()
def shards() -> None:
    """An index's codes as shard files, for batch work on a Dask cluster (dedup --cluster,
    export --neighbours K --cluster).

    \b
    Example:
      imgstore shards export /shared/shards
    """


@shards.command("export")
@click.argument("folder", required=False, type=click.Path(file_okay=False))
@click.option("--index", "index_id", default=None, type=click.IntRange(1), help="Index to export [default: the active one].")
@click.option("--shard-size", default=None, type=click.IntRange(1), metavar="CODES",
              help="Codes per shard when the folder is first made [default: 20,000,000].")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@click.pass_obj
@friendly_errors
def shards_export(obj: Context, folder: str | None, index_id: int | None, shard_size: int | None, as_json: bool) -> None:
    """Export an index's codes into FOLDER [default: DB.shards beside an SQLite store]: one pair
    of .npy files per range of image ids and a manifest. Exported again into the same folder,
    only the shards whose images changed are written.

    Example: imgstore --db postgresql://app@dbhost/photos shards export /shared/shards
    """
    with obj.store() as store:
        done = store.export_shards(folder, index_id=index_id, **({"shard_codes": shard_size} if shard_size else {}))
    if as_json:
        emit_json(done.as_dict())
        return
    got = done.shards
    click.echo(f"{counted(got.n_codes, 'code')} of index {got.index.id} in {counted(len(got.shards), 'shard')} at "
               f"{printable(str(got.folder))}: {len(done.written)} written, {len(done.kept)} unchanged "
               f"({done.seconds:.1f} s)")


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
@click.option("--bands", "n_bands", default=None, type=click.IntRange(1, 64),
              help="Bands the code is cut into [default: about bits / log2(images)].")
@click.option("--sample", default=None, type=click.IntRange(1), help="Fit on a random sample of this many images.")
@click.option("--extractor", default=None, help="Feature space to index [default: the largest].")
@click.option("--labels", default=None, help="Supervision: 'folder' or 'tag:KEY'.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same codes).")
@click.option("--activate/--no-activate", default=True, show_default=True, help="Make it the index queries use.")
@click.option("--json", "as_json", is_flag=True, help="Print the new index as JSON.")
@click.pass_obj
@friendly_errors
def index_create(obj: Context, method: str, n_bits: int, n_bands: int | None, sample: int | None,
                 extractor: str | None, labels: str | None, seed: int, activate: bool, as_json: bool) -> None:
    """Fit a hasher on the stored features and encode every image.

    Example: imgstore index create --method itq --bits 64 --bands 4
    """
    with obj.store() as store:  # a store that does not exist has no features to index: never created here
        index_id = store.create_index(method, n_bits, n_bands=n_bands, sample=sample, extractor=extractor,
                                      activate=activate, random_state=seed, labels=labels)
        info = next(i for i in store.indexes() if i.id == index_id)
    if as_json:
        emit_json(info.as_dict())
        return
    click.echo(f"index {info.id}: {info.method}, {info.n_bits} bits, {counted(info.n_bands, 'band')} of {info.band_width} "
               f"bits, {counted(info.n_codes, 'image')}{' (active)' if info.is_active else ''}")


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
        kind = "supervised" if i.config.get("supervised") else "unsupervised"
        mark = "*" if i.is_active else " "
        click.echo(f"{mark} {i.id:>3}  {i.method:<7} {i.n_bits:>3} bits  {counted(i.n_bands, 'band')} of {i.band_width} bits  "
                   f"{counted(i.n_codes, 'image')}  {i.extractor}  {kind}, fitted on {i.n_fitted}")


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
        successor = store.drop_index(index_id)
        remaining = store.indexes()
    click.echo(f"index {index_id} dropped")
    if successor is not None:
        click.echo(f"index {successor} is now the active one")
    elif not any(i.is_active for i in remaining):
        click.echo("no active index left: queries scan the float features exactly (`imgstore index create` builds one)")


# --- query --------------------------------------------------------------------------------------


@cli.command()
@click.argument("images", nargs=-1, required=False)
@click.option("--text", "words", metavar="WORDS", default=None,
              help='Find images by words instead ("a dog on the beach"): through what the classifier sees in them, '
                   "or by CLIP's text tower in a CLIP feature space.")
@click.option("-k", default=10, show_default=True, type=click.IntRange(1, 10_000), help="Results per query.")
@click.option("--exact", is_flag=True, help="Exact Hamming kNN (equal to a full scan).")
@click.option("--probe-radius", default=1, show_default=True, type=click.IntRange(0, 8),
              help="Bits flipped per band when probing.")
@click.option("--rerank/--no-rerank", default=None,
              help="Re-rank the best Hamming candidates by float-feature cosine [default: on].")
@click.option("--index", "index_id", type=int, default=None, help="Search this index [default: the active one; not with --text].")
@click.option("--include-stale", is_flag=True, help="Also show images whose files all changed or vanished.")
@click.option("--extractor", default=None, metavar="NAME",
              help="With --text: the feature space searched (clip:ARCH:PATH, or efficientnet-lite0) [default: a CLIP "
                   "space when the store has one, else the labelled one]. With IMAGES: clip:ARCH:PATH says where the "
                   "weights file of the CLIP space searched is, when this machine has not seen it.")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--montage", type=click.Path(dir_okay=False), default=None,
              help="Write a contact sheet PNG of the query and its results (one per query: name-2.png, ...).")
@_weights_option
@click.pass_obj
@friendly_errors
def query(obj: Context, images: tuple[str, ...], words: str | None, k: int, exact: bool, probe_radius: int, rerank: bool | None,
          index_id: int | None, include_stale: bool, extractor: str | None, search_filter: SearchFilter | None, as_json: bool,
          montage: str | None, weights: str | None) -> None:
    """Find the stored images most similar to each IMAGE (a file, or a stored image id).

    The filters (--where, --tag, --label, --under, --taken-after/--taken-before) combine: a result
    meets every one. --exact stays exact over the images they allow; a filter that allows
    nothing finds nothing.

    \b
    Example:
      imgstore query cat.jpg -k 5
      imgstore query 42 --exact --json
      imgstore query cat.jpg --montage results.png
      imgstore query cat.jpg --tag pets --under ~/Pictures/2024 --taken-after 2024-06
      imgstore query --text "a dog on the beach"
      imgstore query 42 --label "golden retriever"
      imgstore query --text "a dog on the beach" --extractor clip:ViT-B-32:/models/vit_b32.bin
    """
    if words is not None:
        if images:
            raise click.UsageError("give IMAGES or --text WORDS, not both")
        if index_id is not None:
            raise click.UsageError("--index is for IMAGES: a word search scores every image's stored features, through "
                                   "no index (--extractor chooses its feature space)")
        _query_words(obj, words, k, include_stale, as_json, search_filter, extractor)
        return
    if not images:
        raise click.UsageError("give one or more IMAGES (files or stored ids), or --text WORDS")

    if weights:
        obj.extractor_options["resnet50"] = {"weights": weights}
    if extractor is not None:
        if not embeds_text(extractor):
            raise click.UsageError("with IMAGES the index decides the feature space (--index); --extractor there only "
                                   "says where a CLIP space's weights file is (clip:ARCH:PATH)")
        space_name(extractor)  # hashed once: the space's model is then found from its name
    queries: list[Any] = []
    for ref in images:
        if os.path.exists(ref):
            queries.append(ref)
        elif ref.isdigit():
            queries.append(int(ref))
        else:
            raise click.ClickException(f"{ref}: no such file (or stored image id)")
    with obj.store() as store:
        results = store.search_many(queries, k, exact=exact, probe_radius=probe_radius, rerank=rerank,
                                    index_id=index_id, include_stale=include_stale, filter=search_filter)
        if montage:
            for n, (ref, q, res) in enumerate(zip(images, queries, results)):
                target = montage if n == 0 else _numbered(montage, n + 1)
                source = q if isinstance(q, str) else next(iter(store.image(q).current_paths), None)
                _result_sheet(ref, source, res, target, store.max_pixels)
                click.echo(f"wrote {target}", err=True)
    if as_json:
        emit_json([{"query": q, "results": [r.as_dict() for r in res]} for q, res in zip(images, results)])
        return
    for ref, res in zip(images, results):
        click.echo(f"query: {ref}")
        click.echo(f"  {'rank':>4}  {'id':>6}  {'hamming':>7}  {'cosine':>7}  path")
        for n, r in enumerate(res, 1):
            dist = "-" if r.distance is None else str(r.distance)
            cos = "-" if r.cosine is None else f"{r.cosine:.4f}"
            path = printable(r.paths[0]) if r.paths else "(no current path)"
            more = f" (+{len(r.paths) - 1} more)" if len(r.paths) > 1 else ""
            click.echo(f"  {n:>4}  {r.image_id:>6}  {dist:>7}  {cos:>7}  {path}{more}")


def _query_words(obj: Context, words: str, k: int, include_stale: bool, as_json: bool,
                 search_filter: SearchFilter | None, extractor: str | None = None) -> None:
    with obj.store() as store:
        found = store.search_text(words, k=k, include_stale=include_stale, filter=search_filter, extractor=extractor)
    if as_json:
        emit_json(found.as_dict())
        return
    understood = ", ".join(f"{u.label} {u.prob:.0%}" for u in found.understood[:3])
    click.echo(f"words: {found.text}  (understood as {understood})" if understood else f"words: {found.text}")
    # the match score orders the hits; the best-matching label says what was matched (its
    # probability is of that class alone, so it is left out: it would not fall down the list)
    width = max([len(BEST_LABEL), *(len(_best_label(hit.labels)) for hit in found.hits)])
    click.echo(f"  {'rank':>4}  {'id':>6}  {'match':>6}  {BEST_LABEL:<{width}}  path")
    for n, hit in enumerate(found.hits, 1):
        path = printable(hit.paths[0]) if hit.paths else "(no current path)"
        more = f" (+{len(hit.paths) - 1} more)" if len(hit.paths) > 1 else ""
        click.echo(f"  {n:>4}  {hit.image_id:>6}  {hit.score:>6.3f}  {_best_label(hit.labels):<{width}}  {path}{more}")
    if not found.hits:
        click.echo("  no image carries those labels" if found.understood else "  no image found")


#: The word search table's column of each hit's best-matching label.
BEST_LABEL = "best label"


def _best_label(found: list[ImageLabel]) -> str:
    """A hit's best-matching label (its most probable among the words' classes), or "-"."""
    return found[0].label if found else "-"


def _numbered(path: str, n: int) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}-{n}{ext or '.png'}"


def _short_name(path: str) -> str:
    """``folder/file.jpg``: enough to tell copies apart in a caption."""
    return printable(os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path)))


def _result_sheet(ref: str, source: Any, results: list[Any], target: str, max_pixels: int) -> None:
    from .montage import Tile, contact_sheet

    tiles = [Tile(source, ["query", os.path.basename(ref)], highlight=True)]
    for n, r in enumerate(results, 1):
        score = []
        if r.distance is not None:
            score.append(f"hamming {r.distance}")
        if r.cosine is not None:
            score.append(f"cos {r.cosine:.3f}")
        path = r.paths[0] if r.paths else None
        tiles.append(Tile(path, [f"#{n}  id {r.image_id}", "  ".join(score), _short_name(path) if path else "(no file)"]))
    contact_sheet(tiles, target, columns=min(6, len(tiles)), title=f"query: {ref}", max_pixels=max_pixels)


@cli.command()
@click.option("--max-distance", type=click.IntRange(0, 256), default=None,
              help="Largest Hamming distance [default: a quarter of the bits].")
@click.option("--min-cosine", type=click.FloatRange(0, 1), default=None,
              help="Smallest float-feature cosine [default: 0.90; 0 = codes only].")
@click.option("--min-signature", type=click.FloatRange(0, 1), default=None,
              help="Smallest pixel-layout signature similarity that also makes a duplicate [default: 0.95; 0 = off].")
@click.option("--geometry/--no-geometry", default=True, show_default=True,
              help="Check candidate pairs on their pixels, re-reading their files (photos: keypoints, one affine map, "
                   "aligned pixels; thumbnails: an edit search): finds rotated, cropped and captioned copies, rejects "
                   "second shots of a scene and look-alikes.")
@click.option("--format", "fmt", type=click.Choice(["text", "csv", "json"]), default="text", show_default=True,
              help="text: a table per group; csv: a row per file; json: one JSON array.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON (the same as --format json).")
@click.option("--montage", "montage_dir", type=click.Path(file_okay=False), default=None,
              help="Write one contact sheet per group into this folder (created if missing).")
@click.option("--keep", type=click.Choice(["original", "largest", "oldest", "newest", "smallest"]), default="original",
              show_default=True, help="Which copy to keep: original = most picture, lossless, no added border, earliest capture.")
@click.option("--apply", "do_apply", is_flag=True, help="Move every copy but the keeper into --move-to (journalled; see --undo).")
@click.option("--move-to", type=click.Path(file_okay=False), default=None, help="Folder the copies go to with --apply.")
@click.option("--undo", "undo_journal", type=click.Path(dir_okay=False), default=None,
              help="Put back everything an --apply journal moved.")
@batch_options
@click.pass_obj
@friendly_errors
def dedup(obj: Context, max_distance: int | None, min_cosine: float | None, min_signature: float | None,
          geometry: bool, fmt: str, as_json: bool, montage_dir: str | None, keep: str, do_apply: bool, move_to: str | None,
          undo_journal: str | None, cluster: str | None, shards_dir: str | None) -> None:
    """Find groups of duplicate and near-duplicate images, with a suggested keeper.

    Exact copies (same bytes at several paths) and near copies (resized, recompressed,
    cropped, rotated, captioned, colour-adjusted). With an index, candidates come from its bands; without
    one, every pair is compared (a large store gets a temporary in-memory index instead).

    \b
    Example:
      imgstore dedup
      imgstore dedup --min-cosine 0.95 --format csv > duplicates.csv
      imgstore dedup --montage dup-sheets/
      imgstore dedup --cluster tcp://scheduler:8786 --shards /shared/shards

    With --cluster, the index's candidate pairs are found over its shards on the cluster's
    workers (the same pairs, so the same groups); the rest runs here.
    """
    import csv

    if undo_journal:
        with obj.store() as store:
            undone = store.undo_duplicates(undo_journal)
        if as_json or fmt == "json":
            emit_json(undone.as_dict())
        else:
            for _src, dst in undone.restored:
                click.echo(f"restored {printable(dst)}")
            for path, reason in undone.failed:
                click.echo(f"not restored: {printable(path)}: {reason}", err=True)
            click.echo(f"{counted(len(undone.restored), 'file')} put back, {len(undone.failed)} not")
        if undone.failed:
            raise SystemExit(1)
        return
    if do_apply != bool(move_to):
        raise click.UsageError("--apply and --move-to DIR go together")
    with obj.store() as store:
        groups = store.find_duplicates(max_distance=max_distance, min_cosine=min_cosine, min_signature=min_signature,
                                       keep=keep, geometry=geometry, cluster=cluster,
                                       shards=shards_dir)
        if do_apply:
            assert move_to is not None
            done = store.apply_duplicates(groups, move_to)
            if as_json or fmt == "json":
                emit_json(done.as_dict())
            else:
                for src, dst in done.moved:
                    click.echo(f"moved {printable(src)} -> {printable(dst)}")
                for path, reason in done.failed:
                    click.echo(f"not moved: {printable(path)}: {reason}", err=True)
                click.echo(f"{counted(len(done.moved), 'file')} moved from {counted(len(groups), 'group')}; undo with "
                           f"`imgstore dedup --undo {printable(done.journal)}`")
            return
    if montage_dir:
        _dedup_sheets(groups, montage_dir, obj.max_pixels)
    if fmt == "json" or as_json:
        emit_json([g.as_dict() for g in groups])
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["group", "kind", "keeper", "image_id", "distance", "cosine", "path"])
        for g, group in enumerate(groups, 1):
            for m in group.members:
                for path in m.paths or [""]:
                    writer.writerow([g, group.kind, "true" if path == group.keeper_path else "false", m.image_id,
                                     "" if m.distance is None else m.distance, "" if m.cosine is None else f"{m.cosine:.4f}",
                                     printable(path)])
    else:
        for g, group in enumerate(groups, 1):
            click.echo(f"group {g} ({group.kind}, {counted(sum(len(m.paths) for m in group.members), 'file')}):")
            click.echo(f"  {'keep':<4}  {'id':>6}  {'hamming':>7}  {'cosine':>6}  path")  # the columns of `query`
            for m in group.members:
                # None: not measured (no index, or no direct pair with the keeper)
                dist = "-" if m.distance is None else str(m.distance)
                cos = "-" if m.cosine is None else f"{m.cosine:.3f}"
                for path in m.paths or ["(no file)"]:
                    mark = "keep" if path == group.keeper_path else ""
                    click.echo(f"  {mark:<4}  {m.image_id:>6}  {dist:>7}  {cos:>6}  {printable(path)}")
        click.echo(counted(len(groups), "group"))


def _dedup_sheets(groups: list[Any], folder: str, max_pixels: int | None) -> None:
    from .montage import Tile, contact_sheet

    os.makedirs(folder, exist_ok=True)
    for g, group in enumerate(groups, 1):
        tiles = []
        for m in group.members:
            for path in m.paths or [None]:
                keeper = path == group.keeper_path
                score = ("" if m.distance is None else f"d {m.distance}  ") + ("" if m.cosine is None else f"cos {m.cosine:.3f}")
                if not score.strip() and not keeper:
                    score = "joined via other copies"  # no direct pair with the keeper
                tiles.append(Tile(path, [f"{'KEEP ' if keeper else ''}id {m.image_id}", score.strip(),
                                         _short_name(path) if path else "(no file)"], highlight=keeper))
        contact_sheet(tiles, os.path.join(folder, f"group-{g:04d}.png"), title=f"group {g}: {group.kind} duplicates",
                      max_pixels=max_pixels)
    click.echo(f"wrote {counted(len(groups), 'contact sheet')} to {printable(folder)}", err=True)


@cli.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
@friendly_errors
def show(obj: Context, ref: str, as_json: bool) -> None:
    """Show one stored image by id or path: size, format, metadata, every path it was seen at.

    Example: imgstore show 42 --json
    """
    with obj.store() as store:
        record = store.image(ref)
    if as_json:
        emit_json(record.as_dict())
        return
    click.echo(f"image {record.id}: {record.width}x{record.height} {record.format or '?'}, {record.byte_size:,} bytes, "
               f"sha256 {record.sha256[:16]}...")
    # the capture time is the camera's clock as its EXIF says, stored as if it were UTC (what the
    # --taken-after filters compare with): shown without an offset it never had
    taken = f", captured {record.captured_at.replace(tzinfo=None)} (camera clock)" if record.captured_at else ""
    click.echo(f"ingested {record.ingested_at}" + taken)
    if record.meta:
        click.echo(f"metadata {json.dumps(record.meta, ensure_ascii=False, default=str)}")
    for p in record.paths:
        moved = f"  (moved to {printable(p.moved_to)})" if p.moved_to else ""
        click.echo(f"  {'current' if p.is_current else 'moved  ' if p.moved_to else 'gone   '}  {printable(p.path)}{moved}")
    if not record.paths:
        click.echo("  (added without a path)")
    click.echo(f"feature spaces {', '.join(map(str, record.feature_spaces)) or '-'}, "
               f"indexes {', '.join(map(str, record.indexes)) or '-'}")
    if record.labels:
        click.echo("labels " + ", ".join(f"{label.label} {label.prob:.0%}" for label in record.labels))


@cli.command()
@click.option("--update", is_flag=True, help="First compute the labels of images stored without them (from their "
                                            "stored features: no file is read).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Show only the N most common labels.")
@click.option("--extractor", default=None, help="Feature space to read [default: the labelled one with most images].")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
@friendly_errors
def labels(obj: Context, update: bool, limit: int | None, extractor: str | None, as_json: bool) -> None:
    """Count what the classifier sees in the collection: each label, how many images carry it
    (among their few most probable classes) and for how many it is the first.

    \b
    Example:
      imgstore labels --limit 20
      imgstore labels --update --json
    """
    with obj.store(create=update) as store:
        if update:
            n = store.update_labels(extractor)
            click.echo(f"labelled {counted(n, 'image')} from their stored features", err=True)
        found = store.label_counts(extractor)
        missing = store.labels_missing(extractor)
    shown = found[:limit] if limit else found
    if as_json:
        emit_json({"labels": [c.as_dict() for c in shown], "images_without_labels": missing})
        return
    if not found:
        click.echo("no labels yet")
    else:
        width = max(len(c.name) for c in shown)
        click.echo(f"{'label':<{width}}  {'images':>7}  {'first':>7}")
        for c in shown:
            click.echo(f"{c.name:<{width}}  {c.images:>7,}  {c.first:>7,}")
        if limit and len(found) > limit:
            click.echo(f"... {counted(len(found) - limit, 'more label')}")
    if missing:
        click.echo(f"{counted(missing, 'image')} stored before labels existed: `imgstore labels --update` labels "
                   "them from their stored features", err=True)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--allow-writes", is_flag=True,
              help="Let clients add, remove and resolve: uploads, removals, new indexes, duplicate moves.")
@click.option("--move-to", type=click.Path(file_okay=False), default=None,
              help="Folder the duplicates page moves copies into when resolving (needs --allow-writes).")
@click.option("--token", default=None, envvar="IMGSTORE_TOKEN",
              help="Require this token (16+ characters) on every page and API call [env IMGSTORE_TOKEN].")
@click.option("--insecure", is_flag=True, help="Listen beyond this machine without a token (not recommended).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Server processes, each with its own copy of the codes in memory: more searches at once "
                   "(about one per core); read-only only.")
@click.option("--vector-cache-mb", default=1024, show_default=True, type=click.IntRange(0),
              help="Memory per process for the float features the re-rank reads (0: read them from the database).")
@click.option("--watch", "watch_folders", multiple=True, metavar="FOLDER", type=click.Path(path_type=str),
              help="Keep the store up to date with this folder while serving (repeatable; as `imgstore watch`): new, "
                   "changed, moved and deleted images are searchable within seconds.")
@click.pass_obj
@friendly_errors
def serve(obj: Context, host: str, port: int, allow_writes: bool, move_to: str | None, token: str | None, insecure: bool,
          workers: int, vector_cache_mb: int, watch_folders: tuple[str, ...]) -> None:
    """Serve the store over HTTP: web pages to search and review it, and a JSON API (docs at /docs).

    Listens on this machine only by default; any other address needs --token (or --insecure).
    Read-only unless --allow-writes.

    \b
    Example:
      imgstore serve                      # then open http://127.0.0.1:8000
      imgstore serve --allow-writes --move-to ~/dupes
      imgstore serve --host 0.0.0.0 --token "$(openssl rand -hex 16)"
      imgstore serve --workers 2          # a read-only server using two cores
      imgstore serve --watch ~/Pictures   # new photos searchable as they arrive
    """
    import socket

    from .serve import WORKER_SETTINGS_ENV, check_token, create_app, is_loopback, worker_settings
    from .watch import Watcher, watched_folders

    try:
        check_token(token)  # before anything listens: an empty --token "$UNSET" would open the store to all
    except ImgStoreError as exc:
        raise click.BadParameter(str(exc), param_hint="--token") from None
    if not is_loopback(host) and token is None:
        if not insecure:
            raise click.UsageError(f"--host {host} is reachable from other machines: give --token TOKEN (or --insecure)")
        click.echo(f"warning: serving {host} without a token; anyone who can reach it can read the collection", err=True)
    if move_to and not allow_writes:
        raise click.UsageError("--move-to is where resolving duplicates moves files: add --allow-writes")
    if workers > 1 and allow_writes:
        raise click.UsageError("--workers serves a read-only collection (page notes, background jobs and undo live in "
                               "one process): drop --allow-writes, or --workers")
    if workers > 1 and watch_folders:
        raise click.UsageError("--watch runs in one server process: drop --workers, or run `imgstore watch` beside it")
    roots = watched_folders(watch_folders)  # a missing folder is one line, before anything listens
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
            port = probe.getsockname()[1]
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                                       "pick another --port (0 picks a free one)") from None
    import uvicorn

    # opened here first: a wrong path or an old schema is one line, before any worker starts; --watch
    # fills the store, so it may create it (as `imgstore watch` and `ingest` do)
    with obj.store(create=bool(roots)) as store:
        store.cache_codes = True
        store.vector_cache_mb = vector_cache_mb
        shown = f"[{host}]" if ":" in host else host
        address = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{port}/" + (f"?token={token}" if token else "")
        processes = f", {workers} processes" if workers > 1 else ""
        click.echo(f"serving {store.display_url}{'; writes allowed' if allow_writes else ' (read-only)'}{processes}", err=True)
        click.echo(f"open {address}   (API docs at /docs; Ctrl-C stops)", err=True)
        if workers > 1:
            os.environ[WORKER_SETTINGS_ENV] = worker_settings(store, token)
            store.close()
            uvicorn.run("imgstore.serve:worker_app", factory=True, workers=workers, host=host, port=port, log_level="warning",
                        access_log=False)
            return
        watcher = Watcher(store, roots, on_message=lambda text: click.echo(f"watch: {text}", err=True),
                          on_batch=functools.partial(_echo_watch_batch, prefix="watch: ", err=True)) if roots else None
        if roots:
            click.echo(f"watching {', '.join(printable(r) for r in roots)}", err=True)
        app = create_app(store, allow_writes=allow_writes, token=token, move_to=move_to, watcher=watcher)
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)  # no log line per request


def _db_after_command(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(Context).db = value


def _accept_db_everywhere(group: click.Group) -> None:
    """``imgstore info --db x.db`` as well as ``imgstore --db x.db info`` (datasette and
    sqlite-utils users type it after the command); the later one wins."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _accept_db_everywhere(command)
        else:
            command.params.append(click.Option(
                ["--db"], metavar="URL", expose_value=False, is_eager=True, callback=_db_after_command,
                help="SQLite file path or postgresql:// URL (also accepted before the command name).",
            ))


_accept_db_everywhere(cli)


def main() -> None:  # pragma: no cover - console entry point alternative
    cli(prog_name="imgstore")


if __name__ == "__main__":  # pragma: no cover
    main()
