"""Administrators of the console and the admin API, their API tokens and their console sessions."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, LargeBinary, String, Text, false
from sqlalchemy.orm import Mapped, mapped_column

from mailkms.store._models import Base, UTCDateTime


class Administrator(Base):
    __tablename__ = "administrators"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(20))  # auditor | operator | officer | superuser
    password_hash: Mapped[str] = mapped_column(String(200))  # argon2id (PHC string)
    # The TOTP secret, AES-256-GCM under the server's at-rest key (services.AdminAccounts); never clear.
    totp_sealed: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    totp_enabled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    totp_last_step: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), nullable=True
    )  # a code is accepted once
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    disabled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # `mailkms admin require-passkey NAME`: a password and a TOTP code no longer log this admin in.
    passkey_required: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class AdminToken(Base):
    """A per-administrator API token (Bearer), stored as its SHA-256 only."""

    __tablename__ = "admin_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    admin_id: Mapped[int] = mapped_column(ForeignKey("administrators.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    __table_args__ = (Index("ix_admin_tokens_admin", "admin_id"),)


class AdminSession(Base):
    """A console session: the cookie's SHA-256 is the key; the CSRF token is bound to it."""

    __tablename__ = "admin_sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    admin_id: Mapped[int] = mapped_column(ForeignKey("administrators.id"))
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)


class WebAuthnCredential(Base):
    """A passkey (WebAuthn credential) of an administrator: its public key (COSE) and the last
    signature counter seen (a later assertion must count higher, unless the authenticator keeps none)."""

    __tablename__ = "webauthn_credentials"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    admin_id: Mapped[int] = mapped_column(ForeignKey("administrators.id"))
    credential_id: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    sign_count: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), default=0)
    label: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    __table_args__ = (Index("ix_webauthn_credentials_admin", "admin_id"),)


class WebAuthnChallenge(Base):
    """A challenge handed to a browser, good once and briefly; keyed by the SHA-256 of a random
    handle the browser holds in a cookie. `purpose` is "register" or "login"."""

    __tablename__ = "webauthn_challenges"
    handle_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    admin_id: Mapped[int] = mapped_column(ForeignKey("administrators.id"))
    purpose: Mapped[str] = mapped_column(String(10))
    challenge: Mapped[bytes] = mapped_column(LargeBinary)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)


class ApprovalRequest(Base):
    """A dangerous act started by one administrator, released (run once) only when M approvals
    from distinct administrators arrived. Kinds: "recover" and "export" (approved with M officers'
    shares), "bulk_revoke" (approved by `required` administrators other than the one who started it)."""

    __tablename__ = "approval_requests"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    subject: Mapped[str] = mapped_column(String(320))
    started_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    released_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    released_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    payload: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: what the act does
    required: Mapped[int | None] = mapped_column(Integer, nullable=True)  # approvals needed (None: the shares' M)
    outcome: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: what it did (no secret)


class ApprovalVote(Base):
    """One officer's approval: the share file and its passphrase, sealed under the server's at-rest
    key until the quorum is reached (then opened once and deleted)."""

    __tablename__ = "approval_votes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("approval_requests.id"))
    officer: Mapped[str] = mapped_column(String(64))
    share_officer: Mapped[str] = mapped_column(String(100))
    sealed: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    __table_args__ = (Index("ux_approval_votes_officer", "request_id", "officer", unique=True),)
