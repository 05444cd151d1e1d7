"""The audit chain's head row exists from the start, so two first writers cannot race to create it.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    head = sa.table(
        "audit_head", sa.column("id", sa.Integer), sa.column("seq", sa.Integer), sa.column("hash", sa.String)
    )
    bind = op.get_bind()
    exists = bind.execute(sa.text("select count(*) from audit_head where id = 1")).scalar()
    if not exists:
        op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": "0" * 64}])


def downgrade() -> None:
    pass
