"""Camera RAW files (DNG, CR2, CR3, NEF, ARW, RAF, ORF, RW2, ...) through LibRaw (``rawpy``).

A RAW file holds the sensor's data, and almost always a full-size or large JPEG preview that
the camera rendered from it. For search and copy detection the preview is what a person sees:
it is used when it covers the size the caller needs (its ``draft_size``, or a quarter of the
sensor's pixels without one); otherwise the sensor data is demosaiced at half size (LibRaw's
``half_size``: one RGB pixel per 2x2 Bayer block, four times faster than a full demosaic) with
the camera's white balance. The image is turned upright by LibRaw's orientation (``flip``);
the capture time comes from the preview's EXIF or, for TIFF-based RAWs, the file's own.

Only :mod:`imgstore.decode` calls this; it imports nothing of ours but the error types, and
``rawpy`` on first use.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .errors import DecodeError

#: File name extensions of camera RAW formats LibRaw reads.
RAW_EXTENSIONS = frozenset({
    ".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2", ".rwl",
    ".pef", ".srw", ".x3f", ".3fr", ".iiq", ".erf", ".kdc", ".dcr", ".mrw", ".mos", ".mef",
})

#: LibRaw's ``flip`` as the EXIF orientation that undoes it.
_FLIP_TO_ORIENTATION = {0: 1, 3: 3, 5: 8, 6: 6}


@dataclass(frozen=True)
class RawPicture:
    """``image``: an encoded JPEG preview (bytes, decoded by the caller like any JPEG) or the
    demosaiced picture (RGB); ``width``/``height``: the sensor image's size before orientation;
    ``orientation``: EXIF orientation that makes it upright (applied by the caller)."""

    image: bytes | Image.Image
    width: int
    height: int
    orientation: int


def is_raw_name(path: str | os.PathLike[str] | None) -> bool:
    return path is not None and os.path.splitext(os.fspath(path))[1].lower() in RAW_EXTENSIONS


def _rawpy(path: str | os.PathLike[str] | None) -> Any:
    try:
        import rawpy
    except ImportError:  # pragma: no cover - a core dependency; a broken install says so
        raise DecodeError(path, "a camera RAW file, and rawpy is not installed (pip install rawpy)") from None
    return rawpy


def _imread(data: bytes | bytearray | memoryview, path: str | os.PathLike[str] | None) -> Any:
    rawpy = _rawpy(path)
    try:
        return rawpy.imread(io.BytesIO(bytes(data)))
    except (rawpy.LibRawError, OSError, ValueError) as exc:
        raise DecodeError(path, f"not a readable camera RAW file ({type(exc).__name__})") from None


def raw_size(data: bytes | bytearray | memoryview, *, path: str | os.PathLike[str] | None = None) -> tuple[int, int]:
    """(width, height) of a RAW file's sensor image, without developing it."""
    with _imread(data, path) as raw:
        return int(raw.sizes.width), int(raw.sizes.height)


def read_raw(data: bytes | bytearray | memoryview, *, path: str | os.PathLike[str] | None,
             draft_size: tuple[int, int] | None, header_size: Callable[[bytes], tuple[int, int]],
             check_size: Callable[[int, int], None]) -> RawPicture:
    """The picture of a RAW file (see the module doc); :class:`DecodeError` when LibRaw cannot
    read it. ``check_size(width, height)`` is called with the sensor image's size before
    anything is developed (it raises above the caller's limit); ``header_size`` reads an encoded
    image's (width, height) from its header (the preview's)."""
    rawpy = _rawpy(path)
    with _imread(data, path) as raw:
        width, height = int(raw.sizes.width), int(raw.sizes.height)
        check_size(width, height)
        orientation = _FLIP_TO_ORIENTATION.get(int(raw.sizes.flip), 1)
        wanted = draft_size or (width // 2, height // 2)
        preview = _preview(raw, rawpy)
        if preview is not None and _covers(preview, wanted, header_size):
            return RawPicture(preview, width, height, orientation)
        try:
            rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8, user_flip=0)
        except (rawpy.LibRawError, MemoryError) as exc:
            raise DecodeError(path, f"cannot develop the RAW image ({type(exc).__name__})") from None
    return RawPicture(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB"), width, height, orientation)


def _preview(raw: Any, rawpy: Any) -> bytes | None:
    """The embedded JPEG preview, or None (none, or not a JPEG)."""
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError, rawpy.LibRawError):
        return None
    if thumb.format != rawpy.ThumbFormat.JPEG:
        return None
    return bytes(thumb.data)


def _covers(jpeg: bytes, wanted: tuple[int, int], header_size: Callable[[bytes], tuple[int, int]]) -> bool:
    try:
        w, h = header_size(jpeg)
    except DecodeError:
        return False
    return max(w, h) >= max(wanted) and min(w, h) >= min(wanted)
