"""Server-rendered HTML: the Jinja2 templates, their filters, and the error page."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from ..paths import counted, printable
from .service import Service

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))


def _short_path(path: str | None) -> str:
    """The file name with its folder (``copies/crop_80/chelsea.jpg`` -> ``crop_80/chelsea.jpg``):
    copies often share a name."""
    if not path:
        return ""
    parent = os.path.basename(os.path.dirname(path))
    return printable(f"{parent}/{os.path.basename(path)}" if parent else os.path.basename(path))


def _size(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _num(n: object) -> object:
    return f"{n:,}" if isinstance(n, int) else n


def _when(d: datetime | None) -> str:
    return "" if d is None else d.strftime("%Y-%m-%d %H:%M")


templates.env.filters.update({
    "printable": lambda p: printable(p) if p else "",
    "basename": lambda p: os.path.basename(p) if p else "",
    "short": _short_path,
    "bits": lambda d: f"{d} bit" if d == 1 else f"{d} bits",
    "dirname": lambda p: printable(os.path.dirname(p)) if p else "",
    "num": _num,
    "counted": lambda n, noun: counted(n, noun),
    "cos": lambda c: "" if c is None else f"{c:.3f}",
    "when": _when,
    "day": lambda d: "" if d is None else d.strftime("%Y-%m-%d"),
    "size": _size,
})


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    """A page of this server: the template ``name`` with what every page shows."""
    service: Service = request.app.state.service
    context.setdefault("note", None)
    return templates.TemplateResponse(request, name, {
        "service": service, "store_name": service.store.display_url, "allow_writes": service.allow_writes,
        "csrf": service.csrf_token, **context,
    }, status_code=status)


def error_page(request: Request, status: int, title: str, message: str, headers: dict[str, str] | None = None) -> HTMLResponse:
    response = templates.TemplateResponse(request, "error.html", {
        "title": title, "message": message, "status": status, "store_name": None, "allow_writes": False,
        "note": None,
    }, status_code=status)
    if headers:
        response.headers.update(headers)
    return response
