"""The HTTP API and pages over one store (``imgstore serve``; ``create_app(store)`` to embed it).

One process opens the store once (codes cached in memory, brought up to date by appends when an
ingest writes beside it), loads the extractor on first need and answers JSON in the shapes of
the CLI's ``--json`` (the typed results' ``as_dict()``). FastAPI serves the OpenAPI docs at
``/docs``. Files are only ever read as images the store knows, by id (their current paths); no
request names a path. Writes (adding an uploaded image, removing one) need ``allow_writes``.

The code lives in :mod:`imgstore.web`; this module is the name the command and embedders use.
"""

from __future__ import annotations

from .web.app import MIN_TOKEN_LENGTH, WORKER_SETTINGS_ENV, check_token, create_app, is_loopback, worker_app, worker_settings
from .web.http import Guard
from .web.service import MAX_UPLOAD_BYTES, Batcher, Service, Thumbnails

__all__ = [
           "MAX_UPLOAD_BYTES",
           "MIN_TOKEN_LENGTH",
           "WORKER_SETTINGS_ENV",
           "Batcher",
           "Guard",
           "Service",
           "Thumbnails",
           "check_token",
           "create_app",
           "is_loopback",
           "worker_app",
           "worker_settings",
]
