"""httphard: the nonce HMAC key shared by every node; an index to purge spent nonces

Revision ID: 0009 (httphard)
Revises: 0008
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    keys = op.create_table(
        "server_keys",
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    # Made here, under the migration lock, so that nodes starting at once never race to make it.
    op.bulk_insert(keys, [{"name": "nonce-hmac", "secret": secrets.token_bytes(32)}])
    with op.batch_alter_table("nonces") as batch_op:
        batch_op.create_index("ix_nonces_expires_at", ["expires_at"], unique=False)
    # Nonces handed out before this revision were rows; they are not HMAC nonces and would never
    # be accepted again, so the rows only take room.
    op.execute("DELETE FROM nonces")


def downgrade() -> None:
    with op.batch_alter_table("nonces") as batch_op:
        batch_op.drop_index("ix_nonces_expires_at")
    op.drop_table("server_keys")
