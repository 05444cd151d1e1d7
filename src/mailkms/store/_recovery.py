"""Tables of the M-of-N recovery: ceremonies, the pointer to the current one, and recovered keys
held (sealed under the recovery token) until the user enrols."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from mailkms.store._models import Base, UTCDateTime


class RecoveryCeremony(Base):
    """One recovery key pair. The server holds its certificate and its private key wrapped under
    the KEK that only M of the N officers' shares rebuild; never the KEK or a share."""

    __tablename__ = "recovery_ceremonies"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # 128 random bits, hex
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    threshold: Mapped[int] = mapped_column(Integer)
    officer_count: Mapped[int] = mapped_column(Integer)
    officer_names: Mapped[str] = mapped_column(Text)  # JSON list, share index order (1..N)
    certificate: Mapped[bytes] = mapped_column(LargeBinary)  # DER of the recovery certificate
    key_id: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 of the cert = archived_keys.archive_key_id
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # None once retired
    share_digests: Mapped[str] = mapped_column(Text)  # JSON {index: sha256 commitment}
    previous_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    retired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RecoveryHead(Base):
    """A single row naming the current ceremony. Issuers read it FOR SHARE, a re-wrap locks it
    FOR UPDATE: no key is archived to a recovery key that is being replaced."""

    __tablename__ = "recovery_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ceremony_id: Mapped[str] = mapped_column(ForeignKey("recovery_ceremonies.id"))


class RecoveryHold(Base):
    """A user's recovered keys between `mailkms recover` and their enrolment with the recovery
    token: AES-256-GCM under a key derived from the token (stored only hashed). Deleted when the
    token is spent, replaced or expired."""

    __tablename__ = "recovery_holds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    token_id: Mapped[int] = mapped_column(ForeignKey("tokens.id"), unique=True)
    ceremony_id: Mapped[str] = mapped_column(String(32))
    key_serials: Mapped[str] = mapped_column(Text)  # JSON list (public)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
