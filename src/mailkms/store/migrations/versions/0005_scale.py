"""scale: reminders, job claims, key pool; indexes for sweeps

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reminders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_by", sa.String(length=100), nullable=False),
        sa.Column("message_id", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "generation", "kind", name="uq_reminder_user_generation_kind"),
    )
    op.create_table(
        "job_claims",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job", sa.String(length=60), nullable=False),
        sa.Column("period", sa.String(length=40), nullable=False),
        sa.Column("claimed_by", sa.String(length=100), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job", "period", name="uq_job_period"),
    )
    op.create_table(
        "key_pool",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_type", sa.String(length=20), nullable=False),
        sa.Column("wrapping_key_id", sa.String(length=16), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_key_pool_type", "key_pool", ["key_type", "id"])
    # Sweeps look certificates up by kind and date; the outbox worker by claim.
    op.create_index("ix_certificates_kind_not_before", "certificates", ["kind", "not_before"])
    op.create_index("ix_certificates_kind_not_after", "certificates", ["kind", "not_after"])


def downgrade() -> None:
    op.drop_index("ix_certificates_kind_not_after", "certificates")
    op.drop_index("ix_certificates_kind_not_before", "certificates")
    op.drop_index("ix_key_pool_type", "key_pool")
    op.drop_table("key_pool")
    op.drop_table("job_claims")
    op.drop_table("reminders")
