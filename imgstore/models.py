"""Typed SQLAlchemy 2.0 models. Alembic owns the schema: every change here needs a new revision.

Tables:

* ``images``: one row per distinct content (SHA-256 of the file bytes); the same bytes are
  stored once however many paths they were seen at.
* ``image_paths``: every path an image was seen at, with the file's size and mtime when seen.
  A path whose content changes gets a new row for the new image and its old row is marked not
  current, so the history of a path is kept.
* ``ingest_errors``: files that could not be ingested, with the reason.
* ``feature_spaces``: one per (extractor, preprocessing version); ``features`` holds one float
  vector per (space, image) as little-endian float32 bytes.
* ``hashers`` (model :class:`HashIndex`): the indexes: method, bit count, bands, fitted
  parameters (bytes), the feature space they read, whether active. ``codes`` holds one row per
  (index, image): the packed code, the source of truth. ``code_buckets`` is the band index
  search probes: per (index, band, band value), the ids and codes of that bucket, packed.
* ``pair_verdicts``: the geometric check's verdicts on pairs of contents, kept between dedups.
* ``labels``: per (image, feature space), the classes the extractor's classifier sees in it,
  most probable first, with their probabilities; ``label_norms`` the log-sum-exp of its logits.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator[datetime]):
    """A point in time stored in UTC and read back as an aware ``datetime`` on every database:
    PostgreSQL's driver gives one already, SQLite's a naive one (the column keeps no offset),
    which the library, its JSON and the HTTP API's ``date-time`` fields would otherwise show
    without its zone. The column type is ``DateTime(timezone=True)`` as before: no migration."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)

    if TYPE_CHECKING:
        # DeclarativeBase says FromClause; every model here is declared with __tablename__, so a Table
        __table__: ClassVar[Table]


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(16))
    byte_size: Mapped[int] = mapped_column(BigInteger)
    ingested_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    captured_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: pixel-layout signature for copy detection (``imgstore.signature``), 63 float32 LE values
    signature: Mapped[bytes | None] = mapped_column(LargeBinary)
    #: share of the picture that is a rotation's border (``imgstore.keeper``), measured on the
    #: file by dedup when it chooses a keeper and kept: a property of the content. NULL until
    #: measured; ``border_version`` is the measure's (``keeper.BORDER_VERSION``), another is ignored
    border_fraction: Mapped[float | None] = mapped_column(Float)
    border_version: Mapped[int | None] = mapped_column(SmallInteger)

    paths: Mapped[list[ImagePath]] = relationship(
        back_populates="image", cascade="all, delete-orphan", passive_deletes=True
    )


class ImagePath(Base):
    """A path an image was seen at. ``is_current`` is false once the path holds other content."""

    __tablename__ = "image_paths"
    __table_args__ = (
        UniqueConstraint("path", "image_id", name="uq_image_paths_path_image_id"),
        Index("ix_image_paths_image_id", "image_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    file_size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    first_seen_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    #: the folder given to ingest when the path was found (``imgstore.paths`` text; NULL before 0006)
    root: Mapped[str | None] = mapped_column(Text)
    #: where ``dedup --apply`` moved the file (the row is then not current); NULL otherwise
    moved_to: Mapped[str | None] = mapped_column(Text)

    image: Mapped[Image] = relationship(back_populates="paths")


class IngestError(Base):
    """A file that could not be ingested (the latest failure per path)."""

    __tablename__ = "ingest_errors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    error_type: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class FeatureSpace(Base):
    __tablename__ = "feature_spaces"
    __table_args__ = (
        UniqueConstraint("extractor", "preprocess_version", name="uq_feature_spaces_extractor_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    extractor: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    preprocess_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Feature(Base):
    """A float vector: ``vector`` is ``dim`` little-endian float32 values."""

    __tablename__ = "features"

    space_id: Mapped[int] = mapped_column(
        ForeignKey("feature_spaces.id", ondelete="CASCADE"), primary_key=True
    )
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class HashIndex(Base):
    """An index: a fitted hasher over one feature space, and the layout of its bands. (The
    fitted object itself is a :class:`imgstore.hashing.Hasher`; this is its database row.)"""

    __tablename__ = "hashers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: random token written at creation: caches key on it, since SQLite reuses a dropped index's id
    uid: Mapped[str] = mapped_column(String(32), unique=True)
    space_id: Mapped[int] = mapped_column(
        ForeignKey("feature_spaces.id", ondelete="CASCADE"), index=True
    )
    method: Mapped[str] = mapped_column(String(32))
    n_bits: Mapped[int] = mapped_column(Integer)
    n_bands: Mapped[int] = mapped_column(Integer)
    band_width: Mapped[int] = mapped_column(Integer)
    params: Mapped[bytes] = mapped_column(LargeBinary)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    is_active: Mapped[bool] = mapped_column(Boolean, default=False)
    n_fitted: Mapped[int] = mapped_column(Integer, default=0)
    #: bumped on every change to the index's codes, so process-local caches know to reload
    generation: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Code(Base):
    """A packed code (``n_bits // 8`` bytes, bit order in ``imgstore.hashing.bits``)."""

    __tablename__ = "codes"

    hasher_id: Mapped[int] = mapped_column(
        ForeignKey("hashers.id", ondelete="CASCADE"), primary_key=True
    )
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    code: Mapped[bytes] = mapped_column(LargeBinary)


class CodeBucket(Base):
    """One bucket of the band index: the image ids and codes whose band ``band`` equals ``value``.

    Search reads a probe's candidates as one row (or a few ``chunk`` rows) of packed arrays
    instead of one row per candidate: a radius-1 query probes a few dozen band values and
    finds tens of times more candidates, and moving those rows into Python cost more than the database's
    own work. ``image_ids`` is little-endian int64, ``codes`` the packed codes in the same
    order, ``n`` the number of entries; a chunk holds at most ``bandindex.BUCKET_CHUNK`` entries,
    so appending to a crowded bucket rewrites one bounded row. Written in the same transaction
    as the ``codes`` rows, only by :mod:`imgstore.bandindex`.
    """

    __tablename__ = "code_buckets"
    __table_args__ = {"sqlite_with_rowid": False}  # noqa: RUF012 - SQLAlchemy's declarative hook, read once, never mutated

    hasher_id: Mapped[int] = mapped_column(ForeignKey("hashers.id", ondelete="CASCADE"), primary_key=True)
    band: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    chunk: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    image_ids: Mapped[bytes] = mapped_column(LargeBinary)
    codes: Mapped[bytes] = mapped_column(LargeBinary)


class PairVerdict(Base):
    """The geometric check's verdict on a pair of contents (:mod:`imgstore.geometry`): COPY (1)
    or DIFFERENT (0), by the two images' SHA-256 (``sha_a`` < ``sha_b``), so that a second
    dedup checks only pairs it has not seen. ``check_version`` is the check's
    (``geometry.CHECK_VERSION``): a verdict of another version is not used. Contents never
    change, so a verdict stays true while its version does; the rows of a removed image's
    pairs stay (a few dozen bytes each) and serve again if its content comes back.
    """

    __tablename__ = "pair_verdicts"
    __table_args__ = {"sqlite_with_rowid": False}  # noqa: RUF012 - SQLAlchemy's declarative hook, read once, never mutated

    sha_a: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha_b: Mapped[str] = mapped_column(String(64), primary_key=True)
    check_version: Mapped[int] = mapped_column(Integer)
    verdict: Mapped[int] = mapped_column(Integer)
    checked_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Label(Base):
    """What the extractor's own classifier sees in an image: its ``rank``-th most probable
    class (``class_id`` in the extractor's vocabulary, ImageNet-1k for EfficientNet-Lite) with
    probability ``prob``, per feature space (extractor and preprocessing version), computed from
    the image's features (:mod:`imgstore.labels`). A few rows per image; the index on
    (space, class, prob) answers "images labelled X" and word searches.
    """

    __tablename__ = "labels"
    __table_args__ = (
        Index("ix_labels_space_class", "space_id", "class_id", "prob"),
        {"sqlite_with_rowid": False},
    )

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    space_id: Mapped[int] = mapped_column(ForeignKey("feature_spaces.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    class_id: Mapped[int] = mapped_column(SmallInteger)
    prob: Mapped[float] = mapped_column(Float)


class LabelNorm(Base):
    """Per (image, feature space), the log-sum-exp of the classifier's logits: with it, an image's
    log-probability of any mix of classes is one dot product with its features (the word
    search's score, :mod:`imgstore.wordsearch`), without the 1,000-class product per image."""

    __tablename__ = "label_norms"
    __table_args__ = {"sqlite_with_rowid": False}  # noqa: RUF012 - SQLAlchemy's declarative hook, read once, never mutated

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    space_id: Mapped[int] = mapped_column(ForeignKey("feature_spaces.id", ondelete="CASCADE"), primary_key=True)
    logsumexp: Mapped[float] = mapped_column(Float)
