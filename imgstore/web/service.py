"""What one ``imgstore serve`` process holds and does, over the library's public API only.

:class:`Service` is the server's state: the open store, thumbnails, the batchers that share
model calls between concurrent uploads, background jobs, page notes, and the options the server
was started with. The JSON API (:mod:`imgstore.web.api`) and the pages
(:mod:`imgstore.web.pages`) both act through it; it talks to the store through ``ImageStore``'s
methods, never its context, models or SQL.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import queue
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage

from ..decode import check_size, load_fitted, load_image, read_file, resolve_max_pixels
from ..dedup import DuplicateGroup, DuplicatesState, describe_progress
from ..dedup_apply import ApplyReport, UndoReport, journals
from ..errors import ConfigError, DecodeError, NotFoundError
from ..features.base import Extractor
from ..hashing import available_methods
from ..jobs import Job, Jobs
from ..repository import ImageStore
from ..types import SearchOptions, SearchResult

#: Largest upload accepted (bytes). The picture it holds is limited by the store's pixel limit
#: (``ImageStore.max_pixels``, read from the header before decoding), as on every other path.
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
THUMB_SIZES = (128, 256, 512)
#: Duplicate searches kept (one per setting asked for, most recent first); their groups stay
#: in memory, so an API client trying many ``min_cosine`` values cannot pile them up.
KEPT_SEARCHES = 6
#: A write that needs the duplicate groups (resolving them) waits at most this long for them.
RESOLVE_WAIT_S = 600.0


class Overloaded(Exception):
    """More uploads are waiting for the model than the queue holds: answered with 503."""


class Batcher:
    """Concurrent uploads share model calls. A request announces itself when it starts decoding
    (:meth:`announce`); the first image in then waits at most ``max_wait_s`` for the images
    announced after it, and one ``extract`` call embeds up to ``max_batch`` of them, so
    throughput under load approaches the model's batched rate instead of its batch-1 rate,
    while a lone upload on an idle server waits for nobody. A queue longer than ``max_queue``
    refuses new images at once (:class:`Overloaded`)."""

    def __init__(self, extract: Callable[[list[PILImage.Image]], npt.NDArray[np.float32]], *, max_batch: int = 16,
                 max_wait_s: float = 0.005, max_queue: int = 64) -> None:
        self.extract = extract
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.queue: queue.Queue[tuple[PILImage.Image, Future[npt.NDArray[np.float32]]] | None] = queue.Queue()
        self.calls = 0  # model calls made
        self.images = 0  # images embedded
        self._coming = 0  # announced images not yet taken into a batch
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="imgstore-batcher", daemon=True)
        self.thread.start()

    def announce(self) -> None:
        """An image is on its way (being decoded): a batch being formed may wait for it."""
        if self.queue.qsize() + self._coming >= self.max_queue:
            raise Overloaded(f"{self.queue.qsize() + self._coming} images are waiting for the model; try again shortly")
        with self._lock:
            self._coming += 1

    def withdraw(self) -> None:
        """An announced image will not come (it failed to decode)."""
        with self._lock:
            self._coming -= 1

    def embed(self, image: PILImage.Image, timeout_s: float = 120.0, *, announced: bool = False) -> npt.NDArray[np.float32]:
        if not announced:
            self.announce()
        future: Future[npt.NDArray[np.float32]] = Future()
        self.queue.put((image, future))
        return future.result(timeout=timeout_s)

    def _take(self) -> None:
        with self._lock:
            self._coming = max(0, self._coming - 1)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            self._take()
            batch = [item]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0 or (self._coming <= 0 and self.queue.empty()):
                    break  # nobody else is on the way: run now
                try:
                    nxt = self.queue.get(timeout=left)
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                self._take()
                batch.append(nxt)
            try:
                vectors = self.extract([image for image, _ in batch])
                self.calls += 1
                self.images += len(batch)
                for (_, future), vector in zip(batch, vectors):
                    future.set_result(vector)
            except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error
                for _, future in batch:
                    future.set_exception(exc)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)


class Thumbnails:
    """Small JPEG thumbnails, made once per (content, size) and kept on disk: beside an SQLite
    file (``<db>.thumbs/``), or under the user's cache folder for PostgreSQL, keyed by the
    image's SHA-256 so renames and moves never make them stale."""

    def __init__(self, store: ImageStore, folder: str | os.PathLike[str] | None = None) -> None:
        if folder is None:
            db_file = store.sqlite_file
            if db_file is not None:
                folder = f"{db_file}.thumbs"
            else:
                key = hashlib.sha256(store.display_url.encode()).hexdigest()[:16]
                folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imgstore" / "thumbs" / key
        self.folder = Path(folder)
        self.store = store

    def get(self, image_id: int, size: int) -> bytes:
        if size not in THUMB_SIZES:
            raise ConfigError(f"thumbnail size must be one of {', '.join(map(str, THUMB_SIZES))}")
        found = self.store.thumbnail_source(image_id)  # two small look-ups; the file only when not cached
        path = self.folder / found.sha256[:2] / f"{found.sha256}-{size}.jpg"
        if path.exists():
            return path.read_bytes()
        if found.path is None:
            raise NotFoundError(f"image {image_id} has no current file to make a thumbnail from")
        img = load_fitted(found.path, size, max_pixels=self.store.max_pixels)  # a JPEG's draft, a HEIC's own thumbnail
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=85)
        data = buf.getvalue()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # made once; concurrent makers write the same bytes
        return data




class Service:
    """What one server process holds: the open store, thumbnails, the batchers that share model
    calls, background jobs, and the options the server was started with. The API (this module)
    and the pages (:mod:`imgstore.web`) both act through it. ``max_pixels``: the largest
    uploaded picture decoded (None: the store's limit, as for every other decode)."""

    def __init__(self, store: ImageStore, *, allow_writes: bool = False, token: str | None = None,
                 move_to: str | os.PathLike[str] | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 max_pixels: int | None = None, thumbnails: Thumbnails | None = None,
                 batch_max: int = 16, batch_wait_s: float = 0.005, queue_max: int = 64) -> None:
        self.store = store
        self.allow_writes = allow_writes
        self.token = token
        self.move_to = os.path.abspath(os.path.expanduser(os.fspath(move_to))) if move_to else None
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = store.max_pixels if max_pixels is None else resolve_max_pixels(max_pixels)
        self.thumbs = thumbnails or Thumbnails(store)
        self.batch_max, self.batch_wait_s, self.queue_max = batch_max, batch_wait_s, queue_max
        self.batchers: dict[str, Batcher] = {}
        self.model_lock = threading.Lock()  # one forward pass at a time on a shared extractor
        self._batchers_lock = threading.Lock()
        self.jobs = Jobs()
        self._searches: OrderedDict[tuple[str, float | None], DuplicateSearch] = OrderedDict()
        self._searches_lock = threading.Lock()
        self._secret = os.urandom(32)  # signs the page forms' cross-site-request tokens
        self.notes = Notes()  # one-line messages for the page a redirect leads to

    def close(self) -> None:
        """Stop the batchers' threads (the store stays open: it is the caller's)."""
        for batcher in list(self.batchers.values()):
            batcher.close()

    # -- security -------------------------------------------------------------------------

    @property
    def csrf_token(self) -> str:
        """Put in every page form that writes; a cross-site page cannot read it."""
        return hmac.new(self._secret, b"imgstore-form", hashlib.sha256).hexdigest()

    def check_form(self, given: str | None) -> None:
        self.check_writes()
        if not given or not hmac.compare_digest(given.encode(), self.csrf_token.encode()):
            raise Forbidden("this form is out of date or came from another site; reload the page and try again")

    def check_writes(self) -> None:
        if not self.allow_writes:
            raise Forbidden("this server is read-only; start it with --allow-writes")

    # -- model ----------------------------------------------------------------------------

    def batcher_for(self, index_id: int | None) -> tuple[Batcher, Extractor]:
        """The batcher of the extractor whose features the searched index reads."""
        space = self.store.index_space(index_id)
        extractor = self.store.extractor(space.extractor)
        if extractor.preprocess_version != space.preprocess_version:
            raise ConfigError(f"stored {space.extractor} features were made with preprocessing {space.preprocess_version}, "
                              f"this imgstore makes {extractor.preprocess_version}; re-ingest, or search by stored id")
        with self._batchers_lock:
            if space.extractor not in self.batchers:
                def extract(images: list[PILImage.Image], ex: Extractor = extractor) -> npt.NDArray[np.float32]:
                    with self.model_lock:
                        return ex.extract(images)

                self.batchers[space.extractor] = Batcher(extract, max_batch=self.batch_max, max_wait_s=self.batch_wait_s,
                                                         max_queue=self.queue_max)
        return self.batchers[space.extractor], extractor

    def check_pixels(self, data: bytes) -> None:
        """Refuse an upload whose header promises more than ``max_pixels``, from the header
        alone (:class:`~imgstore.errors.ImageTooLargeError`, answered 422)."""
        check_size(data, max_pixels=self.max_pixels)

    def embed(self, data: bytes, index_id: int | None) -> npt.NDArray[np.float32]:
        """The feature vector of an uploaded image (decoded here, embedded in a shared batch)."""
        batcher, extractor = self.batcher_for(index_id)
        batcher.announce()  # a batch forming now may wait for this image while it decodes
        try:
            image = load_image(data, max_pixels=self.max_pixels, draft_size=extractor.draft_size,
                               thumbnail_size=extractor.thumbnail_size).image
        except BaseException:
            batcher.withdraw()
            raise
        return batcher.embed(image, announced=True)

    def search_upload(self, data: bytes, options: SearchOptions) -> list[SearchResult]:
        """The nearest stored images of an uploaded image (embedded in a shared batch)."""
        return self.store.search(self.embed(data, options.index_id), options=options)

    def original(self, image_id: int) -> tuple[bytes, str]:
        """The stored image's own file, and its media type. Only bytes whose SHA-256 is the
        stored image's are ever sent: a path that now holds something else (replaced, or a
        symlink pointed elsewhere) is refused, whatever it holds."""
        record = self.store.image(image_id)
        for path in record.current_paths:
            try:
                data = read_file(path)
            except (OSError, DecodeError):
                continue
            if hashlib.sha256(data).hexdigest() == record.sha256:
                return data, PILImage.MIME.get((record.format or "").upper(), "application/octet-stream")
        raise NotFoundError(f"image {image_id} has no current file with its stored content (run `imgstore verify`)")

    def add(self, data: bytes) -> int:
        self.check_pixels(data)
        with self.model_lock:
            return self.store.add(data)

    # -- duplicates -----------------------------------------------------------------------

    def duplicate_search(self, keep: str = "original", min_cosine: float | None = None) -> DuplicateSearch:
        """The search for these settings' duplicate groups, in the background: the one running
        (a second visitor joins it), a finished one while the store is as it was when that one
        started (:meth:`ImageStore.duplicates_state`), or a new one. A failed search is not
        kept: asking again starts another (its failure stays readable from its job)."""
        key = (keep, min_cosine)
        with self._searches_lock:
            found = self._searches.get(key)
            if found is not None and not found.job.finished:
                return found  # running or queued: join it, without a look at the database
        state = self.store.duplicates_state()
        with self._searches_lock:
            found = self._searches.get(key)
            if found is not None and (not found.job.finished or (found.job.state == "done" and found.state == state)):
                self._searches.move_to_end(key)
                return found
            search = DuplicateSearch(keep, min_cosine, state)
            store = self.store

            def work(progress: Callable[[str, int, int], None]) -> dict[str, int]:
                search.state = store.duplicates_state()  # as the search starts (it may have waited its turn)
                groups = store.find_duplicates(keep=keep, min_cosine=min_cosine, progress=progress)
                search.groups = groups
                return {"groups": len(groups), "spare_files": sum(g.n_files - 1 for g in groups)}

            query = {"keep": keep} | ({} if min_cosine is None else {"min_cosine": repr(min_cosine)})
            title = f"duplicate groups, keeper by {keep}" + ("" if min_cosine is None else f", cosine >= {min_cosine}")
            # the work never reads search.job; every reader gets the search from the table, after this
            search.job = self.jobs.start("duplicates", title, work, describe=describe_progress,
                                         result_url=f"/api/duplicates?{urlencode(query)}")
            self._searches[key] = search
            self._searches.move_to_end(key)
            finished = [k for k, s in self._searches.items() if s.job.finished]
            for old in finished[: max(0, len(self._searches) - KEPT_SEARCHES)]:
                del self._searches[old]
            return search

    def duplicate_groups(self, keep: str, *, wait_s: float = RESOLVE_WAIT_S) -> list[DuplicateGroup]:
        """The groups a write acts on: those found for the store as it is now, waiting (in this
        thread) for the search when they are not. Raises what the search raised."""
        search = self.duplicate_search(keep)
        job = self.jobs.wait(search.job.id, timeout_s=wait_s) or search.job
        if job.failure is not None:
            raise job.failure
        if search.groups is None:
            raise Overloaded("the duplicate search is still running; try again when it is done")
        return search.groups

    def resolve(self, keep: str, choices: dict[str, str | None] | None = None) -> ApplyReport:
        """Move every copy but the keeper of the chosen groups into ``move_to``, with the CLI's
        journalled, undoable ``dedup --apply``. ``choices``: group key -> the path to keep (None:
        the suggested keeper); None resolves every group. The groups are those found for the
        store as it is now (the page's, unless it changed since), so a group that changed since
        the page showed it (another member, or gone) is left alone."""
        self.check_writes()
        if self.move_to is None:
            raise ConfigError("start the server with --move-to DIR to resolve duplicates (the copies are moved there)")
        groups = self.duplicate_groups(keep)
        if choices is not None:
            by_key = {g.key: g for g in groups}
            missing = [key for key in choices if key not in by_key]
            if missing:
                raise NotFoundError(f"duplicate group {missing[0]} changed since it was shown; reload the page")
            groups = [by_key[key] if path is None else by_key[key].with_keeper(path) for key, path in choices.items()]
        return self.store.apply_duplicates(groups, self.move_to)

    def undo(self, journal_name: str) -> UndoReport:
        """Undo one resolve, named by its journal's file name (only journals in ``move_to``)."""
        self.check_writes()
        if self.move_to is None:
            raise ConfigError("start the server with --move-to DIR to undo what was moved there")
        for journal in journals(self.move_to):
            if os.path.basename(journal.path) == journal_name:
                return self.store.undo_duplicates(journal.path)
        raise NotFoundError(f"no journal named {journal_name!r} in {self.move_to}")

    def recent_journals(self, limit: int = 5) -> list[str]:
        if self.move_to is None:
            return []
        return [os.path.basename(j.path) for j in journals(self.move_to)][-limit:][::-1]

    # -- indexes --------------------------------------------------------------------------

    def start_index(self, method: str = "itq", n_bits: int = 64, *, extractor: str | None = None,
                    n_bands: int | None = None, activate: bool = True) -> Job:
        """Fit an index in the background (a fit over 1M images takes minutes); returns the job."""
        self.check_writes()
        if method not in available_methods():
            raise ConfigError(f"unknown index method {method!r}; choose one of {', '.join(available_methods())}")
        if not 8 <= n_bits <= 1024 or n_bits % 8:
            raise ConfigError("bits must be a multiple of 8 between 8 and 1024")
        store = self.store

        def work(progress: Callable[[str, int, int], None]) -> int:
            return store.create_index(method, n_bits, extractor=extractor, n_bands=n_bands, activate=activate,
                                      progress=progress)

        return self.jobs.start("index", f"{method} index, {n_bits} bits", work)


@dataclass(eq=False)
class DuplicateSearch:
    """One background search for duplicate groups (a job of kind ``duplicates``): its settings,
    the store's state as it started, and, once done, the groups."""

    keep: str
    min_cosine: float | None
    state: DuplicatesState
    groups: list[DuplicateGroup] | None = None
    job: Job = field(init=False)  # set when the job starts, before the search is shown to anyone


class Forbidden(Exception):
    """A write on a read-only server, or a page form without its token: 403."""


class TooLarge(Exception):
    """An upload over the size limit: 413."""


class Notes:
    """One-line messages this server wrote for the page a redirect leads to, by a random key
    (``?note=KEY``): a page shows only these, never text from the address. Per app, at most
    ``limit`` kept (the oldest go first)."""

    def __init__(self, limit: int = 200) -> None:
        self.limit = limit
        self._notes: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, text: str) -> str:
        key = secrets.token_urlsafe(8)
        with self._lock:
            self._notes[key] = text
            while len(self._notes) > self.limit:
                self._notes.popitem(last=False)
        return key

    def get(self, key: str | None) -> str | None:
        return self._notes.get(key) if key else None
