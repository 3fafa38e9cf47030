"""The catalog: images, the paths they were seen at, ingest errors; look-up, removal, metadata."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import Connection, case, delete, func, select, update

from .bandindex import mark_changed, remove_codes
from .errors import ConfigError, NotFoundError
from .labels import ImageLabel, image_labels
from .models import Code, Feature, FeatureSpace, HashIndex, Image, ImagePath, IngestError, Label, LabelNorm
from .paths import MAX_ID, from_stored, is_storable_id, names_an_id, printable, to_stored
from .sqlhelpers import IN_CHUNK, chunks, driver_rows
from .types import ImageFiles, ThumbnailSource

if TYPE_CHECKING:  # pragma: no cover
    from .context import StoreContext


@dataclass(frozen=True)
class PathRecord:
    """A path an image was seen at; ``is_current`` is false once the path holds other content."""

    path: str
    is_current: bool
    file_size: int
    mtime_ns: int
    last_seen_at: datetime
    #: where ``dedup --apply`` moved the file (undoable); None otherwise
    moved_to: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ImageRecord:
    """One stored image: its row, every path it was seen at, and which feature spaces and
    indexes hold it."""

    id: int
    sha256: str
    width: int
    height: int
    format: str | None
    byte_size: int
    ingested_at: datetime
    captured_at: datetime | None
    meta: dict[str, Any]
    paths: list[PathRecord]
    feature_spaces: list[int]
    indexes: list[int]
    #: what the extractor's classifier sees in it, most probable first (:mod:`imgstore.labels`)
    labels: list[ImageLabel] = field(default_factory=list)

    @property
    def current_paths(self) -> list[str]:
        return [p.path for p in self.paths if p.is_current]

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["paths"] = [p.as_dict() for p in self.paths]
        out["labels"] = [label.as_dict() for label in self.labels]
        return out


@dataclass(frozen=True)
class IngestErrorRecord:
    """A file that could not be ingested (the latest failure per path)."""

    path: str
    error_type: str
    reason: str
    occurred_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Counts:
    """Rows of the main tables."""

    images: int
    paths: int
    feature_spaces: int
    features: int
    indexes: int
    codes: int
    errors: int

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


_COUNTED = {"images": Image, "paths": ImagePath, "feature_spaces": FeatureSpace, "features": Feature,
            "indexes": HashIndex, "codes": Code, "errors": IngestError}


def counts(conn: Connection) -> Counts:
    return Counts(**{name: int(conn.scalar(select(func.count()).select_from(model)) or 0) for name, model in _COUNTED.items()})


def errors(conn: Connection, limit: int | None = None) -> list[IngestErrorRecord]:
    """Ingest errors by path, the first ``limit`` (None: all)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit must be a whole number, 0 or more, got {limit!r}")
    columns = (IngestError.path, IngestError.error_type, IngestError.reason, IngestError.occurred_at)
    stmt = select(*columns).order_by(IngestError.path)
    if limit is not None:  # 0 lists none, as "the first 0" says
        stmt = stmt.limit(min(limit, MAX_ID))
    return [IngestErrorRecord(from_stored(path), str(kind), str(reason), when) for path, kind, reason, when in conn.execute(stmt)]


def resolve(conn: Connection, ref: int | str) -> int:
    """The id of the image ``ref`` names: an id, or any path it was seen at (current first)."""
    if names_an_id(ref):
        image_id = int(ref)
        if not is_storable_id(image_id) or conn.scalar(select(Image.id).where(Image.id == image_id)) is None:
            raise NotFoundError(f"no image with id {image_id}")
        return image_id
    path = os.path.abspath(os.path.expanduser(str(ref)))
    found = conn.scalar(select(ImagePath.image_id).where(ImagePath.path == to_stored(path)).order_by(ImagePath.is_current.desc()))
    if found is None:
        raise NotFoundError(f"no stored image was seen at {printable(path)}")
    return int(found)


def image(conn: Connection, ref: int | str) -> ImageRecord:
    image_id = resolve(conn, ref)
    row = conn.execute(select(Image.__table__).where(Image.id == image_id)).mappings().one()
    paths = [
        PathRecord(from_stored(p[0]), *p[1:5], moved_to=from_stored(p[5]) if p[5] else None) for p in conn.execute(
            select(ImagePath.path, ImagePath.is_current, ImagePath.file_size, ImagePath.mtime_ns, ImagePath.last_seen_at,
                   ImagePath.moved_to)
            .where(ImagePath.image_id == image_id).order_by(ImagePath.path)
        )
    ]
    return ImageRecord(
        id=row["id"], sha256=row["sha256"], width=row["width"], height=row["height"], format=row["format"],
        byte_size=row["byte_size"], ingested_at=row["ingested_at"], captured_at=row["captured_at"],
        meta=dict(row["meta"] or {}), paths=paths,
        feature_spaces=list(conn.scalars(
            select(Feature.space_id).where(Feature.image_id == image_id).order_by(Feature.space_id))),
        indexes=list(conn.scalars(select(Code.hasher_id).where(Code.image_id == image_id).order_by(Code.hasher_id))),
        labels=next(iter(image_labels(conn, image_id).values()), []),
    )


@dataclass(frozen=True)
class Removal:
    """What ``rm`` removed (or, with ``dry_run``, would remove): path rows, and images (an
    image named by id, or one whose last current path went)."""

    paths: list[str]
    images: list[int]
    dry_run: bool

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[int]:
        return iter(self.images)

    def as_dict(self) -> dict[str, Any]:
        return {"paths": self.paths, "images": self.images, "dry_run": self.dry_run}


def remove(ctx: StoreContext, refs: Sequence[int | str], *, dry_run: bool = False) -> Removal:
    """Remove what ``refs`` name, in one transaction. An ``int`` (or a string of digits that is no
    existing file) names an image: it goes with its features, codes and every path. A path names
    that path: its rows go, and its image too when no other current path is left (an image
    reached through another file stays). Unknown references raise :class:`NotFoundError` and
    remove nothing."""
    def work(conn: Connection) -> Removal:
        image_ids: set[int] = set()
        stored: set[str] = set()
        for ref in refs:
            if names_an_id(ref):
                image_ids.add(resolve(conn, ref))
            else:
                resolve(conn, ref)  # NotFoundError for a path never seen
                stored.add(to_stored(os.path.abspath(os.path.expanduser(str(ref)))))
        touched = {int(i) for i in conn.scalars(select(ImagePath.image_id).where(ImagePath.path.in_(sorted(stored))))}
        left = {int(i) for i in conn.scalars(
            select(ImagePath.image_id).where(ImagePath.image_id.in_(sorted(touched)), ImagePath.is_current.is_(True),
                                             ImagePath.path.not_in(sorted(stored)))
        )} if touched else set()
        image_ids |= touched - left
        removal = Removal(sorted(from_stored(p) for p in stored), sorted(image_ids), dry_run)
        if dry_run:
            return removal
        if stored:
            conn.execute(delete(ImagePath).where(ImagePath.path.in_(sorted(stored))))
        if image_ids:
            ids = sorted(image_ids)
            changed = remove_codes(conn, ids)
            for model in (Label, LabelNorm, Feature, ImagePath):
                conn.execute(delete(model).where(model.image_id.in_(ids)))
            conn.execute(delete(Image).where(Image.id.in_(ids)))
            mark_changed(conn, changed)
        return removal

    return ctx.write(work, doing="remove images")


def _gone(path: str) -> bool:
    """True only when the file is known not to exist (a permission error is not "gone")."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def mark_gone(ctx: StoreContext, *, roots: Sequence[str] | None = None, seen: set[str] | None = None,
              dry_run: bool = False) -> list[str]:
    """Mark current paths whose file no longer exists as not current (history kept): those
    under ``roots`` (a rescan; ``seen`` are stored paths the walk just found), or every one
    (``roots=None``: prune). Returns those paths."""
    seen = seen or set()
    with ctx.read("look up current paths") as conn:
        stmt = select(ImagePath.path).where(ImagePath.is_current.is_(True))
        candidates: list[str] = []
        if roots is None:
            candidates = list(conn.scalars(stmt))
        else:
            for root in roots:
                stored = to_stored(root)
                lo = stored.rstrip(os.sep) + os.sep
                hi = lo[:-1] + chr(ord(os.sep) + 1)
                under = (ImagePath.path >= lo) & (ImagePath.path < hi)
                candidates += conn.scalars(stmt.where(under | (ImagePath.path == stored)))
    gone = sorted({p for p in candidates if p not in seen and _gone(from_stored(p))})
    if gone and not dry_run:
        def work(conn: Connection) -> None:
            for part in chunks(gone, IN_CHUNK):
                conn.execute(update(ImagePath).where(ImagePath.path.in_(part), ImagePath.is_current.is_(True))
                             .values(is_current=False))

        ctx.write(work, doing="mark vanished paths")
    return [from_stored(p) for p in gone]


def prune_moved(ctx: StoreContext, *, dry_run: bool = False) -> Removal:
    """Forget the files ``dedup --apply`` moved away (their rows, kept for ``--undo``), and the
    images left with no path at all. The moved files themselves stay where they were moved."""
    def work(conn: Connection) -> Removal:
        rows = conn.execute(select(ImagePath.path, ImagePath.image_id).where(ImagePath.moved_to.is_not(None))).all()
        touched = sorted({int(i) for _, i in rows})
        keep = {int(i) for i in conn.scalars(
            select(ImagePath.image_id).where(ImagePath.image_id.in_(touched), ImagePath.moved_to.is_(None))
        )} if touched else set()
        gone = sorted(set(touched) - keep)
        removal = Removal(sorted(from_stored(p) for p, _ in rows), gone, dry_run)
        if dry_run or not rows:
            return removal
        conn.execute(delete(ImagePath).where(ImagePath.moved_to.is_not(None)))
        if gone:
            changed = remove_codes(conn, gone)
            conn.execute(delete(Label).where(Label.image_id.in_(gone)))
            conn.execute(delete(LabelNorm).where(LabelNorm.image_id.in_(gone)))
            conn.execute(delete(Feature).where(Feature.image_id.in_(gone)))
            conn.execute(delete(Image).where(Image.id.in_(gone)))
            mark_changed(conn, changed)
        return removal

    return ctx.write(work, doing="forget moved files")


def merged_meta(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``old`` updated with ``new``: list values (``tags``) are joined (sorted, no repeats),
    everything else is replaced; a value of None removes the key."""
    out = dict(old or {})
    for key, value in new.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = sorted(set(out[key]) | set(value), key=str)
        else:
            out[key] = value
    return out


def merge_meta(conn: Connection, image_ids: Sequence[int], meta: dict[str, Any]) -> int:
    """Merge ``meta`` into these images' metadata (:func:`merged_meta`); returns how many changed."""
    if not meta:
        return 0
    changed = []
    for part in chunks(sorted({int(i) for i in image_ids}), IN_CHUNK):
        for image_id, old in conn.execute(select(Image.id, Image.meta).where(Image.id.in_(part))):
            new = merged_meta(old if isinstance(old, dict) else {}, meta)
            if new != old:
                changed.append({"i": int(image_id), "m": new})
    if changed:
        from sqlalchemy import bindparam

        conn.execute(update(Image).where(Image.id == bindparam("i")).values(meta=bindparam("m")), changed)
    return len(changed)


def set_meta(ctx: StoreContext, ref: int | str, meta: dict[str, Any]) -> dict[str, Any]:
    """Merge ``meta`` into one image's metadata; returns the metadata now stored."""
    def work(conn: Connection) -> dict[str, Any]:
        image_id = resolve(conn, ref)
        merge_meta(conn, [image_id], meta)
        return dict(conn.scalar(select(Image.meta).where(Image.id == image_id)) or {})

    return ctx.write(work, doing="set metadata")


def stale_among(conn: Connection, image_ids: Sequence[int]) -> set[int]:
    """Images among ``image_ids`` whose every path went stale (seen at paths, none current).
    Images added without a path are never stale."""
    out: set[int] = set()
    current = func.sum(case((ImagePath.is_current.is_(True), 1), else_=0))
    for part in chunks(sorted({int(i) for i in image_ids}), IN_CHUNK):
        out |= {int(i) for i in conn.scalars(
            select(ImagePath.image_id).where(ImagePath.image_id.in_(part)).group_by(ImagePath.image_id).having(current == 0)
        )}
    return out


class PathRow(NamedTuple):
    """One row of ``image_paths`` as :func:`path_rows` reads it (``path`` as a file name); a
    named tuple: a search makes one per result, and a tuple is made in a third of the time."""

    path: str
    is_current: bool
    file_size: int
    first_seen_at: Any  # a datetime, or SQLite's text of one: ordered either way


def path_rows(conn: Connection, image_ids: Sequence[int]) -> dict[int, list[PathRow]]:
    """Every path row of each image (current or not), sorted by path: the one read of "the
    paths of these ids" that search, dedup and the pages share. Images without any path row
    (added from bytes) are absent. Read through the driver's cursor: it runs with every search."""
    out: dict[int, list[PathRow]] = {}
    columns = "image_id, path, is_current, file_size, first_seen_at"
    for part in chunks(sorted({int(i) for i in image_ids}), IN_CHUNK):
        if conn.dialect.name == "postgresql":  # one array parameter (see vectors.iter_features)
            rows = driver_rows(conn, f"SELECT {columns} FROM image_paths WHERE image_id = ANY(%s::bigint[]) ORDER BY path",
                               (list(part),))
        else:
            marks = ",".join("?" * len(part))
            rows = driver_rows(conn, f"SELECT {columns} FROM image_paths WHERE image_id IN ({marks}) ORDER BY path", tuple(part))
        for image_id, path, is_current, size, seen in rows:
            out.setdefault(int(image_id), []).append(PathRow(from_stored(path), bool(is_current), int(size or 0), seen))
    return out


def keeper_path(rows: Sequence[PathRow]) -> str | None:
    """The path to keep among one image's current paths: first seen, then shortest, then by name."""
    current = [(r.first_seen_at, len(r.path), r.path) for r in rows if r.is_current]
    return min(current)[2] if current else None


def image_files(conn: Connection, image_ids: Sequence[int]) -> dict[int, ImageFiles]:
    """Each image's format and its current files' sizes, for a side-by-side view of copies:
    two queries for any number of images. Unknown ids are absent."""
    ids = sorted({int(i) for i in image_ids if is_storable_id(int(i))})
    formats: dict[int, str | None] = {}
    for part in chunks(ids, IN_CHUNK):
        formats.update((int(i), f) for i, f in conn.execute(select(Image.id, Image.format).where(Image.id.in_(part))))
    rows = path_rows(conn, list(formats))
    return {i: ImageFiles(i, fmt, {r.path: r.file_size for r in rows.get(i, []) if r.is_current}) for i, fmt in formats.items()}


def thumbnail_source(conn: Connection, image_id: int) -> ThumbnailSource:
    """What a thumbnail of ``image_id`` is made from: its content hash and its first current
    file (None when every file went). Unknown id: :class:`NotFoundError`."""
    sha256 = conn.scalar(select(Image.sha256).where(Image.id == image_id)) if is_storable_id(image_id) else None
    if sha256 is None:
        raise NotFoundError(f"no image with id {image_id}")
    source = conn.scalar(select(ImagePath.path).where(ImagePath.image_id == image_id, ImagePath.is_current.is_(True))
                         .order_by(ImagePath.id).limit(1))
    return ThumbnailSource(image_id, str(sha256), None if source is None else from_stored(source))


def count_images(conn: Connection) -> int:
    """Stored images (one count, not every table's: a page shows it with every search)."""
    return int(conn.scalar(select(func.count()).select_from(Image)) or 0)


def existing_ids(conn: Connection, image_ids: Sequence[int]) -> set[int]:
    """Those of ``image_ids`` that are stored images (not removed)."""
    out: set[int] = set()
    for part in chunks(sorted({int(i) for i in image_ids if is_storable_id(int(i))}), IN_CHUNK):
        out.update(int(i) for i in conn.scalars(select(Image.id).where(Image.id.in_(part))))
    return out
