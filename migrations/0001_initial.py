"""Initial schema: images and their paths, ingest errors, feature spaces and vectors, hashers
(indexes) and their codes with band columns.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here on purpose: a revision never imports the live models, which change later.
MAX_BANDS = 8


def upgrade() -> None:
    op.create_table(
        "feature_spaces",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("extractor", sa.String(length=64), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("preprocess_version", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feature_spaces")),
        sa.UniqueConstraint(
            "extractor", "preprocess_version", name="uq_feature_spaces_extractor_version"
        ),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=True),
        sa.Column("byte_size", sa.BigInteger(), nullable=False),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("captured_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("sha256", name=op.f("uq_images_sha256")),
    )
    op.create_table(
        "ingest_errors",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("error_type", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_errors")),
        sa.UniqueConstraint("path", name=op.f("uq_ingest_errors_path")),
    )
    op.create_table(
        "features",
        sa.Column("space_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_features_image_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["space_id"],
            ["feature_spaces.id"],
            name=op.f("fk_features_space_id_feature_spaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("space_id", "image_id", name=op.f("pk_features")),
    )
    op.create_index(op.f("ix_features_image_id"), "features", ["image_id"])
    op.create_table(
        "hashers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("space_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("n_bits", sa.Integer(), nullable=False),
        sa.Column("n_bands", sa.Integer(), nullable=False),
        sa.Column("band_width", sa.Integer(), nullable=False),
        sa.Column("params", sa.LargeBinary(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("n_fitted", sa.Integer(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["space_id"],
            ["feature_spaces.id"],
            name=op.f("fk_hashers_space_id_feature_spaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hashers")),
    )
    op.create_index(op.f("ix_hashers_space_id"), "hashers", ["space_id"])
    op.create_table(
        "image_paths",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("file_size", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("is_current", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_image_paths_image_id_images"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image_paths")),
        sa.UniqueConstraint("path", "image_id", name="uq_image_paths_path_image_id"),
    )
    op.create_index("ix_image_paths_image_id", "image_paths", ["image_id"])
    op.create_table(
        "codes",
        sa.Column("hasher_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("code", sa.LargeBinary(), nullable=False),
        *[sa.Column(f"band_{i}", sa.BigInteger(), nullable=True) for i in range(MAX_BANDS)],
        sa.ForeignKeyConstraint(
            ["hasher_id"], ["hashers.id"], name=op.f("fk_codes_hasher_id_hashers"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_codes_image_id_images"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("hasher_id", "image_id", name=op.f("pk_codes")),
    )
    for i in range(MAX_BANDS):
        # covering (hasher, band) -> (image, code), partial: unused bands hold no entries
        where = sa.text(f"band_{i} IS NOT NULL")
        op.create_index(
            f"ix_codes_hasher_id_band_{i}",
            "codes",
            ["hasher_id", f"band_{i}", "image_id", "code"],
            sqlite_where=where,
            postgresql_where=where,
        )
    op.create_index(op.f("ix_codes_image_id"), "codes", ["image_id"])


def downgrade() -> None:
    # dropping a table drops its indexes; children first
    op.drop_table("codes")
    op.drop_table("image_paths")
    op.drop_table("hashers")
    op.drop_table("features")
    op.drop_table("ingest_errors")
    op.drop_table("images")
    op.drop_table("feature_spaces")
