"""The geometric check's verdicts, kept between runs.

``pair_verdicts``: per pair of contents (SHA-256, the smaller first), COPY (1) or DIFFERENT
(0) and the version of the check that gave it, so that a second ``imgstore dedup`` (or the
duplicates page in a new server) checks only pairs it has not seen. A new table: the
downgrade drops it (the verdicts are recomputed on the next dedup).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pair_verdicts",
        sa.Column("sha_a", sa.String(64), nullable=False),
        sa.Column("sha_b", sa.String(64), nullable=False),
        sa.Column("check_version", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.Integer(), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha_a", "sha_b", name=op.f("pk_pair_verdicts")),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("pair_verdicts")
