"""Tables for work shared between server nodes: reminders sent, periodic jobs claimed, the key pool."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from mailkms.store._models import Base, UTCDateTime


class Reminder(Base):
    """One row per (user, certificate generation, kind): the claim that makes a reminder go out once.

    kind: "due" (at the reminder point) | "final" (the last notice before expiry).
    """

    __tablename__ = "reminders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    generation: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    claimed_by: Mapped[str] = mapped_column(String(100))
    message_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    __table_args__ = (UniqueConstraint("user_id", "generation", "kind", name="uq_reminder_user_generation_kind"),)


class JobClaim(Base):
    """A periodic job done once per period across all nodes, e.g. ("admin-summary", "2026-01-15")."""

    __tablename__ = "job_claims"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job: Mapped[str] = mapped_column(String(60))
    period: Mapped[str] = mapped_column(String(40))
    claimed_by: Mapped[str] = mapped_column(String(100))
    claimed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    __table_args__ = (UniqueConstraint("job", "period", name="uq_job_period"),)


class PoolWrapping(Base):
    """The key pool's wrapping key: 32 random bytes, stored only inside a scrypt envelope of the CA
    passphrase (pki.seal_secret). One row; `key_id` is random, so nothing here checks a passphrase
    guess faster than a full scrypt."""

    __tablename__ = "key_pool_wrapping"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    key_id: Mapped[str] = mapped_column(String(16))
    envelope: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class PooledKey(Base):
    """A pre-generated encryption key, AES-256-GCM encrypted under the random pool wrapping key.

    Taken (deleted) in the same transaction as the issuance that uses it, so never used twice.
    """

    __tablename__ = "key_pool"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_type: Mapped[str] = mapped_column(String(20))
    wrapping_key_id: Mapped[str] = mapped_column(String(16))  # which wrapping key sealed it
    sealed: Mapped[bytes] = mapped_column(LargeBinary)  # nonce || AES-GCM(PKCS#8 DER)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    __table_args__ = (Index("ix_key_pool_type", "key_type", "id"),)
