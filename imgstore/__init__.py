"""imgstore: a persistent, database-backed image search store.

The Python API is :class:`imgstore.ImageStore`; importing this package stays light (no torch).
"""

from __future__ import annotations

from .errors import ImgStoreError
from .repository import ImageStore
from .types import SearchFilter, SearchOptions, SearchResult

__all__ = ["ImageStore", "ImgStoreError", "SearchFilter", "SearchOptions", "SearchResult", "__version__"]
__version__ = "0.1.0"
