"""The JSON API of ``imgstore serve``: one router, one declaration per endpoint, every request
body and response shape declared (:mod:`imgstore.web.schemas`), so ``/docs`` can try an
upload and a client can be generated from ``/openapi.json``.

The two search routes read their query parameters and body themselves, from the table in
:mod:`imgstore.web.http` that also declares them to OpenAPI: FastAPI's per-route parameter
models and thread hand-off cost as much as a search answered from memory
(benchmarks/results/serve.md). A search whose codes and vectors are in memory runs at once on
the event loop; one that would load them runs in a thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Annotated, Any, Literal

import anyio
import numpy as np
from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.routing import request_response

from ..browse import MAX_PAGE, MAX_PER_PAGE, BrowsePage
from ..catalog import ImageRecord, IngestErrorRecord
from ..errors import ConfigError, ImgStoreError, NotFoundError
from ..paths import MAX_ID
from ..types import IndexInfo, SearchFilter, SearchOptions, SearchResult
from .http import (
    ID_PARAM,
    MAX_K_HTTP,
    SEARCH_PARAMS,
    TEXT_PARAM,
    body_filter,
    combined,
    error_response,
    filter_parameters,
    json_response,
    openapi_parameters,
    read_filter,
    read_param,
    read_upload,
    search_options,
    status_for,
)
from .schemas import (
    ERRORS,
    UPLOAD_ERRORS,
    AddedOut,
    ApplyOut,
    ApplyRequest,
    ErrorOut,
    GroupOut,
    IndexRequest,
    InfoOut,
    JobOut,
    RemovalOut,
    SearchHit,
    UndoOut,
    UndoRequest,
    UploadQuery,
    VectorQuery,
    WordSearchOut,
)
from .service import THUMB_SIZES, Service


def _operation_id(route: APIRoute) -> str:
    """Operation ids are the handlers' names (``search_by_upload``): what a generated client's
    functions are called."""
    return route.name


class LeanRoute(APIRoute):
    """A route declared to OpenAPI like any other (parameters, body, responses) whose endpoint
    takes the ``Request`` and reads what it needs itself, served by Starlette's plain
    request/response wrapper: FastAPI's request handler (parameter models, dependency solving,
    exit stacks) and a nested router's matching cost a fifth of a by-id search's rate
    (benchmarks/results/shape.md). The application puts these routes first in its own table
    (:func:`imgstore.web.app.create_app`)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **options: Any) -> None:
        super().__init__(path, endpoint, **options)
        self.app = request_response(endpoint)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: Callable[[Request], Coroutine[Any, Any, Response]] = self.endpoint
        return endpoint  # included through a router: FastAPI wraps it, still without its handler


router = APIRouter(prefix="/api", responses=ERRORS, generate_unique_id_function=_operation_id)
#: The search routes, matched first: they answer most requests of a busy server.
search_router = APIRouter(prefix="/api", responses=ERRORS, generate_unique_id_function=_operation_id, route_class=LeanRoute)


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


Svc = Annotated[Service, Depends(get_service)]
ImageId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="a stored image's id")]
KeepRule = Literal["original", "largest", "oldest", "newest", "smallest"]


def _hits(results: list[SearchResult]) -> Response:
    return json_response([h.as_dict() for h in results])


@router.get("/info", response_model=InfoOut)
def info(service: Svc) -> dict[str, Any]:
    """The store's counts, spaces and indexes (as ``imgstore info --json``), and ``cache``:
    what this server holds in memory per index (codes, attached vectors, bytes)."""
    store = service.store
    return store.info().as_dict() | {"cache": [c.as_dict() for c in store.cache_state()]}


@router.get("/indexes", response_model=list[IndexInfo])
def indexes(service: Svc) -> list[dict[str, Any]]:
    return [i.as_dict() for i in service.store.indexes()]


@router.post("/indexes", status_code=202, response_model=JobOut)
def create_index(service: Svc, body: IndexRequest) -> dict[str, Any]:
    """Fit an index in the background; poll ``/api/jobs/{id}`` for its progress."""
    job = service.start_index(body.method, body.n_bits, extractor=body.extractor, n_bands=body.n_bands,
                              activate=body.activate)
    return job.as_dict()


@router.post("/indexes/{index_id}/activate", response_model=list[IndexInfo])
def activate(service: Svc, index_id: Annotated[int, PathParam(ge=1, le=MAX_ID)]) -> list[dict[str, Any]]:
    service.check_writes()
    service.store.activate_index(index_id)
    return [i.as_dict() for i in service.store.indexes()]


@router.get("/jobs", response_model=list[JobOut])
def jobs(service: Svc) -> list[dict[str, Any]]:
    return [j.as_dict() for j in service.jobs.all()]


@router.get("/jobs/{job_id}", response_model=JobOut)
def job(service: Svc, job_id: Annotated[int, PathParam(ge=1, le=MAX_ID)]) -> dict[str, Any]:
    """One background job (``Location`` of a 202): its state and progress; once done, its
    ``result`` and, for duplicate groups, ``result_url`` to read them from."""
    found = service.jobs.get(job_id)
    if found is None:
        raise NotFoundError(f"no job with id {job_id}")
    return found.as_dict()


@router.get("/errors", response_model=list[IngestErrorRecord])
def errors(service: Svc, limit: Annotated[int, Query(ge=1, le=100_000)] = 100) -> list[dict[str, Any]]:
    """Files that could not be ingested, by path (the first ``limit``)."""
    return [e.as_dict() for e in service.store.errors(limit)]


@router.get("/images", response_model=BrowsePage, openapi_extra={"parameters": filter_parameters()})
def browse(request: Request, service: Svc, sort: Literal["taken", "added", "folder"] = "taken",
           order: Literal["asc", "desc"] = "desc", page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
           per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE)] = 60, include_stale: bool = False) -> dict[str, Any]:
    """One page of the collection's images, sorted by ``sort`` (``taken``: EXIF capture time,
    images without one last; ``added``; ``folder``: the path of their first current file) in
    ``order``, narrowed by the filter parameters (``where``, ``tag``, ``label``, ``under``,
    ``taken_after``, ``taken_before``); with ``total``, the images the filter allows."""
    try:
        search_filter = read_filter(request.query_params)
    except ValueError as exc:
        raise ConfigError(f"bad argument: {exc}") from None
    return service.store.browse(search_filter or None, sort=sort, order=order, page=page, per_page=per_page,
                                include_stale=include_stale).as_dict()


@router.get("/images/{image_id}", response_model=ImageRecord)
def image(service: Svc, image_id: ImageId) -> dict[str, Any]:
    return service.store.image(image_id).as_dict()


@router.get("/images/{image_id}/thumbnail", response_class=Response,
            responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "a JPEG thumbnail"}})
def thumbnail(service: Svc, image_id: ImageId,
              size: Annotated[int, Query(json_schema_extra={"enum": list(THUMB_SIZES)})] = 256) -> Response:
    """A JPEG thumbnail (128, 256 or 512 pixels on its longer side), made once and kept."""
    return Response(service.thumbs.get(image_id, size), media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=86400"})


@router.get("/images/{image_id}/neighbours", response_model=list[SearchHit])
def neighbours(service: Svc, image_id: ImageId, k: Annotated[int, Query(ge=1, le=MAX_K_HTTP)] = 10, exact: bool = False,
               include_stale: bool = False) -> Response:
    """The k nearest other stored images of a stored image."""
    hits = service.store.search(image_id, options=SearchOptions(k=k + 1, exact=exact, include_stale=include_stale))
    return _hits([h for h in hits if h.image_id != image_id][:k])


@search_router.get("/search", response_model=None,
                   responses={200: {"model": list[SearchHit] | WordSearchOut,
                                    "description": "by id: the hits; by text: the hits and what the words were "
                                                   "understood as"}},
                   openapi_extra={"parameters": [*openapi_parameters((ID_PARAM, TEXT_PARAM, *SEARCH_PARAMS)),
                                                 *filter_parameters()]})
async def search_by_id(request: Request) -> Response:
    """The k nearest stored images of stored image ``id``, or, given ``text`` instead, the k
    images that best match those words (through what the classifier sees in them; a store
    without labels answers 404). The filter parameters (``where``, ``tag``, ``label``,
    ``under``, ``taken_after``, ``taken_before``) keep only the images they allow."""
    service = get_service(request)
    given = request.query_params
    try:
        image_id = read_param(given, ID_PARAM)
        words = read_param(given, TEXT_PARAM)
        if (image_id is None) == (words is None):
            raise ValueError("give id (a stored image) or text (words), one of them")
        options = search_options(given)
        if words is not None and options.index_id is not None:
            raise ValueError("index: a word search scores every image's stored features, through no index; "
                             "leave index out")
    except ValueError as exc:
        return error_response(request, 422, f"bad argument: {exc}")
    store = service.store
    if words is not None:  # reads every feature vector of the labelled space: off the event loop
        found = await anyio.to_thread.run_sync(lambda: store.search_text(words, k=options.k, filter=options.filter))
        return json_response(found.as_dict())
    # a filter may read its allowed set from the database first: off the event loop
    if options.filter is None and store.answers_from_memory(options.index_id, rerank=options.rerank is not False):
        return _hits(store.search(image_id, options=options))
    return _hits(await anyio.to_thread.run_sync(lambda: store.search(image_id, options=options)))


_SEARCH_BODY = {
    "required": True,
    "description": "an image file (multipart field ``image``), or a feature vector (JSON)",
    "content": {
        "multipart/form-data": {"schema": UploadQuery.model_json_schema()},
        "application/json": {"schema": VectorQuery.model_json_schema()},
    },
}


@search_router.post("/search", response_model=None, responses={200: {"model": list[SearchHit]}, **UPLOAD_ERRORS},
             openapi_extra={"parameters": [*openapi_parameters(SEARCH_PARAMS), *filter_parameters()],
                            "requestBody": _SEARCH_BODY})
async def search_by_upload(request: Request) -> Response:
    """The nearest stored images of an uploaded image (multipart field ``image``), or of a
    feature vector (JSON body ``{"vector": [...]}``). The filter may be given as query
    parameters, as form fields beside the image, or as keys of the JSON body."""
    service = get_service(request)
    try:
        options = search_options(request.query_params)
    except ValueError as exc:
        return error_response(request, 422, f"bad argument: {exc}")
    store = service.store
    if request.headers.get("content-type", "").startswith("application/json"):
        query, given = _vector(await request.body())
        options = _with_filter(options, lambda: body_filter(given))
        hits = await anyio.to_thread.run_sync(lambda: store.search(query, options=options))
    else:
        data, form = await read_upload(request, service)
        options = _with_filter(options, lambda: read_filter(form))
        hits = await anyio.to_thread.run_sync(lambda: service.search_upload(data, options))
    return _hits(hits)


def _with_filter(options: SearchOptions, read: Callable[[], SearchFilter]) -> SearchOptions:
    """``options`` with the filter of the request's body added to its query string's."""
    try:
        found = combined(options.filter or SearchFilter(), read())
    except ValueError as exc:
        raise ConfigError(f"bad argument: {exc}") from None
    return replace(options, filter=found or None)


def _vector(body: bytes) -> tuple[np.ndarray[Any, np.dtype[np.float32]], dict[str, Any]]:
    """The query vector of a JSON body (finite numbers) and the body, or a ConfigError saying
    what to send."""
    try:
        parsed = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        raise ConfigError('the body is not JSON; send {"vector": [numbers]} or a multipart image') from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("vector"), list) or not parsed["vector"]:
        raise ConfigError('send {"vector": [numbers]} or a multipart image')
    values = parsed["vector"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError('"vector" must hold only numbers')
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused just below
        vector = np.asarray(values, dtype=np.float32)
    if not np.isfinite(vector).all():
        raise ConfigError('"vector" must hold finite numbers (no NaN or infinity, none beyond float32)')
    return vector, parsed


#: ``GET /api/duplicates?wait=`` waits at most this long (seconds) for a running search.
MAX_WAIT_S = 300


@router.get("/duplicates", response_model=list[GroupOut], responses={
    200: {"description": "the groups, largest first"},
    202: {"model": JobOut, "description": "the search is running in the background: follow the job at Location "
                                          "(GET /api/jobs/{id}) until its state is done, then ask again",
          "headers": {"Location": {"description": "the job, /api/jobs/{id}", "schema": {"type": "string"}},
                      "Retry-After": {"description": "seconds before asking again", "schema": {"type": "integer"}}}},
    500: {"model": ErrorOut, "description": "the search failed"},
})
async def duplicates(request: Request, service: Svc, keep: KeepRule = "original",
                     min_cosine: Annotated[float | None, Query(ge=0, le=1)] = None,
                     wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description=(
                         "seconds to wait for a running search before answering 202 (0: answer at once)"))] = 0,
                     ) -> Response | list[dict[str, Any]]:
    """Groups of duplicate images, largest first, each with a suggested keeper. Finding them
    reads and compares photos (minutes for a large collection the first time), so it runs in
    the background: while it runs the answer is 202 with the job (also at ``Location``); once
    done, the groups, kept until images are added, removed or moved. ``wait`` waits that long
    for them first."""
    search = await anyio.to_thread.run_sync(service.duplicate_search, keep, min_cosine)
    job = search.job
    deadline = anyio.current_time() + wait
    while not job.finished and anyio.current_time() < deadline:
        await anyio.sleep(min(0.05, max(0.0, deadline - anyio.current_time())))
    if job.state == "failed":
        failure = job.failure
        if isinstance(failure, ImgStoreError):
            return error_response(request, status_for(failure), str(failure).splitlines()[0])
        return error_response(request, 500, f"the duplicate search failed: {job.error}")
    if search.groups is None:
        return JSONResponse(job.as_dict(), status_code=202,
                            headers={"Location": f"/api/jobs/{job.id}", "Retry-After": "1"})
    return [g.as_dict() | {"key": g.key} for g in search.groups]


@router.post("/duplicates/apply", response_model=ApplyOut)
def apply_duplicates(service: Svc, body: Annotated[ApplyRequest, Body()]) -> dict[str, Any]:
    """Move every copy but the keeper of the named groups into the server's ``--move-to``
    folder: ``{"keep": "original", "groups": {"KEY": "path to keep" or null}}``, or
    ``"groups": "all"`` for every group (never the default: a body without ``groups`` is
    refused)."""
    if body.groups is None:
        raise ConfigError('name the groups to resolve: "groups": {"KEY": null, ...} (keys from /api/duplicates), or "all"')
    return service.resolve(body.keep, None if body.groups == "all" else body.groups).as_dict()


@router.post("/duplicates/undo", response_model=UndoOut)
def undo_duplicates(service: Svc, body: UndoRequest) -> dict[str, Any]:
    """Put back what one apply moved, named by its journal's file name."""
    return service.undo(body.journal).as_dict()


@router.post("/images", response_model=AddedOut, responses=UPLOAD_ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "multipart/form-data": {"schema": UploadQuery.model_json_schema()}}}})
async def add_image(request: Request) -> dict[str, Any]:
    """Add an uploaded image (multipart field ``image``) to the store (``--allow-writes``)."""
    service = get_service(request)
    service.check_writes()
    data, _ = await read_upload(request, service)
    return {"image_id": await anyio.to_thread.run_sync(service.add, data)}


@router.delete("/images/{image_id}", response_model=RemovalOut)
def remove_image(service: Svc, image_id: ImageId) -> dict[str, Any]:
    """Remove a stored image (its files on disk are never touched; ``--allow-writes``)."""
    service.check_writes()
    return service.store.remove([image_id]).as_dict()
