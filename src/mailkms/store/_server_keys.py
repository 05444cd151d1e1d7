"""Keys the server nodes share through the store (not the CA's: those stay in files)."""

from __future__ import annotations

from sqlalchemy import LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from mailkms.store._models import Base

NONCE_KEY = "nonce-hmac"


class ServerKey(Base):
    """A random key by name, made by the migration that adds it, so every node reads the same one.

    `nonce-hmac` authenticates the server's nonces (HMAC-SHA256). It is a key, not a password:
    random, 256 bits, never derived from the CA passphrase, so nonces seen on the wire give no
    handle for guessing any passphrase. Whoever reads the database can mint nonces, which opens
    nothing: a signed request still needs the user's signing key, and a spent nonce stays spent.
    """

    __tablename__ = "server_keys"
    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    secret: Mapped[bytes] = mapped_column(LargeBinary)
