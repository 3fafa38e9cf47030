"""``ImageStore``: the Python API. It owns the engine, sessions and transactions."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, func, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from . import migrate
from .db import WRITE_OPTION, make_engine, make_sessionmaker, resolve_url, safe_url
from .errors import ConfigError, DatabaseError, ImgStoreError, NotFoundError, SchemaError
from .models import Code, Feature, FeatureSpace, Hasher, Image, ImagePath, IngestError

T = TypeVar("T")

#: Write transactions that hit a lock or a serialization failure are retried this many times,
#: with exponential back-off from RETRY_BASE_S (plus jitter), then the error is raised.
RETRY_ATTEMPTS = 8
RETRY_BASE_S = 0.05
#: A store with no index gets one built automatically once a feature space has this many images.
AUTO_INDEX_MIN_IMAGES = 256
#: ... and rebuilt when the space has grown this many times past what the auto index was fitted on.
AUTO_INDEX_REFIT_GROWTH = 10
#: Float re-rank looks at this many Hamming candidates per result wanted.
RERANK_DEPTH_PER_K = 10

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchResult:
    """One search hit. ``distance``: Hamming distance of the codes (None for an exact float
    search without index); ``cosine``: similarity of the float features when they were used."""

    image_id: int
    paths: list[str]
    distance: int | None
    cosine: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "distance": self.distance, "cosine": self.cosine, "paths": self.paths}


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
    ``imgstore.db`` in the current directory). ``extractor_options`` maps an extractor name to
    the options it is always built with, e.g. ``{"resnet50": {"weights": "resnet50.pth"}}``.
    A brand-new empty database gets the schema
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
        cache_codes: bool = False,
        extractor_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.url = resolve_url(db)
        self.cache_codes = cache_codes
        #: per extractor name, options used whenever this store builds it (e.g. a weights file)
        self.extractor_options = dict(extractor_options or {})
        self._extractors: dict[Any, Any] = {}
        self._caches: dict[int, Any] = {}
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

    # -- transactions ---------------------------------------------------------------------

    def transaction(self, work: Callable[[Connection], T], *, what: str = "write") -> T:
        """Run ``work(conn)`` in one write transaction, retrying on lock and serialization
        conflicts with a bounded exponential back-off; the whole body is rerun on retry."""
        delay = RETRY_BASE_S
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                with self.engine.connect() as conn:
                    conn = conn.execution_options(**{WRITE_OPTION: True})
                    with conn.begin():
                        return work(conn)
            except DBAPIError as exc:
                if attempt == RETRY_ATTEMPTS or not _is_retryable(exc):
                    raise DatabaseError(f"cannot {what} on {self.display_url}: {_driver_message(exc)}") from exc
                log.info("%s: %s; retry %d in %.2fs", what, _driver_message(exc), attempt, delay)
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def _read(self) -> Any:
        return self.engine.connect()

    # -- extractors and feature spaces ----------------------------------------------------

    def extractor(self, name: str | None = None, **options: Any) -> Any:
        """The extractor ``name`` (default EfficientNet-Lite0), built once per store."""
        from .features import DEFAULT_EXTRACTOR, get_extractor

        name = name or DEFAULT_EXTRACTOR
        options = {**self.extractor_options.get(name, {}), **options}
        key = (name, tuple(sorted(options.items())))
        if key not in self._extractors:
            self._extractors[key] = get_extractor(name, **options)
        return self._extractors[key]

    def _space_id(self, extractor: Any) -> int:
        from .dbops import get_or_create_space

        return self.transaction(
            lambda conn: get_or_create_space(conn, extractor.name, extractor.dim, extractor.preprocess_version),
            what="register a feature space",
        )

    def feature_spaces(self) -> list[dict[str, Any]]:
        with self._wrap("list feature spaces"), self._read() as conn:
            counts = dict(conn.execute(select(Feature.space_id, func.count()).group_by(Feature.space_id)).all())
            rows = conn.execute(select(FeatureSpace.__table__).order_by(FeatureSpace.id)).mappings().all()
            return [{**dict(r), "n_features": int(counts.get(r["id"], 0))} for r in rows]

    # -- ingest ---------------------------------------------------------------------------

    def ingest(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        recursive: bool = True,
        extractor: str | None = None,
        batch_size: int = 64,
        workers: int | None = None,
        tags: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
        dry_run: bool = False,
        follow_symlinks: bool = False,
        auto_index: bool = True,
        progress: Callable[[Any], None] | None = None,
    ) -> Any:
        """Ingest files and folders; returns an :class:`~imgstore.ingest.IngestSummary`.

        Files whose path, size and mtime are unchanged since the last ingest are skipped without
        reading them; content already stored is recorded as a new path only. Bad files are
        recorded (``imgstore errors``) and counted, and the ingest goes on.
        """
        from .ingest import Ingester

        ex = self.extractor(extractor)
        space_id = self._space_id(ex)
        meta = dict(metadata or {})
        if tags:
            meta["tags"] = sorted(set(tags))
        job = Ingester(self.engine, lambda work: self.transaction(work, what="ingest"), ex, space_id,
                       batch_size=batch_size, workers=workers, metadata=meta, progress=progress)
        summary = job.run(list(paths), recursive=recursive, follow_symlinks=follow_symlinks, dry_run=dry_run)
        if auto_index and not dry_run and summary.added:
            self._maybe_auto_index(space_id)
        return summary

    def add(self, source: Any, metadata: dict[str, Any] | None = None, *, extractor: str | None = None) -> int:
        """Add one image (a path, encoded bytes or a PIL image); returns its image id.

        Raises :class:`DecodeError` when it cannot be decoded. The same content added twice
        returns the same id.
        """
        summary, ids = self.add_many([source], metadata=metadata, extractor=extractor)
        if ids[0] is None:
            raise summary.errors[0][1] if isinstance(summary.errors[0][1], ImgStoreError) else _decode_error(summary.errors[0])
        return ids[0]

    def add_many(
        self, sources: Iterable[Any], metadata: dict[str, Any] | None = None, *, extractor: str | None = None,
        batch_size: int = 64, auto_index: bool = True,
    ) -> tuple[Any, list[int | None]]:
        """Add many images; returns (summary, image id or None per source, in order)."""
        from .ingest import Ingester

        ex = self.extractor(extractor)
        space_id = self._space_id(ex)
        job = Ingester(self.engine, lambda work: self.transaction(work, what="add images"), ex, space_id,
                       batch_size=batch_size, metadata=metadata)
        summary, ids = job.add_items(sources)
        if auto_index and summary.added:
            self._maybe_auto_index(space_id)
        return summary, ids

    def _maybe_auto_index(self, space_id: int) -> int | None:
        """Build the default index once a space has enough images; rebuild an automatic one
        that was fitted on far fewer images than the space now holds."""
        from .indexing import create_index, drop_index

        with self._read() as conn:
            n = int(conn.scalar(select(func.count()).select_from(Feature).where(Feature.space_id == space_id)) or 0)
            existing = conn.execute(
                select(Hasher.id, Hasher.n_fitted, Hasher.config, Hasher.is_active, Hasher.method, Hasher.n_bits)
                .where(Hasher.space_id == space_id)
            ).all()
        if n < AUTO_INDEX_MIN_IMAGES:
            return None
        if not existing:
            return self.transaction(lambda conn: create_index(conn, space_id, method="itq", n_bits=64, fallback=True, auto=True),
                                    what="build the default index")
        for row in existing:
            config = dict(row.config or {})
            if config.get("auto") and n >= AUTO_INDEX_REFIT_GROWTH * max(row.n_fitted, 1):
                def rebuild(conn: Connection, old: Any = row) -> int:
                    new_id = create_index(conn, space_id, method=old.method, n_bits=old.n_bits,
                                          activate=bool(old.is_active), fallback=True, auto=True)
                    drop_index(conn, old.id)
                    return new_id
                return self.transaction(rebuild, what="rebuild the default index")
        return None

    def _signature_codes(self, conn: Connection) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
        """Every stored image's signature hashed to a 32-bit code, read in chunks (bounded memory)."""
        from .dedup import signature_codes
        from .signature import from_bytes

        ids_out: list[npt.NDArray[np.int64]] = []
        codes_out: list[npt.NDArray[np.uint8]] = []
        last = -1
        while True:
            rows = conn.execute(
                select(Image.id, Image.signature).where(Image.id > last, Image.signature.is_not(None))
                .order_by(Image.id).limit(50_000)
            ).all()
            if not rows:
                break
            last = int(rows[-1][0])
            sigs = [(int(i), from_bytes(b)) for i, b in rows]
            sigs = [(i, v) for i, v in sigs if v is not None and v.any()]
            if sigs:
                ids_out.append(np.array([i for i, _ in sigs], dtype=np.int64))
                codes_out.append(signature_codes(np.stack([v for _, v in sigs])))
        if not ids_out:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.uint8)
        return np.concatenate(ids_out), np.concatenate(codes_out)

    def errors(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Files that could not be ingested: path, error type, reason, when."""
        with self._wrap("list ingest errors"), self._read() as conn:
            stmt = select(IngestError.__table__).order_by(IngestError.path)
            if limit:
                stmt = stmt.limit(limit)
            return [dict(r) for r in conn.execute(stmt).mappings()]

    # -- indexes --------------------------------------------------------------------------

    def create_index(
        self,
        method: str = "itq",
        n_bits: int = 64,
        *,
        n_bands: int | None = None,
        sample: int | None = None,
        extractor: str | None = None,
        activate: bool = True,
        random_state: int = 0,
        labels: str | None = None,
        fallback: bool = False,
    ) -> int:
        """Fit an index on the stored features of one feature space; returns its id.

        ``extractor`` picks the space (default: the one with the most stored vectors).
        ``labels``: ``"folder"`` (each image's parent folder) or ``"tag:KEY"`` (a metadata
        field), for supervised methods.
        """
        from .indexing import DEFAULT_SAMPLE, create_index

        space_id = self._pick_space(extractor)

        def work(conn: Connection) -> int:
            label_map = self._labels(conn, labels) if labels else None
            return create_index(conn, space_id, method=method, n_bits=n_bits, n_bands=n_bands,
                                sample=sample or DEFAULT_SAMPLE, random_state=random_state,
                                activate=activate, fallback=fallback, labels=label_map)

        index_id = self.transaction(work, what="create an index")
        self._caches.pop(index_id, None)
        return index_id

    def indexes(self) -> list[Any]:
        from .indexing import list_indexes

        with self._wrap("list indexes"), self._read() as conn:
            return list_indexes(conn)

    def activate_index(self, index_id: int) -> None:
        from .indexing import activate_index

        self.transaction(lambda conn: activate_index(conn, index_id), what="activate an index")

    def drop_index(self, index_id: int) -> None:
        from .indexing import drop_index

        self.transaction(lambda conn: drop_index(conn, index_id), what="drop an index")
        self._caches.pop(index_id, None)

    def _pick_space(self, extractor: str | None) -> int:
        spaces = self.feature_spaces()
        if extractor is not None:
            spaces = [s for s in spaces if s["extractor"] == extractor]
            if not spaces:
                raise NotFoundError(f"no images with {extractor} features; ingest with --extractor {extractor} first")
        if not spaces or max(s["n_features"] for s in spaces) == 0:
            raise NotFoundError("the store has no images yet; run `imgstore ingest FOLDER` first")
        return int(max(spaces, key=lambda s: (s["n_features"], -s["id"]))["id"])

    def _labels(self, conn: Connection, spec: str) -> dict[int, Any]:
        """Image id -> label from ``folder`` (the parent folder of a current path) or ``tag:KEY``."""
        out: dict[int, Any] = {}
        if spec == "folder":
            rows = conn.execute(select(ImagePath.image_id, ImagePath.path).where(ImagePath.is_current.is_(True)).order_by(ImagePath.id))
            for image_id, path in rows:
                out.setdefault(int(image_id), os.path.basename(os.path.dirname(path)))
        elif spec.startswith("tag:") and len(spec) > 4:
            key = spec[4:]
            for image_id, meta in conn.execute(select(Image.id, Image.meta)):
                if isinstance(meta, dict) and key in meta:
                    out[int(image_id)] = str(meta[key])
        else:
            raise ConfigError(f"unknown labels {spec!r}; use 'folder' or 'tag:KEY'")
        return out

    # -- search ---------------------------------------------------------------------------

    def search(
        self,
        query: Any,
        k: int = 10,
        *,
        exact: bool = False,
        probe_radius: int = 1,
        rerank: bool | None = None,
        rerank_depth: int | None = None,
        cached: bool | None = None,
        index_id: int | None = None,
    ) -> list[SearchResult]:
        """The k images most similar to ``query``, best first.

        ``query``: a path, encoded bytes, a PIL image, a stored image id (``int``) or a feature
        vector. With an index: band prefilter then Hamming re-rank (``exact=True`` equals a
        brute-force Hamming scan); ``rerank`` orders the best ``rerank_depth`` (default 10k)
        Hamming candidates by cosine similarity of the stored features (default: on). Without any index: exact cosine search over the stored features.
        ``cached`` keeps the index's codes in this process's memory between queries (default:
        the store's ``cache_codes``).
        """
        return self.search_many([query], k, exact=exact, probe_radius=probe_radius, rerank=rerank,
                                rerank_depth=rerank_depth, cached=cached, index_id=index_id)[0]

    def search_many(
        self,
        queries: Sequence[Any],
        k: int = 10,
        *,
        exact: bool = False,
        probe_radius: int = 1,
        rerank: bool | None = None,
        rerank_depth: int | None = None,
        cached: bool | None = None,
        index_id: int | None = None,
    ) -> list[list[SearchResult]]:
        """:meth:`search` for many queries, with one connection and one cache check."""
        from .indexing import list_indexes
        from .search import SqlProbe, cosine_rerank, exact_float_search, hamming_search

        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        use_cache = self.cache_codes if cached is None else cached
        with self._wrap("search"), self._read() as conn:
            indexes = list_indexes(conn)
            if index_id is not None:
                matches = [i for i in indexes if i.id == index_id]
                if not matches:
                    raise NotFoundError(f"no index with id {index_id}; `imgstore index list` shows them")
                index = matches[0]
            else:
                index = next((i for i in indexes if i.is_active), None)
            space_id = index.space_id if index is not None else self._pick_space(None)
            space = conn.execute(select(FeatureSpace.__table__).where(FeatureSpace.id == space_id)).mappings().one()
            vectors, codes = self._query_vectors(conn, queries, space, index)
            out: list[list[SearchResult]] = []
            if index is None:
                for vec in vectors:
                    ids, sims = exact_float_search(conn, space_id, space["dim"], vec, k)
                    out.append(self._results(conn, ids, None, sims))
                return out
            # Re-rank is on by default for every kind of index: measured on CIFAR-10, re-ranking
            # the Hamming candidates by cosine raises P@10 for unsupervised codes and for
            # supervised ones alike (0.46 -> 0.72 for the deep supervised head) without lowering
            # mAP@ALL, since the candidates it orders were already chosen by the codes.
            do_rerank = True if rerank is None else rerank
            depth = rerank_depth or RERANK_DEPTH_PER_K * k
            want = max(k, depth) if do_rerank else k
            cache = self._cache(conn, index) if use_cache else None
            sql = None if cache is not None else SqlProbe(index)
            if sql is not None:
                sql.begin(conn)
            for vec, code in zip(vectors, codes):
                ranked = hamming_search(code, index, want, exact=exact, probe_radius=probe_radius,
                                        conn=conn, cache=cache, sql=sql)
                if do_rerank and vec is not None:
                    ids, sims = cosine_rerank(conn, space_id, space["dim"], vec, ranked.image_ids)
                    dist_of = dict(zip(ranked.image_ids.tolist(), ranked.distances.tolist()))
                    ids, sims = ids[:k], sims[:k]
                    out.append(self._results(conn, ids, np.array([dist_of[i] for i in ids.tolist()]), sims))
                else:
                    out.append(self._results(conn, ranked.image_ids[:k], ranked.distances[:k], None))
            return out

    def _query_vectors(
        self, conn: Connection, queries: Sequence[Any], space: Any, index: Any
    ) -> tuple[list[npt.NDArray[np.float32] | None], list[npt.NDArray[np.uint8]]]:
        """Float vectors (None where unknown) and codes (when there is an index) per query."""
        from .dbops import load_features
        from .decode import load_image
        from .indexing import load_hasher

        vectors: list[npt.NDArray[np.float32] | None] = [None] * len(queries)
        to_embed: list[tuple[int, Any]] = []
        for i, q in enumerate(queries):
            if isinstance(q, (int, np.integer)) and not isinstance(q, bool):
                ids, vecs = load_features(conn, space["id"], space["dim"], [int(q)])
                if len(ids) == 0:
                    raise NotFoundError(f"no image with id {int(q)} and {space['extractor']} features")
                vectors[i] = vecs[0]
            elif isinstance(q, np.ndarray) and q.dtype.kind == "f":
                vec = np.asarray(q, dtype=np.float32).reshape(-1)
                if vec.shape[0] != space["dim"]:
                    raise ConfigError(f"query vector has {vec.shape[0]} values; {space['extractor']} features have {space['dim']}")
                vectors[i] = vec
            else:
                to_embed.append((i, q))
        if to_embed:
            ex = self.extractor(space["extractor"])
            if ex.preprocess_version != space["preprocess_version"]:
                raise ConfigError(
                    f"stored {space['extractor']} features were made with preprocessing "
                    f"{space['preprocess_version']}, this imgstore makes {ex.preprocess_version}; "
                    "re-ingest, or query by stored image id"
                )
            images = [load_image(q, draft_size=ex.draft_size).image for _, q in to_embed]
            feats = ex.extract(images)
            for (i, _), f in zip(to_embed, feats):
                vectors[i] = f
        codes: list[npt.NDArray[np.uint8]] = []
        if index is not None:
            hasher = load_hasher(conn, index.id)
            codes = list(hasher.encode(np.stack(vectors)))
        return vectors, codes

    def _cache(self, conn: Connection, index: Any) -> Any:
        """The index's codes in memory, reloaded when the database says they changed."""
        from .search import CodeCache

        generation = int(conn.scalar(select(Hasher.generation).where(Hasher.id == index.id)) or 0)
        cache = self._caches.get(index.id)
        if cache is None or cache.generation != generation:
            cache = self._caches[index.id] = CodeCache.load(conn, index)
        return cache

    def _results(self, conn: Connection, ids: Any, distances: Any, cosines: Any) -> list[SearchResult]:
        ids = [int(i) for i in ids]
        paths: dict[int, list[str]] = {i: [] for i in ids}
        if ids:
            for image_id, path in conn.execute(
                select(ImagePath.image_id, ImagePath.path)
                .where(ImagePath.image_id.in_(ids), ImagePath.is_current.is_(True))
                .order_by(ImagePath.path)
            ):
                paths[int(image_id)].append(path)
        return [
            SearchResult(
                image_id=i,
                paths=paths[i],
                distance=None if distances is None else int(distances[n]),
                cosine=None if cosines is None else float(cosines[n]),
            )
            for n, i in enumerate(ids)
        ]

    def image(self, ref: int | str) -> dict[str, Any]:
        """One stored image by id or by path: its row, paths and feature/code coverage."""
        with self._wrap("read an image"), self._read() as conn:
            if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit() and not os.path.exists(ref)):
                image_id = int(ref)
            else:
                path = os.path.abspath(os.fspath(ref))
                found = conn.scalar(select(ImagePath.image_id).where(ImagePath.path == path).order_by(ImagePath.is_current.desc()))
                if found is None:
                    raise NotFoundError(f"no stored image was seen at {path}")
                image_id = int(found)
            row = conn.execute(select(Image.__table__).where(Image.id == image_id)).mappings().first()
            if row is None:
                raise NotFoundError(f"no image with id {image_id}")
            paths = conn.execute(
                select(ImagePath.path, ImagePath.is_current, ImagePath.file_size, ImagePath.mtime_ns, ImagePath.last_seen_at)
                .where(ImagePath.image_id == image_id).order_by(ImagePath.path)
            ).mappings().all()
            spaces = conn.scalars(select(Feature.space_id).where(Feature.image_id == image_id)).all()
            codes = conn.scalars(select(Code.hasher_id).where(Code.image_id == image_id)).all()
            return {**dict(row), "paths": [dict(p) for p in paths], "feature_spaces": list(spaces), "indexes": list(codes)}

    # -- managing the store ---------------------------------------------------------------

    def remove(self, refs: Sequence[int | str]) -> list[int]:
        """Delete images (by id or by any path they were seen at) from every table; returns
        the ids removed. Unknown references raise :class:`NotFoundError` and remove nothing."""
        ids = [self.image(r)["id"] for r in refs]

        def work(conn: Connection) -> list[int]:
            from sqlalchemy import delete

            from .dbops import bump_generation, remove_codes

            hashers = remove_codes(conn, ids)
            for model in (Feature, ImagePath):
                conn.execute(delete(model).where(model.image_id.in_(ids)))
            conn.execute(delete(Image).where(Image.id.in_(ids)))
            bump_generation(conn, hashers)
            return sorted(set(ids))

        return self.transaction(work, what="remove images")

    def verify(self, *, check_files: bool = True) -> dict[str, Any]:
        """Consistency report: images without features, missing codes per index, dangling rows,
        and (``check_files``) current paths whose file vanished or changed on disk."""
        from sqlalchemy import and_, exists

        report: dict[str, Any] = {}
        with self._wrap("verify"), self._read() as conn:
            report["images_without_features"] = conn.scalars(
                select(Image.id).where(~exists().where(Feature.image_id == Image.id)).order_by(Image.id)
            ).all()
            missing: dict[int, list[int]] = {}
            for hasher_id, space_id in conn.execute(select(Hasher.id, Hasher.space_id)):
                ids = conn.scalars(
                    select(Feature.image_id).where(
                        Feature.space_id == space_id,
                        ~exists().where(and_(Code.hasher_id == hasher_id, Code.image_id == Feature.image_id)),
                    )
                ).all()
                if ids:
                    missing[int(hasher_id)] = list(ids)
            report["missing_codes"] = missing
            # every code sits in one bucket per band: entries = codes x bands, per index
            from .models import CodeBucket

            have = dict(conn.execute(select(CodeBucket.hasher_id, func.sum(CodeBucket.n)).group_by(CodeBucket.hasher_id)).all())
            buckets: dict[int, dict[str, int]] = {}
            for hasher_id, n_bands, n_codes in conn.execute(
                select(Hasher.id, Hasher.n_bands, func.count(Code.image_id)).outerjoin(Code, Code.hasher_id == Hasher.id).group_by(Hasher.id, Hasher.n_bands)
            ):
                found = int(have.get(hasher_id) or 0)
                if found != n_bands * n_codes:
                    buckets[int(hasher_id)] = {"expected": int(n_bands * n_codes), "found": found}
            report["bucket_mismatch"] = buckets
            report["dangling_rows"] = sum(
                int(conn.scalar(select(func.count()).select_from(model).where(~exists().where(Image.id == model.image_id))) or 0)
                for model in (Feature, Code, ImagePath)
            )
            vanished, changed = [], []
            if check_files:
                for path, size, mtime in conn.execute(
                    select(ImagePath.path, ImagePath.file_size, ImagePath.mtime_ns).where(ImagePath.is_current.is_(True))
                ):
                    try:
                        st = os.stat(path)
                    except OSError:
                        vanished.append(path)
                        continue
                    if (st.st_size, st.st_mtime_ns) != (size, mtime):
                        changed.append(path)
            report["vanished_files"] = vanished
            report["changed_files"] = changed
        report["ok"] = not (report["images_without_features"] or missing or report["dangling_rows"] or buckets)
        return report

    def info(self) -> dict[str, Any]:
        """Counts, database size, feature spaces, and indexes with their band occupancy."""
        from .indexing import list_indexes
        from .models import BAND_COLUMNS

        out: dict[str, Any] = {"database": self.display_url, "revision": self.schema_status().current, **self.counts()}
        with self._wrap("summarise the store"), self._read() as conn:
            if self.url.get_backend_name() == "sqlite":
                size = conn.exec_driver_sql("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()").scalar()
            else:
                size = conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar()
            out["database_bytes"] = int(size or 0)
            out["feature_spaces"] = self.feature_spaces()
            indexes = []
            for info in list_indexes(conn):
                bands = []
                for j in range(info.n_bands):
                    col = getattr(Code, BAND_COLUMNS[j])
                    sizes = np.array(
                        conn.scalars(select(func.count()).where(Code.hasher_id == info.id).group_by(col)).all(), dtype=np.float64
                    )
                    bands.append(_occupancy(sizes, info.band_width))
                indexes.append({**info.as_dict(), "bands": bands})
            out["indexes"] = indexes
        return out

    def export_rows(self, *, neighbours: int = 0) -> Iterable[dict[str, Any]]:
        """One dict per image: id, content hash, size, format, capture time, metadata, current
        paths and, with ``neighbours``, the ids of its nearest stored images (itself excluded)."""
        with self._wrap("export"), self._read() as conn:
            images = conn.execute(select(Image.__table__).order_by(Image.id)).mappings().all()
            paths: dict[int, list[str]] = {}
            for image_id, path in conn.execute(
                select(ImagePath.image_id, ImagePath.path).where(ImagePath.is_current.is_(True)).order_by(ImagePath.path)
            ):
                paths.setdefault(int(image_id), []).append(path)
        for start in range(0, len(images), 256):
            chunk = images[start : start + 256]
            near: list[list[SearchResult]] = []
            if neighbours:
                near = self.search_many([int(r["id"]) for r in chunk], neighbours + 1, cached=True)
            for n, row in enumerate(chunk):
                item = {**dict(row), "paths": paths.get(int(row["id"]), [])}
                if neighbours:
                    item["neighbours"] = [r.image_id for r in near[n] if r.image_id != row["id"]][:neighbours]
                yield item

    def find_duplicates(
        self,
        *,
        max_distance: int | None = None,
        min_cosine: float | None = None,
        min_signature: float | None = None,
        index_id: int | None = None,
        probe_radius: int = 1,
    ) -> list[dict[str, Any]]:
        """Groups of duplicate images, largest first.

        Exact copies (one content seen at several paths) form groups of kind ``"exact"``.
        Near copies are found through the active index's bands (never all pairs): pairs within
        ``max_distance`` bits (default a quarter of the code) whose float features have cosine
        similarity >= ``min_cosine`` (default 0.90; pass 0 to rely on the codes alone), or whose
        features agree loosely (cosine >= 0.3) and whose pixel-layout signatures (flip-aware,
        see ``imgstore.signature``) have similarity >= ``min_signature`` (default 0.95; pass 0
        to turn that test off), are joined into connected components. Signatures are also
        hashed and probed like an index, so copies whose CNN codes drifted apart (a half-size
        thumbnail) are still candidates. Each group names a suggested keeper: the largest
        resolution, then the largest file, then the lowest id.
        """
        from .dbops import load_features
        from .dedup import (
            DEFAULT_MIN_COSINE,
            DEFAULT_MIN_SIGNATURE,
            SIGNATURE_MAX_DISTANCE,
            components,
            default_max_distance,
            near_duplicate_edges,
            signature_cache,
        )
        from .indexing import list_indexes

        groups: list[dict[str, Any]] = []
        with self._wrap("find duplicates"), self._read() as conn:
            multi = conn.execute(
                select(ImagePath.image_id).where(ImagePath.is_current.is_(True))
                .group_by(ImagePath.image_id).having(func.count() > 1)
            ).scalars().all()
            indexes = list_indexes(conn)
            index = next((i for i in indexes if (i.id == index_id if index_id is not None else i.is_active)), None)
            if index_id is not None and index is None:
                raise NotFoundError(f"no index with id {index_id}; `imgstore index list` shows them")
            near: list[list[int]] = []
            edges: list[Any] = []
            if index is not None:
                cache = self._cache(conn, index)
                space = conn.execute(select(FeatureSpace.__table__).where(FeatureSpace.id == index.space_id)).mappings().one()
                max_d = default_max_distance(index.n_bits) if max_distance is None else max_distance
                min_c = DEFAULT_MIN_COSINE if min_cosine is None else min_cosine

                def vectors(ids: list[int]) -> dict[int, Any]:
                    got_ids, vecs = load_features(conn, space["id"], space["dim"], ids)
                    return dict(zip(got_ids.tolist(), vecs))

                def signatures(ids: list[int]) -> dict[int, Any]:
                    from .signature import from_bytes

                    out: dict[int, Any] = {}
                    for start in range(0, len(ids), 900):
                        for image_id, blob in conn.execute(
                            select(Image.id, Image.signature).where(Image.id.in_(ids[start : start + 900]))
                        ):
                            sig = from_bytes(blob)
                            if sig is not None:
                                out[int(image_id)] = sig
                    return out

                edges = near_duplicate_edges(
                    cache, vectors if min_c > 0 else None, max_distance=max_d,
                    min_cosine=min_c if min_c > 0 else None, probe_radius=probe_radius,
                    load_signatures=signatures if min_c > 0 else None,
                    min_signature=DEFAULT_MIN_SIGNATURE if min_signature is None else (min_signature or None),
                )
                if min_c > 0 and (min_signature is None or min_signature > 0):
                    sig_ids, sig_codes = self._signature_codes(conn)
                    if len(sig_ids) > 1:
                        sig_edges = near_duplicate_edges(
                            signature_cache(sig_ids, sig_codes), vectors, max_distance=SIGNATURE_MAX_DISTANCE,
                            min_cosine=2.0,  # only the signature rule accepts these pairs
                            load_signatures=signatures,
                            min_signature=DEFAULT_MIN_SIGNATURE if min_signature is None else min_signature,
                        )
                        edges += _with_index_distance(sig_edges, cache)
                near = components(cache.image_ids.tolist(), edges)
            info_ids = sorted(set(multi) | {i for g in near for i in g})
            rows: dict[int, Any] = {}
            paths: dict[int, list[str]] = {}
            for start in range(0, len(info_ids), 900):
                part = info_ids[start : start + 900]
                for r in conn.execute(select(Image.id, Image.width, Image.height, Image.byte_size).where(Image.id.in_(part))):
                    rows[int(r.id)] = r
                for image_id, path in conn.execute(
                    select(ImagePath.image_id, ImagePath.path)
                    .where(ImagePath.image_id.in_(part), ImagePath.is_current.is_(True)).order_by(ImagePath.path)
                ):
                    paths.setdefault(int(image_id), []).append(path)
        pair: dict[tuple[int, int], Any] = {}
        for e in edges:  # CNN-code edges first: their distance is the index's Hamming distance
            pair.setdefault((e.a, e.b), e)
        for image_id in sorted(multi):
            if any(image_id in g for g in near):
                continue
            groups.append({"kind": "exact", "keeper": int(image_id), "members": [
                {"image_id": int(image_id), "paths": paths.get(int(image_id), []), "distance": 0, "cosine": 1.0}]})
        for g in near:
            keeper = max(g, key=lambda i: (rows[i].width * rows[i].height, rows[i].byte_size, -i))
            members = []
            for i in g:
                e = pair.get((min(i, keeper), max(i, keeper)))
                members.append({
                    "image_id": i, "paths": paths.get(i, []), "width": rows[i].width, "height": rows[i].height,
                    "distance": 0 if i == keeper else (e.distance if e else None),
                    "cosine": 1.0 if i == keeper else (e.cosine if e else None),
                })
            groups.append({"kind": "near", "keeper": keeper, "members": members})
        groups.sort(key=lambda g: (-sum(len(m["paths"]) or 1 for m in g["members"]), g["keeper"]))
        return groups

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


def _with_index_distance(edges: list[Any], cache: Any) -> list[Any]:
    """Edges found through signatures, restricted to images in the index and given the index's
    Hamming distance (what every other edge reports)."""
    from dataclasses import replace

    if not edges:
        return []
    ids = cache.image_ids
    a = np.array([e.a for e in edges], dtype=np.int64)
    b = np.array([e.b for e in edges], dtype=np.int64)
    pa, pb = np.searchsorted(ids, a), np.searchsorted(ids, b)
    pa_ok, pb_ok = np.minimum(pa, len(ids) - 1), np.minimum(pb, len(ids) - 1)
    inside = (pa < len(ids)) & (pb < len(ids)) & (ids[pa_ok] == a) & (ids[pb_ok] == b)
    dist = np.bitwise_count(cache.words[pa_ok] ^ cache.words[pb_ok]).sum(axis=1)
    return [replace(e, distance=int(d)) for e, d, ok in zip(edges, dist, inside) if ok]


def _occupancy(sizes: npt.NDArray[np.float64], band_width: int) -> dict[str, Any]:
    """How evenly codes spread over one band's bucket values. ``evenness`` is the entropy of
    the bucket distribution over its largest possible value, log2(min(2**width, n)): 1.0 when
    every code has its own bucket (or buckets are equal), near 0 when most share one."""
    n = float(sizes.sum())
    if n == 0:
        return {"buckets": 0, "largest": 0, "mean": 0.0, "evenness": 0.0}
    p = sizes / n
    entropy = float(-(p * np.log2(p)).sum())
    ceiling = np.log2(min(2.0**band_width, n)) if n > 1 else 1.0
    return {"buckets": int(len(sizes)), "largest": int(sizes.max()), "mean": round(n / len(sizes), 2),
            "evenness": round(entropy / ceiling, 3) if ceiling > 0 else 1.0}


def _is_retryable(exc: DBAPIError) -> bool:
    """Lock timeouts (SQLite), serialization failures and deadlocks (PostgreSQL)."""
    code = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if code in ("40001", "40P01", "55P03"):
        return True
    text = str(getattr(exc, "orig", exc)).lower()
    return "database is locked" in text or "database table is locked" in text


def _decode_error(err: tuple[str, str]) -> ImgStoreError:
    from .errors import DecodeError

    return DecodeError(None if err[0] == "<in-memory image>" else err[0], err[1])


def _driver_message(exc: SQLAlchemyError) -> str:
    """The driver's own message, first line only, without SQLAlchemy's statement dump."""
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
