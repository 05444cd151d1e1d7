"""EST's one table: a server-made encryption key waiting for its serverkeygen hand-over."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from mailkms.store._models import Base, UTCDateTime


class KeyHandover(Base):
    """The PKCS#8 of an encryption key issued through EST simpleenroll, sealed under a key derived
    from the enrolment token (AES-256-GCM, HKDF-SHA256): the server holds only the token's hash,
    so it cannot open this at rest. One per token; deleted once expired. The archive copy
    (archived_keys) is the lasting one."""

    __tablename__ = "est_key_handovers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    token_id: Mapped[int] = mapped_column(ForeignKey("tokens.id"), unique=True)
    certificate_serial: Mapped[str] = mapped_column(String(64), unique=True)  # the encryption certificate
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
    collected_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)  # the last hand-over
