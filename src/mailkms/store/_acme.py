"""ACME's tables (RFC 8555 with RFC 8823's email identifier): accounts, orders, and one
authorization per order with its one email-reply-00 challenge folded in."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from mailkms.store._models import Base, UTCDateTime


class ACMEAccount(Base):
    """An account key (RFC 8555 §7.3), known by its RFC 7638 thumbprint."""

    __tablename__ = "acme_accounts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # random, in the kid URL
    thumbprint: Mapped[str] = mapped_column(String(64), unique=True)
    jwk: Mapped[str] = mapped_column(Text)  # the public JWK, JSON
    contact: Mapped[str] = mapped_column(Text, default="[]")  # JSON list
    status: Mapped[str] = mapped_column(String(12), default="valid")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class ACMEOrder(Base):
    __tablename__ = "acme_orders"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("acme_accounts.id"), index=True)
    mailbox: Mapped[str] = mapped_column(String(320))  # the one email identifier
    status: Mapped[str] = mapped_column(String(12))  # pending | ready | processing | valid | invalid
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    certificate_serial: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON problem document


class ACMEAuthorization(Base):
    """The authorization for an order's mailbox and its email-reply-00 challenge: token part 1
    went out in the challenge mail's Subject, part 2 is in the challenge object."""

    __tablename__ = "acme_authorizations"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    challenge_id: Mapped[str] = mapped_column(String(64), unique=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("acme_orders.id"), index=True)
    mailbox: Mapped[str] = mapped_column(String(320))
    status: Mapped[str] = mapped_column(String(12))  # pending | valid | invalid
    challenge_status: Mapped[str] = mapped_column(String(12))  # pending | processing | valid | invalid
    token_part1: Mapped[str] = mapped_column(String(64))
    token_part2: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(255), unique=True)  # of the challenge mail
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    validated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON problem document


__all__ = ["ACMEAccount", "ACMEAuthorization", "ACMEOrder"]
