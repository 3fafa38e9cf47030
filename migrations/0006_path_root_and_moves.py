"""Paths remember the folder they were ingested under, and where dedup moved their file.

``image_paths.root``: the folder given to ``ingest`` when the path was found (the file's own
folder when the file itself was given); ``dedup --apply --move-to DIR`` keeps a moved file's
path relative to it. NULL for rows written before this revision (a move then mirrors the
absolute path under DIR). ``image_paths.moved_to``: where ``dedup --apply`` moved the file
(the row is kept, not current), so ``dedup --undo`` can put it back and ``prune --moved`` can
forget it. Both are stored as ``imgstore.paths`` text.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("image_paths") as batch_op:
        batch_op.add_column(sa.Column("root", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("moved_to", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("image_paths") as batch_op:
        batch_op.drop_column("moved_to")
        batch_op.drop_column("root")
