"""cmp: CMP transactions and sender nonces; the token sealed for CMP's MAC

Revision ID: 0012 (cmp)
Revises: 0009 on the cmp branch (re-point to the last migration before it when merging)
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cmp_transactions",
        sa.Column("transaction_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("token_id", sa.Integer(), nullable=True),
        sa.Column("signer_serial", sa.String(length=64), nullable=True),
        sa.Column("certificate_serial", sa.String(length=64), nullable=True),
        sa.Column("server_nonce", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.ForeignKeyConstraint(["token_id"], ["tokens.id"]),
        sa.PrimaryKeyConstraint("transaction_id"),
    )
    with op.batch_alter_table("cmp_transactions") as batch_op:
        batch_op.create_index("ix_cmp_transactions_expires_at", ["expires_at"], unique=False)
    op.create_table(
        "cmp_nonces",
        sa.Column("nonce", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce"),
    )
    with op.batch_alter_table("cmp_nonces") as batch_op:
        batch_op.create_index("ix_cmp_nonces_expires_at", ["expires_at"], unique=False)
    with op.batch_alter_table("tokens") as batch_op:
        batch_op.add_column(sa.Column("cmp_secret", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch_op:
        batch_op.drop_column("cmp_secret")
    op.drop_table("cmp_nonces")
    op.drop_table("cmp_transactions")
