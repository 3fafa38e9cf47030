"""The HTTP API over one store (``imgstore serve``; ``create_app(store)`` to embed it).

One process opens the store once (codes cached in memory, brought up to date by appends when an
ingest writes beside it), loads the extractor on first need and answers JSON in the shapes of
the CLI's ``--json`` (the typed results' ``as_dict()``). FastAPI serves the OpenAPI docs at
``/docs``. Errors are JSON ``{"error": message}`` with the status that says what went wrong:
404 unknown id, 413 upload too large, 415 not an image, 422 a decompression bomb or a bad
argument, 401 a missing or wrong token, 403 a write on a read-only server, 503 the database.

Files are only ever read as images the store knows, by id (their current paths); no request
names a path. Writes (adding an uploaded image, removing one) need ``allow_writes``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request  # this module is imported only by `imgstore serve`
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response

from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from .db import sqlite_file
from .models import Image, ImagePath
from .paths import from_stored
from .errors import ConfigError, DatabaseError, DecodeError, ImgStoreError, NotFoundError
from .repository import ImageStore

log = logging.getLogger(__name__)

#: Largest upload accepted (bytes); the decoder's pixel limit guards against bombs as well.
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
THUMB_SIZES = (128, 256, 512)


class Overloaded(Exception):
    """More uploads are waiting for the model than the queue holds: answered with 503."""


class Batcher:
    """Concurrent uploads share model calls. A request announces itself when it starts decoding
    (:meth:`announce`); the first image in then waits at most ``max_wait_s`` for the images
    announced after it, and one ``extract`` call embeds up to ``max_batch`` of them, so
    throughput under load approaches the model's batched rate instead of its batch-1 rate,
    while a lone upload on an idle server waits for nobody. A queue longer than ``max_queue``
    refuses new images at once (:class:`Overloaded`)."""

    def __init__(self, extract: Any, *, max_batch: int = 16, max_wait_s: float = 0.005, max_queue: int = 64) -> None:
        import queue

        self.extract = extract
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.queue: queue.Queue[Any] = queue.Queue()
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

    def embed(self, image: Any, timeout_s: float = 120.0, *, announced: bool = False) -> Any:
        from concurrent.futures import Future

        if not announced:
            self.announce()
        future: Future[Any] = Future()
        self.queue.put((image, future))
        return future.result(timeout=timeout_s)

    def _take(self) -> None:
        with self._lock:
            self._coming = max(0, self._coming - 1)

    def _run(self) -> None:
        import queue
        import time

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
            db_file = sqlite_file(store.url)
            if db_file is not None:
                folder = f"{db_file}.thumbs"
            else:
                key = hashlib.sha256(store.display_url.encode()).hexdigest()[:16]
                folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imgstore" / "thumbs" / key
        self.folder = Path(folder)
        self.store = store

    def get(self, image_id: int, size: int) -> bytes:
        from .decode import load_image

        if size not in THUMB_SIZES:
            raise ConfigError(f"thumbnail size must be one of {', '.join(map(str, THUMB_SIZES))}")
        with self.store.ctx.read("find a thumbnail") as conn:  # one small query; the file only when not cached
            sha256 = conn.scalar(select(Image.sha256).where(Image.id == image_id))
            if sha256 is None:
                raise NotFoundError(f"no image with id {image_id}")
            path = self.folder / sha256[:2] / f"{sha256}-{size}.jpg"
            if path.exists():
                return path.read_bytes()
            source = conn.scalar(select(ImagePath.path).where(ImagePath.image_id == image_id, ImagePath.is_current.is_(True))
                                 .order_by(ImagePath.id).limit(1))
        if source is None:
            raise NotFoundError(f"image {image_id} has no current file to make a thumbnail from")
        source = from_stored(source)
        img = load_image(source, draft_size=(size, size)).image
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=85)
        data = buf.getvalue()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # made once; concurrent makers write the same bytes
        return data


#: Largest picture an upload may hold (pixels, read from its header before decoding): 8K x 8K.
MAX_UPLOAD_PIXELS = 64_000_000
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_COOKIE = "imgstore_token"


class Service:
    """What one server process holds: the open store, thumbnails, the batchers that share model
    calls, background jobs, and the options the server was started with. The API (this module)
    and the pages (:mod:`imgstore.web`) both act through it."""

    def __init__(self, store: ImageStore, *, allow_writes: bool = False, token: str | None = None,
                 move_to: str | os.PathLike[str] | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 max_pixels: int = MAX_UPLOAD_PIXELS, thumbnails: Thumbnails | None = None,
                 batch_max: int = 16, batch_wait_s: float = 0.005, queue_max: int = 64) -> None:
        from .jobs import Jobs

        self.store = store
        self.allow_writes = allow_writes
        self.token = token
        self.move_to = os.path.abspath(os.path.expanduser(os.fspath(move_to))) if move_to else None
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.thumbs = thumbnails or Thumbnails(store)
        self.batch_options = {"max_batch": batch_max, "max_wait_s": batch_wait_s, "max_queue": queue_max}
        self.batchers: dict[str, Batcher] = {}
        self.model_lock = threading.Lock()  # one forward pass at a time on a shared extractor
        self._batchers_lock = threading.Lock()
        self.jobs = Jobs()
        self._secret = os.urandom(32)  # signs the page forms' cross-site-request tokens

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

    def batcher_for(self, index_id: int | None) -> tuple[Batcher, Any]:
        """The batcher of the extractor whose features the searched index reads."""
        from .indexing import find_index
        from .vectors import pick_space

        store = self.store
        with store.ctx.read("find the feature space") as conn:
            found = find_index(store.ctx.indexes(conn), index_id)
            space = store.ctx.space(conn, found.space_id) if found is not None else pick_space(conn, None)
        extractor = store.ctx.extractor(space.extractor)
        if extractor.preprocess_version != space.preprocess_version:
            raise ConfigError(f"stored {space.extractor} features were made with preprocessing {space.preprocess_version}, "
                              f"this imgstore makes {extractor.preprocess_version}; re-ingest, or search by stored id")
        with self._batchers_lock:
            if space.extractor not in self.batchers:
                def extract(images: list[Any], ex: Any = extractor) -> Any:
                    with self.model_lock:
                        return ex.extract(images)

                self.batchers[space.extractor] = Batcher(extract, **self.batch_options)
        return self.batchers[space.extractor], extractor

    def check_pixels(self, data: bytes) -> None:
        """Refuse an upload whose header promises more than ``max_pixels`` (before decoding)."""
        from .decode import load_image

        load_image(data, max_pixels=self.max_pixels, draft_size=(64, 64))

    def embed(self, data: bytes, index_id: int | None) -> Any:
        """The feature vector of an uploaded image (decoded here, embedded in a shared batch)."""
        from .decode import load_image

        batcher, extractor = self.batcher_for(index_id)
        batcher.announce()  # a batch forming now may wait for this image while it decodes
        try:
            image = load_image(data, max_pixels=self.max_pixels, draft_size=extractor.draft_size).image
        except BaseException:
            batcher.withdraw()
            raise
        return batcher.embed(image, announced=True)

    def search_upload(self, data: bytes, *, k: int, exact: bool = False, probe_radius: int = 1, rerank: bool = True,
                      index: int | None = None) -> list[Any]:
        query = self.embed(data, index)
        return self.store.search(query, k, exact=exact, probe_radius=probe_radius, rerank=rerank, index_id=index)

    def original(self, image_id: int) -> tuple[bytes, str]:
        """The stored image's own file, and its media type. Only bytes whose SHA-256 is the
        stored image's are ever sent: a path that now holds something else (replaced, or a
        symlink pointed elsewhere) is refused, whatever it holds."""
        from PIL import Image as PILImage

        from .decode import read_file

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

    def resolve(self, keep: str, choices: dict[str, str | None] | None = None) -> Any:
        """Move every copy but the keeper of the chosen groups into ``move_to``, with the CLI's
        journalled, undoable ``dedup --apply``. ``choices``: group key -> the path to keep (None:
        the suggested keeper); None resolves every group. Groups are found afresh, so a group
        that changed since the page showed it (another member, or gone) is left alone."""
        self.check_writes()
        if self.move_to is None:
            raise ConfigError("start the server with --move-to DIR to resolve duplicates (the copies are moved there)")
        groups = self.store.find_duplicates(keep=keep)
        if choices is not None:
            by_key = {g.key: g for g in groups}
            missing = [key for key in choices if key not in by_key]
            if missing:
                raise NotFoundError(f"duplicate group {missing[0]} changed since it was shown; reload the page")
            groups = [by_key[key] if path is None else by_key[key].with_keeper(path) for key, path in choices.items()]
        return self.store.apply_duplicates(groups, self.move_to)

    def undo(self, journal_name: str) -> Any:
        """Undo one resolve, named by its journal's file name (only journals in ``move_to``)."""
        from .dedup_apply import journals

        self.check_writes()
        if self.move_to is None:
            raise ConfigError("start the server with --move-to DIR to undo what was moved there")
        for journal in journals(self.move_to):
            if os.path.basename(journal.path) == journal_name:
                return self.store.undo_duplicates(journal.path)
        raise NotFoundError(f"no journal named {journal_name!r} in {self.move_to}")

    def recent_journals(self, limit: int = 5) -> list[str]:
        from .dedup_apply import journals

        if self.move_to is None:
            return []
        return [os.path.basename(j.path) for j in journals(self.move_to)][-limit:][::-1]

    # -- indexes --------------------------------------------------------------------------

    def start_index(self, method: str = "itq", n_bits: int = 64, *, extractor: str | None = None,
                    n_bands: int | None = None, activate: bool = True) -> Any:
        """Fit an index in the background (a fit over 1M images takes minutes); returns the job."""
        from .hashing import available_methods

        self.check_writes()
        if method not in available_methods():
            raise ConfigError(f"unknown index method {method!r}; choose one of {', '.join(available_methods())}")
        if not 8 <= n_bits <= 1024 or n_bits % 8:
            raise ConfigError("bits must be a multiple of 8 between 8 and 1024")
        store = self.store

        def work(progress: Any) -> int:
            return store.create_index(method, n_bits, extractor=extractor, n_bands=n_bands, activate=activate,
                                      progress=progress)

        return self.jobs.start("index", f"{method} index, {n_bits} bits", work)


def create_app(store: ImageStore, *, allow_writes: bool = False, token: str | None = None,
               move_to: str | os.PathLike[str] | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_pixels: int = MAX_UPLOAD_PIXELS, thumbnails: Thumbnails | None = None,
               batch_max: int = 16, batch_wait_s: float = 0.005, queue_max: int = 64, pages: bool = True,
               owns_store: bool = False) -> Any:
    """A FastAPI application answering for ``store`` (kept open by the caller, or closed when
    the app shuts down with ``owns_store``): the JSON API under ``/api``, its docs at
    ``/docs``, and (``pages``) the web pages."""
    from contextlib import asynccontextmanager

    service = Service(store, allow_writes=allow_writes, token=token, move_to=move_to, max_upload_bytes=max_upload_bytes,
                      max_pixels=max_pixels, thumbnails=thumbnails, batch_max=batch_max, batch_wait_s=batch_wait_s,
                      queue_max=queue_max)

    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        store.ctx.start_refresher()  # searches never wait for an ingest's new codes to be merged
        if store.cache_codes:
            threading.Thread(target=store.ctx.warm, name="imgstore-warm", daemon=True).start()
        try:
            yield
        finally:
            store.ctx.stop_refresher()
            for batcher in service.batchers.values():
                batcher.close()
            if owns_store:
                store.close()

    app = FastAPI(title="imgstore", version="0.1.0", lifespan=lifespan,
                  description="Search and browse an imgstore collection. JSON bodies follow the CLI's --json shapes.")
    app.state.service = service
    app.state.batchers = service.batchers

    app.add_middleware(Guard, token=token)

    @app.exception_handler(ImgStoreError)
    async def imgstore_error(request: Request, exc: ImgStoreError) -> Any:
        return _error(request, _status(exc), str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        message = "no such page or API path; the pages are /, /duplicates and /collection, the API is at /docs" \
            if exc.status_code == 404 else str(exc.detail)
        return _error(request, exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_argument(request: Request, exc: RequestValidationError) -> Any:
        problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', '')}"
                             for e in exc.errors())
        return _error(request, 422, f"bad argument: {problems}")

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> Any:
        return _error(request, 403, str(exc))

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> Any:
        return _error(request, 503, str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(TooLarge)
    async def too_large(request: Request, exc: TooLarge) -> Any:
        return _error(request, 413, str(exc))

    _api(app, service)
    if pages:
        from .web import add_pages

        add_pages(app, service)
    return app


async def read_upload(request: Request, service: Service) -> tuple[bytes, Any]:
    """The uploaded image of a multipart form (field ``image``), size-limited, and the form."""
    limit = service.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + 65536:
        raise TooLarge(f"upload too large: at most {limit:,} bytes")
    form = await request.form()
    item = form.get("image")
    if item is None or isinstance(item, str):
        raise ConfigError("send the image as a multipart form field named 'image'")
    data = await item.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"upload too large: at most {limit:,} bytes")
    if not data:
        raise ConfigError("the uploaded file is empty; choose an image")
    return data, form


def _api(app: Any, service: Service) -> None:
    """The JSON API."""
    import anyio

    store = service.store

    @app.get("/api/info")
    def info() -> Any:
        """The store's counts, spaces and indexes (as ``imgstore info --json``), and ``cache``:
        what this server holds in memory per index (codes, attached vectors, bytes)."""
        return store.info().as_dict() | {"cache": store.ctx.cache_state()}

    @app.get("/api/indexes")
    def indexes() -> Any:
        return [i.as_dict() for i in store.indexes()]

    @app.post("/api/indexes", status_code=202)
    def create_index(body: dict[str, Any]) -> Any:
        """Fit an index in the background; poll ``/api/jobs/{id}`` for its progress."""
        job = service.start_index(str(body.get("method", "itq")), int(body.get("n_bits", 64)),
                                  extractor=body.get("extractor"), n_bands=body.get("n_bands"),
                                  activate=bool(body.get("activate", True)))
        return job.as_dict()

    @app.post("/api/indexes/{index_id}/activate")
    def activate(index_id: int) -> Any:
        service.check_writes()
        store.activate_index(index_id)
        return [i.as_dict() for i in store.indexes()]

    @app.get("/api/jobs")
    def jobs() -> Any:
        return [j.as_dict() for j in service.jobs.all()]

    @app.get("/api/jobs/{job_id}")
    def job(job_id: int) -> Any:
        found = service.jobs.get(job_id)
        if found is None:
            raise NotFoundError(f"no job with id {job_id}")
        return found.as_dict()

    @app.get("/api/errors")
    def errors(limit: int = 100) -> Any:
        return [e.as_dict() for e in store.errors(limit)]

    @app.get("/api/images/{image_id}")
    def image(image_id: int) -> Any:
        return store.image(image_id).as_dict()

    @app.get("/api/images/{image_id}/thumbnail")
    def thumbnail(image_id: int, size: int = 256) -> Any:
        return Response(service.thumbs.get(image_id, size), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/api/images/{image_id}/neighbours")
    def neighbours(image_id: int, k: int = 10, exact: bool = False, include_stale: bool = False) -> Any:
        hits = store.search(image_id, k + 1, exact=exact, include_stale=include_stale)
        return _json([h.as_dict() for h in hits if h.image_id != image_id][:k])

    @app.get("/api/search")
    def search_by_id(id: int, k: int = 10, exact: bool = False, probe_radius: int = 1, rerank: bool = True,
                     index: int | None = None) -> Any:
        """The k nearest stored images of stored image ``id``. (Answered by the lean route
        :func:`search_by_id_lean` registered in front of this one; this declaration gives the
        OpenAPI docs its parameters.)"""
        return _json([h.as_dict() for h in store.search(id, k, exact=exact, probe_radius=probe_radius, rerank=rerank, index_id=index)])

    async def search_by_id_lean(request: Request) -> Response:
        """``GET /api/search`` without FastAPI's per-route machinery (parameter models,
        dependency solving, the threadpool): that cost 0.3 ms a request, as much as the search
        itself, at 1M codes (benchmarks/results/serve.md). A search whose codes and vectors are
        in memory runs at once on the event loop; one that would load them runs in a thread."""
        given = request.query_params
        try:
            image_id = _int_param(given, "id", None)
            k = _int_param(given, "k", 10)
            probe_radius = _int_param(given, "probe_radius", 1)
            index = _int_param(given, "index", None, optional=True)
            exact = _bool_param(given, "exact", False)
            rerank = _bool_param(given, "rerank", True)
        except ValueError as exc:
            return _error(request, 422, f"bad argument: {exc}")

        def run() -> Any:
            return store.search(image_id, k, exact=exact, probe_radius=probe_radius, rerank=rerank, index_id=index)

        if store.cache_codes and store.ctx.answers_from_memory(index, rerank=rerank):
            hits = run()
        else:
            hits = await anyio.to_thread.run_sync(run)
        return _json([h.as_dict() for h in hits])

    from starlette.routing import Route

    app.router.routes.insert(0, Route("/api/search", search_by_id_lean, methods=["GET"]))

    @app.post("/api/search")
    async def search_by_upload(request: Request, k: int = 10, exact: bool = False, probe_radius: int = 1,
                               rerank: bool = True, index: int | None = None) -> Any:
        """The nearest stored images of an uploaded image (multipart field ``image``), or of a
        feature vector (JSON body ``{"vector": [...]}``)."""
        import numpy as np

        if request.headers.get("content-type", "").startswith("application/json"):
            body = json.loads(await request.body() or b"{}")
            if not isinstance(body, dict) or not isinstance(body.get("vector"), list):
                raise ConfigError('send {"vector": [numbers]} or a multipart image')
            query = np.asarray(body["vector"], dtype=np.float32)

            def run() -> Any:
                return store.search(query, k, exact=exact, probe_radius=probe_radius, rerank=rerank, index_id=index)
        else:
            data, _ = await read_upload(request, service)

            def run() -> Any:
                return service.search_upload(data, k=k, exact=exact, probe_radius=probe_radius, rerank=rerank, index=index)

        return _json([h.as_dict() for h in await anyio.to_thread.run_sync(run)])

    @app.get("/api/duplicates")
    def duplicates(keep: str = "original", min_cosine: float | None = None) -> Any:
        return [g.as_dict() | {"key": g.key} for g in store.find_duplicates(keep=keep, min_cosine=min_cosine)]

    @app.post("/api/duplicates/apply")
    def apply_duplicates(body: dict[str, Any]) -> Any:
        """Move every copy but the keeper of the groups into the server's ``--move-to`` folder:
        ``{"keep": "original", "groups": {"KEY": "path to keep" or null}}`` (no ``groups``: all)."""
        groups = body.get("groups")
        if groups is not None and not isinstance(groups, dict):
            raise ConfigError('"groups" maps a group key to the path to keep (or null for the suggested keeper)')
        return service.resolve(str(body.get("keep", "original")), groups).as_dict()

    @app.post("/api/duplicates/undo")
    def undo_duplicates(body: dict[str, Any]) -> Any:
        return service.undo(str(body.get("journal", ""))).as_dict()

    @app.post("/api/images")
    async def add_image(request: Request) -> Any:
        service.check_writes()
        data, _ = await read_upload(request, service)
        return {"image_id": await anyio.to_thread.run_sync(service.add, data)}

    @app.delete("/api/images/{image_id}")
    def remove_image(image_id: int) -> Any:
        service.check_writes()
        return store.remove([image_id]).as_dict()


class Guard:
    """The token on every request (header, the cookie a page visit sets, or ``?token=``), and
    no state-changing request from another site's page. A plain ASGI middleware: Starlette's
    ``@app.middleware("http")`` wraps each request in streams and a task group, which cost a
    third of a search's time (benchmarks/results/serve.md, variant noguard)."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refusal = self.check(Request(scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, request: Request) -> Response | None:
        """The answer that refuses (or redirects) this request, or None to let it through."""
        token = self.token
        if token is not None:
            is_api = request.url.path.startswith(("/api", "/docs", "/openapi.json", "/redoc"))
            from_query = request.query_params.get("token", "")
            given = (request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                     or request.cookies.get(TOKEN_COOKIE, "") or from_query)
            if not hmac.compare_digest(given.encode(), token.encode()):
                message = "a token is needed: send 'Authorization: Bearer TOKEN', or open the address `imgstore serve` printed"
                if is_api:
                    return JSONResponse({"error": message}, status_code=401)
                return _page_error(request, 401, "This collection needs a token",
                                   "Open the address that `imgstore serve` printed when it started (it ends in ?token=...).")
            if from_query and not is_api and request.method == "GET":
                # a page opened with ?token=: keep it in a cookie and take it out of the address bar
                clean = request.url.remove_query_params("token")
                response = RedirectResponse(str(clean), status_code=303)
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict",
                                    secure=request.url.scheme == "https")
                return response
        if request.method not in SAFE_METHODS and _cross_site(request):
            return JSONResponse({"error": "a request from another site's page was refused"}, status_code=403)
        return None


def _int_param(given: Any, name: str, default: int | None, *, optional: bool = False) -> Any:
    """An integer query parameter (ValueError naming it when it is not one, or missing)."""
    raw = given.get(name)
    if raw is None or (optional and raw == ""):
        if default is None and not optional:
            raise ValueError(f"{name}: required")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected a whole number, got {raw!r}") from None


_TRUE = frozenset({"1", "true", "on", "yes", "t", "y"})
_FALSE = frozenset({"0", "false", "off", "no", "f", "n"})


def _bool_param(given: Any, name: str, default: bool) -> bool:
    """A true/false query parameter as FastAPI reads one (true/false, 1/0, yes/no, on/off)."""
    raw = given.get(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"{name}: expected true or false, got {raw!r}")


def _json(content: Any) -> Response:
    """Search results as JSON, serialized at once: they hold only numbers, strings and lists,
    and FastAPI's generic encoder cost more than the search itself."""
    return Response(json.dumps(content, ensure_ascii=False, separators=(",", ":")), media_type="application/json")


def _cross_site(request: Request) -> bool:
    """A browser sent this from another site's page (its Origin is not this server, or it says
    so in Sec-Fetch-Site). Clients that are not browsers send neither header."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False
    host = request.headers.get("host", "")
    return origin.rstrip("/") not in (f"http://{host}", f"https://{host}")


def _error(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    """JSON ``{"error": ...}`` for the API; an HTML page for a page."""
    if request.url.path.startswith("/api") or "text/html" not in request.headers.get("accept", ""):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return _page_error(request, status, _TITLES.get(status, "Something went wrong"), message, headers)


_TITLES = {400: "That request did not work", 401: "This collection needs a token", 403: "Not allowed here",
           404: "Not found", 413: "That file is too large", 415: "That is not an image this server can read",
           422: "That request cannot be answered", 503: "Busy; try again in a moment"}


def _page_error(request: Request, status: int, title: str, message: str, headers: dict[str, str] | None = None) -> Any:
    from .web import error_page

    return error_page(request, status, title, message, headers)


class Forbidden(Exception):
    """A write on a read-only server, or a page form without its token: 403."""


class TooLarge(Exception):
    """An upload over the size limit: 413."""


def _status(exc: ImgStoreError) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, DecodeError):
        reason = exc.reason.lower()
        return 422 if ("pixels" in reason or "too large" in reason or "bomb" in reason) else 415
    if isinstance(exc, DatabaseError):
        return 503
    return 422 if isinstance(exc, ConfigError) else 400


#: The settings of one ``imgstore serve --workers N`` process, as JSON, set by the command.
WORKER_SETTINGS_ENV = "IMGSTORE_SERVE_WORKER"


def worker_settings(store: ImageStore, token: str | None) -> str:
    """What each worker process of ``imgstore serve --workers N`` needs to open the same store
    (the URL with its password: the environment of one's own processes is not shown to other
    users), for :func:`worker_app`."""
    return json.dumps({"db": store.url.render_as_string(hide_password=False), "token": token,
                       "vector_cache_mb": store.ctx.vector_cache_bytes >> 20,
                       "extractor_options": store.extractor_options})


def worker_app() -> Any:
    """The app of one ``imgstore serve --workers N`` process (uvicorn's factory): its own store
    and code cache, read-only. Several processes answer more searches at once than one, whose
    search work holds Python's lock; writes are not offered there, since page notes, background
    jobs and the undo list live in one process."""
    settings = json.loads(os.environ[WORKER_SETTINGS_ENV])
    store = ImageStore(settings["db"], cache_codes=True, vector_cache_mb=int(settings["vector_cache_mb"]),
                       extractor_options=settings["extractor_options"])
    return create_app(store, token=settings["token"], owns_store=True)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
