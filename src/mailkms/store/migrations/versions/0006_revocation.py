"""revocation: the published CRL per scope; an index for the CRL's query

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    crls = op.create_table(
        "published_crls",
        sa.Column("scope", sa.String(length=20), nullable=False),
        sa.Column("number", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("this_update", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_update", sa.DateTime(timezone=True), nullable=True),
        sa.Column("entries", sa.Integer(), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=True),
        sa.Column("dirty_since", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("scope"),
    )
    # The row every publisher locks; made here so that two nodes never race to create it.
    op.bulk_insert(crls, [{"scope": "issuing", "number": 0, "entries": 0}])
    with op.batch_alter_table("certificates") as batch_op:
        batch_op.create_index("ix_certificates_revoked_not_after", ["revoked_at", "not_after"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("certificates") as batch_op:
        batch_op.drop_index("ix_certificates_revoked_not_after")
    op.drop_table("published_crls")
