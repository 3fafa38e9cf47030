"""``ImageStore``: the Python API. Each method delegates to the module that owns the concept;
the store's :class:`~imgstore.context.StoreContext` owns the engine, every database access and
the caches."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL

from . import (
    batch,
    browse,
    catalog,
    dedup,
    dedup_apply,
    export,
    filters,
    indexing,
    labels,
    maintenance,
    migrate,
    search,
    wordsearch,
)
from . import shards as shard_files
from .browse import BrowsePage
from .catalog import Counts, ImageRecord, IngestErrorRecord, Removal
from .cluster import ClusterIngest, connect
from .codecache import CodeCache, caches
from .context import open_context
from .db import sqlite_file
from .decode import as_source
from .dedup import DuplicateGroup, DuplicatesState
from .dedup_apply import ApplyReport, UndoReport
from .errors import ConfigError, DecodeError, NotFoundError
from .features import TextEmbedder, embeds_text, space_name
from .features.base import Extractor
from .ingest import Ingester, IngestSummary
from .labels import LabelCount
from .maintenance import StoreInfo, VerifyReport
from .paths import printable
from .types import CacheState, ImageFiles, IndexInfo, SearchFilter, SearchOptions, SearchResult, SpaceInfo, ThumbnailSource
from .vectors import get_or_create_space, largest_space, list_spaces, load_features, pick_space
from .wordsearch import WordSearch

T = TypeVar("T")

__all__ = ["ImageStore", "SchemaStatus", "SearchFilter", "SearchOptions", "SearchResult"]


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
    A brand-new empty database gets the schema created; one that is behind the code's
    migrations raises :class:`SchemaOutdatedError` naming the command that fixes it.
    ``check_schema=False`` opens without that check (used by ``imgstore db ...`` to migrate).
    ``cache_codes`` keeps each index's codes in this process's memory between queries
    (reloaded when the database says the index changed), with the float features of the same
    images beside them for the re-rank while they fit in ``vector_cache_mb`` (0: never).
    ``max_pixels``: the largest image (width x height) this store decodes, on every path
    (ingest, :meth:`add`, queries by example, the server's uploads and thumbnails); above it an
    image is refused with :class:`~imgstore.errors.ImageTooLargeError` before any pixel is
    decoded. None: ``$IMGSTORE_MAX_PIXELS``, else :data:`~imgstore.decode.DEFAULT_MAX_PIXELS`
    (200 MP).
    ``runtime``: what runs the CNN extractors: ``"auto"`` (ONNX Runtime on a CPU, torch for bf16
    or CUDA), ``"torch"`` or ``"onnx"``; None: ``$IMGSTORE_RUNTIME``, else auto. Both give the same
    features (one feature space); ONNX Runtime is several times faster on a CPU.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        db: str | os.PathLike[str] | URL | None = None,
        *,
        check_schema: bool = True,
        echo: bool = False,
        cache_codes: bool = False,
        vector_cache_mb: int = 1024,
        extractor_options: dict[str, dict[str, Any]] | None = None,
        max_pixels: int | None = None,
        runtime: str | None = None,
    ) -> None:
        if vector_cache_mb < 0:
            raise ConfigError(f"vector_cache_mb must be 0 or more, got {vector_cache_mb}")
        self.ctx = open_context(db, check_schema=check_schema, echo=echo, extractor_options=extractor_options,
                                max_pixels=max_pixels, runtime=runtime)
        self.ctx.vector_cache_bytes = vector_cache_mb << 20
        self.cache_codes = cache_codes

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> URL:
        return self.ctx.url

    @property
    def engine(self) -> Engine:
        return self.ctx.engine

    @property
    def display_url(self) -> str:
        """The database URL with any password masked."""
        return self.ctx.display_url

    @property
    def extractor_options(self) -> dict[str, dict[str, Any]]:
        return self.ctx.extractor_options

    @property
    def runtime(self) -> str | None:
        """What runs the CNN extractors as asked ("auto", "torch", "onnx"; None: $IMGSTORE_RUNTIME, else auto)."""
        return self.ctx.runtime

    @property
    def max_pixels(self) -> int:
        """The largest image (pixels) this store decodes (see the class's ``max_pixels``)."""
        return self.ctx.max_pixels

    def close(self) -> None:
        self.ctx.close()

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageStore({self.display_url!r})"

    def transaction(self, work: Callable[[Connection], T], *, what: str = "write") -> T:
        """Run ``work(conn)`` in one write transaction, retrying lock and serialization conflicts
        (the whole body is rerun on retry); driver errors become :class:`DatabaseError`."""
        return self.ctx.write(work, doing=what)

    # -- schema ---------------------------------------------------------------------------

    def schema_status(self) -> SchemaStatus:
        """Where the schema stands: current and head revisions, and model/database differences."""
        with self.ctx.translate("read the schema version"):
            current = migrate.current_revision(self.engine)
            head = migrate.head_revision()
            diffs = [migrate.describe(d) for d in migrate.pending_changes(self.engine)] if current == head else []
        return SchemaStatus(current, head, diffs)

    def upgrade(self, revision: str = "head") -> None:
        with self.ctx.translate(f"upgrade to {revision}"), migrate.known_revision(revision):
            migrate.upgrade(self.engine, revision)

    def downgrade(self, revision: str) -> None:
        with self.ctx.translate(f"downgrade to {revision}"), migrate.known_revision(revision):
            migrate.downgrade(self.engine, revision)

    # -- catalog --------------------------------------------------------------------------

    def counts(self) -> Counts:
        """Row counts of the main tables."""
        with self.ctx.read("count rows") as conn:
            return catalog.counts(conn)

    def errors(self, limit: int | None = None) -> list[IngestErrorRecord]:
        """Files that could not be ingested: path, error type, reason, when."""
        with self.ctx.read("list ingest errors") as conn:
            return catalog.errors(conn, limit)

    def image(self, ref: int | str) -> ImageRecord:
        """One stored image by id or by path: its row, paths and feature/code coverage."""
        with self.ctx.read("read an image") as conn:
            return catalog.image(conn, ref)

    def remove(self, refs: int | str | os.PathLike[str] | Iterable[int | str | os.PathLike[str]], *,
               dry_run: bool = False) -> Removal:
        """Remove images and paths: one reference or several. An ``int`` (or digits naming no
        existing file) is an image id: the image goes with its features, codes and paths. A path
        removes that path, and its image only when no other current path is left. Returns what
        was (or, with ``dry_run``, would be) removed; unknown references raise
        :class:`NotFoundError` and remove nothing. A string is one reference, never its
        characters (``remove("12")`` is image 12 or the file ``12``)."""
        listed: Iterable[object]
        if isinstance(refs, (int, str, os.PathLike)) and not isinstance(refs, bool):
            listed = [refs]
        elif isinstance(refs, (bytes, bytearray, memoryview, dict)) or not isinstance(refs, Iterable):
            raise ConfigError(f"remove takes an image id, a path, or a list of them; got {type(refs).__name__}")
        else:
            listed = refs
        refs_in: list[int | str] = []
        for ref in listed:
            if isinstance(ref, bool) or not isinstance(ref, (int, str, os.PathLike)):
                raise ConfigError(f"remove takes image ids and paths, got {ref!r}")
            refs_in.append(ref if isinstance(ref, (int, str)) else os.fspath(ref))
        return catalog.remove(self.ctx, refs_in, dry_run=dry_run)

    def apply_duplicates(self, groups: Sequence[DuplicateGroup], move_to: str | os.PathLike[str]) -> ApplyReport:
        """Move every file of ``groups`` but each group's ``keeper_path`` into ``move_to``, under
        its path relative to the folder it was ingested under; journalled, resumable (an
        interrupted run is finished by the next one into the same folder) and undoable
        (:meth:`undo_duplicates`). Never deletes or overwrites a file. Returns an
        :class:`~imgstore.dedup_apply.ApplyReport` with the journal's path."""
        return dedup_apply.apply(self.ctx, groups, move_to)

    def undo_duplicates(self, journal: str | os.PathLike[str]) -> UndoReport:
        """Put back every file, path row and keeper metadata that one :meth:`apply_duplicates`
        changed, as its journal records them; safe to run again."""
        return dedup_apply.undo(self.ctx, journal)

    def prune_moved(self, *, dry_run: bool = False) -> Removal:
        """Forget files that :meth:`apply_duplicates` moved away (no undo after this), and images
        left with no path at all; the moved files stay where they are."""
        return catalog.prune_moved(self.ctx, dry_run=dry_run)

    def prune(self, *, dry_run: bool = False) -> list[str]:
        """Mark every current path whose file no longer exists as not current (the rows stay,
        as history); returns those paths. An ingest does this itself for paths under the
        folders it rescans; ``prune`` covers the rest."""
        return catalog.mark_gone(self.ctx, dry_run=dry_run)

    def set_meta(self, ref: int | str, metadata: dict[str, Any]) -> dict[str, Any]:
        """Merge ``metadata`` into one image's (by id or path): list values such as ``tags``
        are joined, others replaced, None removes a key. Returns the metadata now stored."""
        return catalog.set_meta(self.ctx, ref, metadata)

    def export_rows(self, *, neighbours: int = 0, filter: SearchFilter | None = None, cluster: Any = None,
                    shards: str | os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
        """One dict per image (those ``filter`` allows, when given): id, content hash, size,
        format, capture time, metadata, current paths and, with ``neighbours``, the ids of its
        nearest stored images (itself excluded). With ``cluster`` (``"local[:N]"``, a scheduler
        address or a ``distributed.Client``) the neighbours are the exact Hamming neighbours of
        the active index's codes, computed over shards (:meth:`neighbour_graph`), with their
        ``distances``; ``shards`` alone does the same in this process."""
        if (cluster is not None or shards is not None) and neighbours:
            graph = self.neighbour_graph(neighbours, cluster=cluster, shards=shards)
            return export.export_rows(self.ctx, search_filter=filter, graph=graph)
        return export.export_rows(self.ctx, neighbours=neighbours, search_filter=filter)

    # -- batch work over shards -----------------------------------------------------------

    def shards_folder(self, shards: str | os.PathLike[str] | None = None) -> Path:
        """Where this store's shards go: ``shards``, else beside an SQLite file (``DB.shards``);
        a PostgreSQL store needs a folder given (one every worker can read)."""
        if shards is not None:
            return Path(shards).expanduser()
        db = self.sqlite_file
        if db is None:
            raise ConfigError("give a folder for the shards (--shards FOLDER), one every Dask worker can read")
        return Path(f"{db}.shards")

    def export_shards(self, folder: str | os.PathLike[str] | None = None, *, index_id: int | None = None,
                      shard_codes: int = shard_files.DEFAULT_SHARD_CODES) -> shard_files.ExportSummary:
        """Export an index's codes (the active one by default) into shard files
        (:mod:`imgstore.shards`); again into the same folder, only the shards that changed."""
        return shard_files.export_shards(self.ctx, self.shards_folder(folder), index_id=index_id, shard_codes=shard_codes)

    def neighbour_graph(self, k: int, *, cluster: Any = None, shards: str | os.PathLike[str] | None = None,
                        index_id: int | None = None, progress: Callable[[int, int], None] | None = None) -> batch.Neighbours:
        """Every code's exact ``k`` nearest other codes in an index (the active one by default), by
        (Hamming distance, id), block by block over its shards (exported first, or brought up to
        date), in this process or on ``cluster``; finished blocks are kept, so a rerun after an
        interruption does only the rest (:mod:`imgstore.batch`)."""
        exported = self.export_shards(shards, index_id=index_id)
        return batch.neighbours(exported.shards, k, workdir=exported.shards.folder / "work", cluster=cluster,
                                progress=progress)

    def image_files(self, image_ids: Sequence[int]) -> dict[int, ImageFiles]:
        """Each image's format and its current files with their sizes (unknown ids absent)."""
        with self.ctx.read("read image files") as conn:
            return catalog.image_files(conn, image_ids)

    def thumbnail_source(self, image_id: int) -> ThumbnailSource:
        """What a thumbnail of the image is made from: its content hash and first current file."""
        with self.ctx.read("find a thumbnail") as conn:
            return catalog.thumbnail_source(conn, image_id)

    def image_count(self) -> int:
        """Stored images: one count (:meth:`counts` counts every table)."""
        with self.ctx.read("count images") as conn:
            return catalog.count_images(conn)

    def browse(self, filter: SearchFilter | None = None, *, sort: str = "taken", order: str = "desc", page: int = 1,
               per_page: int = 60, include_stale: bool = False) -> BrowsePage:
        """One page of the collection: the images ``filter`` allows (None: all), sorted by
        ``sort`` (``taken``: EXIF capture time, images without one last; ``added``; ``folder``:
        their first current file's path) in ``order`` (``asc``/``desc``), page ``page`` (from 1)
        of ``per_page`` (at most 500). A :class:`~imgstore.browse.BrowsePage` with the images' current
        files and the total the filter allows. Images whose every file went stale are left out
        unless ``include_stale``."""
        with self.ctx.read("browse the images") as conn:
            return browse.browse(conn, filter, sort=sort, order=order, page=page, per_page=per_page,
                                 include_stale=include_stale)

    @property
    def sqlite_file(self) -> str | None:
        """The SQLite database file, or None for a server database."""
        found = sqlite_file(self.url)
        return None if found is None else str(found)

    def feature_spaces(self) -> list[SpaceInfo]:
        with self.ctx.read("list feature spaces") as conn:
            return list_spaces(conn)

    # -- labels ---------------------------------------------------------------------------

    def label_counts(self, extractor: str | None = None) -> list[LabelCount]:
        """Every label of the store with how many images carry it, most common first, in the
        feature space of ``extractor`` (default: the labelled space with the most images)."""
        with self.ctx.read("count labels") as conn:
            space = self._labelled_space(conn, extractor)
            return labels.counts(conn, space.id)

    def labels_missing(self, extractor: str | None = None) -> int:
        """Images with features but no labels yet (stored before labels existed): see :meth:`update_labels`."""
        with self.ctx.read("count images without labels") as conn:
            return labels.missing(conn, self._labelled_space(conn, extractor).id)

    def update_labels(self, extractor: str | None = None, progress: Callable[[int, int], None] | None = None) -> int:
        """Compute the labels of images stored without them, from their stored features (no file
        is read; thousands of images a second). Returns how many images got labels."""
        with self.ctx.read("find images without labels") as conn:
            space = self._labelled_space(conn, extractor)
            total = labels.missing(conn, space.id)
        head = labels.head_of(self.ctx.extractor(space.extractor))
        if head is None:
            raise ConfigError(f"the {space.extractor} extractor has no classifier: it gives no labels")
        done = 0
        while True:
            def work(conn: Connection) -> int:
                ids = labels.missing_ids(conn, space.id, labels.UPDATE_CHUNK)
                got_ids, vectors = load_features(conn, space.id, space.dim, ids)
                labels.write_labels(conn, space.id, got_ids.tolist(), vectors, head)
                return len(got_ids)

            n = self.ctx.write(work, doing="write labels")
            if n == 0:
                return done
            done += n
            if progress is not None:
                progress(done, max(total, done))

    def search_text(self, words: str, *, k: int = 10, extractor: str | None = None, include_stale: bool = False,
                    filter: SearchFilter | None = None) -> WordSearch:
        """The ``k`` images that best match ``words`` ("a dog on the beach"), best first, and what
        the words were understood as; ``filter`` as for :meth:`search`.

        In a CLIP feature space (``--extractor clip:ARCH:PATH``) the words are embedded by CLIP's
        text tower and images ranked by the cosine of their features (exact; nothing is
        "understood"); otherwise through what the classifier sees in them
        (:mod:`imgstore.wordsearch`), with the sentence model loaded on first use (about a second;
        ConfigError when it is not installed). The space: ``extractor``'s (a name, or a
        ``clip:ARCH:PATH`` spec), by default the largest CLIP space when the store has one (CLIP
        was trained on words and pictures together), else the labelled one."""
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        said = " ".join(words.split())
        if not said:
            raise ConfigError("a word search needs some words, e.g. --text \"a dog on the beach\"")
        wanted = space_name(extractor) if extractor is not None else None  # a clip:ARCH:PATH reads its file's digest
        # everything that can be wrong is found before a model loads (seconds): the space, and the
        # filter's allowed set (a label that is no class is refused there, with the closest names)
        with self.ctx.read("find the feature space to search by words") as conn:
            space = self._words_space(conn, wanted)
            allowed = filters.allowed(self.ctx, conn, filter)
        if embeds_text(space.extractor):
            ex = self.ctx.extractor(space.extractor)
            if not isinstance(ex, TextEmbedder):
                raise ConfigError(f"the {space.extractor} extractor embeds no words")
            query = ex.embed_text([said])[0]
            with self.ctx.read("search by words") as conn:
                return wordsearch.search_embedding(conn, space, query, said, k, include_stale=include_stale,
                                                   allowed=allowed)
        from . import text  # the sentence model: only word searches load it

        weights = text.class_weights(said, labels.imagenet_classes())
        head = labels.head_of(self.ctx.extractor(space.extractor))
        assert head is not None, "a labelled space's extractor has a classifier"
        with self.ctx.read("search by words") as conn:
            return wordsearch.search(conn, space, head, said, weights, k, include_stale=include_stale, allowed=allowed)

    def _words_space(self, conn: Connection, extractor: str | None) -> SpaceInfo:
        """The space a word search reads: ``extractor``'s (a space name), else the largest CLIP
        space with images, else the labelled one."""
        if extractor is None:
            with_words = [s for s in list_spaces(conn) if embeds_text(s.extractor) and s.n_features]
            if with_words:
                return largest_space(with_words)
        elif embeds_text(extractor):
            return pick_space(conn, extractor)
        return self._labelled_space(conn, extractor)

    def _labelled_space(self, conn: Connection, extractor: str | None) -> SpaceInfo:
        spaces = [s for s in list_spaces(conn) if labels.has_labels(s.extractor)]
        if extractor is not None:
            spaces = [s for s in spaces if s.extractor == extractor]
        if not spaces:
            which = f"the {extractor} extractor gives" if extractor else "no feature space of this store has"
            raise NotFoundError(f"{which} no labels: labels come from efficientnet-lite0 or -lite2 features "
                                "(`imgstore ingest FOLDER` with the default extractor)")
        return max(spaces, key=lambda s: s.n_features or 0)

    # -- ingest ---------------------------------------------------------------------------

    def extractor(self, name: str | None = None, **options: Any) -> Extractor:
        """The extractor ``name`` (default EfficientNet-Lite0), built once per store."""
        return self.ctx.extractor(name, **options)

    def _space_id(self, extractor: Extractor) -> int:
        return self.ctx.write(
            lambda conn: get_or_create_space(conn, extractor.name, extractor.dim, extractor.preprocess_version),
            doing="register a feature space",
        )

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
        device: str | None = None,
        cluster: Any = None,
        worker_db: str | None = None,
    ) -> IngestSummary:
        """Ingest files and folders; returns an :class:`~imgstore.ingest.IngestSummary`.

        Files whose path, size and mtime are unchanged since the last ingest are skipped without
        reading them; content already stored is recorded as a new path only. Bad files are
        recorded (``imgstore errors``) and counted, and the ingest goes on.

        ``extractor``: a registered name (``imgstore.features.available_extractors()``) or
        ``clip:ARCH:PATH``; None: the one the store searches with (:meth:`searched_extractor`),
        else efficientnet-lite0, so a second ingest adds to the space the first made.

        ``device``: ``auto`` (a CUDA device when torch sees one, else the CPU), ``cpu`` or
        ``cuda``, for the CNN extractors. ``cluster``: run the reading and extraction on a Dask
        cluster (:mod:`imgstore.cluster`): ``"local"`` or ``"local:N"`` (N worker processes on
        this machine), a scheduler address ``"tcp://host:8786"``, or a ``distributed.Client``;
        ``worker_db``: the database URL as the workers must write it (default: this store's).
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        roots = [os.path.expanduser(os.fspath(p)) for p in paths]
        missing = [p for p in roots if not os.path.lexists(p)]
        if missing:
            raise NotFoundError(f"no such file or folder: {', '.join(printable(p) for p in missing)}")
        options = {"device": device} if device else {}
        ex = self.ctx.extractor(extractor or self.searched_extractor(), **options)
        space_id = self._space_id(ex)
        meta = dict(metadata or {})
        if tags:
            meta["tags"] = sorted(set(tags))
        job = Ingester(self.ctx, ex, space_id, batch_size=batch_size, workers=workers, metadata=meta, progress=progress)
        if cluster is not None:
            options = {**self.ctx.extractor_options.get(ex.name, {}), **options}
            if self.ctx.runtime is not None:
                options["runtime"] = self.ctx.runtime
            summary = ClusterIngest(job, ex.name, options, cluster, worker_db=worker_db).run(
                roots, recursive=recursive, follow_symlinks=follow_symlinks, dry_run=dry_run)
        else:
            summary = job.run(roots, recursive=recursive, follow_symlinks=follow_symlinks, dry_run=dry_run)
        if auto_index and not dry_run and summary.added:
            indexing.maybe_auto_index(self.ctx, space_id)
        return summary

    def add(self, source: Any, metadata: dict[str, Any] | None = None, *, extractor: str | None = None) -> int:
        """Add one image; returns its image id.

        ``source`` is one of: a file path (``str`` or ``os.PathLike``; ``~`` is expanded; the
        path is recorded, as an ingest records it); encoded image bytes (``bytes``,
        ``bytearray`` or ``memoryview`` of a JPEG, PNG, ... file); a binary file-like object
        (``io.BytesIO``, a file opened ``"rb"``), read to its end; a PIL image; or a numpy
        ``uint8`` array of pixels, ``(H, W)`` grey, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA.
        Only a path gets a path row; the others are stored by content alone.

        Raises :class:`DecodeError` when it cannot be decoded. The same content added twice
        returns the same id.
        """
        summary, ids = self.add_many([source], metadata=metadata, extractor=extractor)
        if ids[0] is None:
            where, reason = summary.errors[0]
            raise DecodeError(None if where == "<in-memory image>" else where, reason)
        return ids[0]

    def add_many(
        self, sources: Iterable[Any], metadata: dict[str, Any] | None = None, *, extractor: str | None = None,
        batch_size: int = 64, auto_index: bool = True,
    ) -> tuple[IngestSummary, list[int | None]]:
        """Add many images, each of a kind :meth:`add` takes; returns (summary, image id or None
        per source, in order)."""
        ex = self.ctx.extractor(extractor or self.searched_extractor())
        space_id = self._space_id(ex)
        job = Ingester(self.ctx, ex, space_id, batch_size=batch_size, metadata=metadata)
        summary, ids = job.add_items([as_source(s) for s in sources])
        if auto_index and summary.added:
            indexing.maybe_auto_index(self.ctx, space_id)
        return summary, ids

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
        progress: Callable[[str, int, int], None] | None = None,
    ) -> int:
        """Fit an index on the stored features of one feature space; returns its id.

        ``extractor`` picks the space (default: the one with the most stored vectors).
        ``labels``: ``"folder"`` (each image's parent folder) or ``"tag:KEY"`` (a metadata
        field), for supervised methods. ``progress(phase, done, total)`` follows the work
        (phases ``fit``, ``encode``, ``buckets``; a fit over 1M images takes minutes).
        """
        wanted = space_name(extractor) if extractor is not None else None  # clip:ARCH:PATH -> its space's name
        with self.ctx.read("pick a feature space") as conn:
            space = pick_space(conn, wanted)
        return indexing.build_index(
            self.ctx, space.id, "create an index", labels=labels, method=method, n_bits=n_bits, n_bands=n_bands,
            sample=sample or indexing.DEFAULT_SAMPLE, random_state=random_state, activate=activate, fallback=fallback,
            progress=progress,
        )

    def indexes(self, *, with_counts: bool = True) -> list[IndexInfo]:
        """The indexes; ``with_counts=False`` skips counting each one's codes (a page's list),
        and, with :meth:`start_refresher` running, is answered from its last look."""
        with self.ctx.read("list indexes") as conn:
            return indexing.list_indexes(conn) if with_counts else caches(self.ctx).indexes(conn)

    def searched_extractor(self) -> str | None:
        """The extractor of the feature space queries search (the active index's; without an
        index, the space with the most vectors), or None for a store without features: what an
        ingest that names no extractor uses, so new images join the space that is searched."""
        try:
            return self.index_space().extractor
        except NotFoundError:
            return None

    def index_space(self, index_id: int | None = None) -> SpaceInfo:
        """The feature space the index ``index_id`` (default: the active one; without any index,
        the space with the most vectors) reads: what a query image must be embedded into."""
        with self.ctx.read("find the feature space") as conn:
            found = indexing.find_index(caches(self.ctx).indexes(conn), index_id)
            return self.ctx.space(conn, found.space_id) if found is not None else pick_space(conn, None)

    def activate_index(self, index_id: int) -> None:
        self.ctx.write(lambda conn: indexing.activate_index(conn, index_id), doing="activate an index")
        self.ctx.forget_index(index_id)

    def drop_index(self, index_id: int) -> int | None:
        """Delete an index and its codes. If it was the active one, the newest remaining index of
        its feature space becomes active: returns that id, or None (queries then scan the float
        features when no index is left)."""
        successor = self.ctx.write(lambda conn: indexing.drop_index(conn, index_id), doing="drop an index")
        self.ctx.forget_index(index_id)
        return successor

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
        include_stale: bool = False,
        filter: SearchFilter | None = None,
        options: SearchOptions | None = None,
    ) -> list[SearchResult]:
        """The k images most similar to ``query``, best first.

        ``query`` is one of:

        - a stored image id: an ``int`` (or numpy integer), or a ``str`` of digits that names no
          existing file (a file of that name wins);
        - a file path (``str`` or ``os.PathLike``; ``~`` is expanded);
        - encoded image bytes (``bytes``, ``bytearray`` or ``memoryview`` of a JPEG, PNG, ... file);
        - a binary file-like object (``io.BytesIO``, a file opened ``"rb"``), read to its end;
        - a PIL image;
        - a numpy ``uint8`` array of pixels: ``(H, W)`` grey, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA;
        - a feature vector: a 1-D numpy float array of the searched feature space's length.

        An image (anything but an id or a vector) is embedded by the feature space's extractor.
        With an index: band prefilter then Hamming re-rank (``exact=True`` equals a
        brute-force Hamming scan); ``rerank`` orders the best ``rerank_depth`` (default 10k)
        Hamming candidates by cosine similarity of the stored features (default: on). Without
        any index: exact cosine search over the stored features. ``cached`` keeps the index's
        codes in this store's memory between queries (default: the store's ``cache_codes``).
        Images whose every path went stale (the files changed or vanished) are left out unless
        ``include_stale``; images added without a path are never stale. ``filter``: only images
        it allows are returned (:class:`~imgstore.types.SearchFilter`: metadata, tags, a folder,
        capture time); exact mode stays equal to a brute-force scan of the allowed images, and
        approximate mode still returns k results whenever k allowed images exist; a filter that
        allows nothing gives no results. ``options``: all of these as one
        :class:`~imgstore.types.SearchOptions` (then the other keywords are ignored; a ``filter``
        given beside it replaces its ``filter``).
        """
        return self.search_many([query], k, exact=exact, probe_radius=probe_radius, rerank=rerank, rerank_depth=rerank_depth,
                                cached=cached, index_id=index_id, include_stale=include_stale, filter=filter,
                                options=options)[0]

    def search_many(
        self,
        queries: Iterable[Any],
        k: int = 10,
        *,
        exact: bool = False,
        probe_radius: int = 1,
        rerank: bool | None = None,
        rerank_depth: int | None = None,
        cached: bool | None = None,
        index_id: int | None = None,
        include_stale: bool = False,
        filter: SearchFilter | None = None,
        options: SearchOptions | None = None,
    ) -> list[list[SearchResult]]:
        """:meth:`search` for many queries, with one connection and one cache check.

        ``queries``: any iterable of the queries :meth:`search` takes, or one of them on its own
        (a ``str``, bytes, a file-like object, a PIL image or a ``uint8`` array is one query,
        never its characters, bytes or pixel rows). A 2-D float array is one feature vector per
        row. Returns one result list per query, in order."""
        if options is None:
            options = SearchOptions(k=k, exact=exact, probe_radius=probe_radius, rerank=rerank, rerank_depth=rerank_depth,
                                    cached=cached, index_id=index_id, include_stale=include_stale, filter=filter)
        elif filter is not None:
            options = dataclasses.replace(options, filter=filter)
        cached = self.cache_codes if options.cached is None else options.cached
        return search.search_many(self.ctx, queries, options, cached=cached)

    # -- the in-memory code cache (a long-running process: ``imgstore serve``) -------------

    def start_refresher(self, interval_s: float = 0.25) -> None:
        """Keep this store's in-memory codes up to date in a background thread, every
        ``interval_s``: searches then never wait for an ingest's new codes to be merged, at the
        price of answering from codes up to an interval old."""
        caches(self.ctx).start_refresher(interval_s)

    def stop_refresher(self) -> None:
        caches(self.ctx).stop_refresher()

    def warm(self) -> None:
        """Load the active index's codes and their vectors into memory now (so that the first
        search does not pay it); does nothing for a store without an index."""
        caches(self.ctx).warm()

    def cache_state(self) -> list[CacheState]:
        """What this process holds in memory per index: codes, vectors attached, bytes."""
        return caches(self.ctx).state()

    def answers_from_memory(self, index_id: int | None = None, *, rerank: bool = True) -> bool:
        """Whether a cached search of ``index_id`` (default: the active index) would find every
        code (and, for the re-rank, vector) in memory: a millisecond of CPU, no loading."""
        return self.cache_codes and caches(self.ctx).answers_from_memory(index_id, rerank=rerank)

    @property
    def cache_refreshes(self) -> dict[str, int]:
        """How the in-memory codes were brought up to date: full loads, and appends."""
        return dict(caches(self.ctx).refreshes)

    @property
    def vector_cache_mb(self) -> int:
        """Memory the in-memory codes may spend on their images' float features (MB)."""
        return self.ctx.vector_cache_bytes >> 20

    @vector_cache_mb.setter
    def vector_cache_mb(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"vector_cache_mb must be a whole number, 0 or more, got {value!r}")
        self.ctx.vector_cache_bytes = value << 20

    # -- duplicates -----------------------------------------------------------------------

    def find_duplicates(
        self,
        *,
        max_distance: int | None = None,
        min_cosine: float | None = None,
        min_signature: float | None = None,
        index_id: int | None = None,
        probe_radius: int = 1,
        keep: str = "original",
        geometry: bool = True,
        progress: Callable[[str, int, int], None] | None = None,
        cluster: Any = None,
        shards: str | os.PathLike[str] | None = None,
    ) -> list[DuplicateGroup]:
        """Groups of duplicate images, largest first.

        Exact copies (one content seen at several paths) form groups of kind ``"exact"``.
        Near copies are pairs whose float features have cosine similarity >= ``min_cosine``
        (default 0.90), or whose features agree loosely (cosine >= 0.3) and whose pixel-layout
        signatures (flip-aware, see ``imgstore.signature``) have similarity >= ``min_signature``
        (default 0.95; 0 turns that test off), joined into connected components. With an index
        (the active one, or ``index_id``) candidates come from its bands and must be within
        ``max_distance`` bits (default a quarter of the code; ``min_cosine=0`` lets the codes
        alone decide); without one every pair is compared, or, in a large store, a temporary
        in-memory index finds the candidates. With ``geometry`` (the default), every pair the
        rule accepts, and every pair of images at least 64 pixels a side whose features agree
        at least 0.5, is decided by a geometric check of their files (``imgstore.geometry``:
        keypoints, one affine map, then pixels compared once aligned; an edit search for
        thumbnails), which finds rotated, hard-cropped and captioned copies and rejects second
        shots of one scene; files that cannot be read keep the rule's answer.
        Each group names a suggested keeper image and
        ``keeper_path``, by the rule ``keep`` (:mod:`imgstore.keeper`; default ``original``:
        the most picture, then lossless over lossy, then no added border, then the earliest
        capture, then the largest file). ``progress(phase, done, total)`` follows the work
        (phases: :data:`imgstore.dedup.PHASES`; :func:`imgstore.dedup.describe_progress` says
        them in words), from the thread that runs the search. With ``cluster`` (``"local[:N]"``,
        a scheduler address or a ``distributed.Client``) the index's candidate pairs are found
        over its shards (``shards``: see :meth:`shards_folder`) on the cluster's workers
        (:func:`imgstore.batch.near_pairs`): the same pairs, so the same groups, and the
        geometric check compares its pairs there too, each worker reading the files at the
        store's paths (a filesystem they share; a file a worker cannot read leaves the rule's
        answer); ``shards`` alone does the same in this process.
        """
        candidates = None
        client, close = None, None
        if cluster is not None:  # one connection (one LocalCluster) for the candidates and the check
            client, close, _ = connect(cluster)
        if cluster is not None or shards is not None:
            def candidates(cache: CodeCache, max_d: int, radius: int) -> tuple[Any, Any]:
                exported = self.export_shards(shards, index_id=cache.index.id)
                found = batch.near_pairs(exported.shards, max_d, probe_radius=radius,
                                         workdir=exported.shards.folder / "work", cluster=client)
                return found.a, found.b

        try:
            return dedup.find_duplicates(self.ctx, max_distance=max_distance, min_cosine=min_cosine,
                                         min_signature=min_signature, index_id=index_id, probe_radius=probe_radius,
                                         keep=keep, geometry=geometry, progress=progress, candidates=candidates,
                                         check_cluster=client)
        finally:
            if close is not None:
                close()

    def duplicates_state(self) -> DuplicatesState:
        """A small value that changes whenever what :meth:`find_duplicates` reads changes
        (images, their current files, the indexes): groups found while it was equal to the
        state now still hold. Cheap next to a search (two aggregate queries)."""
        with self.ctx.read("read the store's state") as conn:
            return dedup.duplicates_state(conn)

    # -- health ---------------------------------------------------------------------------

    def verify(self, *, check_files: bool = True) -> VerifyReport:
        """Consistency report: images without features, missing codes per index, band buckets
        that do not match the codes, dangling rows, and (``check_files``) current paths whose
        file vanished or changed on disk."""
        return maintenance.verify(self.ctx, check_files=check_files)

    def info(self) -> StoreInfo:
        """Counts, database size, feature spaces, and indexes with their band occupancy."""
        return maintenance.info(self.ctx)

