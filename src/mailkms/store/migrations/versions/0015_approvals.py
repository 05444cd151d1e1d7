"""approvals: one approval model for every dangerous act (bulk revoke, archive export, recovery):
the act's payload (JSON), the approvals it needs when they are not shares, its outcome; and the
administrators who must log in with a passkey (TOTP no longer enough)

Revision ID: 0015 (approvals)
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("approval_requests") as batch:
        batch.add_column(sa.Column("payload", sa.Text(), nullable=True))
        batch.add_column(sa.Column("required", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("outcome", sa.Text(), nullable=True))
    with op.batch_alter_table("administrators") as batch:
        batch.add_column(sa.Column("passkey_required", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("administrators") as batch:
        batch.drop_column("passkey_required")
    with op.batch_alter_table("approval_requests") as batch:
        batch.drop_column("outcome")
        batch.drop_column("required")
        batch.drop_column("payload")
