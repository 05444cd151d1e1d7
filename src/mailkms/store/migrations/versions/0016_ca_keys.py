"""ca keys: which issuing CA key signs each CRL scope (after `mailkms ca rekey` there are several)

A scope keeps the key that signed its first CRL for good: the certificates listed there were issued
by that key, and RFC 5280 §6.3.3 wants their CRL signed by it. Rows signed before this revision get
the key id from their CRL's Authority Key Identifier; rows never signed get it at their first CRL.

Revision ID: 0016 (ca keys)
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op
from cryptography import x509

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("published_crls") as batch_op:
        batch_op.add_column(sa.Column("issuer_key_id", sa.String(64), nullable=True))
    bind = op.get_bind()
    crls = sa.table("published_crls", sa.column("scope"), sa.column("der"), sa.column("issuer_key_id"))
    signed = bind.execute(sa.select(crls.c.scope, crls.c.der).where(crls.c.der.is_not(None))).all()
    for scope, der in signed:  # one row per scope (a few per million certificates)
        try:
            aki = x509.load_der_x509_crl(bytes(der)).extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        except (ValueError, x509.ExtensionNotFound):
            continue  # left to its next CRL, signed by the current key as before
        if aki.value.key_identifier is not None:
            bind.execute(
                sa.update(crls).where(crls.c.scope == scope).values(issuer_key_id=aki.value.key_identifier.hex())
            )


def downgrade() -> None:
    with op.batch_alter_table("published_crls") as batch_op:
        batch_op.drop_column("issuer_key_id")
