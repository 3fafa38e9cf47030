"""One exception tree for imgstore.

Every error a user can cause derives from :class:`ImgStoreError`, and its message says what
to do about it. The CLI catches ``ImgStoreError`` and prints the message as one line; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class ImgStoreError(Exception):
    """Base class of every error imgstore raises on purpose."""


class ConfigError(ImgStoreError):
    """A bad option, URL or argument given by the user."""


class NotFoundError(ImgStoreError):
    """An image, path, index or feature space that the store does not hold."""


# --- database -------------------------------------------------------------------------------


class DatabaseError(ImgStoreError):
    """The database could not be reached or refused an operation."""


class SchemaError(DatabaseError):
    """The database schema does not match what this version of imgstore expects."""


class SchemaOutdatedError(SchemaError):
    """The database is behind the code's migrations."""

    def __init__(self, current: str | None, head: str, url: str) -> None:
        self.current = current
        self.head = head
        shown = current or "empty (no schema)"
        super().__init__(
            f"database {url} is at schema revision {shown} but this imgstore needs {head}; "
            f"run `imgstore --db '{url}' db upgrade` to migrate it"
        )


class SchemaAheadError(SchemaError):
    """The database was migrated by a newer imgstore than this one."""

    def __init__(self, current: str, head: str, url: str) -> None:
        self.current = current
        self.head = head
        super().__init__(
            f"database {url} is at schema revision {current}, which this imgstore does not know "
            f"(its newest is {head}); upgrade imgstore, or run `imgstore db downgrade {head}` "
            "with the newer version"
        )


# --- images and features --------------------------------------------------------------------


class DecodeError(ImgStoreError):
    """A file could not be decoded as an image. Carries the path and a short reason."""

    def __init__(self, path: str | os.PathLike[str] | None, reason: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        from .paths import printable

        where = printable(self.path) if self.path is not None else "<in-memory image>"
        super().__init__(f"{where}: {reason}")


class ImageTooLargeError(DecodeError):
    """An image over a size limit: more pixels than allowed (a decompression bomb), or a file
    larger than allowed. Told apart from an unreadable file by type (HTTP 422, not 415)."""


class ExtractorError(ImgStoreError):
    """A feature extractor is unknown or cannot run."""


class WeightsNotFoundError(ExtractorError):
    """Pretrained weights are needed and none could be found or downloaded."""


class ModelCacheError(ExtractorError):
    """A model in the model cache cannot be loaded as written (damaged since, or partly
    written by a process killed mid-way): it is made again."""


class UnsupportedCpuError(ExtractorError):
    """The extractor's arithmetic on this CPU differs from that of the CPUs its feature space was
    made on (an int8 model without int8 dot-product instructions): its features would not be
    comparable with those stored, so it refuses to run."""


class ClusterError(ImgStoreError):
    """The Dask cluster an ingest ran on went away mid-run (its scheduler lost). What the
    workers finished is stored; rerunning the same command does the rest."""


# --- hashing --------------------------------------------------------------------------------


class HasherError(ImgStoreError):
    """A hasher got bad parameters or bad input."""


class NotFittedError(HasherError):
    """A hasher was used before ``fit``."""


class DimensionMismatchError(HasherError):
    """Input vectors do not have the dimension a hasher or feature space expects."""


class NotEnoughDataError(HasherError):
    """Too few images (or labels) to fit what was asked for."""
