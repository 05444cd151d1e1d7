"""crl partitions: each certificate's CRL partition; per-partition CRL rows that count their certificates

Revision ID: 0010 (crl partitions)
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("certificates") as batch_op:
        # NULL: issued before partitioning (or with it off), listed on the whole-CA CRL.
        batch_op.add_column(sa.Column("crl_partition", sa.Integer(), nullable=True))
        # What a CRL build reads, revoked rows only: the build never touches the table itself.
        batch_op.create_index(
            "ix_certificates_crl",
            ["crl_partition", "not_after", "serial", "revoked_at", "revocation_reason"],
            unique=False,
            sqlite_where=sa.text("revoked_at IS NOT NULL"),
            postgresql_where=sa.text("revoked_at IS NOT NULL"),
        )
    with op.batch_alter_table("published_crls") as batch_op:
        batch_op.add_column(sa.Column("partition", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("assigned", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("revision", sa.Integer(), server_default="0", nullable=False))
        batch_op.create_index("ix_published_crls_partition", ["partition"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("published_crls") as batch_op:
        batch_op.drop_index("ix_published_crls_partition")
        batch_op.drop_column("revision")
        batch_op.drop_column("assigned")
        batch_op.drop_column("partition")
    with op.batch_alter_table("certificates") as batch_op:
        batch_op.drop_index("ix_certificates_crl")
        batch_op.drop_column("crl_partition")
