"""What the classifier sees in each image: ``labels`` and ``label_norms``.

Per (image, feature space), the extractor's most probable classes (``rank`` 0 first) with their
probabilities, and the log-sum-exp of its logits (the word search's normaliser), computed from
the stored features (:mod:`imgstore.labels`). New tables: the downgrade drops them; `imgstore
labels --update` computes them again from the features.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "labels",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("space_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.SmallInteger(), nullable=False),
        sa.Column("class_id", sa.SmallInteger(), nullable=False),
        sa.Column("prob", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_labels_image_id_images"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["space_id"], ["feature_spaces.id"], name=op.f("fk_labels_space_id_feature_spaces"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("image_id", "space_id", "rank", name=op.f("pk_labels")),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_labels_space_class", "labels", ["space_id", "class_id", "prob"])
    op.create_table(
        "label_norms",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("space_id", sa.Integer(), nullable=False),
        sa.Column("logsumexp", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_label_norms_image_id_images"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["space_id"], ["feature_spaces.id"], name=op.f("fk_label_norms_space_id_feature_spaces"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("image_id", "space_id", name=op.f("pk_label_norms")),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("label_norms")
    op.drop_index("ix_labels_space_class", table_name="labels")
    op.drop_table("labels")
