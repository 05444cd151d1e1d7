"""custody: the key pool's random wrapping key in a slow-KDF envelope; pool rows of the old scheme dropped

Before, pooled keys were sealed under HKDF(CA passphrase) and each row carried a hash of that key:
a database dump allowed offline passphrase guessing at hash speed. Those rows are deleted here
(pool keys are pre-generated and never issued, so nothing is lost; the server refills the pool).

Revision ID: 0008 (custody)
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_pool_wrapping",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("envelope", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("DELETE FROM key_pool")


def downgrade() -> None:
    op.execute("DELETE FROM key_pool")
    op.drop_table("key_pool_wrapping")
