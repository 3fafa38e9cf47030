"""The web pages of ``imgstore serve``: search, an image, duplicates and the collection.

Server-rendered (Jinja2) HTML that works without JavaScript (forms post and pages render the
answer); one small script (``static/app.js``) adds dropping and pasting images, a live progress
bar for background jobs and keyboard-free keeper picking. Everything the pages need ships in this
package; nothing is loaded from another site. Every action goes through the server's
:class:`~imgstore.serve.Service`, the same one the JSON API uses.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from ..errors import ImgStoreError
from ..paths import printable

if TYPE_CHECKING:  # pragma: no cover
    from ..serve import Service

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
K_CHOICES = (10, 20, 50, 100)
KEEP_RULES = ("original", "largest", "oldest", "newest", "smallest")
GROUPS_PER_PAGE = 30


def _filters() -> None:
    env = templates.env
    env.filters["printable"] = lambda p: printable(p) if p else ""
    env.filters["basename"] = lambda p: os.path.basename(p) if p else ""
    env.filters["short"] = _short_path
    env.filters["bits"] = lambda d: f"{d} bit" if d == 1 else f"{d} bits"
    env.filters["dirname"] = lambda p: printable(os.path.dirname(p)) if p else ""
    env.filters["num"] = lambda n: f"{n:,}" if isinstance(n, int) else n
    env.filters["cos"] = lambda c: "" if c is None else f"{c:.3f}"
    env.filters["when"] = lambda d: "" if d is None else d.strftime("%Y-%m-%d %H:%M")

    def size(n: int | None) -> str:
        if n is None:
            return ""
        value = float(n)
        for unit in ("B", "KB", "MB", "GB"):
            if value < 1024 or unit == "GB":
                return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
            value /= 1024
        return f"{n} B"

    env.filters["size"] = size


def _short_path(path: str | None) -> str:
    """The file name with its folder (``copies/crop_80/chelsea.jpg`` -> ``crop_80/chelsea.jpg``):
    copies often share a name."""
    if not path:
        return ""
    parent = os.path.basename(os.path.dirname(path))
    return printable(f"{parent}/{os.path.basename(path)}" if parent else os.path.basename(path))


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    service: Service = request.app.state.service
    context.setdefault("note", None)
    return templates.TemplateResponse(request, name, {
        "service": service, "store_name": service.store.display_url, "allow_writes": service.allow_writes,
        "csrf": service.csrf_token, **context,
    }, status_code=status)


def error_page(request: Request, status: int, title: str, message: str, headers: dict[str, str] | None = None) -> Any:
    response = templates.TemplateResponse(request, "error.html", {
        "title": title, "message": message, "status": status, "store_name": None, "allow_writes": False,
        "note": None,
    }, status_code=status)
    if headers:
        response.headers.update(headers)
    return response


def _query_preview(data: bytes) -> str | None:
    """The uploaded query as a small JPEG data URL, to show beside its results."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (256, 256))
            img.thumbnail((256, 256))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - the preview is a nicety; the search reports real errors
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _int_or_none(value: Any) -> int | None:
    text = str(value or "").strip()
    return int(text) if text.isdigit() else None


def _choices(value: Any, allowed: tuple[int, ...], default: int) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError):
        return default
    return k if 1 <= k <= max(allowed) else default


def add_pages(app: Any, service: Service) -> None:
    """Mount the pages and their static files on ``app``."""
    import anyio

    from ..serve import read_upload

    store = service.store
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def search_context(k: int, exact: bool, index: int | None) -> dict[str, Any]:
        """What the search form shows: the index choices and how many images there are (one
        count, not every table's: this renders with every search)."""
        from sqlalchemy import func, select

        from ..models import Image

        with store.ctx.read("show the search form") as conn:
            indexes = store.ctx.indexes(conn)
            n_images = int(conn.scalar(select(func.count()).select_from(Image)) or 0)
        return {"k": k, "exact": exact, "index": index, "indexes": indexes, "k_choices": K_CHOICES,
                "n_images": n_images}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def search_page(request: Request, id: str | None = None, k: str | None = None, exact: str | None = None,
                    index: str | None = None) -> Any:
        k_value, index_id = _choices(k, K_CHOICES, 20), _int_or_none(index)
        context = search_context(k_value, bool(exact), index_id)
        query_id = _int_or_none(id)
        if id and query_id is None:
            return render(request, "search.html", 422, error=f"{id!r} is not an image id", **context)
        if query_id is None:
            return render(request, "search.html", **context)
        try:
            record = store.image(query_id)
            results = store.search(query_id, k_value, exact=bool(exact), index_id=index_id)
        except ImgStoreError as exc:
            from ..serve import _status

            return render(request, "search.html", _status(exc), error=str(exc), **context)
        return render(request, "search.html", query=record, results=results, **context)

    @app.post("/", response_class=HTMLResponse, include_in_schema=False)
    async def search_upload(request: Request) -> Any:
        from ..serve import TooLarge, _status

        form = await request.form()
        k_value, index_id = _choices(form.get("k"), K_CHOICES, 20), _int_or_none(form.get("index"))
        exact = bool(form.get("exact"))
        context = await anyio.to_thread.run_sync(search_context, k_value, exact, index_id)
        try:
            data, _ = await read_upload(request, service)
        except TooLarge as exc:
            return render(request, "search.html", 413, error=str(exc), **context)
        except ImgStoreError as exc:
            return render(request, "search.html", _status(exc), error=str(exc), **context)
        item = form.get("image")
        name = getattr(item, "filename", None) or "the uploaded image"

        def run() -> Any:
            return service.search_upload(data, k=k_value, exact=exact, index=index_id)

        try:
            results = await anyio.to_thread.run_sync(run)
        except ImgStoreError as exc:
            return render(request, "search.html", _status(exc), error=f"{name}: {exc}", **context)
        return render(request, "search.html", results=results, upload_name=name, upload_preview=_query_preview(data),
                      **context)

    @app.get("/images/{image_id}", response_class=HTMLResponse, include_in_schema=False)
    def image_page(request: Request, image_id: int, note: str | None = None) -> Any:
        record = store.image(image_id)
        try:
            neighbours = [h for h in store.search(image_id, 13) if h.image_id != image_id][:12]
        except ImgStoreError:
            neighbours = []
        return render(request, "image.html", image=record, neighbours=neighbours, note=note_for(note))

    @app.get("/images/{image_id}/file", include_in_schema=False)
    def original(image_id: int) -> Any:
        data, media_type = service.original(image_id)
        return Response(data, media_type=media_type, headers={
            "Content-Disposition": "inline", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'",
        })

    @app.post("/images/{image_id}/remove", include_in_schema=False)
    async def remove_image(request: Request, image_id: int) -> Any:
        form = await request.form()
        service.check_form(str(form.get("csrf", "")))
        removal = await anyio.to_thread.run_sync(lambda: store.remove([image_id]))
        note = f"Removed image {image_id} from the store ({len(removal.paths)} path(s)); the files are untouched."
        return render(request, "search.html", note=note, **search_context(20, False, None))

    @app.get("/duplicates", response_class=HTMLResponse, include_in_schema=False)
    def duplicates_page(request: Request, keep: str = "original", page: int = 1, note: str | None = None,
                        undo: str | None = None) -> Any:
        keep = keep if keep in KEEP_RULES else "original"
        groups = store.find_duplicates(keep=keep)
        pages = max(1, -(-len(groups) // GROUPS_PER_PAGE))
        page = min(max(1, page), pages)
        shown = groups[(page - 1) * GROUPS_PER_PAGE: page * GROUPS_PER_PAGE]
        spare = sum(g.n_files - 1 for g in groups)
        return render(request, "duplicates.html", groups=shown, n_groups=len(groups), spare=spare, keep=keep,
                      keep_rules=KEEP_RULES, page=page, pages=pages, move_to=service.move_to,
                      journals=service.recent_journals(), note=note_for(note), undo=undo, details=_member_details(store, shown),
                      ordered={g.key: sorted(g.members, key=lambda m, g=g: m.image_id != g.keeper) for g in shown})

    @app.post("/duplicates/resolve", include_in_schema=False)
    async def resolve(request: Request) -> Any:
        form = await request.form()
        service.check_form(str(form.get("csrf", "")))
        keep = str(form.get("keep", "original"))
        keep = keep if keep in KEEP_RULES else "original"
        key, path = str(form.get("group", "")), form.get("keeper")
        report = await anyio.to_thread.run_sync(lambda: service.resolve(keep, {key: str(path) if path else None}))
        journal = os.path.basename(report.journal)
        note = f"Moved {len(report.moved)} file(s) to {printable(service.move_to or '')}"
        if report.failed:
            note += f"; {len(report.failed)} could not be moved ({report.failed[0][1]})"
        return RedirectResponse(f"/duplicates?keep={keep}&note={flash(note)}&undo={_quote(journal)}", status_code=303)

    @app.post("/duplicates/undo", include_in_schema=False)
    async def undo(request: Request) -> Any:
        form = await request.form()
        service.check_form(str(form.get("csrf", "")))
        report = await anyio.to_thread.run_sync(lambda: service.undo(str(form.get("journal", ""))))
        note = f"Put back {len(report.restored)} file(s)"
        if report.failed:
            note += f"; {len(report.failed)} could not be put back ({report.failed[0][1]})"
        return RedirectResponse(f"/duplicates?note={flash(note)}", status_code=303)

    @app.get("/collection", response_class=HTMLResponse, include_in_schema=False)
    def collection_page(request: Request, note: str | None = None) -> Any:
        from ..hashing import available_methods

        return render(request, "collection.html", info=store.info(), errors=store.errors(50),
                      jobs=list(reversed(service.jobs.all())), methods=available_methods(), note=note_for(note))

    @app.post("/collection/indexes", include_in_schema=False)
    async def create_index(request: Request) -> Any:
        form = await request.form()
        service.check_form(str(form.get("csrf", "")))
        bits = _int_or_none(form.get("n_bits")) or 64
        job = service.start_index(str(form.get("method", "itq")), bits, extractor=str(form.get("extractor") or "") or None)
        return RedirectResponse(f"/collection?note={flash(f'Started job {job.id}: {job.title}')}", status_code=303)

    @app.post("/collection/indexes/{index_id}/activate", include_in_schema=False)
    async def activate(request: Request, index_id: int) -> Any:
        form = await request.form()
        service.check_form(str(form.get("csrf", "")))
        await anyio.to_thread.run_sync(store.activate_index, index_id)
        return RedirectResponse(f"/collection?note={flash(f'Index {index_id} is now active')}", status_code=303)


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


_NOTES: dict[str, str] = {}


def flash(text: str) -> str:
    """Keep a one-line message for the page a redirect leads to; returns its key for ``?note=``
    (the page shows only messages this server wrote, never text from the address)."""
    import secrets

    key = secrets.token_urlsafe(8)
    _NOTES[key] = text
    while len(_NOTES) > 200:
        del _NOTES[next(iter(_NOTES))]
    return key


def note_for(key: str | None) -> str | None:
    return _NOTES.get(key) if key else None


def _member_details(store: Any, groups: list[Any]) -> dict[int, Any]:
    """Each shown member's format and its current files' sizes, for the side-by-side view, in
    two queries for the whole page: image id -> (format, {path: file size})."""
    from sqlalchemy import select

    from ..models import Image, ImagePath
    from ..paths import from_stored
    from ..sqlhelpers import IN_CHUNK, chunks

    ids = sorted({m.image_id for g in groups for m in g.members})
    details: dict[int, Any] = {}
    with store.ctx.read("show duplicate groups") as conn:
        for part in chunks(ids, IN_CHUNK):
            for image_id, fmt in conn.execute(select(Image.id, Image.format).where(Image.id.in_(part))):
                details[int(image_id)] = (fmt, {})
            for image_id, path, size in conn.execute(
                select(ImagePath.image_id, ImagePath.path, ImagePath.file_size)
                .where(ImagePath.image_id.in_(part), ImagePath.is_current.is_(True))
            ):
                if int(image_id) in details:
                    details[int(image_id)][1][from_stored(path)] = int(size)
    return details


_filters()
