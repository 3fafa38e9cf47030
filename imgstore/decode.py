"""Opening image files safely: size limits, EXIF orientation, every Pillow mode to RGB, typed errors.

Every image imgstore looks at goes through :func:`load_image` (or :func:`read_file` +
:func:`decode_bytes`), so ingest, search-by-example, the server and the benchmarks see the same
pixels and obey the same limit.

One pixel limit for every path: :data:`DEFAULT_MAX_PIXELS`, or ``$IMGSTORE_MAX_PIXELS`` for the
whole process, or ``ImageStore(max_pixels=...)`` (``imgstore --max-pixels``) for one store. It
is checked here from the header, before any pixel data is decoded, and it is the limit that
decides: images are opened without Pillow's own decompression-bomb check (see :func:`_open`),
so a 150 MP photo is neither warned about nor refused by Pillow. Nothing here touches global
Pillow state: ``Image.MAX_IMAGE_PIXELS`` and ``ImageFile.LOAD_TRUNCATED_IMAGES`` keep whatever
values the application chose.

Memory stays bounded for large photos: with ``draft_size`` a JPEG decodes at a reduced DCT
scale, and an image still above :data:`REDUCE_FROM_PIXELS` is then reduced (a box average by a
whole factor) to the smallest size that still covers ``draft_size`` before its mode is
converted, so a 144 MP PNG takes one full-size buffer for the time of its decode, and what is
kept is a few hundred pixels a side.

A HEIC/HEIF usually carries a small thumbnail its encoder made (a few hundred pixels a side). With
``thumbnail_size`` it is decoded instead of the image when it covers that size in both
directions and is a scaled copy of the image (pillow-heif checks its aspect ratio, crop,
rotation, mirroring and colour profile): a 12 MP HEIC's HEVC decode takes 0.1-1 s, its
thumbnail's a few milliseconds. Callers ask for it where a picture of that size is all they
use (an extractor's input, a page's thumbnail, the geometric check's 512-px working image when
the thumbnail covers it: a Galaxy's 512-px one does, an iPhone's 320-px one does not).

Formats: Pillow's own (JPEG, PNG, GIF, WebP, AVIF, TIFF, BMP, ...), HEIC/HEIF through the
``pillow-heif`` plugin, and camera RAW files through :mod:`imgstore.rawphoto` (by their name, or
by LibRaw recognising bytes that Pillow does not).

Any failure a file can cause is raised as :class:`~imgstore.errors.DecodeError` carrying the path
and a short human reason (``"truncated or corrupt image data"``, ``"not a recognised image
format"``, ...), never a raw Pillow traceback.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import IO, Any, TextIO, Union

import numpy as np
from PIL import Image, ImageFile

from .errors import ConfigError, DecodeError, ImageTooLargeError
from .rawphoto import is_raw_name, raw_size, read_raw

logger = logging.getLogger(__name__)

#: Largest image (width x height, in pixels) decoded by default: 200 megapixels, the biggest
#: phone sensors (200 MP) and above medium-format cameras (150 MP). A 200 MP image takes 800 MB
#: while it is decoded (Pillow keeps RGB as 4 bytes a pixel), so this also bounds the memory one
#: decode worker can take. ``$IMGSTORE_MAX_PIXELS`` changes it for a process,
#: ``ImageStore(max_pixels=...)`` (``imgstore --max-pixels``) for one store.
DEFAULT_MAX_PIXELS = 200_000_000

#: The environment variable that sets the pixel limit of a process: a whole number of pixels
#: (``250000000``) or of megapixels (``250M``). Read when a store opens or a decode is given no limit.
MAX_PIXELS_ENV = "IMGSTORE_MAX_PIXELS"

#: How a too-large image's error says to raise the limit, on every path.
RAISE_LIMIT_HINT = f"imgstore --max-pixels N, ${MAX_PIXELS_ENV}=N or ImageStore(max_pixels=N)"

#: Largest file read by default (bytes). Compressed images are far smaller than their pixels; a
#: file above this is most likely not a photo (or a hostile one).
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

#: Formats that need an external program (Ghostscript for EPS) are never opened from untrusted
#: files.
_EXCLUDED_FORMATS = frozenset({"EPS"})

# EXIF tags
_TAG_ORIENTATION = 0x0112
_TAG_DATETIME = 0x0132
_TAG_EXIF_IFD = 0x8769
_TAG_DATETIME_ORIGINAL = 0x9003

_TRANSPOSE_FOR_ORIENTATION: dict[int, tuple[Image.Transpose, ...]] = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}

#: Exceptions Pillow's decoders are known to raise on bad data. Anything else is a bug.
_DECODE_FAILURES: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # only ever raised when the application escalates warnings
)

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image]


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image, ready for an extractor.

    image: RGB, fully loaded, EXIF orientation applied (possibly reduced by a JPEG draft, or a
    HEIC's embedded thumbnail: see ``thumbnail_size``).
    width, height: pixels after orientation, at the file's full resolution (not the draft's).
    format: Pillow's format name (``"JPEG"``, ``"PNG"``, ...) or None for an in-memory image.
    captured_at: EXIF DateTimeOriginal (else DateTime), naive local time as the camera wrote it;
    None when absent or unreadable.
    """

    image: Image.Image
    width: int
    height: int
    format: str | None
    captured_at: datetime | None


def parse_pixels(text: str, *, source: str = "the pixel limit") -> int:
    """A pixel count from text: a whole number (``250000000``, ``250_000_000``) or megapixels
    (``250M``, ``250MP``, ``1.5M``). Raises ConfigError, naming ``source``, for anything else."""
    cleaned = text.strip().upper().replace("_", "").replace(" ", "")
    scale = 1
    for suffix in ("MP", "M"):
        if cleaned.endswith(suffix):
            cleaned, scale = cleaned[: -len(suffix)], 1_000_000
            break
    try:
        value = float(cleaned) * scale if scale > 1 else int(cleaned)
    except ValueError:
        value = 0
    if not 1 <= value < 2**63:  # NaN fails this too
        raise ConfigError(f"{source} must be a number of pixels (250000000) or megapixels (250M), got {text!r}")
    return int(value)


def default_max_pixels() -> int:
    """The pixel limit of this process: ``$IMGSTORE_MAX_PIXELS`` when set, else
    :data:`DEFAULT_MAX_PIXELS`. Read at each call, so a value set after import counts."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    return parse_pixels(text, source=f"${MAX_PIXELS_ENV}") if text else DEFAULT_MAX_PIXELS


def resolve_max_pixels(max_pixels: int | None) -> int:
    """``max_pixels`` checked (a whole number, at least 1), or :func:`default_max_pixels` for None."""
    if max_pixels is None:
        return default_max_pixels()
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ConfigError(f"max_pixels must be a whole number of pixels, at least 1, got {max_pixels!r}")
    return int(max_pixels)


def read_file(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a whole file, refusing what cannot be an image file.

    Raises DecodeError for a missing path, a directory, a FIFO/device/socket (reading one could
    block forever), a file we may not read, an empty file and a file over ``max_bytes``.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DecodeError(path, "file not found") from None
    except NotADirectoryError:
        raise DecodeError(path, "file not found (a parent is not a directory)") from None
    except PermissionError:
        raise DecodeError(path, "permission denied") from None
    except OSError as exc:
        raise DecodeError(path, f"cannot access file ({exc.strerror or exc})") from None
    except ValueError:  # a NUL character: no file can have this name
        raise DecodeError(path, "not a valid file name (it holds a NUL character)") from None
    if stat.S_ISDIR(st.st_mode):
        raise DecodeError(path, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise DecodeError(path, "not a regular file (a FIFO, device or socket)")
    if st.st_size == 0:
        raise DecodeError(path, "empty file (0 bytes)")
    if st.st_size > max_bytes:
        raise ImageTooLargeError(path, f"file too large ({st.st_size} bytes; the limit is {max_bytes})")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat
    except PermissionError:
        raise DecodeError(path, "permission denied") from None
    except IsADirectoryError:
        raise DecodeError(path, "is a directory, not an image file") from None
    except OSError as exc:
        raise DecodeError(path, f"cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise DecodeError(path, "empty file (0 bytes)")
    if len(data) > max_bytes:
        raise ImageTooLargeError(path, f"file too large (over {max_bytes} bytes)")
    return data


def decode_bytes(
    data: bytes | bytearray | memoryview,
    *,
    path: str | os.PathLike[str] | None = None,
    max_pixels: int | None = None,
    draft_size: tuple[int, int] | None = None,
    thumbnail_size: tuple[int, int] | None = None,
    thumbnail_box: int | None = None,
) -> DecodedImage:
    """Decode an encoded image (JPEG, PNG, GIF, WebP, TIFF, BMP, ...) to an RGB :class:`DecodedImage`.

    The pixel count is checked against ``max_pixels`` (None: :func:`default_max_pixels`) from
    the header, before decoding; above it, :class:`ImageTooLargeError`. Only the first frame of
    an animation is decoded. ``draft_size`` (width, height) is the smallest size the caller
    needs: a JPEG decodes at a reduced DCT scale (1/2, 1/4 or 1/8) that still covers it, several
    times faster, and an image still above :data:`REDUCE_FROM_PIXELS` is then reduced by a whole
    factor (a box average) to the smallest size that still covers it, so that a large photo's
    full-size pixels are freed at once. ``thumbnail_size`` (width, height): a HEIC/HEIF's
    embedded thumbnail at least this big, a scaled copy of the image, is decoded instead of it
    (see the module doc); ``width`` and ``height`` stay the image's. ``thumbnail_box``: the same,
    for a thumbnail that covers the image fitted within ``thumbnail_box`` x ``thumbnail_box``
    (what :func:`load_fitted` shows, what the geometric check works on), whatever its aspect.
    ``path`` is used in error messages, and its extension tells a camera RAW file.
    """
    limit = resolve_max_pixels(max_pixels)
    if thumbnail_box is not None and (thumbnail_size is not None or thumbnail_box < 1):
        raise ConfigError(f"thumbnail_box is a side of at least 1 pixel, given instead of thumbnail_size; got "
                          f"{thumbnail_box!r} with thumbnail_size {thumbnail_size!r}")
    if is_raw_name(path):
        return _decode_raw(data, path, limit, draft_size)
    try:
        img = _open(data, path)
    except DecodeError as exc:
        if exc.reason != _UNRECOGNISED or not _looks_raw(data):
            raise
        return _decode_raw(data, path, limit, draft_size)  # a RAW file without its name (an upload)
    if img.format == "HEIF" and not _items_whole(data):
        # libheif decodes a tiled photo (an iPhone's: 512-px tiles) whose tiles are cut off with
        # those tiles blank, and reads its thumbnail from what is left, without an error
        raise DecodeError(path, "truncated HEIC/HEIF file: the image data it lists runs past its end (an "
                                "interrupted copy?); copy it again from its source")
    if thumbnail_box is not None and img.format == "HEIF":
        thumbnail_size = fitted_size(img.size, thumbnail_box)
    return _finish(img, path=path, max_pixels=limit, draft_size=draft_size, owned=True, thumbnail_size=thumbnail_size)


def fitted_size(size: tuple[int, int], box: int) -> tuple[int, int]:
    """The size ``Image.thumbnail((box, box))`` gives an image of ``size``, rounded down (whole
    pixels): what a thumbnail must cover to stand in for it. Down, since an encoder rounds its
    thumbnail's sides either way: a Galaxy's 4000 x 1848 photo carries a 512 x 236 one, where
    the fitted size is 512 x 236.5 (a thumbnail a pixel short is then enlarged by that pixel)."""
    width, height = size
    long_side = max(width, height)
    if long_side <= box:
        return width, height
    return max(1, width * box // long_side), max(1, height * box // long_side)


def _items_whole(data: bytes | bytearray | memoryview) -> bool:
    """Whether every item of an ISO base media file (HEIF) has all its data in the file: each
    extent its item location box (``iloc``) lists ends within the file, or within the ``idat``
    box for data kept there. A copy cut off mid-way (an interrupted transfer) does not, even where
    what is left still decodes (a tiled photo with blank tiles, its thumbnail); bytes after the
    last box (padding, a tool's trailer) do not matter. Reads only box headers and the ``iloc``
    box. A file whose ``meta`` box is cut off is not whole; one whose ``iloc`` cannot be read is
    left to libheif to judge (True)."""
    view = memoryview(data)
    end = len(view)
    meta = next((b for b in _boxes(view, 0, end) if b[0] == b"meta"), None)
    if meta is None:
        return True  # no meta box: libheif refuses the file itself
    _, body, stop = meta
    if stop > end:
        return False
    children = {kind: (start, box_end) for kind, start, box_end in _boxes(view, body + 4, stop)}  # meta: a full box
    if b"iloc" not in children or children[b"iloc"][1] > stop:
        return True
    idat = children.get(b"idat")
    try:
        extents = _iloc_extents(view, *children[b"iloc"])
    except IndexError:
        return True  # a damaged iloc: libheif's error, not ours
    for method, offset, length in extents:
        if method == 0 and offset + max(length, 0) > end:
            return False
        if method == 1 and (idat is None or idat[1] > stop or offset + length > idat[1] - idat[0]):
            return False
    return True


#: ``ftyp`` brands of still images in an ISO base media file (ISO/IEC 23008-12, AV1 image format)
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1",
                          b"mif2", b"miaf"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})


def _cut_iso_image(data: bytes | bytearray | memoryview) -> str | None:
    """``"HEIC/HEIF"`` or ``"AVIF"`` for the start of such a file cut off before its end (a box
    runs past the end of what is there, or its items' data does), else None."""
    view = memoryview(data)
    first = next(_boxes(view, 0, len(view)), None)
    if first is None or first[0] != b"ftyp" or len(view) < first[1] + 4:
        return None  # not an ISO file, or too little of it left to tell its brand
    _, body, stop = first
    stop = min(stop, len(view))  # the brands that are left of a cut-off ftyp box
    brands = {bytes(view[body : body + 4])} | {bytes(view[at : at + 4]) for at in range(body + 8, stop - 3, 4)}
    kind = "AVIF" if brands & _AVIF_BRANDS else "HEIC/HEIF" if brands & _HEIF_BRANDS else None
    if kind is None:
        return None
    cut = any(box_end > len(view) for _, _, box_end in _boxes(view, 0, len(view)))
    return kind if cut or not _items_whole(data) else None


def _boxes(view: memoryview, pos: int, stop: int) -> Iterator[tuple[bytes, int, int]]:
    """The boxes from ``pos`` on, until ``stop``: (type, where its body starts, where it ends,
    past ``stop`` for a box cut off). Stops at a header that cannot be read or a size that
    cannot be (under 8), and after a box that runs to the end (size 0)."""
    while pos + 8 <= stop:
        size = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        body = pos + 8
        if size == 1:  # a 64-bit size follows the type
            if pos + 16 > stop:
                return
            size, body = int.from_bytes(view[pos + 8 : pos + 16], "big"), pos + 16
        elif size == 0:  # runs to the end
            yield kind, body, stop
            return
        if size < body - pos:
            return
        yield kind, body, pos + size
        pos += size


def _iloc_extents(view: memoryview, body: int, stop: int) -> list[tuple[int, int, int]]:
    """(construction method, offset, length) of every extent in an ``iloc`` box (ISO/IEC
    14496-12 8.11.3, versions 0-2) whose data is in this file; offsets are the file's for
    method 0, the ``idat`` box's for method 1; a length of 0 means "to the end". IndexError
    for a box too short for what it declares."""

    def number(at: int, size: int) -> int:
        if at + size > stop:
            raise IndexError(at)
        return int.from_bytes(view[at : at + size], "big")

    version = number(body, 1)
    sizes = number(body + 4, 2)
    offset_size, length_size, base_size = sizes >> 12, (sizes >> 8) & 15, (sizes >> 4) & 15
    index_size = sizes & 15 if version in (1, 2) else 0
    id_size = 4 if version == 2 else 2
    at = body + 6
    count = number(at, id_size)
    at += id_size
    out: list[tuple[int, int, int]] = []
    for _ in range(count):
        at += id_size  # item_ID
        method = 0
        if version in (1, 2):
            method = number(at, 2) & 15
            at += 2
        reference = number(at, 2)
        base = number(at + 2, base_size) if base_size else 0
        at += 2 + base_size
        n_extents = number(at, 2)
        at += 2
        if offset_size + length_size + index_size == 0:  # extents of no bytes (a hostile box's way to loop)
            n_extents = min(n_extents, 1)
        for _ in range(n_extents):
            at += index_size
            offset = number(at, offset_size) if offset_size else 0
            length = number(at + offset_size, length_size) if length_size else 0
            at += offset_size + length_size
            if reference == 0 and method in (0, 1):  # data in this file (not another file, not another item)
                out.append((method, base + offset, length))
    return out


def _looks_raw(data: bytes | bytearray | memoryview) -> bool:
    """Whether LibRaw reads these bytes (tried only on what Pillow does not recognise)."""
    try:
        raw_size(data)
    except DecodeError:
        return False
    return True


def _decode_raw(data: bytes | bytearray | memoryview, path: str | os.PathLike[str] | None, limit: int,
                draft_size: tuple[int, int] | None) -> DecodedImage:
    """A camera RAW file (:mod:`imgstore.rawphoto`): its JPEG preview or its half-size
    demosaic, upright by the RAW's own orientation, with the capture time of its EXIF."""
    pic = read_raw(data, path=path, draft_size=draft_size, header_size=lambda b: _open(b, path).size,
                   check_size=lambda w, h: _check_dimensions(w, h, path, limit))
    if isinstance(pic.image, bytes):
        decoded = _finish(_open(pic.image, path), path=path, max_pixels=limit, draft_size=draft_size, owned=True,
                          orientation=pic.orientation)
    else:
        decoded = _finish(pic.image, path=path, max_pixels=limit, draft_size=draft_size, owned=True,
                          orientation=pic.orientation)
    captured_at = decoded.captured_at or _tiff_capture_time(data)
    width, height = (pic.height, pic.width) if pic.orientation in (5, 6, 7, 8) else (pic.width, pic.height)
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").upper() if path is not None else "RAW"
    return DecodedImage(image=decoded.image, width=width, height=height, format=fmt or "RAW", captured_at=captured_at)


def _tiff_capture_time(data: bytes | bytearray | memoryview) -> datetime | None:
    """The capture time in a TIFF-based RAW's own tags (DNG, NEF, CR2, ARW: their first IFD
    and its EXIF IFD, read as TIFF directories, since Pillow opens no RAW as an image), else None."""
    from PIL.TiffImagePlugin import ImageFileDirectory_v2

    head = bytes(data[:8])
    if head[:4] not in (b"II*\0", b"MM\0*"):
        return None
    fp = io.BytesIO(data)
    try:
        first = ImageFileDirectory_v2(head)
        fp.seek(first.next)
        first.load(fp)
        found = {_TAG_DATETIME: first.get(_TAG_DATETIME)}
        if _TAG_EXIF_IFD in first:
            exif = ImageFileDirectory_v2(head)
            fp.seek(int(first[_TAG_EXIF_IFD]))
            exif.load(fp)
            found[_TAG_DATETIME_ORIGINAL] = exif.get(_TAG_DATETIME_ORIGINAL)
    except Exception:  # garbage tags mean no time, never a failed decode
        logger.debug("unreadable RAW tags", exc_info=True)
        return None
    for tag in (_TAG_DATETIME_ORIGINAL, _TAG_DATETIME):
        when = _parse_exif_datetime(found.get(tag))
        if when is not None:
            return when
    return None


def check_size(
    data: bytes | bytearray | memoryview,
    *,
    path: str | os.PathLike[str] | None = None,
    max_pixels: int | None = None,
) -> tuple[int, int]:
    """(width, height) of an encoded image from its header, without decoding any pixel;
    :class:`ImageTooLargeError` above ``max_pixels`` (None: :func:`default_max_pixels`), as
    :func:`decode_bytes` would raise, and DecodeError for what is not an image."""
    limit = resolve_max_pixels(max_pixels)
    if is_raw_name(path):
        width, height = raw_size(data, path=path)
    else:
        try:
            img = _open(data, path)
        except DecodeError as exc:
            if exc.reason != _UNRECOGNISED or not _looks_raw(data):
                raise
            width, height = raw_size(data, path=path)
        else:
            with img:
                _check_pixels(img, path, limit)
                return img.size
    _check_dimensions(width, height, path, limit)
    return width, height


def as_source(source: Any) -> Any:
    """What callers hand over, as a path, bytes or a PIL image: ``~`` expanded in a path, a
    file-like object (``BytesIO``, an open file) read to bytes, a numpy ``uint8`` array of
    ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` turned into an image. Anything else is returned
    as it is (and refused by :func:`load_image`)."""
    if isinstance(source, (str, os.PathLike)) and not isinstance(source, (bytes, bytearray)):
        return os.path.expanduser(os.fspath(source))
    if hasattr(source, "read") and callable(source.read):
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise DecodeError(None, "the file-like object did not give bytes (open it in binary mode)")
        return bytes(data)
    if isinstance(source, np.ndarray) and source.ndim in (2, 3):
        if source.dtype != "uint8":
            raise DecodeError(None, f"an image array must be uint8 (0-255), got {source.dtype}")
        if source.ndim == 3 and source.shape[2] not in (3, 4):
            raise DecodeError(None, f"an image array must be (H, W), (H, W, 3) or (H, W, 4), got {source.shape}")
        return Image.fromarray(source)
    return source


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = None,
    draft_size: tuple[int, int] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    thumbnail_size: tuple[int, int] | None = None,
    thumbnail_box: int | None = None,
) -> DecodedImage:
    """Decode a path, encoded bytes or a PIL image into an RGB :class:`DecodedImage`.

    ``max_pixels``, ``draft_size``, ``thumbnail_size`` and ``thumbnail_box`` as :func:`decode_bytes`
    says (None: the process's limit, :func:`default_max_pixels`; a store passes its own). A PIL image is taken as it is (its
    EXIF orientation applied, its mode converted, reduced as a decoded file would be, so that
    it gives the features its PNG would); it is not modified in place.
    File-like objects and numpy arrays are accepted as :func:`as_source` says.
    """
    source = as_source(source)
    if isinstance(source, Image.Image):
        return _finish(source, path=None, max_pixels=resolve_max_pixels(max_pixels), draft_size=draft_size, owned=False)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_bytes(source, max_pixels=max_pixels, draft_size=draft_size, thumbnail_size=thumbnail_size,
                            thumbnail_box=thumbnail_box)
    if isinstance(source, (str, os.PathLike)):
        data = read_file(source, max_bytes=max_bytes)
        return decode_bytes(data, path=source, max_pixels=max_pixels, draft_size=draft_size, thumbnail_size=thumbnail_size,
                            thumbnail_box=thumbnail_box)
    raise ConfigError(f"an image is a path, bytes, a file-like object, a PIL image or a uint8 array, "
                      f"not {type(source).__name__}")


def load_fitted(source: str | os.PathLike[str] | bytes | bytearray | memoryview, box: int, *,
                max_pixels: int | None = None) -> Image.Image:
    """The picture of an image file (a path, or its bytes) fitted within ``box`` x ``box``
    pixels (to show it), decoded the cheapest way that still covers that size: a JPEG's draft, a
    HEIC's embedded thumbnail (a 320 x 240 one serves a 256-pixel box of a 4:3 photo), else the
    whole image."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        path, data = None, source
    else:
        path, data = source, read_file(source)
    img = decode_bytes(data, path=path, max_pixels=max_pixels, draft_size=(box, box), thumbnail_box=box).image
    img.thumbnail((box, box))
    return img


# --- internals -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _allowed_formats() -> tuple[str, ...]:
    Image.init()
    _register_heif()
    return tuple(sorted(f for f in Image.OPEN if f not in _EXCLUDED_FORMATS))


def _register_heif() -> None:
    """HEIC/HEIF (what phones write) through ``pillow-heif``'s Pillow plugin: it adds the format
    to Pillow's registry (as any plugin does), decodes with libheif and applies the file's own
    rotation and mirroring, leaving EXIF orientation 1."""
    try:
        import pillow_heif
    except ImportError:  # pragma: no cover - a core dependency; without it HEIC is unrecognised
        logger.warning("pillow-heif is not installed: HEIC/HEIF files cannot be read")
        return
    pillow_heif.register_heif_opener()


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open(data: bytes | bytearray | memoryview, path: str | os.PathLike[str] | None) -> ImageFile.ImageFile:
    """Identify an encoded image and read its header, as ``Image.open(fp, formats=...)`` does,
    but without Pillow's decompression-bomb check, so that our limit is the one that decides.

    ``Image.open`` warns (``DecompressionBombWarning``, which Python prints on the terminal)
    above ``Image.MAX_IMAGE_PIXELS`` (89 MP by default) and raises above twice that (178 MP),
    before we can read the size and apply our own, configurable limit: a 150 MP camera photo
    printed a raw warning, a 190 MP phone photo was refused under a 200 MP limit. Every way to
    silence that check per call changes process-wide state that other threads and the
    application share: ``Image.MAX_IMAGE_PIXELS`` is the application's; a warnings filter is
    global (``warnings.catch_warnings`` swaps the one filter list of the process and restores it
    on exit, so on Python < 3.14 two threads in it, which ingest's decode workers would be, can
    leave each other's filters behind or drop them; a filter added once at import hides the
    warning from the application's own Pillow calls too, and its ``module=`` cannot tell our
    calls from theirs, since the warning is raised inside ``PIL.Image``). Calling the format
    plugins that ``Image.open`` calls (Pillow's registry, ``Image.OPEN``, in the same order,
    skipping the same errors) touches nothing shared. The size is then checked against our
    limit by :func:`_check_pixels` before any pixel is decoded.

    What stays Pillow's: a few plugins check again while loading (a TIFF's strips, a WebP
    canvas, a GIF frame larger than its screen); there Pillow's own limit can still warn or
    refuse (reported as :class:`ImageTooLargeError`). The CLI, which owns its process, quiets
    that warning with :func:`quiet_pillow_warnings`.
    """
    if len(data) == 0:
        raise DecodeError(path, "empty file (0 bytes)")
    fp: IO[bytes] = io.BytesIO(data)
    prefix = fp.read(16)
    try:
        for fmt in _allowed_formats():
            factory, accept = Image.OPEN[fmt]
            verdict = accept(prefix) if accept is not None else True
            if not verdict or isinstance(verdict, str):  # a str: why it is not this format
                continue
            fp.seek(0)
            try:
                return factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):  # as Image.open: try the next format
                continue
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(path, _pillow_refused(exc)) from None
    except NotImplementedError as exc:  # a plugin's variant it does not read (a DDS's DXGI format)
        raise DecodeError(path, _unsupported(exc)) from None
    except _DECODE_FAILURES as exc:
        raise DecodeError(path, f"corrupt image header ({_short(exc)})") from None
    kind = _cut_iso_image(data)
    if kind is not None:  # what is left of a HEIC or AVIF is no longer recognised: say what it was
        raise DecodeError(path, f"truncated {kind} file: it ends inside its own boxes (an interrupted copy?); copy "
                                "it again from its source")
    raise DecodeError(path, _UNRECOGNISED)


_UNRECOGNISED = "not a recognised image format"


def _unsupported(exc: BaseException) -> str:
    return f"a variant of its format that Pillow cannot decode ({_short(exc)}); convert it to PNG or JPEG"


def _pillow_refused(exc: BaseException) -> str:
    return (f"image too large for Pillow's own limit in this format ({_short(exc)}); convert it to PNG or "
            "JPEG, or raise PIL.Image.MAX_IMAGE_PIXELS in your program")


def _check_pixels(img: Image.Image, path: str | os.PathLike[str] | None, max_pixels: int) -> None:
    _check_dimensions(img.width, img.height, path, max_pixels)


def _check_dimensions(width: int, height: int, path: str | os.PathLike[str] | None, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(path, f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            path,
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels; "
            f"if it is genuine, raise the limit ({RAISE_LIMIT_HINT})",
        )


def quiet_pillow_warnings() -> None:
    """For an application whose every decode goes through this module (the ``imgstore`` command
    and its server processes call it first thing), in this whole process:

    - Pillow's ``DecompressionBombWarning`` is ignored: our own limit has already decided.
    - Pillow's (and pillow-heif's) other warnings, about a file they still decoded (corrupt EXIF
      data, a malformed MPO or APNG read as its first picture, an icon not the size it says), are
      logged on this module's logger at debug level, in one line, instead of printed on the
      terminal with the plugin's source line: 40 of them in a folder of odd files buried the
      ingest's own report.

    The library never calls it: a warnings filter and ``warnings.showwarning`` are process-wide,
    and an embedding program may want Pillow's warnings for its own images. Pillow's error above
    twice its limit is not affected."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    shown = warnings.showwarning
    if getattr(shown, "imgstore_pillow", False):
        return

    folders = [os.path.dirname(os.path.abspath(Image.__file__)) + os.sep]  # PIL's own folder
    try:
        import pillow_heif

        folders.append(os.path.dirname(os.path.abspath(pillow_heif.__file__)) + os.sep)
    except ImportError:  # pragma: no cover - a core dependency
        pass

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        if os.path.abspath(filename).startswith(tuple(folders)):
            logger.debug("%s (%s)", message, category.__name__)
            return
        shown(message, category, filename, lineno, file, line)

    show.imgstore_pillow = True  # type: ignore[attr-defined]
    warnings.showwarning = show


#: Images above this many pixels (as decoded: after a JPEG draft) are reduced to about their
#: ``draft_size`` right after decoding. Reducing shifts features a little (efficientnet-lite0:
#: cosine 0.9987 at worst, colour 0.986, on scikit-image's photos upscaled 4x as PNG), so
#: ordinary photos are left as they always were and only the ones that cost memory (a 100 MP
#: PNG is 300 MB decoded, 1.2 GB in float) are reduced.
REDUCE_FROM_PIXELS = 40_000_000

#: Modes :meth:`PIL.Image.Image.reduce` averages correctly. Not "P"/"PA" (it would average
#: palette indices), not "1" and "I;16*" (refused).
_REDUCIBLE_MODES = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"})


def _reduce(img: Image.Image, draft_size: tuple[int, int]) -> Image.Image:
    """``img`` box-averaged by the largest whole factor that keeps it at least ``draft_size``
    (``img`` itself when that factor is 1): what a JPEG draft does in the decoder, for every
    format. Pillow's own ``thumbnail`` reduces the same way before it resizes. The mode is
    converted after reducing where the reduce can average it, so no full-size copy is made."""
    factor = min(img.width // max(1, int(draft_size[0])), img.height // max(1, int(draft_size[1])))
    if factor < 2:
        return img
    if img.mode.startswith("I;16"):
        img = img.convert("I")  # same values, a mode the reduce takes; _to_rgb scales I as 16-bit
    elif img.mode not in _REDUCIBLE_MODES:
        img = _to_rgb(img)  # palette and 1-bit images: colours first (rarely large)
    return img.reduce(factor)


def _finish(
    img: Image.Image,
    *,
    path: str | os.PathLike[str] | None,
    max_pixels: int,
    draft_size: tuple[int, int] | None,
    owned: bool,
    orientation: int | None = None,
    thumbnail_size: tuple[int, int] | None = None,
) -> DecodedImage:
    """Check the size, read EXIF, decode, reduce, orient and convert to RGB. ``img`` is
    header-only or loaded; ``owned``: we opened it, so its full-size pixels may be freed here;
    ``orientation``: the EXIF orientation to apply instead of the image's own (a RAW's);
    ``thumbnail_size``: a HEIF's embedded thumbnail at least this big may stand in for it."""
    _check_pixels(img, path, max_pixels)
    width, height = img.size
    fmt = img.format
    own_orientation, captured_at = _read_exif(img)
    orientation = own_orientation if orientation is None else orientation
    try:
        if owned and draft_size is not None and fmt in ("JPEG", "MPO"):  # never a caller's image: in place
            img.draft("RGB", (max(1, int(draft_size[0])), max(1, int(draft_size[1]))))
        elif owned and thumbnail_size is not None and fmt == "HEIF":
            # pillow-heif's draft picks the smallest embedded thumbnail that covers the size and is
            # a scaled copy of the image (aspect, crop, rotation, mirroring, colour profile), or none
            img.draft(None, (max(1, int(thumbnail_size[0])), max(1, int(thumbnail_size[1]))))
        img.load()
        # only large images are reduced: below REDUCE_FROM_PIXELS the pixels an extractor sees stay
        # what they always were (a stored feature and a query's agree exactly)
        small = _reduce(img, draft_size) if draft_size is not None and img.width * img.height > REDUCE_FROM_PIXELS else img
        if owned and small is not img:
            img.close()  # frees the full-size pixels now, not when the caller's frame lets go
        rgb = _to_rgb(small)
    except DecodeError as exc:
        raise DecodeError(path, exc.reason) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(path, _pillow_refused(exc)) from None
    except NotImplementedError as exc:
        raise DecodeError(path, _unsupported(exc)) from None
    except _DECODE_FAILURES as exc:
        raise DecodeError(path, f"truncated or corrupt image data ({_short(exc)})") from None
    except MemoryError:
        raise DecodeError(path, "out of memory decoding the image") from None
    for op in _TRANSPOSE_FOR_ORIENTATION.get(orientation, ()):
        rgb = rgb.transpose(op)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return DecodedImage(image=rgb, width=width, height=height, format=fmt, captured_at=captured_at)


def _read_exif(img: Image.Image) -> tuple[int, datetime | None]:
    """(orientation 1..8, capture time) from EXIF; (1, None) when absent or garbage. Never raises."""
    try:
        exif = img.getexif()
    except Exception:  # garbage EXIF must never fail the decode (logged below)
        logger.debug("unreadable EXIF block", exc_info=True)
        return 1, None
    orientation = 1
    try:
        value = exif.get(_TAG_ORIENTATION, 1)
        value = int(value[0] if isinstance(value, (tuple, list)) else value)
        if 1 <= value <= 8:
            orientation = value
    except Exception:  # noqa: BLE001 - a garbage orientation tag means "upright", never a failed decode
        orientation = 1
    captured_at = None
    try:
        sub = exif.get_ifd(_TAG_EXIF_IFD)
        captured_at = _parse_exif_datetime(sub.get(_TAG_DATETIME_ORIGINAL))
    except Exception:  # noqa: BLE001 - a garbage EXIF sub-IFD just gives no capture time
        captured_at = None
    if captured_at is None:
        try:
            captured_at = _parse_exif_datetime(exif.get(_TAG_DATETIME))
        except Exception:  # noqa: BLE001 - a garbage date tag just gives no capture time
            captured_at = None
    return orientation, captured_at


def _parse_exif_datetime(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    text = value.strip().strip("\x00").strip()
    for fmt, length in (("%Y:%m:%d %H:%M:%S", 19), ("%Y-%m-%d %H:%M:%S", 19), ("%Y-%m-%dT%H:%M:%S", 19),
                        ("%Y:%m:%d %H:%M", 16)):
        try:
            return datetime.strptime(text[:length], fmt)
        except ValueError:
            continue
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB. Transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        if "transparency" in img.info:
            return _flatten_alpha(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _flatten_alpha(img.convert("RGBA"))
    if mode in ("L", "CMYK", "YCbCr", "HSV"):
        return img.convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        gray = _high_depth_to_uint8(img)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode.startswith("BGR;"):
        return img.convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:
        raise DecodeError(None, f"unsupported pixel mode {mode!r}") from None


def _flatten_alpha(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """16-bit / 32-bit integer / float greyscale to uint8 by scaling, never by clipping.

    ``I;16*``: the full 0..65535 range maps to 0..255 (v / 257, rounded). ``I`` (32-bit signed;
    Pillow's mode for 16-bit PNGs in some versions and for 32-bit TIFFs): treated as 16-bit when
    the values fit in 0..65535, otherwise stretched from its min..max. ``F``: values in 0..1 are
    scaled by 255, anything else stretched from its min..max.
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    values = arr.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    values = np.where(finite, values, 0.0)
    lo, hi = float(values.min()), float(values.max())
    if img.mode == "I" and lo >= 0 and hi <= 65535:
        scaled = values / 257.0
    elif img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    elif hi > lo:
        scaled = (values - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
