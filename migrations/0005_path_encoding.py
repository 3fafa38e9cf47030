"""Stored paths: from backslash escapes to a reversible percent encoding.

Up to 0004, a file name byte that is not UTF-8 was stored as the four characters ``\\xNN``
(Python's ``backslashreplace``), which cannot be told apart from a real backslash: ``show`` and
``rm`` could not find such a file and ``verify`` reported it vanished. From 0005 on
(``imgstore.paths``) such a byte is stored as ``%NN`` and a real ``%`` as ``%25``; every other
character is stored as it is. The upgrade rewrites ``image_paths.path`` and
``ingest_errors.path`` where they hold ``%`` or ``\\x`` followed by a byte of 0x80-0xFF (read
as that byte, unless only the literal reading names an existing file); the downgrade writes
the old form back.

Rows are rewritten in two passes through a prefix no real path has, so no intermediate value
can collide with another row's under the tables' unique constraints.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TEMP = "\x01imgstore-0005\x01"
_OLD_ESCAPE = re.compile(r"\\x([89a-f][0-9a-f])")
_NEW_ESCAPE = re.compile(r"%([0-9A-F]{2})")


def _to_new(old: str) -> str:
    """``\\xNN`` was either an undecodable byte or four real characters; the byte unless only the
    literal reading names a file that exists."""
    literal = old.replace("%", "%25")
    as_bytes = _OLD_ESCAPE.sub(lambda m: "%" + m.group(1).upper(), literal)
    if as_bytes != literal and not os.path.lexists(_real(as_bytes)) and os.path.lexists(_real(literal)):
        return literal
    return as_bytes


def _real(new: str) -> str:
    """The file path a new-form stored path names (as imgstore.paths.from_stored, frozen here)."""
    def back(m: re.Match[str]) -> str:
        byte = int(m.group(1), 16)
        return "%" if byte == 0x25 else chr(0xDC00 + byte) if byte >= 0x80 else m.group(0)

    return _NEW_ESCAPE.sub(back, new)


def _to_old(new: str) -> str:
    def back(m: re.Match[str]) -> str:
        byte = int(m.group(1), 16)
        if byte == 0x25:
            return "%"
        return f"\\x{byte:02x}" if byte >= 0x80 else m.group(0)

    return _NEW_ESCAPE.sub(back, new)


def _rewrite(table: str, convert: Callable[[str], str]) -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.text(f"SELECT id, path FROM {table} WHERE path LIKE '%\\%%' ESCAPE '\\' OR path LIKE '%\\\\x%' ESCAPE '\\'")).all()
    changed = [(row_id, convert(path)) for row_id, path in rows if convert(path) != path]
    if not changed:
        return
    update = sa.text(f"UPDATE {table} SET path = :p WHERE id = :i")
    conn.execute(update, [{"i": row_id, "p": _TEMP + new} for row_id, new in changed])
    conn.execute(update, [{"i": row_id, "p": new} for row_id, new in changed])


def upgrade() -> None:
    for table in ("image_paths", "ingest_errors"):
        _rewrite(table, _to_new)


def downgrade() -> None:
    for table in ("image_paths", "ingest_errors"):
        _rewrite(table, _to_old)
