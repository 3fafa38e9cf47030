"""Watched folders: the store follows folders as image files come, change, move and go.

What ``imgstore watch FOLDER...`` and ``imgstore serve --watch FOLDER`` run. A :class:`Watcher`
follows the file system's events (``watchdog``: inotify on Linux) and hands them, coalesced by
path (:class:`Pending`, a pure structure), to the ingest of :mod:`imgstore.ingest` in batches,
on its own thread: the observer's thread only adds to a dictionary, so a burst of events never
waits behind the model.

- A file is read once it is complete: when its writer closed it (inotify's close-after-write),
  when it was renamed into place, or, without either (a file moved in from another file
  system shows up as created, with no close), once nothing happened to it for ``settle_s``
  and its modification time is that old too.
- What ``imgstore ingest`` does to a file, this does: unchanged files (path, size and mtime)
  are skipped unread, content already stored only gets the new path, a changed file gets its
  new image (the old one stays, not current, as history), bad files are recorded as errors.
  Each file's ``root`` is the watched folder, as an ingest of that folder records it.
- A deleted file, or one moved out of the folders, is marked not current, as an ingest's
  rescan marks a vanished file: its image drops out of search results (``include_stale``
  shows it) and its history stays. A file renamed inside the folders becomes a new path of
  the same image (read and hashed, never decoded) and its old path not current.
- A new folder is walked once it settled, so files written into it before its watch existed
  are found; files still being written (an open file, a recent modification time) are held
  back until they are complete.
- On start, whenever events were lost (the kernel's queue overflowed) and when the watch
  itself stopped (watchdog's threads ended: it is started again), each folder is rescanned as
  ``imgstore ingest FOLDER`` would: what changed meanwhile is picked up.
- A watched folder that disappears (deleted, a drive unmounted) marks nothing: its images stay
  as they were, and the watcher says so.

Every ingest transaction (``batch_size`` images) is atomic. :meth:`Watcher.stop` ends the run
between two of them; Ctrl-C (``KeyboardInterrupt``) or a kill may end it anywhere, and the
transaction it interrupted is rolled back: nothing is half-written, and what was not ingested
yet is found by the next start's rescan.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import select
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from . import catalog, indexing
from .errors import ConfigError, DatabaseError, NotFoundError
from .ingest import IMAGE_EXTENSIONS, Ingester, IngestProgress, IngestSummary, Plan, Task
from .models import Feature, ImagePath
from .paths import from_stored, printable, to_stored
from .repository import ImageStore
from .sqlhelpers import IN_CHUNK, chunks
from .vectors import get_or_create_space

log = logging.getLogger(__name__)

#: Seconds a file without a close event (moved in from elsewhere, or written by a platform or
#: program that reports none) must stay unchanged before it is read; also how long a new folder
#: settles before it is walked.
SETTLE_S = 2.0
#: Seconds a batch waits, once something is due, for more of a burst to arrive.
GATHER_S = 0.2
#: Files per batch (and per reported line); the ingest writes them ``batch_size`` at a time.
MAX_FILES = 256
#: The events asked of the kernel. Not opens, reads or individual writes: the ingest's own reads
#: would come back as events, and a file being copied would send one per write call.
EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileClosedEvent, FileDeletedEvent, FileMovedEvent,
    DirCreatedEvent, DirDeletedEvent, DirMovedEvent, EventsLostEvent,
]

ChangeKind = Literal["created", "closed", "deleted", "moved", "dir_created", "dir_deleted", "dir_moved", "lost"]


@dataclass(frozen=True)
class Change:
    """One file-system event as the watcher reads it (what :class:`Pending` coalesces).

    ``created``: a file appeared (being written, or moved in from outside); ``closed``: a file
    was closed after writing; ``moved``: renamed from ``path`` to ``dest`` inside the watched
    folders; ``deleted``: removed or moved out; the ``dir_`` kinds are the same for a folder;
    ``lost``: events under the watched folder ``path`` were lost (rescan it)."""

    kind: ChangeKind
    path: str
    dest: str = ""


def is_image_name(path: str) -> bool:
    """Whether an ingest of a folder would try this file (its extension is an image's)."""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def is_under(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass
class Batch:
    """What :meth:`Pending.take` hands over: every path once."""

    files: list[str] = field(default_factory=list)  # image files to (re)ingest, the complete ones first
    closed: set[str] = field(default_factory=set)  # those of them known complete
    scans: list[str] = field(default_factory=list)  # new folders to walk
    gone: list[str] = field(default_factory=list)  # files and folders deleted or moved away
    moves: dict[str, str] = field(default_factory=dict)  # file renamed inside the folders: new path -> first old path
    rescans: list[str] = field(default_factory=list)  # watched folders to rescan whole

    def __bool__(self) -> bool:
        return bool(self.files or self.scans or self.gone or self.rescans)


class Pending:
    """Changes coalesced by path until they are due: many events for one path make one entry,
    a file created then deleted makes one deletion, a rename carries the state of the file it
    renames. A pure structure (times are given, nothing is read from disk), so its rules are
    tested on their own; :class:`Watcher` guards it with a lock.

    Due: a complete file (closed after writing, or renamed into place) at once; a file without
    a close event ``settle_s`` after its last event; a new folder ``settle_s`` after it
    appeared; deletions and rescans at once. Files are kept in the order of their last event,
    so finding what is due never scans what is not."""

    def __init__(self, settle_s: float = SETTLE_S) -> None:
        self.settle_s = settle_s
        self.complete: dict[str, float] = {}  # path -> time (monotonic) of its last event, oldest first
        self.writing: dict[str, float] = {}  # files seen appearing, not known complete yet; oldest first
        self.scans: dict[str, float] = {}
        self.gone: dict[str, None] = {}  # an ordered set
        self.moves: dict[str, str] = {}
        self.rescans: dict[str, None] = {}

    def __len__(self) -> int:
        return len(self.complete) + len(self.writing) + len(self.scans) + len(self.gone) + len(self.rescans)

    def add(self, change: Change, now: float) -> bool:
        """Take one change; returns whether something became due at once (worth waking for)."""
        kind, path, dest = change.kind, change.path, change.dest
        if kind == "lost":
            self.rescans[path] = None
        elif kind == "dir_created":
            self.gone.pop(path, None)
            self.scans[path] = now
            return False
        elif kind == "dir_deleted":
            self._forget_under(path)
            self.gone[path] = None
        elif kind == "dir_moved":  # its files come as moves of their own (watchdog walks the folder for them)
            self.gone[path] = None
            self.gone.pop(dest, None)
            self.scans[dest] = now
        elif kind == "moved":
            self._moved(path, dest, now)
        elif not is_image_name(path):
            return False  # sidecars, videos, temporary files: an ingest of the folder ignores them too
        elif kind == "created":  # a new file: whatever was renamed here before is gone
            self.moves.pop(path, None)
            self._set(path, now, complete=False)
            return False
        elif kind == "closed":
            if path not in self.writing:  # written again after it was complete: new content, not the renamed one
                self.moves.pop(path, None)
            self._set(path, now, complete=True)
        elif kind == "deleted":
            self._drop(path)
            self.moves.pop(path, None)
            self.gone[path] = None
        return True

    def _drop(self, path: str) -> bool | None:
        """Forget a pending file; returns whether it was complete (None: not pending)."""
        if self.complete.pop(path, None) is not None:
            return True
        if self.writing.pop(path, None) is not None:
            return False
        return None

    def _set(self, path: str, now: float, *, complete: bool) -> None:
        self._drop(path)  # then at the end: the order is the order of last events
        (self.complete if complete else self.writing)[path] = now
        self.gone.pop(path, None)

    def _moved(self, src: str, dest: str, now: float) -> None:
        was: bool | None = None
        origin: str | None = None
        if is_image_name(src):
            was = self._drop(src)
            origin = self.moves.pop(src, src)
            self.gone[src] = None
        if not is_image_name(dest):
            return  # renamed to a name an ingest ignores: as good as deleted
        self._set(dest, now, complete=was is not False)  # a rename completes a write (a download's .part renamed)
        if origin is not None:
            self.moves[dest] = origin
        else:
            self.moves.pop(dest, None)

    def _forget_under(self, folder: str) -> None:
        for table in (self.complete, self.writing, self.scans, self.gone, self.moves):
            for path in [p for p in table if is_under(p, folder)]:
                del table[path]

    def in_flight(self) -> set[str]:
        """Files seen appearing and not known complete yet."""
        return set(self.writing)

    def next_due(self) -> float | None:
        """When the first entry is due (monotonic time; None: nothing pending)."""
        if self.gone or self.rescans or self.complete:
            return float("-inf")
        times = [t + self.settle_s for t in self.scans.values()]
        if self.writing:
            times.append(next(iter(self.writing.values())) + self.settle_s)
        return min(times) if times else None

    def take(self, now: float, limit: int = MAX_FILES) -> Batch:
        """Everything due at ``now``: deletions, rescans, due folders, and up to ``limit`` due
        files (the rest stay for the next batch)."""
        batch = Batch(rescans=list(self.rescans), gone=list(self.gone))
        self.rescans.clear()
        self.gone.clear()
        for table, complete in ((self.complete, True), (self.writing, False)):
            for path, last in list(table.items()):
                if len(batch.files) >= limit or not (complete or now - last >= self.settle_s):
                    break  # oldest first: the rest is not due either
                del table[path]
                batch.files.append(path)
                if complete:
                    batch.closed.add(path)
                if path in self.moves:
                    batch.moves[path] = self.moves.pop(path)
        for folder, seen in list(self.scans.items()):
            if now - seen >= self.settle_s:
                del self.scans[folder]
                batch.scans.append(folder)
        return batch

    def hold(self, path: str, now: float) -> None:
        """A file found but not complete yet: due again after ``settle_s`` (unless an event
        about it came meanwhile, which then decides)."""
        if path not in self.complete and path not in self.writing:
            self.writing[path] = now

    def put_back(self, batch: Batch, now: float) -> None:
        """A batch that failed (the database was unreachable): pending again, behind anything
        newer about the same paths."""
        for path in batch.files:
            if path not in self.complete and path not in self.writing and path not in self.gone:
                (self.complete if path in batch.closed else self.writing)[path] = now
        for dest, src in batch.moves.items():
            self.moves.setdefault(dest, src)
        for path in batch.gone:
            if path not in self.complete and path not in self.writing:
                self.gone[path] = None
        for folder in batch.scans:
            self.scans.setdefault(folder, now - self.settle_s)
        for folder in batch.rescans:
            self.rescans[folder] = None


@dataclass
class WatchBatch:
    """What one batch did (one line of ``imgstore watch``). ``added``: files recorded at a new
    path (their content new, or a copy of a stored image); ``updated``: stored paths whose
    file changed, re-ingested; ``moved``: files renamed inside the folders (old, new);
    ``removed``: stored paths whose file is gone, now not current (out of search results);
    ``failed``: (path, reason), recorded as ingest errors; ``rescanned``: the watched folders
    this batch rescanned whole (at start, or after lost events)."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    moved: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    unchanged: int = 0
    new_images: int = 0  # images whose content was not stored before (the rest of ``added``/``updated`` are copies)
    rescanned: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.added or self.updated or self.moved or self.removed or self.failed or self.rescanned)

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": len(self.added), "updated": len(self.updated), "moved": len(self.moved),
            "removed": len(self.removed), "failed": len(self.failed), "unchanged": self.unchanged,
            "new_images": self.new_images, "rescanned": self.rescanned, "elapsed_s": round(self.elapsed_s, 3),
            "paths": {"added": self.added, "updated": self.updated, "moved": [list(m) for m in self.moved],
                      "removed": self.removed},
            "errors": [{"path": p, "reason": r} for p, r in self.failed],
        }


@dataclass
class _Work:
    """One batch planned (:meth:`Watcher._plan`)."""

    rescans: list[str]  # watched folders rescanned whole
    folders: list[str]  # folders walked: the rescans and new folders
    tasks: list[Task]  # complete files to read
    unchanged: list[str]  # stored paths (database text) of files found unchanged
    gone: list[str]  # paths to mark not current (files or folders)
    seen: set[str]  # stored paths the walks saw
    walk_errors: list[tuple[str, str]]  # what the walks could not read (recorded)
    stored: dict[str, tuple[int, int, bool]]  # stored current paths among those planned, before the batch


class _Stopped(Exception):
    """Raised between two ingest transactions once :meth:`Watcher.stop` was called."""


class _Handler(FileSystemEventHandler):
    """Runs on the observer's thread: turns each event into a :class:`Change`, nothing more."""

    def __init__(self, watcher: Watcher, root: str) -> None:
        self.watcher = watcher
        self.root = root

    def dispatch(self, event: FileSystemEvent) -> None:
        src, dest = os.fsdecode(event.src_path), os.fsdecode(event.dest_path)
        change: Change | None = None
        if isinstance(event, EventsLostEvent):
            change = Change("lost", self.root)
        elif isinstance(event, DirMovedEvent):
            change = Change("dir_moved", src, dest) if src and dest else Change("dir_deleted" if src else "dir_created",
                                                                                 src or dest)
        elif isinstance(event, FileMovedEvent):
            change = Change("moved", src, dest) if src and dest else Change("deleted" if src else "created", src or dest)
        elif isinstance(event, DirCreatedEvent):
            change = Change("dir_created", src)
        elif isinstance(event, DirDeletedEvent):
            change = Change("dir_deleted", src)
        elif isinstance(event, FileCreatedEvent):
            change = Change("created", src)
        elif isinstance(event, FileClosedEvent):
            change = Change("closed", src)
        elif isinstance(event, FileDeletedEvent):
            change = Change("deleted", src)
        if change is not None:
            self.watcher.add(change)


def watched_folders(folders: Iterable[str | os.PathLike[str]]) -> list[str]:
    """The folders to watch, absolute, ``~`` expanded, each once (a folder inside another
    watched one is covered by it). A missing one raises :class:`NotFoundError`, a file
    :class:`ConfigError`, before anything is watched or written."""
    roots: list[str] = []
    for folder in folders:
        path = os.path.abspath(os.path.expanduser(os.fspath(folder)))
        if not os.path.lexists(path):
            raise NotFoundError(f"no such folder: {printable(path)}")
        if not os.path.isdir(path):
            raise ConfigError(f"{printable(path)} is not a folder: watch takes folders (`imgstore ingest FILE` adds one file)")
        roots.append(path)
    roots = sorted(set(roots))
    return [r for r in roots if not any(r != o and is_under(r, o) for o in roots)]


class Watcher:
    """Keeps ``store`` up to date with ``folders``: see the module's description.

    :meth:`run` watches on the calling thread until :meth:`stop` (or ``KeyboardInterrupt``);
    :meth:`start` runs it on a thread of its own (a server). ``on_batch`` is called with each
    :class:`WatchBatch` that did something (and with each rescan's, even an empty one);
    ``on_message`` with a one-line note of what went wrong (the database unreachable: the batch
    is retried; a watched folder gone). ``extractor``: the features to compute (default: the
    feature space the store searches, else the default extractor). The other options are the
    ingest's (``tags`` and ``metadata`` are set on every image found, as ``ingest`` does)."""

    def __init__(
        self,
        store: ImageStore,
        folders: Sequence[str | os.PathLike[str]],
        *,
        recursive: bool = True,
        extractor: str | None = None,
        batch_size: int = 64,
        workers: int | None = None,
        tags: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
        settle_s: float = SETTLE_S,
        gather_s: float = GATHER_S,
        max_files: int = MAX_FILES,
        auto_index: bool = True,
        rescan: bool = True,
        on_batch: Callable[[WatchBatch], None] | None = None,
        on_message: Callable[[str], None] | None = None,
    ) -> None:
        if isinstance(folders, (str, os.PathLike)):
            folders = [folders]
        if settle_s <= 0 or gather_s < 0 or max_files < 1 or batch_size < 1:
            raise ConfigError("settle_s must be positive, gather_s 0 or more, max_files and batch_size 1 or more")
        self.store = store
        self.roots = watched_folders(folders)
        self.recursive = recursive
        self.extractor = extractor
        self.batch_size = batch_size
        self.workers = workers
        self.metadata = dict(metadata or {})
        if tags:
            self.metadata["tags"] = sorted(set(tags))
        self.settle_s, self.gather_s, self.max_files = settle_s, gather_s, max_files
        self.auto_index = auto_index
        self.rescan = rescan
        self.on_batch = on_batch or (lambda _batch: None)
        self.on_message = on_message or (lambda text: log.warning("%s", text))
        #: set once the folders are watched (events from then on are not missed)
        self.watching = threading.Event()
        self._pending = Pending(settle_s)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost_roots: set[str] = set()
        self._observer: BaseObserver | None = None  # the current one (a test may stop its watches)

    # -- life cycle ---------------------------------------------------------------------------

    def add(self, change: Change) -> None:
        """Take one change (the observer's thread calls this for every event); the batch
        thread is woken only for what is due at once (else its own timer finds it)."""
        with self._cond:
            if self._pending.add(change, time.monotonic()):
                self._cond.notify()

    def start(self) -> None:
        """Watch on a background thread (what ``serve --watch`` does); :meth:`stop` ends it."""
        self._thread = threading.Thread(target=self._run_reporting, name="imgstore-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """End the run after the ingest transaction in progress (if any), and wait for it."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run_reporting(self) -> None:
        try:
            self.run()
        except Exception as exc:  # a server's background thread: said in one line (and logged, at debug level)
            log.debug("watching stopped", exc_info=True)
            self.on_message(f"watching stopped: {exc}")

    def run(self) -> None:
        """Watch until :meth:`stop`: rescan the folders first (``rescan``), then ingest what the
        events ask for, batch by batch."""
        name = self.extractor or self.store.searched_extractor()
        ex = self.store.extractor(name)
        self.extractor = ex.name
        space_id = self.store.transaction(lambda conn: get_or_create_space(conn, ex.name, ex.dim, ex.preprocess_version),
                                          what="register a feature space")
        observer = self._observe(self.roots)
        try:
            if self.rescan:
                for root in self.roots:
                    self.add(Change("lost", root))
            self.watching.set()
            backoff = 1.0
            while not self._stop.is_set():
                if not _alive(observer):  # the watch itself failed: watch again, and rescan what it may have missed
                    observer = self._observe_again(observer)
                batch = self._next_batch()
                if not batch:
                    continue
                try:
                    self._process(batch, ex.name, space_id)
                    backoff = 1.0
                except _Stopped:
                    break
                except DatabaseError as exc:  # a server restart, a full disk: kept, and tried again
                    self.on_message(f"{exc}; trying again in {backoff:.0f} s")
                    with self._cond:
                        self._pending.put_back(batch, time.monotonic())
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 60.0)
        finally:
            self.watching.clear()
            observer.stop()
            observer.join(timeout=10)

    def _observe(self, roots: list[str]) -> BaseObserver:
        """An observer of ``roots``, started: the kernel's watches exist once this returns."""
        observer = Observer()
        for root in roots:
            try:
                observer.schedule(_Handler(self, root), root, recursive=self.recursive, event_filter=EVENTS)
            except OSError as exc:
                raise ConfigError(f"cannot watch {printable(root)}: {exc.strerror or exc}") from exc
        try:
            observer.start()
        except OSError as exc:  # ENOSPC: more folders than inotify's limit of watches
            raise ConfigError(f"cannot watch {', '.join(map(printable, roots))}: {exc.strerror or exc} (the limit of "
                              "watched folders is sysctl fs.inotify.max_user_watches)") from exc
        self._observer = observer
        return observer

    def _observe_again(self, observer: BaseObserver) -> BaseObserver:
        """An observer thread or one of its watches ended (a watched folder went, or an error
        in watchdog): watch the folders that are still there again, and rescan them."""
        observer.stop()
        observer.join(timeout=10)
        live = [r for r in self.roots if os.path.isdir(r)]
        if len(live) == len(self.roots):
            self.on_message("the file-system watch stopped; watching again, and rescanning the folders")
        self._say_lost_roots(live)
        observer = self._observe(live)
        for root in live:
            self.add(Change("lost", root))
        return observer

    def _next_batch(self) -> Batch:
        """The next due batch, or an empty one after a second with nothing due."""
        with self._cond:
            due = self._pending.next_due()
            now = time.monotonic()
            if due is None or due > now:
                self._cond.wait(1.0 if due is None else min(1.0, due - now))
                due = self._pending.next_due()
                if due is None or due > time.monotonic() or self._stop.is_set():
                    return Batch()
        if self._stop.wait(self.gather_s):  # more of a burst may come meanwhile
            return Batch()
        with self._cond:
            return self._pending.take(time.monotonic(), self.max_files)

    # -- one batch ----------------------------------------------------------------------------

    def _process(self, batch: Batch, extractor: str, space_id: int) -> None:
        """One batch: plan it, ingest its files part by part (a line each), mark what went."""
        started = time.perf_counter()
        job = Ingester(self.store.ctx, self.store.extractor(extractor), space_id, batch_size=self.batch_size,
                       workers=self.workers, metadata=self.metadata, progress=self._check_stop)
        work = self._plan(batch, job, space_id)
        moved_from: set[str] = set()
        new_images = 0
        parts = list(chunks(work.tasks, self.max_files)) or [[]]
        for n, part in enumerate(parts):
            report = WatchBatch(rescanned=work.rescans if n == 0 else [])
            if n == 0:
                report.failed = list(work.walk_errors)
                report.unchanged = len(work.unchanged)
            if part:
                summary = job.process(list(part), IngestSummary(), time.perf_counter())
                report.new_images = summary.added
                new_images += summary.added
                report.failed += summary.errors
                self._classify(report, part, batch.moves, work.stored)
                moved_from.update(src for src, _ in report.moved)
            if n < len(parts) - 1:  # each written part is said at once; the last one after the deletions
                report.elapsed_s, started = time.perf_counter() - started, time.perf_counter()
                self._emit(report)
        if self.metadata and work.unchanged:  # files skipped unread still get --tag/--meta, as in an ingest
            job.finish(Plan([], [], work.unchanged, set(), IngestSummary()), IngestSummary(), started)
        marked = catalog.mark_gone(self.store.ctx, roots=work.folders, seen=work.seen) if work.folders else []
        marked += catalog.mark_gone(self.store.ctx, roots=work.gone) if work.gone else []
        report.removed = sorted(set(marked) - moved_from)
        report.elapsed_s = time.perf_counter() - started
        self._emit(report)
        if self.auto_index and new_images:  # as an ingest does at its end (the index of a space that grew)
            indexing.maybe_auto_index(self.store.ctx, space_id)

    def _plan(self, batch: Batch, job: Ingester, space_id: int) -> _Work:
        """What a batch asks for, as an ingest would plan it: folders to rescan or walk (by
        :meth:`Ingester.plan`), named files that changed (one query for all of them), paths to
        mark not current (under a watched folder that is still there)."""
        live = [r for r in self.roots if os.path.isdir(r)]
        self._say_lost_roots(live)
        rescans = [r for r in batch.rescans if r in live]
        folders = _outermost(rescans + [d for d in batch.scans if self.recursive and os.path.isdir(d)
                                        and any(is_under(d, r) for r in live)])
        walk = job.plan(folders, recursive=self.recursive) if folders else None
        planned = list(walk.tasks) if walk is not None else []
        files: dict[str, os.stat_result] = {}
        gone = list(batch.gone)
        for path in batch.files:
            if any(is_under(path, f) for f in folders):
                continue  # the folder's walk found it
            st = _regular_file(path)
            if st is None:
                gone.append(path)  # went again before its turn (or a link: folder walks skip those too)
            else:
                files[path] = st
        stored = self._stored_paths([*files, *(t.path for t in planned if t.path), *batch.moves.values()], space_id)
        unchanged = list(walk.unchanged) if walk is not None else []
        for path, st in files.items():  # what Ingester.plan does for a walked folder, for named files
            prior = stored.get(path)
            if prior is not None and prior[2] and prior[:2] == (st.st_size, st.st_mtime_ns):
                unchanged.append(to_stored(path))
            else:
                planned.append(Task(path, st.st_size, st.st_mtime_ns))
        return _Work(
            rescans=rescans, folders=folders, tasks=self._complete(planned, batch.closed), unchanged=unchanged,
            gone=[g for g in gone if any(is_under(g, r) and g != r for r in live)],  # never a watched folder itself
            seen=walk.seen if walk is not None else set(), walk_errors=walk.summary.errors if walk is not None else [],
            stored=stored)

    @staticmethod
    def _classify(report: WatchBatch, part: Sequence[Task], moves: dict[str, str],
                  stored: dict[str, tuple[int, int, bool]]) -> None:
        """Each written file of ``part`` as added, updated (its path was stored) or moved (its
        old path was stored)."""
        for task in part:
            if task.image_id is None or task.path is None:
                continue  # failed: in report.failed
            src = moves.get(task.path)
            if src is not None and src in stored:
                report.moved.append((src, task.path))
            elif task.path in stored:
                report.updated.append(task.path)
            else:
                report.added.append(task.path)

    def _emit(self, report: WatchBatch) -> None:
        if report:
            self.on_batch(report)

    def _complete(self, tasks: list[Task], closed: set[str]) -> list[Task]:
        """The planned files that are complete, each given its watched folder as root (as an
        ingest of that folder records it); the others (an event said it is being written, or its
        modification time is recent) are held back, pending again."""
        now_wall = time.time()
        with self._cond:
            in_flight = self._pending.in_flight()
        ready: list[Task] = []
        held: list[str] = []
        for task in tasks:
            path = task.path
            assert path is not None, "a planned file has a path"
            if path not in closed and (path in in_flight or 0 <= now_wall - task.mtime_ns / 1e9 < self.settle_s):
                held.append(path)
                continue
            task.root = max((r for r in self.roots if is_under(path, r)), key=len, default=task.root)
            ready.append(task)
        if held:
            with self._cond:
                now = time.monotonic()
                for path in held:
                    self._pending.hold(path, now)
                self._cond.notify()
        return ready

    def _stored_paths(self, paths: list[str], space_id: int) -> dict[str, tuple[int, int, bool]]:
        """Those of ``paths`` that are stored current paths (before this batch writes): path ->
        (file size, mtime in ns, whether its image has features in this space)."""
        found: dict[str, tuple[int, int, bool]] = {}
        if not paths:
            return found
        in_space = (Feature.image_id == ImagePath.image_id) & (Feature.space_id == space_id)
        with self.store.ctx.read("look up stored paths") as conn:
            for part in chunks(sorted({to_stored(p) for p in paths}), IN_CHUNK):
                rows = conn.execute(
                    select(ImagePath.path, ImagePath.file_size, ImagePath.mtime_ns, Feature.image_id.is_not(None))
                    .outerjoin(Feature, in_space).where(ImagePath.path.in_(part), ImagePath.is_current.is_(True)))
                for path, size, mtime, has_features in rows:
                    found[from_stored(path)] = (int(size or 0), int(mtime or 0), bool(has_features))
        return found

    def _check_stop(self, _progress: IngestProgress) -> None:
        """Called after every written transaction: where a stop takes effect."""
        if self._stop.is_set():
            raise _Stopped

    def _say_lost_roots(self, live: list[str]) -> None:
        for root in self.roots:
            if root not in live and root not in self._lost_roots:
                self._lost_roots.add(root)
                self.on_message(f"watched folder {printable(root)} is gone (deleted, moved or unmounted): its images are "
                                "kept as they were; watch it again once it is back")


def _alive(observer: BaseObserver) -> bool:
    return observer.is_alive() and all(emitter.is_alive() for emitter in observer.emitters)


def _regular_file(path: str) -> os.stat_result | None:
    """The file's ``stat``, or None when it is gone or not a regular file (a link is not followed)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _outermost(folders: Iterable[str]) -> list[str]:
    """Each folder once, without those inside another one of them."""
    unique = sorted(set(folders))
    return [f for f in unique if not any(f != o and is_under(f, o) for o in unique)]
