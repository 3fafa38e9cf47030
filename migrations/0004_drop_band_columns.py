"""Drop the band columns of ``codes`` and their covering indexes; give each index a ``uid``.

Since 0003 search reads candidates from ``code_buckets``; the eight ``band_*`` columns and
their covering indexes (each of which also stored the code bytes, so every code was kept
``1 + 2 x bands`` times) were read by nothing but ``imgstore info``'s occupancy, which now
counts ``code_buckets``. ``hashers.uid`` is a random token written when an index is created:
process-local caches key fitted hashers and code caches by it, because SQLite reuses the id
of a dropped index and a re-created index restarts at generation 0.

The downgrade restores the columns and indexes and fills them from the stored codes (band
``j`` is bits ``[j * band_width, (j + 1) * band_width)`` of the packed code, the first bit most
significant); an index with more than 8 bands has no columns to go to and must be dropped
first.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here on purpose: a revision never imports the live models, which change later.
MAX_BANDS = 8
#: Codes read and updated per batch while back-filling the band columns.
FILL_BATCH = 20_000


def upgrade() -> None:
    conn = op.get_bind()
    for i in range(MAX_BANDS):
        op.drop_index(f"ix_codes_hasher_id_band_{i}", table_name="codes")
    with op.batch_alter_table("codes") as batch_op:
        for i in range(MAX_BANDS):
            batch_op.drop_column(f"band_{i}")
    with op.batch_alter_table("hashers") as batch_op:
        batch_op.add_column(sa.Column("uid", sa.String(length=32), nullable=True))
    for (hasher_id,) in conn.execute(sa.text("SELECT id FROM hashers")).all():
        conn.execute(sa.text("UPDATE hashers SET uid = :u WHERE id = :i"), {"u": uuid.uuid4().hex, "i": hasher_id})
    with op.batch_alter_table("hashers") as batch_op:
        batch_op.alter_column("uid", existing_type=sa.String(length=32), nullable=False)
        batch_op.create_unique_constraint(op.f("uq_hashers_uid"), ["uid"])


def downgrade() -> None:
    conn = op.get_bind()
    crowded = conn.execute(sa.text("SELECT id, n_bands FROM hashers WHERE n_bands > :m"), {"m": MAX_BANDS}).all()
    if crowded:
        listed = ", ".join(f"{i} ({m} bands)" for i, m in crowded)
        raise RuntimeError(
            f"revision 0003 stores at most {MAX_BANDS} bands per index; drop index {listed} "
            "(`imgstore index drop ID`) before downgrading"
        )
    with op.batch_alter_table("hashers") as batch_op:
        batch_op.drop_constraint(op.f("uq_hashers_uid"), type_="unique")
        batch_op.drop_column("uid")
    with op.batch_alter_table("codes") as batch_op:
        for i in range(MAX_BANDS):
            batch_op.add_column(sa.Column(f"band_{i}", sa.BigInteger(), nullable=True))
    _fill_bands(conn)
    for i in range(MAX_BANDS):
        where = sa.text(f"band_{i} IS NOT NULL")
        op.create_index(f"ix_codes_hasher_id_band_{i}", "codes", ["hasher_id", f"band_{i}", "image_id", "code"],
                        sqlite_where=where, postgresql_where=where)


def _band_values(codes: np.ndarray, n_bands: int, band_width: int) -> np.ndarray:
    """(n, n_bytes) uint8 -> (n, n_bands) int64: band j is bits [j*w, (j+1)*w), MSB first."""
    bits = np.unpackbits(codes, axis=1)[:, : n_bands * band_width].reshape(len(codes), n_bands, band_width)
    weights = (1 << np.arange(band_width - 1, -1, -1, dtype=np.int64)).astype(np.int64)
    return (bits.astype(np.int64) * weights).sum(axis=2)


def _fill_bands(conn: sa.Connection) -> None:
    for hasher_id, n_bits, n_bands, band_width in conn.execute(
        sa.text("SELECT id, n_bits, n_bands, band_width FROM hashers")
    ).all():
        sets = ", ".join(f"band_{j} = :b{j}" for j in range(n_bands))
        update = sa.text(f"UPDATE codes SET {sets} WHERE hasher_id = :h AND image_id = :i")
        last = -1
        while True:
            rows = conn.execute(
                sa.text("SELECT image_id, code FROM codes WHERE hasher_id = :h AND image_id > :last "
                        "ORDER BY image_id LIMIT :n"),
                {"h": hasher_id, "last": last, "n": FILL_BATCH},
            ).all()
            if not rows:
                break
            last = int(rows[-1][0])
            codes = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype=np.uint8).reshape(len(rows), n_bits // 8)
            bands = _band_values(codes, n_bands, band_width).tolist()
            conn.execute(update, [
                {"h": hasher_id, "i": int(r[0]), **{f"b{j}": v for j, v in enumerate(values)}}
                for r, values in zip(rows, bands)
            ])
