"""Add code_buckets: each band value's image ids and codes packed in one row (or a few chunks).

Search used to read one ``codes`` row per candidate through the covering band indexes; at 1M
codes a radius-1 query ships ~1,500 rows, and turning them into Python objects cost more than
the database's own work. A bucket row carries every candidate of one probe as two packed
arrays. The upgrade fills the buckets from the existing codes (about 30 s per million codes);
the ``codes`` table and its band columns stay as they are and remain the source of truth.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Entries per bucket row (the value of imgstore.dbops.BUCKET_CHUNK when this revision shipped).
CHUNK = 512
#: Rows inserted per statement while filling.
INSERT_BATCH = 2000


def upgrade() -> None:
    op.create_table(
        "code_buckets",
        sa.Column("hasher_id", sa.Integer(), nullable=False),
        sa.Column("band", sa.Integer(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("image_ids", sa.LargeBinary(), nullable=False),
        sa.Column("codes", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["hasher_id"], ["hashers.id"], name=op.f("fk_code_buckets_hasher_id_hashers"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("hasher_id", "band", "value", "chunk", name=op.f("pk_code_buckets")),
        sqlite_with_rowid=False,
    )
    _fill(op.get_bind())


def _fill(conn: sa.Connection) -> None:
    """Buckets for every code already stored, built from the codes' band columns."""
    buckets = sa.table(
        "code_buckets", *(sa.column(c) for c in ("hasher_id", "band", "value", "chunk", "n", "image_ids", "codes"))
    )
    hashers = conn.execute(sa.text("SELECT id, n_bits, n_bands FROM hashers")).all()
    for hasher_id, n_bits, n_bands in hashers:
        cols = ", ".join(f"band_{j}" for j in range(n_bands))
        rows = conn.execute(
            sa.text(f"SELECT image_id, code, {cols} FROM codes WHERE hasher_id = :h ORDER BY image_id"), {"h": hasher_id}
        ).all()
        if not rows:
            continue
        ids = np.array([r[0] for r in rows], dtype="<i8")
        codes = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype=np.uint8).reshape(len(rows), n_bits // 8)
        bands = np.array([r[2:] for r in rows], dtype=np.int64)
        out = []
        for j in range(n_bands):
            order = np.argsort(bands[:, j], kind="stable")
            values = bands[order, j]
            starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
            ends = np.r_[starts[1:], len(values)]
            for a, b in zip(starts.tolist(), ends.tolist()):
                for chunk, c in enumerate(range(a, b, CHUNK)):
                    sel = order[c : min(b, c + CHUNK)]
                    out.append({"hasher_id": hasher_id, "band": j, "value": int(values[a]), "chunk": chunk,
                                "n": len(sel), "image_ids": ids[sel].tobytes(), "codes": codes[sel].tobytes()})
                if len(out) >= INSERT_BATCH:
                    conn.execute(buckets.insert(), out)
                    out = []
        if out:
            conn.execute(buckets.insert(), out)


def downgrade() -> None:
    op.drop_table("code_buckets")
