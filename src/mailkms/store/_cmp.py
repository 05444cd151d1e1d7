"""CMP's tables: open transactions (for certConf) and the sender nonces seen (replay)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from mailkms.store._models import Base, UTCDateTime


class CMPTransaction(Base):
    """One CMP transaction (RFC 4210 §5.1.1): its transactionID is never accepted twice. An
    enrolment or key update stays open until certConf (or `expires_at`); a revocation is closed
    at once. `server_nonce` is the senderNonce of the last answer, the recipNonce expected next."""

    __tablename__ = "cmp_transactions"
    transaction_id: Mapped[str] = mapped_column(String(128), primary_key=True)  # hex
    kind: Mapped[str] = mapped_column(String(10))  # ir | cr | kur | rr
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    token_id: Mapped[int | None] = mapped_column(ForeignKey("tokens.id"), nullable=True)  # MAC-protected
    signer_serial: Mapped[str | None] = mapped_column(String(64), nullable=True)  # signature-protected
    certificate_serial: Mapped[str | None] = mapped_column(String(64), nullable=True)  # what was issued
    server_nonce: Mapped[str | None] = mapped_column(String(128), nullable=True)  # hex
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
    closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class CMPNonce(Base):
    """A senderNonce seen in a request; a second request with it is a replay."""

    __tablename__ = "cmp_nonces"
    nonce: Mapped[str] = mapped_column(String(128), primary_key=True)  # hex
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)


__all__ = ["CMPNonce", "CMPTransaction"]
