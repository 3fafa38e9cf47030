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
from fastapi.responses import JSONResponse, Response

from .db import sqlite_file
from .errors import ConfigError, DatabaseError, DecodeError, ImgStoreError, NotFoundError
from .repository import ImageStore

log = logging.getLogger(__name__)

#: Largest upload accepted (bytes); the decoder's pixel limit guards against bombs as well.
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
THUMB_SIZES = (128, 256, 512)


class Overloaded(Exception):
    """More uploads are waiting for the model than the queue holds: answered with 503."""


class Batcher:
    """Concurrent uploads share model calls: the first image in waits at most ``max_wait_s``
    for others, then one ``extract`` call embeds up to ``max_batch`` of them, so throughput under
    load approaches the model's batched rate instead of its batch-1 rate. A queue longer than
    ``max_queue`` refuses new images at once (:class:`Overloaded`)."""

    def __init__(self, extract: Any, *, max_batch: int = 16, max_wait_s: float = 0.005, max_queue: int = 64) -> None:
        import queue

        self.extract = extract
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.queue: queue.Queue[Any] = queue.Queue()
        self.calls = 0  # model calls made
        self.images = 0  # images embedded
        self.thread = threading.Thread(target=self._run, name="imgstore-batcher", daemon=True)
        self.thread.start()

    def embed(self, image: Any, timeout_s: float = 120.0) -> Any:
        from concurrent.futures import Future

        if self.queue.qsize() >= self.max_queue:
            raise Overloaded(f"{self.queue.qsize()} images are waiting for the model; try again shortly")
        future: Future[Any] = Future()
        self.queue.put((image, future))
        return future.result(timeout=timeout_s)

    def _run(self) -> None:
        import queue
        import time

        while True:
            item = self.queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    nxt = self.queue.get(timeout=left)
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
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
        record = self.store.image(image_id)
        path = self.folder / record.sha256[:2] / f"{record.sha256}-{size}.jpg"
        if path.exists():
            return path.read_bytes()
        source = next(iter(record.current_paths), None)
        if source is None:
            raise NotFoundError(f"image {image_id} has no current file to make a thumbnail from")
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


def create_app(store: ImageStore, *, allow_writes: bool = False, token: str | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, thumbnails: Thumbnails | None = None,
               batch_max: int = 16, batch_wait_s: float = 0.005, queue_max: int = 64) -> Any:
    """A FastAPI application answering for ``store`` (kept open by the caller)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        store.ctx.start_refresher()  # searches never wait for an ingest's new codes to be merged
        try:
            yield
        finally:
            store.ctx.stop_refresher()
            for batcher in batchers.values():
                batcher.close()

    app = FastAPI(title="imgstore", version="0.1.0", lifespan=lifespan,
                  description="Search and browse an imgstore collection. JSON bodies follow the CLI's --json shapes.")
    thumbs = thumbnails or Thumbnails(store)
    model_lock = threading.Lock()  # one forward pass at a time on the shared extractor
    batchers: dict[str, Batcher] = {}
    app.state.batchers = batchers

    def batcher_for(index_id: int | None) -> tuple[Batcher, Any]:
        """The batcher of the extractor whose features the searched index reads."""
        from .indexing import find_index, list_indexes
        from .vectors import get_space, pick_space

        with store.ctx.read("find the feature space") as conn:
            found = find_index(list_indexes(conn, with_counts=False), index_id)
            space = get_space(conn, found.space_id) if found is not None else pick_space(conn, None)
        extractor = store.ctx.extractor(space.extractor)
        if extractor.preprocess_version != space.preprocess_version:
            raise ConfigError(f"stored {space.extractor} features were made with preprocessing {space.preprocess_version}, "
                              f"this imgstore makes {extractor.preprocess_version}; re-ingest, or search by stored id")
        if space.extractor not in batchers:
            def extract(images: list[Any], ex: Any = extractor) -> Any:
                with model_lock:
                    return ex.extract(images)

            batchers[space.extractor] = Batcher(extract, max_batch=batch_max, max_wait_s=batch_wait_s, max_queue=queue_max)
        return batchers[space.extractor], extractor

    @app.middleware("http")
    async def check_token(request: Request, call_next: Any) -> Any:
        if token is not None and request.url.path.startswith("/api"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or request.query_params.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "a token is needed: send 'Authorization: Bearer TOKEN'"}, status_code=401)
        return await call_next(request)

    @app.exception_handler(ImgStoreError)
    async def imgstore_error(_request: Request, exc: ImgStoreError) -> Any:
        return JSONResponse({"error": str(exc)}, status_code=_status(exc))

    def writes() -> None:
        if not allow_writes:
            raise _Forbidden("this server is read-only; start it with --allow-writes")

    @app.exception_handler(_Forbidden)
    async def forbidden(_request: Request, exc: _Forbidden) -> Any:
        return JSONResponse({"error": str(exc)}, status_code=403)

    async def upload(request: Request) -> bytes:
        """The uploaded image of a multipart form (field ``image``), size-limited."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload_bytes + 65536:
            raise _TooLarge(f"upload too large: at most {max_upload_bytes:,} bytes")
        form = await request.form()
        item = form.get("image")
        if item is None or isinstance(item, str):
            raise ConfigError("send the image as a multipart form field named 'image'")
        data = await item.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise _TooLarge(f"upload too large: at most {max_upload_bytes:,} bytes")
        return data

    @app.exception_handler(Overloaded)
    async def overloaded(_request: Request, exc: Overloaded) -> Any:
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(_TooLarge)
    async def too_large(_request: Request, exc: _TooLarge) -> Any:
        return JSONResponse({"error": str(exc)}, status_code=413)

    @app.get("/api/info")
    def info() -> Any:
        return store.info().as_dict()

    @app.get("/api/indexes")
    def indexes() -> Any:
        return [i.as_dict() for i in store.indexes()]

    @app.get("/api/images/{image_id}")
    def image(image_id: int) -> Any:
        return store.image(image_id).as_dict()

    @app.get("/api/images/{image_id}/thumbnail")
    def thumbnail(image_id: int, size: int = 256) -> Any:
        return Response(thumbs.get(image_id, size), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=86400"})

    @app.get("/api/images/{image_id}/neighbours")
    def neighbours(image_id: int, k: int = 10, exact: bool = False, include_stale: bool = False) -> Any:
        hits = store.search(image_id, k + 1, exact=exact, include_stale=include_stale)
        return [h.as_dict() for h in hits if h.image_id != image_id][:k]

    @app.get("/api/search")
    def search_by_id(id: int, k: int = 10, exact: bool = False, probe_radius: int = 1, rerank: bool = True,
                     index: int | None = None) -> Any:
        return [h.as_dict() for h in store.search(id, k, exact=exact, probe_radius=probe_radius, rerank=rerank, index_id=index)]

    @app.post("/api/search")
    async def search_by_upload(request: Request, k: int = 10, exact: bool = False, probe_radius: int = 1,
                               rerank: bool = True, index: int | None = None) -> Any:
        """The nearest stored images of an uploaded image (multipart field ``image``), or of a
        feature vector (JSON body ``{"vector": [...]}``)."""
        import anyio
        import numpy as np

        if request.headers.get("content-type", "").startswith("application/json"):
            body = json.loads(await request.body() or b"{}")
            if not isinstance(body, dict) or not isinstance(body.get("vector"), list):
                raise ConfigError('send {"vector": [numbers]} or a multipart image')
            query: Any = np.asarray(body["vector"], dtype=np.float32)
        else:
            data = await upload(request)

            def embed() -> Any:
                from .decode import load_image

                batcher, extractor = batcher_for(index)
                image = load_image(data, draft_size=extractor.draft_size).image  # decoded in the request's thread
                return batcher.embed(image)

            query = await anyio.to_thread.run_sync(embed)

        def run() -> Any:
            return store.search(query, k, exact=exact, probe_radius=probe_radius, rerank=rerank, index_id=index)

        return [h.as_dict() for h in await anyio.to_thread.run_sync(run)]

    @app.get("/api/duplicates")
    def duplicates(keep: str = "original", min_cosine: float | None = None) -> Any:
        return [g.as_dict() for g in store.find_duplicates(keep=keep, min_cosine=min_cosine)]

    @app.post("/api/images")
    async def add_image(request: Request) -> Any:
        writes()
        data = await upload(request)
        with model_lock:
            image_id = store.add(data)
        return {"image_id": image_id}

    @app.delete("/api/images/{image_id}")
    def remove_image(image_id: int) -> Any:
        writes()
        return store.remove([image_id]).as_dict()

    return app


class _Forbidden(Exception):
    pass


class _TooLarge(Exception):
    pass


def _status(exc: ImgStoreError) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, DecodeError):
        reason = exc.reason.lower()
        return 422 if ("pixels" in reason or "too large" in reason or "bomb" in reason) else 415
    if isinstance(exc, DatabaseError):
        return 503
    return 422 if isinstance(exc, ConfigError) else 400


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
