"""M-of-N recovery: ceremonies, current-ceremony pointer, recovered keys held for enrolment

Revision ID: 0004
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "recovery_ceremonies",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=False),
        sa.Column("officer_count", sa.Integer(), nullable=False),
        sa.Column("officer_names", sa.Text(), nullable=False),
        sa.Column("certificate", sa.LargeBinary(), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=True),
        sa.Column("share_digests", sa.Text(), nullable=False),
        sa.Column("previous_id", sa.String(length=32), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_id"),
    )
    op.create_table(
        "recovery_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ceremony_id", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(["ceremony_id"], ["recovery_ceremonies.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "recovery_holds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("ceremony_id", sa.String(length=32), nullable=False),
        sa.Column("key_serials", sa.Text(), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["token_id"], ["tokens.id"]),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_id"),
    )
    op.create_index("ix_archived_keys_user", "archived_keys", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_archived_keys_user", table_name="archived_keys")
    op.drop_table("recovery_holds")
    op.drop_table("recovery_head")
    op.drop_table("recovery_ceremonies")
