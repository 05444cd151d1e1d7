"""Revocation: take certificates back, and publish the CRL that says so.

A revocation marks the certificates, sets the user REVOKED (when it touches their current pair),
kills their unused tokens and flags the CRL as stale, all in one transaction. Publishing is a
separate step under a row lock, so revocations that arrive together share one new CRL and two
nodes never publish the same number twice. Expired certificates drop off the CRL after their
notAfter (RFC 5280 §3.3 allows it; the S/MIME BR only ask that they stay until then).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import AlreadyRevoked, CertificateNotFound, MailkmsError, Malformed, UserNotFound
from mailkms.pki import SUBSCRIBER_REASONS, RevokedEntry, build_crl, parse_reason, reason_name
from mailkms.services._audit import AuditLog
from mailkms.services._ca import CAContext
from mailkms.services._issuance import serial_hex
from mailkms.services._users import normalise_mailbox
from mailkms.store import Certificate, Database, KeyHandover, PublishedCRL, Token, User

ISSUING_SCOPE = "issuing"
STREAM_ROWS = 20_000
KEY_COMPROMISE = "keyCompromise"  # as stored in certificates.revocation_reason


def parse_serial(text: str) -> str:
    """A serial as openssl prints it (hex, any case, optional 0x and colons) -> the store's form."""
    value = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        number = int(value, 16)
    except ValueError:
        raise Malformed(f"{text!r} is not a hexadecimal serial number") from None
    if number <= 0:
        raise Malformed("serial numbers are positive")
    return serial_hex(number)


@dataclass(frozen=True)
class RevocationReport:
    subject: str  # the mailbox, or the serial for a certificate without a user
    serials: tuple[str, ...]
    reason: str | None
    revoked_at: dt.datetime
    user_revoked: bool


@dataclass(frozen=True)
class CRLView:
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    entries: int
    der: bytes


class _Counter:
    def __init__(self) -> None:
        self.count = 0

    def through(self, items: Iterator[RevokedEntry]) -> Iterator[RevokedEntry]:
        for item in items:
            self.count += 1
            yield item


class Revocation:
    def __init__(
        self,
        db: Database,
        ca: CAContext,
        settings: Settings,
        clock: Clock,
        audit: AuditLog,
        on_revoked: Sequence[Callable[[Sequence[str]], None]] = (),
    ) -> None:
        self._db = db
        self._ca = ca
        self._cfg = settings.revocation
        self._clock = clock
        self._audit = audit
        self._on_revoked = list(on_revoked)
        self._latest: CRLView | None = None

    # --- revoking ------------------------------------------------------------------------------
    def revoke_users(
        self, emails: Sequence[str], reason: str | None, actor: str, *, publish: bool = True
    ) -> list[RevocationReport]:
        """Every unexpired certificate of each user (all generations), one transaction for all."""
        try:
            reports = self._revoke_users(emails, reason, actor)
        except MailkmsError as exc:
            self._refused(actor, ", ".join(e.strip().lower() for e in emails)[:300] or "-", exc)
            raise
        self._after_revocation(reports, publish, actor)
        return reports

    def revoke_serial(self, serial: str, reason: str | None, actor: str, *, publish: bool = True) -> RevocationReport:
        """One certificate. If it belongs to the user's current pair, the user is REVOKED too."""
        try:
            report = self._revoke_serial(serial, reason, actor)
        except MailkmsError as exc:
            self._refused(actor, serial.strip()[:300] or "-", exc)
            raise
        self._after_revocation([report], publish, actor)
        return report

    def _refused(self, actor: str, subject: str, exc: MailkmsError) -> None:
        with self._db.transaction() as session:
            self._audit.append(session, actor, "revocation.refused", subject, reason=exc.code)

    def _revoke_users(self, emails: Sequence[str], reason: str | None, actor: str) -> list[RevocationReport]:
        flag = parse_reason(reason)
        mailboxes = list(dict.fromkeys(normalise_mailbox(e) for e in emails))
        if not mailboxes:
            raise Malformed("name at least one user")
        now = self._clock.now()
        reports: list[RevocationReport] = []
        with self._db.transaction() as session:
            self._flag_crl(session, now)  # first: publishers lock this row before the audit head too
            for mailbox in mailboxes:
                user = session.execute(select(User).where(User.email == mailbox).with_for_update()).scalar_one_or_none()
                if user is None:
                    raise UserNotFound(f"no user {mailbox}")
                certs = self._live_certificates(session, user.id, now)
                if user.status == "revoked" and not certs:
                    raise AlreadyRevoked(f"{mailbox} is already revoked; `mailkms user reenroll` is the way back")
                for cert in certs:
                    self._mark(session, cert, now, reason_name(flag), actor, mailbox)
                self._revoke_user(session, user, now, actor, reason_name(flag))
                reports.append(RevocationReport(mailbox, tuple(c.serial for c in certs), reason_name(flag), now, True))
        return reports

    def _revoke_serial(self, serial: str, reason: str | None, actor: str) -> RevocationReport:
        flag = parse_reason(reason)
        wanted = parse_serial(serial)
        now = self._clock.now()
        with self._db.transaction() as session:
            self._flag_crl(session, now)
            cert = session.execute(
                select(Certificate).where(Certificate.serial == wanted).with_for_update()
            ).scalar_one_or_none()
            if cert is None:
                raise CertificateNotFound(f"no certificate {wanted} was issued by this CA")
            if cert.revoked_at is not None:
                raise AlreadyRevoked(f"certificate {wanted} was revoked at {cert.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
            user = session.get(User, cert.user_id, with_for_update=True) if cert.user_id is not None else None
            subject = user.email if user is not None else wanted
            self._mark(session, cert, now, reason_name(flag), actor, subject)
            current = user is not None and cert.generation == user.generation and user.status != "revoked"
            if user is not None and current:
                self._revoke_user(session, user, now, actor, reason_name(flag))
            return RevocationReport(subject, (wanted,), reason_name(flag), now, current)

    def _live_certificates(self, session: Session, user_id: int, now: dt.datetime) -> list[Certificate]:
        return list(
            session.execute(
                select(Certificate)
                .where(Certificate.user_id == user_id, Certificate.revoked_at.is_(None), Certificate.not_after >= now)
                .order_by(Certificate.generation, Certificate.kind)
            ).scalars()
        )

    def _mark(
        self, session: Session, cert: Certificate, now: dt.datetime, reason: str | None, actor: str, subject: str
    ) -> None:
        cert.revoked_at = now
        cert.revocation_reason = reason
        # A server-made key still waiting for its EST hand-over dies with its certificate.
        session.execute(delete(KeyHandover).where(KeyHandover.certificate_serial == cert.serial))
        self._audit.append(
            session, actor, "certificate.revoked", subject, serial=cert.serial, kind=cert.kind, reason=reason
        )

    def _revoke_user(self, session: Session, user: User, now: dt.datetime, actor: str, reason: str | None) -> None:
        user.status = "revoked"
        user.revoked_at = now
        # An unused enrolment token would let the user back in without an administrator.
        session.execute(
            update(Token)
            .where(Token.user_id == user.id, Token.used_at.is_(None), Token.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        # ... and so does every key of the user still waiting for its EST hand-over (spent tokens open them).
        session.execute(delete(KeyHandover).where(KeyHandover.user_id == user.id))
        self._audit.append(session, actor, "user.revoked", user.email, reason=reason)

    def _flag_crl(self, session: Session, now: dt.datetime) -> None:
        # Always write the row: that waits for a publisher holding it, so a revocation that
        # commits after the publisher read the entries flags the CRL again rather than being lost.
        session.execute(
            update(PublishedCRL)
            .where(PublishedCRL.scope == ISSUING_SCOPE)
            .values(dirty_since=func.coalesce(PublishedCRL.dirty_since, now))
        )

    def _after_revocation(self, reports: Sequence[RevocationReport], publish: bool, actor: str) -> None:
        serials = [s for r in reports for s in r.serials]
        for hook in self._on_revoked:
            hook(serials)
        if publish:
            self.publish_crl(actor)

    # --- the CRL -------------------------------------------------------------------------------
    def publish_crl(self, actor: str = "system", *, force: bool = False) -> CRLView | None:
        """A new CRL if revocations wait for one, the current one is due for refresh, or `force`.

        Returns None when nothing was due (another node or an earlier call already published).
        """
        with self._db.transaction() as session:
            row = self._locked_row(session)
            now = self._clock.now()
            if not force and not self._due(row, now):
                return None
            this_update = now.replace(microsecond=0)
            counted = _Counter()  # the rows stream into the builder; no second list of a million entries
            crl = build_crl(
                self._ca.issuing,
                counted.through(self._entries(session, this_update)),
                number=row.number + 1,
                this_update=this_update,
                next_update=this_update + dt.timedelta(days=self._cfg.crl_validity_days),
            )
            der = crl.public_bytes(serialization.Encoding.DER)
            row.number += 1
            row.this_update = this_update
            row.next_update = this_update + dt.timedelta(days=self._cfg.crl_validity_days)
            row.entries = counted.count
            row.der = der
            row.dirty_since = None
            self._audit.append(
                session,
                actor,
                "crl.published",
                ISSUING_SCOPE,
                number=row.number,
                entries=row.entries,
                next_update=row.next_update.isoformat(),
                bytes=len(der),
            )
            view = CRLView(row.number, this_update, row.next_update, row.entries, der)
        if self._latest is None or view.number > self._latest.number:
            self._latest = view
        return view

    def _locked_row(self, session: Session) -> PublishedCRL:
        """The scope's row, locked; made if missing (the migration makes it; an emptied store may not have it)."""
        query = select(PublishedCRL).where(PublishedCRL.scope == ISSUING_SCOPE).with_for_update()
        row = session.execute(query).scalar_one_or_none()
        if row is None:
            insert: Any = postgresql.insert if self._db.engine.dialect.name == "postgresql" else sqlite.insert
            session.execute(
                insert(PublishedCRL)
                .values(scope=ISSUING_SCOPE, number=0, entries=0)
                .on_conflict_do_nothing(index_elements=["scope"])
            )
            row = session.execute(query).scalar_one()
        return row

    def _due(self, row: PublishedCRL, now: dt.datetime) -> bool:
        if row.der is None or row.this_update is None or row.dirty_since is not None:
            return True
        return now - row.this_update >= dt.timedelta(hours=self._cfg.crl_refresh_hours)

    def crl_due(self) -> bool:
        with self._db.transaction() as session:
            row = session.execute(select(PublishedCRL).where(PublishedCRL.scope == ISSUING_SCOPE)).scalar_one_or_none()
            return row is None or self._due(row, self._clock.now())

    def _entries(self, session: Session, this_update: dt.datetime) -> Iterator[RevokedEntry]:
        reasons = SUBSCRIBER_REASONS
        rows = session.execute(
            select(Certificate.serial, Certificate.revoked_at, Certificate.revocation_reason)
            .where(
                Certificate.revoked_at.is_not(None),
                # entries leave the CRL once the certificate expires, except for a compromised key: a
                # signature it makes later, with a signing time claimed in the validity, stays refused
                or_(Certificate.not_after >= this_update, Certificate.revocation_reason == KEY_COMPROMISE),
            )
            .execution_options(yield_per=STREAM_ROWS)
        )
        for serial, revoked_at, reason in rows:
            assert revoked_at is not None  # the WHERE clause
            yield RevokedEntry(int(serial, 16), revoked_at, reasons.get(reason) if reason else None)

    def current_crl(self, known_number: int = -1) -> CRLView | None:
        """The published CRL, or None if there is none yet or it is still `known_number`."""
        with self._db.transaction() as session:
            number = session.execute(
                select(PublishedCRL.number).where(PublishedCRL.scope == ISSUING_SCOPE)
            ).scalar_one_or_none()
            if number is None or number == known_number:
                return None
            row = session.execute(select(PublishedCRL).where(PublishedCRL.scope == ISSUING_SCOPE)).scalar_one()
            if row.der is None or row.this_update is None or row.next_update is None:
                return None
            return CRLView(row.number, row.this_update, row.next_update, row.entries, row.der)

    @property
    def latest(self) -> CRLView | None:
        """The newest CRL this process knows (what the HTTP endpoint serves, no I/O)."""
        return self._latest

    def refresh_latest(self) -> CRLView | None:
        """Load the published CRL if another process (or node) published a newer one."""
        known = self._latest.number if self._latest is not None else -1
        fresh = self.current_crl(known)
        if fresh is not None and (self._latest is None or fresh.number > self._latest.number):
            self._latest = fresh
        return self._latest
