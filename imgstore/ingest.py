"""Ingest: walk folders, skip what is unchanged, decode and extract in parallel, write in batches.

Each model batch is written in one transaction (images, features, codes for every index of the
feature space, paths, error records), so a process killed at any moment leaves the database as
it was after the last whole batch, and running the same command again finishes the job.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
from sqlalchemy import Connection, delete, select, update

from . import catalog, labels
from .context import StoreContext
from .decode import DecodedImage, decode_bytes, load_image, read_file
from .errors import DecodeError, ImgStoreError
from .features import Extractor
from .features.pipeline import StreamResult, extract_stream
from .indexing import encode_images, finish_encoding
from .models import Feature, Image, ImagePath, IngestError, utcnow
from .paths import printable, to_stored
from .rawphoto import RAW_EXTENSIONS
from .signature import thumb_signature
from .signature import to_bytes as signature_bytes
from .sqlhelpers import IN_CHUNK, chunks, insert_ignore, insert_stmt
from .vectors import features_table, vector_to_bytes

log = logging.getLogger(__name__)

#: File name extensions tried as images when walking folders (a file named on the command line
#: is always tried). Anything else in a folder is ignored, not reported as an error.
IMAGE_EXTENSIONS = frozenset(
    [
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
        ".pnm", ".ico", ".tga", ".jp2", ".j2k", ".jpx", ".pcx", ".sgi", ".rgb", ".qoi", ".avif", ".heic", ".heif", ".hif",
    ]
) | RAW_EXTENSIONS  # camera RAW files (imgstore.rawphoto); sidecars (.xmp, .aae) and videos are not images

ProgressFn = Callable[["IngestProgress"], None]

#: Images per model run when the model runs on a CPU. A transaction still holds ``batch_size``
#: images (consecutive runs joined, :func:`_joined`). A short run starts the model after a few
#: decodes instead of a whole batch and keeps it overlapped with the decode threads up to the last
#: file (the run left alone at the end is short), and its activations are a quarter of a 64-image
#: run's: less memory, fewer page faults on the first run (benchmarks/results/ingest_photos.md).
#: ONNX Runtime computes each image on its own, so the features do not depend on the run's size
#: (tests/test_ingest.py). On a GPU, which wants large batches, a run is the whole batch.
CPU_MODEL_RUN = 16

#: What a folder walk passes over without trying it: a symbolic link (not followed), a file
#: whose extension is not an image's, a sub-folder (not descended: ``recursive=False``).
SkipKind = Literal["symlink", "non-image", "folder"]


@dataclass
class IngestProgress:
    done: int
    total: int
    added: int
    failed: int
    elapsed_s: float


@dataclass
class IngestSummary:
    """What an ingest did. ``added`` counts new images; ``duplicates`` files whose content was
    already stored (their path is recorded); ``unchanged`` files skipped by path, size and mtime."""

    files_seen: int = 0
    added: int = 0
    unchanged: int = 0
    duplicates: int = 0
    failed: int = 0
    gone: int = 0  # stored paths under the roots whose file no longer exists (now not current)
    # what the walk passed over, so that an ingest that found nothing can say why
    skipped_symlinks: int = 0  # symbolic links (followed only with follow_symlinks)
    skipped_non_images: int = 0  # files whose extension is not in IMAGE_EXTENSIONS
    skipped_folders: int = 0  # sub-folders not descended (recursive=False)
    retries: int = 0  # write transactions rerun after a conflict with another writer
    elapsed_s: float = 0.0
    dry_run: bool = False
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.added / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "files_seen": self.files_seen,
            "added": self.added,
            "unchanged": self.unchanged,
            "duplicates": self.duplicates,
            "failed": self.failed,
            "gone": self.gone,
            "skipped_symlinks": self.skipped_symlinks,
            "skipped_non_images": self.skipped_non_images,
            "skipped_folders": self.skipped_folders,
            "retries": self.retries,
            "elapsed_s": round(self.elapsed_s, 3),
            "images_per_s": round(self.images_per_s, 2),
            "dry_run": self.dry_run,
        }


@dataclass
class BatchOutcome:
    """What one written batch did: new images, files whose content was already stored, errors
    (path, reason), and duplicates whose original is not written yet (carried to the next batch)."""

    added: int
    duplicates: int
    errors: list[tuple[str, str]]
    unresolved: list[Task]


@dataclass
class Plan:
    """What an ingest found to do: the roots, the files to read, the stored paths that are
    unchanged, every path the walk saw, and the summary so far."""

    roots: list[str]
    tasks: list[Task]
    unchanged: list[str]
    seen: set[str]
    summary: IngestSummary


@dataclass
class Task:
    """One file to ingest. ``sha256``/``byte_size`` are filled by the worker that reads it."""

    path: str | None  # None for an in-memory image (bytes or PIL), which gets no path row
    size: int
    mtime_ns: int
    root: str | None = None  # the folder given to ingest it was found under
    source: Any = None  # bytes or a PIL image when path is None
    data_sha256: str | None = None
    byte_size: int = 0
    duplicate: bool = False
    image_id: int | None = None  # set once the batch holding it is written
    signature: bytes | None = None  # imgstore.signature of the decoded image


# --- walking ------------------------------------------------------------------------------------


def walk_files(
    roots: Iterable[str | os.PathLike[str]],
    *,
    recursive: bool = True,
    follow_symlinks: bool = False,
    on_error: Callable[[str, str], None],
    on_skip: Callable[[str, SkipKind], None] | None = None,
) -> Iterator[tuple[str, os.stat_result]]:
    """Image files under ``roots`` in sorted order, with their ``stat``.

    Symbolic links are skipped unless ``follow_symlinks`` (then directory loops are detected by
    device and inode). Unreadable directories and missing roots are reported to ``on_error``
    and the walk goes on; entries passed over on purpose (links, other files, sub-folders when
    not ``recursive``) to ``on_skip``, so that a walk that found nothing can say why.
    """
    skip = on_skip or (lambda _path, _kind: None)
    for root in roots:
        root = os.path.abspath(os.fspath(root))
        try:
            st = os.stat(root) if follow_symlinks else os.lstat(root)
        except OSError as exc:
            on_error(root, f"cannot access ({exc.strerror or exc})")
            continue
        if stat.S_ISREG(st.st_mode) or (stat.S_ISLNK(st.st_mode) and not follow_symlinks and os.path.isfile(root)):
            # a file named explicitly is always tried, whatever its extension
            yield root, os.stat(root)
            continue
        if not stat.S_ISDIR(st.st_mode):
            linked_folder = stat.S_ISLNK(st.st_mode) and os.path.isdir(root)
            on_error(root, "a symbolic link to a folder, not followed (ingest --follow-symlinks follows it)"
                     if linked_folder else "not a regular file or directory")
            continue
        yield from _walk_dir(root, recursive, follow_symlinks, on_error, skip, {(st.st_dev, st.st_ino)})


def _walk_dir(
    top: str,
    recursive: bool,
    follow: bool,
    on_error: Callable[[str, str], None],
    on_skip: Callable[[str, SkipKind], None],
    visited: set[tuple[int, int]],
) -> Iterator[tuple[str, os.stat_result]]:
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except OSError as exc:
        on_error(top, f"cannot list directory ({exc.strerror or exc})")
        return
    subdirs = []
    for entry in entries:
        try:
            if entry.is_symlink() and not follow:
                on_skip(entry.path, "symlink")
                continue
            if entry.is_dir(follow_symlinks=follow):
                subdirs.append(entry)
                continue
            if not entry.is_file(follow_symlinks=follow):
                continue
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                on_skip(entry.path, "non-image")
                continue
            yield entry.path, entry.stat(follow_symlinks=follow)
        except OSError as exc:
            on_error(entry.path, f"cannot access ({exc.strerror or exc})")
    if not recursive:
        for entry in subdirs:
            on_skip(entry.path, "folder")
        return
    for entry in subdirs:
        try:
            st = entry.stat(follow_symlinks=follow)
        except OSError as exc:
            on_error(entry.path, f"cannot access ({exc.strerror or exc})")
            continue
        key = (st.st_dev, st.st_ino)
        if key in visited:
            on_error(entry.path, "directory loop (a symbolic link back into the tree); skipped")
            continue
        yield from _walk_dir(entry.path, recursive, follow, on_error, on_skip, visited | {key})


# --- the ingest job -------------------------------------------------------------------------------


class Ingester:
    """Runs one ingest into one feature space. Built by :meth:`ImageStore.ingest`."""

    def __init__(
        self,
        ctx: StoreContext,
        extractor: Extractor,
        space_id: int,
        *,
        batch_size: int = 64,
        workers: int | None = None,
        metadata: dict[str, Any] | None = None,
        progress: ProgressFn | None = None,
        preload_known: bool = True,
        write_size: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        """``preload_known``: read every stored content hash of the space once, up front (one
        process ingesting a whole folder); False asks the database per file instead (a cluster
        worker handling a few hundred files of a large store). ``write_size``: images per write
        transaction (default ``batch_size``: a killed ingest loses at most one batch; a cluster
        worker writes its whole partition at once, which its rerun redoes anyway, and fewer,
        larger transactions rewrite each shared bucket row less often). ``max_pixels``: the
        largest image decoded (default: the store's, ``ctx.max_pixels``; a cluster worker is
        given its client's)."""
        self.ctx = ctx
        self.extractor = extractor
        self.space_id = space_id
        #: the extractor's classifier, whose labels are written with the features (None: it has none)
        self.label_head = labels.head_of(extractor)
        self.batch_size = batch_size
        self.write_size = max(1, write_size or batch_size)
        #: images per model run (transactions still join ``write_size``)
        self.model_run = model_run_size(extractor, batch_size)
        self.workers = workers
        self.metadata = dict(metadata or {})
        self.progress = progress
        self._claim_lock = threading.Lock()
        self._claimed: set[str] = set()
        self._known: set[str] = set()
        self.preload_known = preload_known
        self.max_pixels = ctx.max_pixels if max_pixels is None else max_pixels

    # The heavy lifting -----------------------------------------------------------------------

    def run(
        self,
        roots: Sequence[str | os.PathLike[str]],
        *,
        recursive: bool = True,
        follow_symlinks: bool = False,
        dry_run: bool = False,
    ) -> IngestSummary:
        started = time.perf_counter()
        plan = self.plan(roots, recursive=recursive, follow_symlinks=follow_symlinks, dry_run=dry_run)
        if dry_run:
            plan.summary.elapsed_s = time.perf_counter() - started
            return plan.summary
        summary = self.process(plan.tasks, plan.summary, started)
        return self.finish(plan, summary, started)

    def plan(
        self,
        roots: Sequence[str | os.PathLike[str]],
        *,
        recursive: bool = True,
        follow_symlinks: bool = False,
        dry_run: bool = False,
    ) -> Plan:
        """Walk the roots and find what to read: every file whose path, size and mtime are not
        stored yet (the rest count as unchanged). Walk errors are recorded (unless ``dry_run``)."""
        summary = IngestSummary(dry_run=dry_run)
        walk_errors: list[tuple[str, str]] = []
        skipped = {"symlink": 0, "non-image": 0, "folder": 0}

        def count_skip(_path: str, kind: SkipKind) -> None:
            skipped[kind] += 1

        files: list[tuple[str, os.stat_result]] = []
        root_of: dict[str, str] = {}
        for root in roots:
            top = os.path.abspath(os.fspath(root))
            folder = top if os.path.isdir(top) else os.path.dirname(top)
            for path, st in walk_files([top], recursive=recursive, follow_symlinks=follow_symlinks,
                                       on_error=lambda p, r: walk_errors.append((p, r)), on_skip=count_skip):
                files.append((path, st))
                root_of.setdefault(path, folder)
        summary.files_seen = len(files)
        summary.skipped_symlinks, summary.skipped_non_images = skipped["symlink"], skipped["non-image"]
        summary.skipped_folders = skipped["folder"]
        known_paths = self._known_paths([os.path.abspath(os.fspath(r)) for r in roots])
        tasks: list[Task] = []
        unchanged: list[str] = []
        for path, st in files:
            shown = to_stored(path)
            prior = known_paths.get(shown)
            if prior is not None and prior == (st.st_size, st.st_mtime_ns):
                summary.unchanged += 1
                unchanged.append(shown)
                continue
            tasks.append(Task(path, st.st_size, st.st_mtime_ns, root=root_of.get(path)))
        if dry_run:
            summary.added = len(tasks)  # at most: duplicates and failures are found by reading
            summary.failed = len(walk_errors)
            summary.errors = walk_errors
        elif walk_errors:
            self.ctx.write(lambda conn: _record_errors(conn, walk_errors, "WalkError"), doing="record ingest errors")
            summary.failed += len(walk_errors)
            summary.errors.extend(walk_errors)
        plan = Plan([os.path.abspath(os.fspath(r)) for r in roots], tasks, unchanged,
                    {to_stored(path) for path, _ in files}, summary)
        if dry_run:  # what finish would mark not current, counted but left as it is
            summary.gone = len(catalog.mark_gone(self.ctx, roots=plan.roots, seen=plan.seen, dry_run=True))
        return plan

    def finish(self, plan: Plan, summary: IngestSummary, started: float) -> IngestSummary:
        """After every task is written: metadata for the unchanged files, and stored paths under
        the roots that the walk did not see marked not current."""
        if self.metadata and plan.unchanged:  # files skipped unread still get the new metadata
            self.ctx.write(lambda conn: catalog.merge_meta(conn, _image_ids_at(conn, plan.unchanged), self.metadata),
                           doing="merge metadata")
        summary.gone = len(catalog.mark_gone(self.ctx, roots=plan.roots, seen=plan.seen))
        summary.elapsed_s = time.perf_counter() - started
        return summary

    def add_items(self, sources: Iterable[Any]) -> tuple[IngestSummary, list[int | None]]:
        """Ingest in-memory images (encoded bytes or PIL images) and single files.

        Returns the summary and, per source, its image id (None where it failed)."""
        started = time.perf_counter()
        summary = IngestSummary()
        tasks = []
        for src in sources:
            if isinstance(src, (str, os.PathLike)):
                path = os.path.abspath(os.fspath(src))
                try:
                    st = os.stat(path)
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:
                    size, mtime = 0, 0  # read_file reports the problem
                tasks.append(Task(path, size, mtime, root=os.path.dirname(path)))
            else:
                tasks.append(Task(None, 0, 0, source=src))
        summary.files_seen = len(tasks)
        summary = self.process(tasks, summary, started)
        return summary, [t.image_id for t in tasks]

    def process(self, tasks: list[Task], summary: IngestSummary, started: float) -> IngestSummary:
        """Read, decode, extract and write ``tasks`` (planned by :meth:`plan`, or a cluster
        worker's partition), adding to ``summary``."""
        self._known = self._known_hashes() if self.preload_known else set()
        batches = extract_stream(tasks, self.load, self.extractor, self.model_run, self.workers)
        return self.write_results(batches, len(tasks), summary, started)

    def write_results(self, batches: Iterable[list[StreamResult[Task]]], total: int, summary: IngestSummary,
                      started: float, *, report: bool = True) -> IngestSummary:
        """Write extracted batches into ``summary``: one transaction per ``write_size`` images
        (consecutive batches joined), numpy's BLAS on one thread meanwhile (a second thread
        only spun beside the small encoding products, taking a core from the database and the
        other writers). A content seen earlier in this run becomes a duplicate (a path of the
        first file's image)."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):
            return self._write_results(_joined(batches, self.write_size), total, summary, started, report=report)

    def _write_results(self, batches: Iterable[list[StreamResult[Task]]], total: int, summary: IngestSummary,
                       started: float, *, report: bool = True) -> IngestSummary:
        pending_dups: list[Task] = []
        seen: set[str] = set()
        done = 0
        retries_before = self.ctx.write_retries
        for batch in batches:
            kept = []
            for r in batch:
                digest = r.item.data_sha256
                if r.features is not None and digest in seen:  # two workers extracted one content
                    r = StreamResult(r.item, None, None, None)
                if r.features is not None and digest:
                    seen.add(digest)
                kept.append(r)
            batch = kept
            pending_dups.extend(r.item for r in batch if r.features is None and r.error is None)
            outcome = self.ctx.write(functools.partial(self._write_batch, batch=batch, dups=pending_dups), doing="ingest")
            summary.added += outcome.added
            summary.duplicates += outcome.duplicates
            summary.failed += len(outcome.errors)
            summary.errors.extend(outcome.errors)
            pending_dups = outcome.unresolved
            done += len(batch)
            if self.progress is not None and report:
                self.progress(IngestProgress(done, total, summary.added, summary.failed, time.perf_counter() - started))
        if pending_dups:
            outcome = self.ctx.write(lambda conn: self._write_batch(conn, [], pending_dups, final=True), doing="ingest")
            summary.duplicates += outcome.duplicates
            summary.failed += len(outcome.errors)
            summary.errors.extend(outcome.errors)
        summary.retries += self.ctx.write_retries - retries_before
        summary.elapsed_s = time.perf_counter() - started
        return summary

    def load(self, task: Task) -> DecodedImage | None:
        """Worker thread: read, hash, skip known content, decode."""
        if task.path is None and not isinstance(task.source, (bytes, bytearray, memoryview)):
            decoded = load_image(task.source, max_pixels=self.max_pixels, draft_size=self.extractor.draft_size,
                                 thumbnail_size=self.extractor.thumbnail_size)  # a PIL image
            task.data_sha256 = digest = image_sha256(task.source)
            task.byte_size = 0
            if self._claim(digest):
                task.duplicate = True
                return None
            task.signature = signature_bytes(thumb_signature(decoded.image))
            return decoded
        data = read_file(task.path) if task.path is not None else bytes(task.source)
        task.byte_size = len(data)
        task.data_sha256 = digest = hashlib.sha256(data).hexdigest()
        if self._claim(digest):
            task.duplicate = True
            return None
        try:
            shown = printable(task.path) if task.path is not None else None
            decoded = decode_bytes(data, path=shown, max_pixels=self.max_pixels, draft_size=self.extractor.draft_size,
                                   thumbnail_size=self.extractor.thumbnail_size)
            task.signature = signature_bytes(thumb_signature(decoded.image))
            return decoded
        except ImgStoreError:
            with self._claim_lock:
                self._claimed.discard(digest)
            raise

    def _claim(self, digest: str) -> bool:
        """True when this content is stored already or another file of this run claimed it;
        else claim it for this file."""
        known = not self.preload_known and self._stored(digest)
        with self._claim_lock:
            if known or digest in self._known or digest in self._claimed:
                return True
            self._claimed.add(digest)
            return False

    def _stored(self, digest: str) -> bool:
        with self.ctx.read("look up a known image") as conn:
            return conn.scalar(
                select(Image.id).join(Feature, Feature.image_id == Image.id)
                .where(Image.sha256 == digest, Feature.space_id == self.space_id)
            ) is not None

    def _known_paths(self, roots: list[str]) -> dict[str, tuple[int, int]]:
        """Current path rows under the roots: path -> (size, mtime_ns)."""
        out: dict[str, tuple[int, int]] = {}
        with self.ctx.read("look up known paths") as conn:
            for root in roots:
                shown = to_stored(root)
                lo = shown.rstrip(os.sep) + os.sep
                hi = lo[:-1] + chr(ord(os.sep) + 1)
                # unchanged means: same file, and its image already has features in this space
                # (a folder ingested with another extractor must still be processed)
                stmt = select(ImagePath.path, ImagePath.file_size, ImagePath.mtime_ns).join(
                    Feature, (Feature.image_id == ImagePath.image_id) & (Feature.space_id == self.space_id)
                ).where(
                    ImagePath.is_current.is_(True),
                    ((ImagePath.path >= lo) & (ImagePath.path < hi)) | (ImagePath.path == shown),
                )
                for path, size, mtime in conn.execute(stmt):
                    out[path] = (int(size), int(mtime))
        return out

    def _known_hashes(self) -> set[str]:
        """Content hashes that already have features in this space."""
        with self.ctx.read("look up known images") as conn:
            return set(
                conn.scalars(
                    select(Image.sha256).join(Feature, Feature.image_id == Image.id).where(Feature.space_id == self.space_id)
                )
            )

    def _write_batch(
        self, conn: Connection, batch: list[StreamResult[Task]], dups: list[Task], *, final: bool = False
    ) -> BatchOutcome:
        """One transaction: new images, their features and codes, paths, error records."""
        now = utcnow()
        if conn.dialect.name == "postgresql":
            # every statement here is a key look-up; a store being filled has no statistics yet
            # (never analysed), and the planner then scanned the whole images table for each
            # batch's hashes: 54 ms a batch at 22k images, growing with the store
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        # rows in one fixed order (content hash, image id, path), the shared bucket rows and the
        # index rows last: concurrent writers never wait on each other in a cycle
        ok = sorted((r for r in batch if r.features is not None), key=lambda r: r.item.data_sha256 or "")
        failed = [r for r in batch if r.error is not None]
        if ok:
            insert_ignore(conn, Image.__table__, [
                {
                    "sha256": r.item.data_sha256,
                    "width": r.decoded.width,
                    "height": r.decoded.height,
                    "format": r.decoded.format,
                    "byte_size": r.item.byte_size,
                    "ingested_at": now,
                    "captured_at": _aware(r.decoded.captured_at),
                    "meta": self.metadata,
                    "signature": r.item.signature,
                }
                for r in ok
                if r.decoded is not None
            ])
        wanted = {r.item.data_sha256 for r in ok} | {t.data_sha256 for t in dups}
        ids = _ids_by_sha(conn, wanted)
        added = 0
        deferred: dict[int, Any] = {}
        if ok:
            new_ids = np.array([ids[_digest(r.item)] for r in ok], dtype=np.int64)
            vectors = np.stack([r.features for r in ok if r.features is not None]).astype(np.float32)  # all of ok
            have = set(
                conn.scalars(
                    select(Feature.image_id).where(Feature.space_id == self.space_id, Feature.image_id.in_(new_ids.tolist()))
                )
            )
            fresh = np.array([i not in have for i in new_ids.tolist()])
            if fresh.any():
                insert_ignore(conn, features_table, [
                    {"space_id": self.space_id, "image_id": int(i), "vector": vector_to_bytes(v)}
                    for i, v in zip(new_ids[fresh], vectors[fresh])
                ])
                if self.label_head is not None:
                    labels.write_labels(conn, self.space_id, new_ids[fresh].tolist(), vectors[fresh], self.label_head)
                order = np.argsort(new_ids[fresh], kind="stable")
                encode_images(self.ctx, conn, self.space_id, new_ids[fresh][order], vectors[fresh][order], deferred=deferred)
                added = int(fresh.sum())
        resolved = [t for t in dups if t.data_sha256 in ids]
        unresolved = [t for t in dups if t.data_sha256 not in ids]
        errors = [(r.item.path if r.item.path else "<in-memory image>", _reason(r.error)) for r in failed]
        if final:
            errors += [
                (t.path if t.path else "<in-memory image>", "same content as another file that could not be decoded")
                for t in unresolved
            ]
            unresolved = []
        paths = [(r.item, ids[_digest(r.item)]) for r in ok] + [(t, ids[_digest(t)]) for t in resolved]
        for task, image_id in paths:
            task.image_id = image_id
        catalog.merge_meta(conn, [i for _, i in paths if i is not None], self.metadata)  # also for content already stored
        _record_paths(conn, [(t.path, t, i) for t, i in paths if t.path is not None], now)
        recorded = [
            (e, x) for e, x in zip(errors, [r.error for r in failed] + [None] * len(errors)) if e[0] != "<in-memory image>"
        ]
        if recorded:
            _record_errors(conn, [e for e, _ in recorded], None, [x for _, x in recorded])
        finish_encoding(conn, deferred)
        return BatchOutcome(added, len(resolved) + (len(ok) - added), errors, unresolved)


def model_run_size(extractor: Extractor, batch_size: int) -> int:
    """Images per model run: :data:`CPU_MODEL_RUN` at most on a CPU, ``batch_size`` on a GPU
    (an extractor's ``device`` other than ``"cpu"``)."""
    if getattr(extractor, "device", "cpu") != "cpu":
        return batch_size
    return max(1, min(batch_size, CPU_MODEL_RUN))


def _joined(batches: Iterable[list[StreamResult[Task]]], size: int) -> Iterator[list[StreamResult[Task]]]:
    """Consecutive batches joined until they hold at least ``size`` results (the last may hold
    fewer)."""
    held: list[StreamResult[Task]] = []
    for batch in batches:
        held.extend(batch)
        if len(held) >= size:
            yield held
            held = []
    if held:
        yield held


def _digest(task: Task) -> str:
    """The content hash of a task a worker read (every task with features or a duplicate has one)."""
    assert task.data_sha256 is not None, "a task reaches the writer only once a worker hashed it"
    return task.data_sha256


def _reason(error: BaseException | None) -> str:
    if isinstance(error, DecodeError):
        return error.reason
    return str(error)


def _aware(value: datetime | None) -> datetime | None:
    """EXIF times are naive local camera times; store them as given, tagged UTC for the column."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _image_ids_at(conn: Connection, stored_paths: list[str]) -> list[int]:
    out: list[int] = []
    for part in chunks(stored_paths, IN_CHUNK):
        out += conn.scalars(select(ImagePath.image_id).where(ImagePath.path.in_(part), ImagePath.is_current.is_(True)))
    return out


def _ids_by_sha(conn: Connection, shas: set[str | None]) -> dict[str, int]:
    wanted = sorted(s for s in shas if s)
    out: dict[str, int] = {}
    for part in chunks(wanted, IN_CHUNK):
        out.update((sha, int(i)) for i, sha in conn.execute(select(Image.id, Image.sha256).where(Image.sha256.in_(part))))
    return out


def _record_paths(conn: Connection, paths: list[tuple[str, Task, int]], now: datetime) -> None:
    """Upsert the rows of (path, its task, its image id); a path that now holds other content has
    its old row made not current."""
    if not paths:
        return
    paths = sorted(paths, key=lambda p: to_stored(p[0]))
    shown = [to_stored(path) for path, _, _ in paths]
    for part in chunks(shown, IN_CHUNK):
        conn.execute(update(ImagePath).where(ImagePath.path.in_(part), ImagePath.is_current.is_(True)).values(is_current=False))
        conn.execute(delete(IngestError).where(IngestError.path.in_(part)))
    stmt = insert_stmt(conn, ImagePath.__table__)
    stmt = stmt.on_conflict_do_update(
        index_elements=["path", "image_id"],
        set_={
            "file_size": stmt.excluded.file_size,
            "mtime_ns": stmt.excluded.mtime_ns,
            "last_seen_at": stmt.excluded.last_seen_at,
            "is_current": True,
            "root": stmt.excluded.root,
            "moved_to": None,
        },
    )
    rows = [
        {"path": p, "image_id": image_id, "file_size": t.size, "mtime_ns": t.mtime_ns,
         "first_seen_at": now, "last_seen_at": now, "is_current": True,
         "root": to_stored(t.root) if t.root else None, "moved_to": None}
        for p, (_, t, image_id) in zip(shown, paths)
    ]
    for start in range(0, len(rows), 1000):
        conn.execute(stmt, rows[start : start + 1000])


def _record_errors(
    conn: Connection, errors: list[tuple[str, str]], error_type: str | None, excs: list[Any] | None = None
) -> None:
    now = utcnow()
    kinds = [type(e).__name__ if e is not None else None for e in (excs or [])]
    kinds += [None] * (len(errors) - len(kinds))
    rows: list[dict[str, Any]] = sorted((  # in path order, as every writer locks rows
        {"path": to_stored(path), "reason": printable(reason)[:2000], "occurred_at": now,
         "error_type": error_type or kind or "DecodeError"}
        for (path, reason), kind in zip(errors, kinds)  # paths as given; stored escaped (imgstore.paths)
    ), key=lambda row: row["path"])
    stmt = insert_stmt(conn, IngestError.__table__)
    stmt = stmt.on_conflict_do_update(
        index_elements=["path"],
        set_={"reason": stmt.excluded.reason, "error_type": stmt.excluded.error_type, "occurred_at": stmt.excluded.occurred_at},
    )
    conn.execute(stmt, rows)


def image_sha256(img: Any) -> str:
    """Content hash of an in-memory PIL image: its mode, size and pixels."""
    h = hashlib.sha256(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


