"""Add images.border_fraction and images.border_version: the keeper's border measure, kept.

Dedup measures, on the file, how much of a picture is a rotation's border when it chooses the
copy to keep (:mod:`imgstore.keeper`): a property of the content, so it is kept on the image's
row with the measure's version and a second dedup reads it instead of decoding the file again.
Nullable columns (NULL: not measured yet); the downgrade drops them (the next dedup measures
again).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch_op:
        batch_op.add_column(sa.Column("border_fraction", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("border_version", sa.SmallInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch_op:
        batch_op.drop_column("border_version")
        batch_op.drop_column("border_fraction")
