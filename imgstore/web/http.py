"""What the API and the pages share about HTTP: statuses by error type, error answers (JSON
for the API, a page for a browser), the token and cross-site guard, uploads, the search's
query parameters, and fast JSON."""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.datastructures import FormData, ImmutableMultiDict, UploadFile
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ConfigError, DatabaseError, DecodeError, ImageTooLargeError, NotFoundError
from ..paths import MAX_ID
from ..types import SearchFilter, SearchOptions
from .render import error_page
from .service import Forbidden, Overloaded, Service, TooLarge

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_COOKIE = "imgstore_token"

#: Status by error type, most specific first (an ImageTooLargeError is a DecodeError too).
STATUSES: tuple[tuple[type[Exception], int], ...] = (
    (NotFoundError, 404),
    (ImageTooLargeError, 422),  # a decompression bomb or an over-size file: the request cannot be served
    (DecodeError, 415),  # not an image this server can read
    (DatabaseError, 503),
    (ConfigError, 422),  # a bad argument
    (Forbidden, 403),
    (TooLarge, 413),
    (Overloaded, 503),
)

TITLES = {400: "That request did not work", 401: "This collection needs a token", 403: "Not allowed here",
          404: "Not found", 413: "That file is too large", 415: "That is not an image this server can read",
          422: "That request cannot be answered", 503: "Busy; try again in a moment"}


def status_for(exc: Exception) -> int:
    """The HTTP status that says what went wrong, chosen by the error's type."""
    for kind, status in STATUSES:
        if isinstance(exc, kind):
            return status
    return 400


def error_text(exc: Exception, upload: str = "the uploaded image") -> str:
    """What to tell the client: the error's own message, except that an upload that is not an
    image it can read is named ``upload`` (the library calls bytes "<in-memory image>")."""
    if isinstance(exc, DecodeError) and exc.path is None:
        return f"{upload}: {exc.reason}"
    return str(exc)


def error_response(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """JSON ``{"error": ...}`` for the API and for clients that are not browsers; an HTML page
    for a page."""
    if request.url.path.startswith("/api") or "text/html" not in request.headers.get("accept", ""):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return error_page(request, status, TITLES.get(status, "Something went wrong"), message, headers)


def json_response(content: Any, status_code: int = 200) -> Response:
    """JSON serialized at once: results hold only numbers, strings and lists, and FastAPI's
    generic encoder cost more than a search itself."""
    return Response(json.dumps(content, ensure_ascii=False, separators=(",", ":")), status_code=status_code,
                    media_type="application/json")


async def read_upload(request: Request, service: Service) -> tuple[bytes, FormData]:
    """The uploaded image of a multipart form (field ``image``), size-limited, and the form."""
    limit = service.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + 65536:
        raise TooLarge(f"upload too large: at most {limit:,} bytes")
    form = await request.form()
    item = form.get("image")
    if not isinstance(item, UploadFile):
        raise ConfigError("send the image as a multipart form field named 'image'")
    data = await item.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"upload too large: at most {limit:,} bytes")
    if not data:
        raise ConfigError("the uploaded file is empty; choose an image")
    return data, form


# --- the search's query parameters: one table, read by the fast routes and declared in the spec


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # int, bool or str
    default: int | bool | None
    description: str
    required: bool = False
    minimum: int | None = None  # integers: the range a value must be in (declared and checked)
    maximum: int | None = None  # text: its longest length


#: Results one HTTP search may ask for (the library allows more: a bulk job uses export).
MAX_K_HTTP = 10_000
SEARCH_PARAMS = (
    Param("k", int, 10, "how many results", minimum=1, maximum=MAX_K_HTTP),
    Param("exact", bool, False, "results equal to a brute-force Hamming scan"),
    Param("probe_radius", int, 1, "bits flipped per band in the first probe", minimum=0, maximum=32),
    Param("rerank", bool, True, "order the Hamming candidates by cosine of the stored features"),
    Param("index", int, None, "the index to search (default: the active one)", minimum=1, maximum=MAX_ID),
)
ID_PARAM = Param("id", int, None, "the stored image to search from (or give text)", minimum=1, maximum=MAX_ID)
#: The longest text a word search takes (characters): a sentence, not a document.
MAX_TEXT = 1000
TEXT_PARAM = Param("text", str, None, "words to find images by instead of an image id, e.g. a dog on the beach "
                   "(through what the classifier sees in them); the answer is then an object that also says what the "
                   "words were understood as; not with index (a word search scores every image, through no index)",
                   maximum=MAX_TEXT)

_TRUE = frozenset({"1", "true", "on", "yes", "t", "y"})
_FALSE = frozenset({"0", "false", "off", "no", "f", "n"})


def openapi_parameters(params: tuple[Param, ...]) -> list[dict[str, Any]]:
    """The OpenAPI declaration of query parameters that a route reads itself."""
    out = []
    for p in params:
        schema: dict[str, Any] = {"type": {int: "integer", bool: "boolean", str: "string"}[p.kind]}
        if p.minimum is not None:
            schema["minimum"] = p.minimum
        if p.maximum is not None:
            schema["maxLength" if p.kind is str else "maximum"] = p.maximum
        if p.default is not None:
            schema["default"] = p.default
        elif not p.required:
            schema = {"anyOf": [schema, {"type": "null"}]}
        out.append({"name": p.name, "in": "query", "required": p.required, "description": p.description, "schema": schema})
    return out


def read_param(given: Mapping[str, str], p: Param) -> Any:
    """A query parameter as FastAPI would read it (ValueError naming it when it is not one)."""
    raw = given.get(p.name)
    if raw is None or (raw == "" and not p.required):
        if p.required:
            raise ValueError(f"{p.name}: required")
        return p.default
    if p.kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError(f"{p.name}: expected true or false, got {raw!r}")
    if p.kind is str:
        if p.maximum is not None and len(raw) > p.maximum:
            raise ValueError(f"{p.name}: at most {p.maximum} characters, got {len(raw)}")
        return raw
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{p.name}: expected a whole number, got {raw!r}") from None
    if (p.minimum is not None and value < p.minimum) or (p.maximum is not None and value > p.maximum):
        raise ValueError(f"{p.name}: expected {p.minimum} to {p.maximum}, got {value}")
    return value


def search_options(given: ImmutableMultiDict[str, Any]) -> SearchOptions:
    """The search options of a request's query string, its filter included (ValueError naming
    a bad one)."""
    values = {p.name: read_param(given, p) for p in SEARCH_PARAMS}
    return SearchOptions(k=values["k"], exact=values["exact"], probe_radius=values["probe_radius"],
                         rerank=values["rerank"], index_id=values["index"], filter=read_filter(given) or None)


# --- the search filter: query string, upload form and vector body alike ------------------------

#: name, JSON schema, description. ``where`` and ``tag`` repeat (every one must hold); the
#: others are given once. The same names are the upload form's fields and the vector body's keys.
FILTER_FIELDS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("where", {"type": "array", "items": {"type": "string"}},
     "only images whose metadata field KEY equals VALUE, as KEY=VALUE (a list field: one of its items); "
     "repeat for more, all must hold"),
    ("tag", {"type": "array", "items": {"type": "string"}}, "only images with this tag; repeat for more, all must hold"),
    ("label", {"type": "array", "items": {"type": "string"}},
     "only images the classifier labelled so (an ImageNet name, e.g. golden retriever; any case); repeat for more, "
     "all must hold"),
    ("under", {"type": "string"}, "only images with a current file under this folder (a path as the server sees it)"),
    ("taken_after", {"type": "string"},
     "only images taken (EXIF capture time) at or after this date or ISO time: 2024-06-01, 2024-06, 2024-06-01T14:30"),
    ("taken_before", {"type": "string"}, "only images taken (EXIF capture time) before this date or ISO time"),
)
_SINGLE = ("under", "taken_after", "taken_before")


def filter_parameters() -> list[dict[str, Any]]:
    """The OpenAPI declaration of the filter's query parameters."""
    return [{"name": name, "in": "query", "required": False, "description": text, "schema": schema,
             **({"style": "form", "explode": True} if schema["type"] == "array" else {})}
            for name, schema, text in FILTER_FIELDS]


def read_filter(given: ImmutableMultiDict[str, Any]) -> SearchFilter:
    """The filter of a query string or a form (empty fields are left out, as an empty form
    input means no condition); ValueError naming what is wrong."""
    values: dict[str, list[str]] = {}
    for name, _, _ in FILTER_FIELDS:
        listed = given.getlist(name)
        for value in listed:
            if not isinstance(value, str):
                raise ValueError(f"{name}: send text, not a file")
        values[name] = [v for v in listed if v.strip()]
        if name in _SINGLE and len(values[name]) > 1:
            raise ValueError(f"{name}: given {len(values[name])} times; give it once")
    return SearchFilter(where=values["where"], tags=values["tag"], labels=values["label"],
                        **{n: values[n][0] if values[n] else None for n in _SINGLE})


def body_filter(body: Mapping[str, Any]) -> SearchFilter:
    """The filter of a JSON body's keys (``where``: KEY=VALUE strings, or an object of fields
    and values); ValueError naming what is wrong."""
    where, tags, labels = body.get("where", []), body.get("tag", []), body.get("label", [])
    if not isinstance(where, (list, dict)) or (isinstance(where, list) and not all(isinstance(v, str) for v in where)):
        raise ValueError('where: send a list of "KEY=VALUE" strings or an object of fields and values')
    if not isinstance(tags, list) or not all(isinstance(v, str) for v in tags):
        raise ValueError("tag: send a list of tags")
    if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
        raise ValueError("label: send a list of label names")
    single = {}
    for name in _SINGLE:
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name}: send text")
        single[name] = value or None
    return SearchFilter(where=where, tags=tags, labels=labels, **single)


def combined(first: SearchFilter, second: SearchFilter) -> SearchFilter:
    """Both filters at once (a search given conditions in its query string and its body)."""
    for name in _SINGLE:
        a, b = getattr(first, name), getattr(second, name)
        if a is not None and b is not None and a != b:
            raise ValueError(f"{name}: given in the query string and in the body; give it once")
    return SearchFilter(where=first.where + second.where, tags=first.tags + second.tags, labels=first.labels + second.labels,
                        **{name: getattr(first, name) or getattr(second, name) for name in _SINGLE})


# --- the guard ------------------------------------------------------------------------------


class Guard:
    """The token on every request (header, the cookie a page visit sets, or ``?token=``), and
    no state-changing request from another site's page. A plain ASGI middleware: Starlette's
    ``@app.middleware("http")`` wraps each request in streams and a task group, which cost a
    third of a search's time (benchmarks/results/serve.md, variant noguard)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
                return error_page(request, 401, "This collection needs a token",
                                  "Open the address that `imgstore serve` printed when it started (it ends in ?token=...).")
            if from_query and not is_api and request.method == "GET":
                # a page opened with ?token=: keep it in a cookie and take it out of the address bar
                clean = request.url.remove_query_params("token")
                response = RedirectResponse(str(clean), status_code=303)
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict",
                                    secure=request.url.scheme == "https")
                return response
        if request.method not in SAFE_METHODS and cross_site(request):
            return JSONResponse({"error": "a request from another site's page was refused"}, status_code=403)
        return None


def cross_site(request: Request) -> bool:
    """A browser sent this from another site's page (its Origin is not this server, or it says
    so in Sec-Fetch-Site). Clients that are not browsers send neither header."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False
    host = request.headers.get("host", "")
    return origin.rstrip("/") not in (f"http://{host}", f"https://{host}")
