"""Revocation: take certificates back, and publish the CRL that says so.

A revocation marks the certificates, sets the user REVOKED (when it touches their current pair),
kills their unused tokens and flags the CRL as stale, all in one transaction. Publishing is a
separate step under a row lock, so revocations that arrive together share one new CRL and two
nodes never publish the same number twice. Expired certificates drop off the CRL after their
notAfter (RFC 5280 §3.3 allows it; the S/MIME BR only ask that they stay until then).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, defer

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import AlreadyRevoked, CertificateNotFound, Internal, MailkmsError, Malformed, UserNotFound
from mailkms.pki import parse_reason, reason_name
from mailkms.services._audit import AuditLog
from mailkms.services._ca import CAContext
from mailkms.services._crl_partitions import (
    ISSUING_SCOPE,
    KEY_COMPROMISE,
    BuiltCRL,
    CRLJob,
    build_scope,
    partition_scope,
)
from mailkms.services._issuance import serial_hex
from mailkms.services._users import normalise_mailbox
from mailkms.store import Certificate, Database, KeyHandover, PublishedCRL, Token, User

log = logging.getLogger("mailkms.revocation")


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
    scope: str = ISSUING_SCOPE


# The partitions' rows as the publisher reads them to decide: never their DER (with 1M revoked
# entries, 10 partitions hold ~40 MB of it; loading it doubled the server's peak while publishing).
_WITHOUT_DER = select(PublishedCRL).options(defer(PublishedCRL.der, raiseload=True))
CRLBuilder = Callable[[Sequence[CRLJob]], Iterator[tuple[CRLJob, BuiltCRL]]]


PARTITION_VIEWS = 4  # partition CRLs a process keeps in memory to serve
PUBLISH_ROUNDS = 20  # rounds one publish_crl call tries before leaving the rest to the scheduler
LOSER_WAIT_SECONDS = 2.0  # how long a publisher that lost a number waits for the winner to clear the flag
LOSER_POLLS = 40
KEYLESS_GRACE_SECONDS = 600.0  # a scope's key missing longer than this is gone, not a reload still to come


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
        self._partition_size = settings.ca.crl_partition_size
        self._retired: set[str] = set()  # partitions whose final CRL was published (once retired, always)
        # scopes whose key this process lacks: another node's rekey not taken here yet (for a
        # reload_check_seconds or so), or a key folder removed (for good)
        self._keyless: set[str] = set()
        self._clock = clock
        self._audit = audit
        self._on_revoked = list(on_revoked)
        # The CRLs this process serves without I/O: the whole-CA one, and the partitions asked for
        # lately (at most PARTITION_VIEWS: with 1M revoked the partitions' DER is ~40 MB in all);
        # `_numbers` is the newest number of every scope this process has seen published.
        self._views: OrderedDict[str, CRLView] = OrderedDict()
        self._numbers: dict[str, int] = {}
        self._views_lock = threading.Lock()
        # Builds CRLs from jobs: here, in this process's thread, or in `CRLWorkers` (serve sets it).
        self.builder: CRLBuilder = self._build_here

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
        self._insert_issuing_row(session)
        session.execute(
            update(PublishedCRL)
            .where(PublishedCRL.scope == ISSUING_SCOPE)
            .values(dirty_since=func.coalesce(PublishedCRL.dirty_since, now), revision=PublishedCRL.revision + 1)
        )

    def _insert_issuing_row(self, session: Session) -> None:
        """The whole-CA row, which revocations flag (the migration makes it; an emptied store may not have it)."""
        insert: Any = postgresql.insert if self._db.engine.dialect.name == "postgresql" else sqlite.insert
        session.execute(
            insert(PublishedCRL)
            .values(scope=ISSUING_SCOPE, number=0, entries=0, assigned=0, revision=0)
            .on_conflict_do_nothing(index_elements=["scope"])
        )

    def _after_revocation(self, reports: Sequence[RevocationReport], publish: bool, actor: str) -> None:
        serials = [s for r in reports for s in r.serials]
        for hook in self._on_revoked:
            hook(serials)
        if publish:
            self.publish_crl(actor)

    # --- the CRLs ------------------------------------------------------------------------------
    def publish_crl(self, actor: str = "system", *, force: bool = False) -> CRLView | None:
        """New CRLs for the scopes that need one: those with revocations waiting (their partitions
        only), those due for refresh, those never signed; every scope with `force`.

        The decision and the build read a snapshot (no write lock while building); each CRL is then
        stored in a short transaction of its own, only if its number is still free (two nodes never
        publish one number twice). Returns the whole-CA CRL's view if it was published, else the
        last one published, or None when nothing was due (another node or an earlier call did it).
        """
        self._ensure_issuing_row()
        # A round that loses a number to another publisher may have lost with the CRL that holds
        # our revocation (the winner read its entries before we committed): go again until a CRL
        # built after the flag was set is stored, or another publisher cleared the flag (which it
        # can only do when no revocation came after its snapshot). Each lost round means another
        # publisher stored a number, so this ends.
        published: CRLView | None = None
        for _ in range(PUBLISH_ROUNDS):
            view, settled = self._publish_round(actor, force)
            published = view or published
            if settled:
                return published
        log.warning("CRL publication lost %d rounds in a row; the next scheduler round finishes it", PUBLISH_ROUNDS)
        return published

    def _publish_round(self, actor: str, force: bool) -> tuple[CRLView | None, bool]:
        this_update = self._clock.now().replace(microsecond=0)
        next_update = this_update + dt.timedelta(days=self._cfg.crl_validity_days)
        with self._db.read_only() as session:
            rows = list(session.execute(_WITHOUT_DER.order_by(PublishedCRL.partition)).scalars())
            flagged = next(r for r in rows if r.scope == ISSUING_SCOPE)
            revision, dirty_since = flagged.revision, flagged.dirty_since
            retired = self._retired_scopes(session, rows)
            wanted = {r.scope for r in rows if force or (self._stale(r, this_update) and r.scope not in retired)}
            touched: set[str] = set()  # the scopes of what was revoked since the flag was set
            if dirty_since is not None:
                partitions = session.execute(
                    select(Certificate.crl_partition).where(Certificate.revoked_at >= dirty_since).distinct()
                ).scalars()
                touched = {partition_scope(p) for p in partitions}  # (None: the whole-CA CRL)
                wanted |= touched
            partitioned = any(r.partition is not None for r in rows)
            jobs = [
                CRLJob(
                    r.scope,
                    r.partition,
                    r.number + 1,
                    this_update,
                    next_update,
                    self._idp(r.partition, partitioned),
                    previous_update=r.this_update,
                    issuer_key_id=self._signing_key(r),
                )
                for r in rows
                if r.scope in wanted and self._signing_key(r)
            ]
            # what this process cannot sign is left flagged for a node that can (see _waits_for_key)
            keep_flag = self._waits_for_key(touched, dirty_since)
        if not jobs and dirty_since is None:
            return None, True
        last: CRLView | None = None  # not a list: with 1M revoked the partitions' DER is ~40 MB
        whole: CRLView | None = None
        complete = True
        for job, built in self.builder(jobs):
            view = self._store(job, built, actor)
            if view is None:
                complete = False  # another publisher took this number: leave the flag for the next round
                continue
            self._remember(view, hold=False)
            last, whole = view, view if view.scope == ISSUING_SCOPE else whole
        if keep_flag:
            return whole or last, True  # settled for this process; the flag waits for a node with the key
        if complete and dirty_since is not None:
            with self._db.transaction() as session:  # unless a revocation came meanwhile
                session.execute(
                    update(PublishedCRL)
                    .where(PublishedCRL.scope == ISSUING_SCOPE, PublishedCRL.revision == revision)
                    .values(dirty_since=None)
                )
        if not complete:
            complete = self._winner_settles(revision)
        return whole or last, complete

    def _winner_settles(self, revision: int) -> bool:
        """This round lost a number to another publisher, which clears the flag right after storing
        its CRLs: wait a moment for that (up to LOSER_WAIT_SECONDS) instead of racing it at once with
        another CRL of the same entries. True once the flag is clear; False when a revocation came
        meanwhile (the revision moved) or the wait ran out: then the caller goes again. A timed wait
        on an Event, not time.sleep (libfaketime)."""
        pause = threading.Event()
        flag = select(PublishedCRL.dirty_since, PublishedCRL.revision).where(PublishedCRL.scope == ISSUING_SCOPE)
        for _ in range(LOSER_POLLS):
            with self._db.read_only() as session:
                dirty_since, now = session.execute(flag).one()
            if dirty_since is None:
                return True
            if now != revision:
                return False
            pause.wait(LOSER_WAIT_SECONDS / LOSER_POLLS)
        return False

    def _signing_key(self, row: PublishedCRL) -> str:
        """The key that signs the scope's next CRL: its own (the key of its certificates); for one never
        signed, the first key for the whole-CA CRL (partitions get theirs when opened). "" when this
        server no longer holds it: the scope keeps its last CRL."""
        key_id = row.issuer_key_id or (self._ca.first_key_id if row.partition is None else self._ca.issuer.key_id)
        if self._ca.signer_for_key(key_id) is None:
            if row.scope not in self._keyless:
                self._keyless.add(row.scope)
                log.error(
                    "CRL %s is signed by the issuing CA key %s, which this server does not hold: a rekey "
                    "on another node not taken here yet, or the key's folder removed from DATA/ca/previous/ "
                    "(then put it back); not re-signed here",
                    row.scope,
                    key_id,
                )
            return ""
        self._keyless.discard(row.scope)
        return key_id

    def _waits_for_key(self, touched: set[str], dirty_since: dt.datetime | None) -> bool:
        """Whether revocations wait in a scope this process cannot sign: the revocations-waiting flag
        then stays for a node that holds the key. Timed from when they began waiting (the flag's
        time), not from when this process first missed the key: a node that lacked a key for long
        must not clear the flag of a revocation made a moment ago. After KEYLESS_GRACE the key
        counts as gone for good (its folder removed), and the flag is cleared as usual."""
        if dirty_since is None or not touched & self._keyless:
            return False
        return self._clock.now() - dirty_since < dt.timedelta(seconds=KEYLESS_GRACE_SECONDS)

    def _idp(self, partition: int | None, partitioned: bool) -> str | None:
        if partition is not None:
            return self._ca.urls.crl_partition(partition)
        return self._ca.urls.issuing_crl if partitioned else None  # scoped once partitions exist

    def _build_here(self, jobs: Sequence[CRLJob]) -> Iterator[tuple[CRLJob, BuiltCRL]]:
        for job in jobs:
            signer = self._ca.signer_for_key(job.issuer_key_id)
            if signer is None:
                raise Internal(f"no issuing CA key {job.issuer_key_id} for the CRL {job.scope}")
            with self._db.read_only() as session:
                yield job, build_scope(session.connection(), signer, job)

    def _store(self, job: CRLJob, built: BuiltCRL, actor: str) -> CRLView | None:
        with self._db.transaction() as session:
            stored = session.execute(
                update(PublishedCRL)
                .where(PublishedCRL.scope == job.scope, PublishedCRL.number == job.number - 1)
                .values(
                    number=job.number,
                    this_update=job.this_update,
                    next_update=job.next_update,
                    entries=built.entries,
                    der=built.der,
                    issuer_key_id=job.issuer_key_id,
                )
            )
            if stored.rowcount != 1:  # type: ignore[attr-defined]
                return None
            self._audit.append(
                session,
                actor,
                "crl.published",
                job.scope,
                number=job.number,
                entries=built.entries,
                next_update=job.next_update.isoformat(),
                bytes=len(built.der),
            )
        return CRLView(job.number, job.this_update, job.next_update, built.entries, built.der, job.scope)

    def _ensure_issuing_row(self) -> None:
        with self._db.read_only() as session:
            if session.get(PublishedCRL, ISSUING_SCOPE) is not None:
                return
        with self._db.transaction() as session:
            self._insert_issuing_row(session)

    def _stale(self, row: PublishedCRL, now: dt.datetime) -> bool:
        if row.this_update is None:  # never signed (this_update and der are stored together)
            return True
        return now - row.this_update >= dt.timedelta(hours=self._cfg.crl_refresh_hours)

    def crl_due(self) -> bool:
        now = self._clock.now()
        with self._db.read_only() as session:
            rows = list(session.execute(_WITHOUT_DER).scalars())
            flagged = [r for r in rows if r.scope == ISSUING_SCOPE]
            if not flagged or flagged[0].dirty_since is not None:
                return True
            retired = self._retired_scopes(session, rows)
        return any(self._stale(r, now) and r.scope not in retired for r in rows)

    def _retired_scopes(self, session: Session, rows: Sequence[PublishedCRL]) -> set[str]:
        """Partitions no longer re-signed: full (no certificate will join them), every certificate
        expired before their last CRL was signed, none revoked for key compromise. That last CRL is
        their final one: issued after every expiry, it lists each revoked certificate once after its
        expiry (RFC 5280 §3.3, as revoked_entries keeps them), and nothing a relying party could still
        ask about is valid. A compromised
        key's entry stays listed after expiry, so its partition keeps being re-signed. A revocation
        still rebuilds a retired partition and a forced refresh re-signs it. Checked once per
        candidate: retirement cannot end (a full partition gets no new certificates).
        """
        size = self._partition_size
        current_key = self._ca.issuer.key_id
        candidates = {
            r.partition: r
            for r in rows
            if r.partition is not None
            and r.scope not in self._retired
            and (
                (size and r.assigned >= size) or r.issuer_key_id not in (None, current_key)
            )  # full, or a replaced key's
            and r.this_update is not None
        }
        if not candidates:
            return self._retired
        compromised = func.sum(case((Certificate.revocation_reason == KEY_COMPROMISE, 1), else_=0))
        found = session.execute(
            select(Certificate.crl_partition, func.max(Certificate.not_after), compromised)
            .where(Certificate.crl_partition.in_(list(candidates)))
            .group_by(Certificate.crl_partition)
        ).all()
        for partition, last_expiry, keys_compromised in found:
            row = candidates[partition]
            if keys_compromised or last_expiry is None or row.this_update is None:
                continue
            expiry = last_expiry if last_expiry.tzinfo else last_expiry.replace(tzinfo=dt.UTC)
            if expiry < row.this_update:
                log.info("CRL partition %s retired: its final CRL (number %s) is published", row.scope, row.number)
                self._retired.add(row.scope)
        return self._retired

    def current_crl(self, known_number: int = -1, scope: str = ISSUING_SCOPE) -> CRLView | None:
        """The published CRL of `scope`, or None if there is none yet or it is still `known_number`."""
        with self._db.read_only() as session:
            number = session.execute(
                select(PublishedCRL.number).where(PublishedCRL.scope == scope)
            ).scalar_one_or_none()
            if number is None or number == known_number:
                return None
            row = session.execute(select(PublishedCRL).where(PublishedCRL.scope == scope)).scalar_one()
            if row.der is None or row.this_update is None or row.next_update is None:
                return None
            return CRLView(row.number, row.this_update, row.next_update, row.entries, row.der, scope)

    def _remember(self, view: CRLView, *, hold: bool = True) -> None:
        """Note `view` as the newest of its scope. Without `hold` (a partition this process just
        published) it is kept only if this process already held that scope: publishing all
        partitions does not fill the cache with ~4 MB per CRL that nobody asked this process for."""
        with self._views_lock:
            if view.number < self._numbers.get(view.scope, -1):
                return
            self._numbers[view.scope] = view.number
            if not hold and view.scope != ISSUING_SCOPE and view.scope not in self._views:
                return  # loaded from the store when asked for (refresh_scope)
            self._views[view.scope] = view
            self._views.move_to_end(view.scope)
            partitions = [s for s in self._views if s != ISSUING_SCOPE]
            for scope in partitions[: max(0, len(partitions) - PARTITION_VIEWS)]:  # least recently used first
                del self._views[scope]

    @property
    def latest(self) -> CRLView | None:
        """The newest whole-CA CRL this process knows (what the HTTP endpoint serves, no I/O)."""
        return self._views.get(ISSUING_SCOPE)

    def latest_of(self, scope: str) -> CRLView | None:
        """A partition's CRL if this process holds it (None: ask `refresh_scope`)."""
        with self._views_lock:
            view = self._views.get(scope)
            if view is not None:
                self._views.move_to_end(scope)
            return view

    def refresh_latest(self) -> CRLView | None:
        """Notice every CRL another process (or node) published since this one last looked: the whole-CA
        one is loaded, a newer partition only drops the copy held here (loaded again when asked for)."""
        with self._db.read_only() as session:
            numbers = {
                scope: number for scope, number in session.execute(select(PublishedCRL.scope, PublishedCRL.number))
            }
        for scope, number in numbers.items():
            known = self._numbers.get(scope, -1)
            if number <= known:
                continue
            if scope == ISSUING_SCOPE:
                fresh = self.current_crl(known, scope)
                if fresh is not None:
                    self._remember(fresh)
                continue
            with self._views_lock:
                self._views.pop(scope, None)
        return self.latest

    def refresh_scope(self, scope: str) -> CRLView | None:
        """One scope from the store (a partition this process does not hold)."""
        fresh = self.current_crl(-1, scope)
        if fresh is not None:
            self._remember(fresh)
        return fresh
