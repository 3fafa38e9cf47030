"""How file paths are stored: text any database accepts, and back to the exact file name.

A POSIX file name is bytes; Python hands it over as ``str`` with each byte that is not UTF-8
as a lone surrogate (``os.fsdecode``'s ``surrogateescape``), which neither PostgreSQL nor a
UTF-8 output stream accepts. Stored paths therefore percent-escape exactly two things: every
byte that is not part of valid UTF-8 (``%E9`` for a Latin-1 ``é``) and the percent sign itself
(``%25``). Every other character is stored as it is, so ordinary names read naturally in the
database, ``LIKE`` prefixes still select a folder, and :func:`from_stored` gives back the
``str`` that ``open`` and ``os.stat`` need, for every name (migration 0005 converted the
backslash escapes that earlier versions wrote, which could not be told apart from a real
backslash).

:func:`printable` is for showing a path to a person: undecodable bytes as ``\\xNN``.
"""

from __future__ import annotations

import os
import re

_ESCAPED = re.compile(r"%([0-9A-F]{2})")


def to_stored(path: str | os.PathLike[str]) -> str:
    """The database text of a file path (absolute or not, as given)."""
    text = os.fspath(path)
    if "%" not in text and not _has_surrogates(text):
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "%":
            out.append("%25")
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as surrogateescape carries it
            out.append(f"%{code - 0xDC00:02X}")
        else:
            out.append(ch)
    return "".join(out)


def from_stored(text: str) -> str:
    """The file path (``str``, undecodable bytes as surrogates) of database text."""
    if "%" not in text:
        return text
    return _ESCAPED.sub(lambda m: _unescape(int(m.group(1), 16)), text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def counted(n: int, noun: str) -> str:
    """``1 file``, ``2 files``, ``0 files``: a count and its noun (regular plurals), as the CLI
    and the pages say it."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def printable(path: str) -> str:
    """A path as text for a terminal or a UTF-8 file, on one line: undecodable bytes and
    control characters (a newline, an escape sequence in a file name) as ``\\xNN``."""
    if _has_surrogates(path):
        path = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if _CONTROL.search(path):
        path = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", path)
    return path


def _unescape(byte: int) -> str:
    if byte == 0x25:
        return "%"
    if byte >= 0x80:
        return chr(0xDC00 + byte)
    return f"%{byte:02X}"  # never written by to_stored: leave it as it was


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


#: The largest image id a database stores (a signed 64-bit integer): a larger number names no image.
MAX_ID = (1 << 63) - 1


def is_storable_id(value: int) -> bool:
    """An id that may exist: 1 to :data:`MAX_ID` (SQLite raises OverflowError past it)."""
    return 1 <= value <= MAX_ID


def names_an_id(ref: object) -> bool:
    """An ``int``, or digits that name no existing file: the one rule by which the API and the
    CLI tell an image id from a path."""
    return (isinstance(ref, int) and not isinstance(ref, bool)) or (
        isinstance(ref, str) and ref.isdigit() and not os.path.exists(ref))
