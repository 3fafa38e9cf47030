"""``ImageStore``: the Python API. It owns the engine, sessions and transactions."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import TracebackType

from sqlalchemy import func, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from . import migrate
from .db import make_engine, make_sessionmaker, resolve_url, safe_url
from .errors import DatabaseError, SchemaError
from .models import Code, Feature, FeatureSpace, Hasher, Image, ImagePath, IngestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchemaStatus:
    current: str | None
    head: str
    differences: list[str]

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head and not self.differences


class ImageStore:
    """A store of images, their features and hash codes in one SQLite file or PostgreSQL database.

    ``db`` is an SQLite file path, a ``postgresql://`` URL or ``None`` (``$IMGSTORE_DB``, else
    ``imgstore.db`` in the current directory). A brand-new empty database gets the schema
    created; one that is behind the code's migrations raises :class:`SchemaOutdatedError`
    naming the command that fixes it. ``check_schema=False`` opens without that check (used by
    ``imgstore db ...`` to migrate).

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        db: str | os.PathLike[str] | URL | None = None,
        *,
        check_schema: bool = True,
        echo: bool = False,
    ) -> None:
        self.url = resolve_url(db)
        self.engine = make_engine(self.url, echo=echo)
        self._sessions = make_sessionmaker(self.engine)
        if check_schema:
            try:
                migrate.ensure_current(self.engine, self.url)
            except SchemaError:
                self.engine.dispose()
                raise
            except (OperationalError, SQLAlchemyError) as exc:
                self.engine.dispose()
                raise DatabaseError(f"cannot open {self.display_url}: {_driver_message(exc)}") from exc

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def display_url(self) -> str:
        """The database URL with any password masked."""
        return safe_url(self.url)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageStore({self.display_url!r})"

    # -- schema ---------------------------------------------------------------------------

    def schema_status(self) -> SchemaStatus:
        """Where the schema stands: current and head revisions, and model/database differences."""
        with self._wrap("read the schema version"):
            current = migrate.current_revision(self.engine)
            head = migrate.head_revision()
            diffs = [repr(d) for d in migrate.pending_changes(self.engine)] if current == head else []
        return SchemaStatus(current, head, diffs)

    def upgrade(self, revision: str = "head") -> None:
        with self._wrap(f"upgrade to {revision}"):
            migrate.upgrade(self.engine, revision)

    def downgrade(self, revision: str) -> None:
        with self._wrap(f"downgrade to {revision}"):
            migrate.downgrade(self.engine, revision)

    # -- summaries ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Row counts of the main tables."""
        tables = {
            "images": Image,
            "paths": ImagePath,
            "feature_spaces": FeatureSpace,
            "features": Feature,
            "indexes": Hasher,
            "codes": Code,
            "errors": IngestError,
        }
        with self._wrap("count rows"), self._sessions() as session:
            return {
                name: int(session.scalar(select(func.count()).select_from(model)) or 0)
                for name, model in tables.items()
            }

    # -- helpers --------------------------------------------------------------------------

    def _wrap(self, doing: str) -> _DriverErrors:
        return _DriverErrors(f"cannot {doing} on {self.display_url}")


class _DriverErrors:
    """Context manager: driver errors become :class:`DatabaseError` (``from`` the original)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(exc, SQLAlchemyError):
            raise DatabaseError(f"{self.prefix}: {_driver_message(exc)}") from exc


def _driver_message(exc: SQLAlchemyError) -> str:
    """The driver's own message, first line only, without SQLAlchemy's statement dump."""
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
