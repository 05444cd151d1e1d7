"""SQLAlchemy 2 typed models. Schema changes go through Alembic (store/migrations)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores aware UTC; SQLite returns naive values, so make them aware again."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: object) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: object) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    group: Mapped[str | None] = mapped_column("user_group", String(100), nullable=True)
    # registered (token out, never enrolled) | enrolled | revoked
    status: Mapped[str] = mapped_column(String(20), default="registered")
    generation: Mapped[int] = mapped_column(Integer, default=0)  # pairs issued so far
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    __table_args__ = (Index("ix_users_status", "status"),)


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    purpose: Mapped[str] = mapped_column(String(20))  # enrol | reenrol | recovery
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The token itself, AES-256-GCM under the key pool's wrapping key (a random key inside a scrypt
    # envelope of the CA passphrase): CMP's MAC protection is keyed by the token (RFC 9483 §3.2),
    # so the server must be able to compute it. Erased when the CMP transaction closes.
    cmp_secret: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class Certificate(Base):
    __tablename__ = "certificates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    serial: Mapped[str] = mapped_column(String(64), unique=True)  # lower-case hex
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    kind: Mapped[str] = mapped_column(String(20))
    generation: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    not_after: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    der: Mapped[bytes] = mapped_column(LargeBinary)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revocation_reason: Mapped[str | None] = mapped_column(String(40), nullable=True)
    crl_partition: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: the whole-CA CRL
    __table_args__ = (
        Index("ix_certificates_user_kind_gen", "user_id", "kind", "generation"),
        # A CRL build reads only this (revoked rows only, every column it needs): small and index-only.
        Index(
            "ix_certificates_crl",
            "crl_partition",
            "not_after",
            "serial",
            "revoked_at",
            "revocation_reason",
            sqlite_where=text("revoked_at IS NOT NULL"),
            postgresql_where=text("revoked_at IS NOT NULL"),
        ),
        Index("ix_certificates_revoked", "revoked_at"),
        Index("ix_certificates_revoked_not_after", "revoked_at", "not_after"),
    )


class ArchivedKey(Base):
    __tablename__ = "archived_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    certificate_serial: Mapped[str] = mapped_column(String(64), unique=True)
    envelope: Mapped[bytes] = mapped_column(LargeBinary)  # CMS EnvelopedData to the archive key
    archive_key_id: Mapped[str] = mapped_column(String(64))  # SHA-256 of the archive certificate
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    __table_args__ = (Index("ix_archived_keys_user", "user_id"),)


class IssuanceRequest(Base):
    """One per issued pair; (user, generation) is unique, so a pair is never issued twice."""

    __tablename__ = "issuance_requests"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(20))  # enrolment | renewal | recovery
    generation: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    outbox_id: Mapped[int | None] = mapped_column(ForeignKey("outbox.id"), nullable=True)
    # Set with the outbox row still unflushed: the ORM inserts the row first and fills outbox_id.
    outbox: Mapped[OutboxMessage | None] = relationship(lazy="raise")
    __table_args__ = (UniqueConstraint("user_id", "generation", name="uq_request_user_generation"),)


class OutboxMessage(Base):
    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[str] = mapped_column(String(255), unique=True)
    sender: Mapped[str] = mapped_column(String(320))
    recipient: Mapped[str] = mapped_column(String(320))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    purpose: Mapped[str] = mapped_column(String(40), default="delivery")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    claimed_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # the kind of the last failure (mailkms.mail FAILURE_KINDS: auth, tls-verify, connect, ...)
    last_error_kind: Mapped[str | None] = mapped_column(String(40), nullable=True)
    __table_args__ = (Index("ix_outbox_pending", "sent_at", "next_attempt_at"),)


class Nonce(Base):
    """A SPENT nonce (the replay set): written when a signed request uses it, purged once the
    nonce would be stale anyway. Handing nonces out writes nothing (services.Nonces)."""

    __tablename__ = "nonces"
    value: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())  # when the nonce was issued
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class AuditRecord(Base):
    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    )
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(80))
    subject: Mapped[str] = mapped_column(String(320))
    details: Mapped[str] = mapped_column(Text)  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    __table_args__ = (
        Index("ix_audit_log_subject_seq", "subject", "seq"),
        Index("ix_audit_log_actor_seq", "actor", "seq"),
    )


class AuditHead(Base):
    """A single row, locked by every writer: it serialises the hash chain across nodes."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    hash: Mapped[str] = mapped_column(String(64))


class PublishedCRL(Base):
    """The current CRL per scope, and whether revocations wait for the next one (dirty_since)."""

    __tablename__ = "published_crls"
    scope: Mapped[str] = mapped_column(String(20), primary_key=True)  # issuing
    number: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    this_update: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    next_update: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    entries: Mapped[int] = mapped_column(Integer, default=0)
    der: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    dirty_since: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # "issuing" (the whole-CA CRL of certificates without a partition, and the row revocations flag)
    # or "issuing-N" for partition N, which counts the certificates `assigned` to it.
    partition: Mapped[int | None] = mapped_column(Integer, nullable=True)
    assigned: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # bumped by each revocation
    # SKI (hex) of the issuing CA key that signs this scope, fixed at its first CRL (None: not signed yet).
    # After `mailkms ca rekey` a scope keeps its key: its certificates were issued by it.
    issuer_key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    __table_args__ = (Index("ix_published_crls_partition", "partition", unique=True),)
