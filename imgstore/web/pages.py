"""The web pages of ``imgstore serve``: search, an image, duplicates and the collection.

Server-rendered (Jinja2) HTML that works without JavaScript (forms post and pages render the
answer); one small script (``static/app.js``) adds dropping and pasting images, a live progress
bar for background jobs and keyboard-free keeper picking. Everything the pages need ships in this
package; nothing is loaded from another site. Every action goes through the server's
:class:`~imgstore.web.service.Service`, the same one the JSON API uses, and reads the store only
through ``ImageStore``'s methods.
"""

from __future__ import annotations

import base64
import io
import os
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.datastructures import FormData, ImmutableMultiDict

from ..browse import MAX_PAGE, BrowsePage
from ..browse import SORTS as BROWSE_SORTS
from ..decode import load_fitted
from ..dedup import DuplicateGroup, DuplicateMember
from ..errors import DecodeError, ImgStoreError, NotFoundError
from ..hashing import available_methods
from ..paths import counted, printable
from ..types import SearchFilter, SearchOptions
from .http import error_text, read_filter, read_upload, status_for
from .render import render
from .service import Service, TooLarge

router = APIRouter(include_in_schema=False)
K_CHOICES = (10, 20, 50, 100)
PER_PAGE_CHOICES = (30, 60, 120)
#: The most common labels the collection page offers as one-click filters.
LABEL_CHIPS = 30
KEEP_RULES = ("original", "largest", "oldest", "newest", "smallest")
GROUPS_PER_PAGE = 30


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _query_preview(data: bytes, max_pixels: int) -> str | None:
    """The uploaded query as a small JPEG data URL, to show beside its results (decoded as every
    upload is: the server's pixel limit, formats that need no external program, a draft)."""
    try:
        img = load_fitted(data, 256, max_pixels=max_pixels)  # a JPEG's draft, a HEIC's own thumbnail
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - the preview is a nicety; the search reports real errors
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _int_or_none(value: object) -> int | None:
    text = str(value or "").strip()
    return int(text) if text.isdigit() else None


def _choices(value: object, allowed: tuple[int, ...], default: int) -> int:
    try:
        k = int(str(value))
    except (TypeError, ValueError):
        return default
    return k if 1 <= k <= max(allowed) else default


def search_context(service: Service, k: int, exact: bool, index: int | None,
                   search_filter: SearchFilter | None = None) -> dict[str, Any]:
    """What the search form shows: the index choices, how many images there are (one count,
    not every table's: this renders with every search) and the filter's inputs."""
    store = service.store
    shown = search_filter or SearchFilter()
    return {"k": k, "exact": exact, "index": index, "indexes": store.indexes(with_counts=False), "k_choices": K_CHOICES,
            "n_images": store.image_count(), "filter": shown, "filter_inputs": _filter_inputs(shown),
            "filter_query": _filter_query(shown)}


def _filter_inputs(shown: SearchFilter) -> dict[str, Any]:
    """The filter form's input values (one empty input where a condition is not given)."""
    given = shown.as_dict()
    return {"where": given.get("where") or [""], "tag": given.get("tag") or [""], "label": ", ".join(shown.labels),
            "under": given.get("under", ""), "taken_after": _day(shown.taken_after), "taken_before": _day(shown.taken_before)}


def _filter_query(search_filter: SearchFilter) -> str:
    """The filter as query parameters (``&tag=...``), carried by every result's link so that
    searching from a result keeps it."""
    return "".join(f"&{urlencode({key: v})}" for key, values in search_filter.as_dict().items()
                   for v in (values if isinstance(values, list) else [values]))


def _day(when: datetime | None) -> str:
    """A filter's time as a date input shows it (a time of day other than midnight is kept
    in the address, not in the input)."""
    return "" if when is None else when.date().isoformat()


def _page_filter(given: ImmutableMultiDict[str, Any]) -> SearchFilter:
    """The filter of a page's query string or form: the API's parameters; a tag or label
    input may hold several, separated by commas (no ImageNet name holds one). ValueError
    naming what is wrong."""
    found = read_filter(given)
    tags = [t.strip() for tag in found.tags for t in tag.split(",") if t.strip()]
    labels = [n.strip() for name in found.labels for n in name.split(",") if n.strip()]
    if tags == list(found.tags) and labels == list(found.labels):
        return found
    return SearchFilter(where=found.where, tags=tags, under=found.under, taken_after=found.taken_after,
                        taken_before=found.taken_before, labels=labels)


async def _form(request: Request) -> tuple[Service, FormData]:
    """The posted form of a page, after its cross-site token was checked."""
    service = _service(request)
    form = await request.form()
    service.check_form(str(form.get("csrf", "")))
    return service, form


def _redirect(path: str, service: Service, note: str, **more: str) -> RedirectResponse:
    extra = "".join(f"&{key}={quote(value, safe='')}" for key, value in more.items())
    sep = "&" if "?" in path else "?"
    return RedirectResponse(f"{path}{sep}note={service.notes.add(note)}{extra}", status_code=303)


@router.get("/", response_class=HTMLResponse)
def search_page(request: Request, id: str | None = None, k: str | None = None, exact: str | None = None,
                index: str | None = None, text: str | None = None) -> Response:
    """The search page; with ``id``, the search by that stored image; with ``text`` (the words
    box, which wins over an ``id`` the form carries), the search by words."""
    service = _service(request)
    k_value, index_id = _choices(k, K_CHOICES, 20), _int_or_none(index)
    try:
        search_filter = _page_filter(request.query_params) or None
    except ValueError as exc:
        context = search_context(service, k_value, bool(exact), index_id)
        return render(request, "search.html", 422, error=str(exc), **context)
    context = search_context(service, k_value, bool(exact), index_id, search_filter)
    if text and text.strip():
        try:
            found = service.store.search_text(text, k=k_value, filter=search_filter)
        except ImgStoreError as exc:
            return render(request, "search.html", status_for(exc), error=str(exc), words_text=text, **context)
        return render(request, "search.html", words=found, results=found.hits, **context)
    query_id = _int_or_none(id)
    if id and query_id is None:
        return render(request, "search.html", 422, error=f"{id!r} is not an image id", **context)
    if query_id is None:
        return render(request, "search.html", **context)
    try:
        record = service.store.image(query_id)
        results = service.store.search(query_id, options=SearchOptions(k=k_value, exact=bool(exact), index_id=index_id,
                                                                       filter=search_filter))
    except ImgStoreError as exc:
        return render(request, "search.html", status_for(exc), error=str(exc), **context)
    return render(request, "search.html", query=record, results=results, **context)


@router.post("/", response_class=HTMLResponse)
async def search_upload(request: Request) -> Response:
    service = _service(request)
    form = await request.form()
    k_value, index_id = _choices(form.get("k"), K_CHOICES, 20), _int_or_none(form.get("index"))
    exact = bool(form.get("exact"))
    try:
        search_filter = _page_filter(form) or None
    except ValueError as exc:
        context = await anyio.to_thread.run_sync(search_context, service, k_value, exact, index_id)
        return render(request, "search.html", 422, error=str(exc), **context)
    item = form.get("image")
    query_id = _int_or_none(form.get("id"))
    words = str(form.get("text") or "").strip()
    if words and not getattr(item, "filename", None):
        # words typed, then the image search's button (no file): the search by those words
        again = {"text": words, "k": str(k_value)}
        return RedirectResponse(f"/?{urlencode(again)}{_filter_query(search_filter or SearchFilter())}", status_code=303)
    if query_id is not None and not getattr(item, "filename", None):
        # the form of a search by a stored image, sent again with other settings (no new file):
        # the same search at its own address
        again = {"id": str(query_id), "k": str(k_value), **({"exact": "1"} if exact else {}),
                 **({"index": str(index_id)} if index_id else {})}
        return RedirectResponse(f"/?{urlencode(again)}{_filter_query(search_filter or SearchFilter())}", status_code=303)
    context = await anyio.to_thread.run_sync(search_context, service, k_value, exact, index_id, search_filter)
    try:
        data, _ = await read_upload(request, service)
    except (TooLarge, ImgStoreError) as exc:
        return render(request, "search.html", status_for(exc), error=error_text(exc), **context)
    name = getattr(item, "filename", None) or "the uploaded image"
    options = SearchOptions(k=k_value, exact=exact, index_id=index_id, filter=search_filter)
    try:
        results = await anyio.to_thread.run_sync(service.search_upload, data, options)
    except ImgStoreError as exc:
        return render(request, "search.html", status_for(exc), error=error_text(exc, name) if isinstance(exc, DecodeError)
                      else f"{name}: {exc}", **context)
    preview = await anyio.to_thread.run_sync(_query_preview, data, service.max_pixels)
    return render(request, "search.html", results=results, upload_name=name, upload_preview=preview, **context)


@router.get("/images/{image_id}", response_class=HTMLResponse)
def image_page(request: Request, image_id: int, note: str | None = None) -> Response:
    service = _service(request)
    record = service.store.image(image_id)
    try:
        neighbours = [h for h in service.store.search(image_id, 13) if h.image_id != image_id][:12]
    except ImgStoreError:
        neighbours = []
    return render(request, "image.html", image=record, neighbours=neighbours, note=service.notes.get(note))


@router.get("/images/{image_id}/file")
def original(request: Request, image_id: int) -> Response:
    data, media_type = _service(request).original(image_id)
    return Response(data, media_type=media_type, headers={
        "Content-Disposition": "inline", "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'",
    })


@router.post("/images/{image_id}/remove")
async def remove_image(request: Request, image_id: int) -> Response:
    service, _ = await _form(request)
    removal = await anyio.to_thread.run_sync(service.store.remove, [image_id])
    note = f"Removed image {image_id} from the store ({counted(len(removal.paths), 'path')}); the files are untouched."
    context = await anyio.to_thread.run_sync(search_context, service, 20, False, None)
    return render(request, "search.html", note=note, **context)


@router.get("/duplicates", response_class=HTMLResponse)
def duplicates_page(request: Request, keep: str = "original", page: int = 1, note: str | None = None,
                    undo: str | None = None, job: str | None = None) -> Response:
    """The groups, or, while the search for them runs in the background, a page that follows
    it and turns into the groups when it is done (``job``: the search that page followed; if
    it failed, say so instead of starting another)."""
    service = _service(request)
    keep = keep if keep in KEEP_RULES else "original"
    shared = {"keep": keep, "keep_rules": KEEP_RULES, "move_to": service.move_to, "journals": service.recent_journals(),
              "note": service.notes.get(note), "undo": undo}
    followed = service.jobs.get(_int_or_none(job) or 0)
    if followed is None or followed.kind != "duplicates" or followed.state != "failed":
        search = service.duplicate_search(keep)
        followed = search.job
        if search.groups is not None:
            return _groups_page(request, service, search.groups, page, shared)
    if followed.state == "failed":
        status = status_for(followed.failure) if isinstance(followed.failure, ImgStoreError) else 500
        return render(request, "duplicates.html", status, failed=followed, **shared)
    again = {"keep": keep, "page": str(page), "note": note, "undo": undo, "job": str(followed.id)}
    next_url = "/duplicates?" + urlencode({k: v for k, v in again.items() if v})
    return render(request, "duplicates.html", 202, searching=followed, next_url=next_url, **shared)


def _groups_page(request: Request, service: Service, groups: list[DuplicateGroup], page: int,
                 shared: dict[str, Any]) -> Response:
    pages = max(1, -(-len(groups) // GROUPS_PER_PAGE))
    page = min(max(1, page), pages)
    shown = groups[(page - 1) * GROUPS_PER_PAGE: page * GROUPS_PER_PAGE]
    spare = sum(g.n_files - 1 for g in groups)
    details = service.store.image_files([m.image_id for g in shown for m in g.members])  # formats and file sizes
    return render(request, "duplicates.html", groups=shown, n_groups=len(groups), spare=spare, page=page, pages=pages,
                  details=details, ordered={g.key: _keeper_first(g) for g in shown}, **shared)


def _keeper_first(group: DuplicateGroup) -> list[DuplicateMember]:
    return sorted(group.members, key=lambda m: m.image_id != group.keeper)


@router.post("/duplicates/resolve")
async def resolve(request: Request) -> Response:
    service, form = await _form(request)
    keep = str(form.get("keep", "original"))
    keep = keep if keep in KEEP_RULES else "original"
    key, path = str(form.get("group", "")), form.get("keeper")
    report = await anyio.to_thread.run_sync(service.resolve, keep, {key: str(path) if path else None})
    note = f"Moved {counted(len(report.moved), 'file')} to {printable(service.move_to or '')}"
    if report.failed:
        note += f"; {len(report.failed)} could not be moved ({report.failed[0][1]})"
    return _redirect(f"/duplicates?keep={keep}", service, note, undo=os.path.basename(report.journal))


@router.post("/duplicates/undo")
async def undo(request: Request) -> Response:
    service, form = await _form(request)
    report = await anyio.to_thread.run_sync(service.undo, str(form.get("journal", "")))
    note = f"Put back {counted(len(report.restored), 'file')}"
    if report.failed:
        note += f"; {len(report.failed)} could not be put back ({report.failed[0][1]})"
    return _redirect("/duplicates", service, note)


@router.get("/collection", response_class=HTMLResponse)
def collection_page(request: Request, note: str | None = None, sort: str = "taken", order: str = "desc",
                    page: str | None = None, per_page: str | None = None) -> Response:
    """The collection: its images, a page at a time, sorted and filtered (the search's
    filters), its most common labels as one-click filters; then the store's state (counts,
    feature spaces, indexes, background jobs, ingest errors)."""
    service = _service(request)
    store = service.store
    sort = sort if sort in BROWSE_SORTS else "taken"
    order = order if order in ("asc", "desc") else "desc"
    size = _choices(per_page, PER_PAGE_CHOICES, 60)
    size = size if size in PER_PAGE_CHOICES else 60
    wanted = min(max(1, _int_or_none(page) or 1), MAX_PAGE)
    status = 200
    error: str | None = None
    shown: BrowsePage | None = None
    try:
        search_filter = _page_filter(request.query_params)
    except ValueError as exc:
        status, error, search_filter = 422, str(exc), SearchFilter()
    if error is None:
        try:
            shown = store.browse(search_filter or None, sort=sort, order=order, page=wanted, per_page=size)
            if shown.total and wanted > shown.pages:  # past the last page (the collection shrank): the last
                shown = store.browse(search_filter or None, sort=sort, order=order, page=shown.pages, per_page=size)
        except ImgStoreError as exc:  # e.g. a label that is no ImageNet name: the message names the closest
            status, error = status_for(exc), str(exc)
    try:
        common = store.label_counts()
    except NotFoundError:  # no feature space with a classifier (colour histograms): no labels to offer
        common = []
    here = {"sort": sort, "order": order, **({"per_page": str(size)} if size != 60 else {})}
    query = urlencode(here) + _filter_query(search_filter)

    def with_label(name: str, on: bool) -> str:
        labels = [n for n in search_filter.labels if n != name.casefold()] if on else [*search_filter.labels, name]
        changed = SearchFilter(where=search_filter.where, tags=search_filter.tags, under=search_filter.under,
                               taken_after=search_filter.taken_after, taken_before=search_filter.taken_before, labels=labels)
        return "/collection?" + urlencode(here) + _filter_query(changed)

    offered = common[:LABEL_CHIPS]
    offered += [c for c in common[LABEL_CHIPS:] if c.name.casefold() in search_filter.labels]  # on: always shown
    chips = [{"name": c.name, "images": c.images, "on": c.name.casefold() in search_filter.labels,
              "href": with_label(c.name, c.name.casefold() in search_filter.labels)} for c in offered]
    return render(request, "collection.html", status, error=error, browse=shown, query=query, sort=sort, order=order,
                  per_page=size, per_page_choices=PER_PAGE_CHOICES, filter=search_filter,
                  filter_inputs=_filter_inputs(search_filter),
                  chips=chips, label_names=sorted(c.name for c in common), info=store.info(), errors=store.errors(50),
                  jobs=list(reversed(service.jobs.all())), methods=available_methods(), note=service.notes.get(note))


@router.post("/collection/indexes")
async def create_index(request: Request) -> Response:
    service, form = await _form(request)
    bits = _int_or_none(form.get("n_bits")) or 64
    job = service.start_index(str(form.get("method", "itq")), bits, extractor=str(form.get("extractor") or "") or None)
    return _redirect("/collection", service, f"Started job {job.id}: {job.title}")


@router.post("/collection/indexes/{index_id}/activate")
async def activate(request: Request, index_id: int) -> Response:
    service, _ = await _form(request)
    await anyio.to_thread.run_sync(service.store.activate_index, index_id)
    return _redirect("/collection", service, f"Index {index_id} is now active")
