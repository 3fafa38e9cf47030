"""The application of ``imgstore serve``: the API and page routers over one :class:`Service`,
the guard, error answers by type, and the start and stop of the store's code-cache refresher.

Errors are JSON ``{"error": message}`` (a page for a browser) with the status that says what
went wrong: 404 unknown id, 413 upload too large, 415 not an image, 422 a decompression bomb or
a bad argument, 401 a missing or wrong token, 403 a write on a read-only server, 503 the
database or a full queue.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decode import quiet_pillow_warnings
from ..errors import ConfigError, ImgStoreError
from ..repository import ImageStore
from ..watch import Watcher
from .api import router as api_router
from .api import search_router
from .http import Guard, error_response, error_text, status_for
from .pages import router as page_router
from .render import HERE
from .service import MAX_UPLOAD_BYTES, Forbidden, Overloaded, Service, Thumbnails, TooLarge

#: The settings of one ``imgstore serve --workers N`` process, as JSON, set by the command.
WORKER_SETTINGS_ENV = "IMGSTORE_SERVE_WORKER"
#: A token shorter than this is refused: an empty one (an unset shell variable) would let anyone
#: in, a short one can be guessed. ``openssl rand -hex 16`` gives 32 characters.
MIN_TOKEN_LENGTH = 16
NOT_FOUND = "no such page or API path; the pages are /, /duplicates and /collection, the API is at /docs"


def create_app(store: ImageStore, *, allow_writes: bool = False, token: str | None = None,
               move_to: str | os.PathLike[str] | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_pixels: int | None = None, thumbnails: Thumbnails | None = None,
               batch_max: int = 16, batch_wait_s: float = 0.005, queue_max: int = 64, pages: bool = True,
               owns_store: bool = False, watcher: Watcher | None = None) -> FastAPI:
    """A FastAPI application answering for ``store`` (kept open by the caller, or closed when
    the app shuts down with ``owns_store``): the JSON API under ``/api``, its docs at
    ``/docs``, and (``pages``) the web pages. ``token``: None (no token; then only a loopback
    address should be served), or at least :data:`MIN_TOKEN_LENGTH` characters. Uploads are
    limited to ``max_upload_bytes`` and to ``max_pixels`` (None: the store's own limit,
    ``ImageStore(max_pixels=...)``, the one every decode of that store obeys). ``watcher``: a
    :class:`~imgstore.watch.Watcher` of ``store`` run on a thread of its own while the app runs
    (``serve --watch``): what it ingests reaches searches through the code cache's refresher."""
    check_token(token)
    service = Service(store, allow_writes=allow_writes, token=token, move_to=move_to, max_upload_bytes=max_upload_bytes,
                      max_pixels=max_pixels, thumbnails=thumbnails, batch_max=batch_max, batch_wait_s=batch_wait_s,
                      queue_max=queue_max)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        store.start_refresher()  # searches never wait for an ingest's new codes to be merged
        if watcher is not None:
            watcher.start()
        if store.cache_codes:
            threading.Thread(target=store.warm, name="imgstore-warm", daemon=True).start()
        try:
            yield
        finally:
            if watcher is not None:
                watcher.stop()  # after the ingest transaction in progress
            store.stop_refresher()
            service.close()
            if owns_store:
                store.close()

    app = FastAPI(title="imgstore", version="0.1.0", lifespan=lifespan,
                  description="Search and browse an imgstore collection. JSON bodies follow the CLI's --json shapes.")
    app.state.service = service
    app.state.batchers = service.batchers
    app.add_middleware(Guard, token=token)
    for kind in (ImgStoreError, Forbidden, Overloaded, TooLarge):
        app.add_exception_handler(kind, _library_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _bad_argument)
    app.router.routes[0:0] = search_router.routes  # first, and matched directly: most requests are searches
    app.include_router(api_router)
    if pages:
        app.include_router(page_router)
        app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    return app


def check_token(token: str | None) -> None:
    """Refuse a token that would not protect anything: empty, short, or with white space at its
    ends (a header value loses it)."""
    if token is None:
        return
    if token != token.strip() or len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"a token must be at least {MIN_TOKEN_LENGTH} characters without spaces at its ends "
                          f"(got {len(token)}); make one with: openssl rand -hex 16")


async def _library_error(request: Request, exc: Exception) -> Response:
    headers = {"Retry-After": "1"} if isinstance(exc, Overloaded) else None
    return error_response(request, status_for(exc), error_text(exc), headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    message = NOT_FOUND if exc.status_code == 404 else str(exc.detail)
    return error_response(request, exc.status_code, message, getattr(exc, "headers", None))


async def _bad_argument(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', '')}"
                         for e in exc.errors())
    return error_response(request, 422, f"bad argument: {problems}")


def worker_settings(store: ImageStore, token: str | None) -> str:
    """What each worker process of ``imgstore serve --workers N`` needs to open the same store
    (the URL with its password: the environment of one's own processes is not shown to other
    users), for :func:`worker_app`."""
    return json.dumps({"db": store.url.render_as_string(hide_password=False), "token": token,
                       "vector_cache_mb": store.vector_cache_mb, "extractor_options": store.extractor_options,
                       "max_pixels": store.max_pixels, "runtime": store.runtime})


def worker_app() -> FastAPI:
    """The app of one ``imgstore serve --workers N`` process (uvicorn's factory): its own store
    and code cache, read-only. Several processes answer more searches at once than one, whose
    search work holds Python's lock; writes are not offered there, since page notes, background
    jobs and the undo list live in one process."""
    quiet_pillow_warnings()  # this process is the command's, as the command's own is (see cli)
    settings = json.loads(os.environ[WORKER_SETTINGS_ENV])
    store = ImageStore(settings["db"], cache_codes=True, vector_cache_mb=int(settings["vector_cache_mb"]),
                       extractor_options=settings["extractor_options"], max_pixels=int(settings["max_pixels"]),
                       runtime=settings["runtime"])
    return create_app(store, token=settings["token"], owns_store=True)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
