"""The outbox worker: sends queued mail over SMTP with retries and backoff.

Rows are claimed through the database (a lease with the claimant's name), so two workers
never send one row, and a dead worker's lease runs out and another picks the row up.
The Message-ID is fixed when the row is written; the sink and mail clients de-duplicate on it.

Every failed attempt is classified (`classify`): a short stable kind (`auth`, `tls-verify`,
`connect`, `recipient-refused`, ...) and a readable text, stored on the row
(`last_error_kind`, `last_error`), counted in `/metrics` and shown by `mailkms outbox`.
Nothing is dropped: every kind is retried, transient ones with exponential backoff, permanent
refusals of one message (5xx for its recipient or content) at the longest interval until an
administrator acts. A failure of the relay itself (unreachable, TLS, login) defers the whole
batch after one attempt, so an outage costs one connection per round, not one per mail.

Sent at most once per row, except in one window no SMTP client can close: the relay accepted
the message (250 after DATA) and this process died, or lost the database, before it stored
`sent_at`. The lease then runs out and another round sends the row again, with the same
Message-ID, so the recipient's client files one reply (and installs it idempotently).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import smtplib
import socket
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from sqlalchemy import or_, select, update

from mailkms import metrics
from mailkms.clock import Clock
from mailkms.config import SMTPConfig
from mailkms.services import AuditLog, SealedBodyError, is_sealed
from mailkms.services._outbox import outbox_depth
from mailkms.store import Database, OutboxMessage

log = logging.getLogger("mailkms.outbox")

LEASE = dt.timedelta(minutes=2)


def node_name() -> str:
    """host:pid:random — names this process in leases and claims, so an operator can tell nodes apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class MailSender(Protocol):
    def send(self, sender: str, recipient: str, body: bytes) -> None: ...


@dataclass(frozen=True)
class FailureKind:
    """What went wrong, as an operator acts on it.

    scope "relay": every mail would fail the same way (the relay, its TLS, the login), so the rest
    of the batch is deferred without another connection; "message": only this mail.
    permanent: retrying soon cannot help (5xx for this message): wait `retry_max`.
    config: the administrator must change something (the mailkms.toml smtp keys, the relay, its
    certificate); logged at ERROR.
    """

    code: str
    scope: Literal["relay", "message"]
    permanent: bool
    config: bool
    hint: str


_KINDS = [
    FailureKind("connect", "relay", False, False, "the relay cannot be reached (refused, no route, no such host)"),
    FailureKind(
        "timeout",
        "relay",
        False,
        False,
        "the relay did not answer within smtp.timeout_seconds (at AUTH: relays slow down repeated failed logins)",
    ),
    FailureKind("disconnected", "relay", False, False, "the relay closed the connection"),
    FailureKind("tls-verify", "relay", False, True, "the relay's certificate does not verify: check smtp.ca_file"),
    FailureKind("tls", "relay", False, True, "TLS with the relay failed: check smtp.relay_port and smtp.implicit_tls"),
    FailureKind("starttls-missing", "relay", False, True, "the relay does not offer STARTTLS"),
    FailureKind("auth", "relay", False, True, "the relay refused the login: check smtp.username and the password"),
    FailureKind("auth-unsupported", "relay", False, True, "the relay offers no login (AUTH) mailkms can use"),
    FailureKind("sender-refused", "relay", True, True, "the relay refused the sender address (server.mail_from)"),
    FailureKind("recipient-refused", "message", True, False, "the relay refused the recipient (5xx)"),
    FailureKind("message-refused", "message", True, False, "the relay refused the message (5xx after DATA)"),
    FailureKind("temporary", "message", False, False, "the relay asked to try again later (4xx)"),
    FailureKind("smtp", "relay", False, False, "the relay answered something unexpected"),
    FailureKind(
        "sealed",
        "message",
        False,
        True,
        "this node cannot open the sealed mail: start it with the CA passphrase the mail was sealed under",
    ),
    FailureKind("other", "message", False, False, "an unexpected error in mailkms (see the server log)"),
]
FAILURE_KINDS: dict[str, FailureKind] = {k.code: k for k in _KINDS}
for _code in FAILURE_KINDS:  # every series from the start: rate() and alerts see zeros, not gaps
    metrics.MAIL_SEND_FAILURES.labels(kind=_code)


@dataclass(frozen=True)
class SendFailure:
    kind: FailureKind
    text: str  # one line: what the relay or the TLS layer said


def _response(code: int, message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    return f"{code} {' '.join(text.split())}"


STAGE_NOTE = "smtp stage: "  # SMTPSender notes on an exception where in the session it happened


def classify(exc: BaseException) -> SendFailure:
    """The kind of a failed SMTP attempt, and one readable line naming the stage of the session
    (connect, STARTTLS, AUTH, MAIL). Never contains the password: smtplib's exceptions carry only
    what the relay said."""
    failure = _classify(exc)
    stage = next((n[len(STAGE_NOTE) :] for n in getattr(exc, "__notes__", ()) if n.startswith(STAGE_NOTE)), None)
    if stage is None:
        return failure
    return SendFailure(failure.kind, f"{failure.text} (at {stage})")


def _classify(exc: BaseException) -> SendFailure:
    k = FAILURE_KINDS
    if isinstance(exc, SealedBodyError):
        return SendFailure(k["sealed"], str(exc))
    if isinstance(exc, ssl.SSLCertVerificationError):
        return SendFailure(k["tls-verify"], f"certificate verify failed: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        return SendFailure(k["tls"], f"TLS: {exc.reason or exc}")
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return SendFailure(k["auth"], f"login refused: {_response(exc.smtp_code, exc.smtp_error)}")
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        if "STARTTLS" in str(exc):
            return SendFailure(k["starttls-missing"], str(exc))
        if "AUTH" in str(exc):
            return SendFailure(k["auth-unsupported"], f"{exc} (it may offer AUTH only after STARTTLS)")
        return SendFailure(k["smtp"], str(exc))
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, message = next(iter(exc.recipients.values()), (0, b""))
        kind = "recipient-refused" if code >= 500 else "temporary"
        return SendFailure(k[kind], f"recipient refused: {_response(code, message)}")
    if isinstance(exc, smtplib.SMTPSenderRefused):
        kind = "sender-refused" if exc.smtp_code >= 500 else "temporary"
        return SendFailure(k[kind], f"sender {exc.sender} refused: {_response(exc.smtp_code, exc.smtp_error)}")
    if isinstance(exc, smtplib.SMTPDataError):
        kind = "message-refused" if exc.smtp_code >= 500 else "temporary"
        return SendFailure(k[kind], f"message refused: {_response(exc.smtp_code, exc.smtp_error)}")
    if isinstance(exc, smtplib.SMTPConnectError):
        return SendFailure(k["connect"], f"greeting refused: {_response(exc.smtp_code, exc.smtp_error)}")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        if isinstance(exc.__context__, TimeoutError):  # smtplib turns a read timeout into this
            return SendFailure(k["timeout"], f"no reply within the timeout: {exc.__context__}")
        return SendFailure(k["disconnected"], str(exc) or "connection closed")
    if isinstance(exc, smtplib.SMTPResponseException):
        kind = "temporary" if 400 <= exc.smtp_code < 500 else "smtp"
        return SendFailure(k[kind], _response(exc.smtp_code, exc.smtp_error))
    if isinstance(exc, smtplib.SMTPException):
        if "authentication method" in str(exc):
            return SendFailure(k["auth-unsupported"], str(exc))
        return SendFailure(k["smtp"], f"{exc.__class__.__name__}: {exc}")
    if isinstance(exc, TimeoutError):
        return SendFailure(k["timeout"], f"timed out: {exc}" if str(exc) else "timed out")
    if isinstance(exc, OSError):
        return SendFailure(k["connect"], f"{exc.__class__.__name__}: {exc.strerror or exc}")
    return SendFailure(k["other"], f"{exc.__class__.__name__}: {exc}")


@dataclass
class SMTPSender:
    """One SMTP session per message: connect (implicit TLS or STARTTLS), log in, send, quit.

    `context` verifies the relay (certificate and host name = `host`); None means the system
    store with full verification."""

    host: str
    port: int
    starttls: bool = False
    username: str = ""
    password: str = field(default="", repr=False)
    timeout: float = 10.0
    implicit_tls: bool = False
    context: ssl.SSLContext | None = None
    helo_name: str | None = None

    def send(self, sender: str, recipient: str, body: bytes) -> None:
        stage = "connect"
        try:
            context = self.context or ssl.create_default_context()
            smtp: smtplib.SMTP
            if self.implicit_tls:
                smtp = smtplib.SMTP_SSL(
                    self.host, self.port, local_hostname=self.helo_name, timeout=self.timeout, context=context
                )
            else:
                smtp = smtplib.SMTP(self.host, self.port, local_hostname=self.helo_name, timeout=self.timeout)
        except Exception as exc:
            exc.add_note(f"{STAGE_NOTE}{stage}")
            raise
        try:
            if self.starttls and not self.implicit_tls:
                stage = "STARTTLS"
                try:
                    smtp.starttls(context=context)
                except smtplib.SMTPResponseException as exc:
                    raise smtplib.SMTPNotSupportedError(
                        f"STARTTLS refused: {_response(exc.smtp_code, exc.smtp_error)}"
                    ) from None
            if self.username:
                stage = "AUTH"
                smtp.login(self.username, self.password)
            stage = "MAIL"
            smtp.sendmail(sender, [recipient], body)
        except Exception as exc:
            exc.add_note(f"{STAGE_NOTE}{stage}")
            raise
        finally:
            # Once sendmail returned the relay has the message: a failing QUIT must not make it a
            # failure (and so a second copy). After a failure QUIT is only politeness.
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()
            smtp.close()


def relay_tls_context(config: SMTPConfig) -> ssl.SSLContext:
    """Verify the relay against `ca_file` (only those CAs) or the system store, and its name."""
    context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def sender_for(config: SMTPConfig) -> SMTPSender:
    if config.mode == "relay":
        if config.uses_tls and not config.verify:
            log.warning(
                "smtp.verify = false: the relay %s:%d is NOT authenticated; anyone on the path can read "
                "the mail and the relay password. Set smtp.ca_file to the relay's CA and verify = true.",
                config.relay_host,
                config.relay_port,
            )
        if not config.uses_tls:
            log.warning("smtp: neither starttls nor implicit_tls: mail to %s goes out in clear", config.relay_host)
        return SMTPSender(
            config.relay_host,
            config.relay_port,
            starttls=config.starttls,
            username=config.username,
            password=config.effective_password,
            timeout=config.timeout_seconds,
            implicit_tls=config.implicit_tls,
            context=relay_tls_context(config) if config.uses_tls else None,
            helo_name=config.helo_name or None,
        )
    return SMTPSender("127.0.0.1", config.sink_port, timeout=config.timeout_seconds)


class OutboxWorker:
    def __init__(
        self,
        db: Database,
        sender: MailSender,
        clock: Clock,
        audit: AuditLog,
        *,
        retry_base: float = 2.0,
        retry_max: float = 300.0,
        worker_id: str | None = None,
        on_sent: Callable[[OutboxMessage], None] | None = None,
        lease: dt.timedelta = LEASE,
        opener: Callable[[str, bytes], bytes] | None = None,
    ) -> None:
        self._db = db
        self._sender = sender
        self._clock = clock
        self._audit = audit
        self._retry_base = retry_base
        self._retry_max = retry_max
        self.worker_id = worker_id or node_name()
        self._on_sent = on_sent
        self._lease = lease
        self._opener = opener  # opens sealed bodies (services.OutboxSealer.open); None: none expected

    def _claim(self, limit: int) -> list[int]:
        now = self._clock.now()
        with self._db.transaction() as session:
            query = (
                select(OutboxMessage.id)
                .where(
                    OutboxMessage.sent_at.is_(None),
                    OutboxMessage.next_attempt_at <= now,
                    or_(OutboxMessage.claimed_until.is_(None), OutboxMessage.claimed_until < now),
                )
                .order_by(OutboxMessage.next_attempt_at, OutboxMessage.id)
                .limit(limit)
            )
            if not self._db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            ids = list(session.execute(query).scalars())
            if ids:
                session.execute(
                    update(OutboxMessage)
                    .where(OutboxMessage.id.in_(ids))
                    .values(claimed_by=self.worker_id, claimed_until=now + self._lease)
                )
        return ids

    def run_once(self, limit: int = 50) -> int:
        """Send what is due; returns how many were sent."""
        sent = 0
        relay_failure: SendFailure | None = None  # the relay failed this round: defer the rest
        deferred: list[tuple[str, float]] = []  # by the relay failure: (message id, delay)
        for row_id in self._claim(limit):
            if relay_failure is not None:
                deferred.extend(self._failed(row_id, relay_failure))
                continue
            if not self._renew_lease(row_id):
                continue  # our lease ran out and another node took the row
            with self._db.transaction() as session:
                row = session.get(OutboxMessage, row_id)
                if row is None:
                    continue
                sender, recipient, body, message_id = row.sender, row.recipient, row.body, row.message_id
            try:
                if is_sealed(body):
                    if self._opener is None:
                        raise SealedBodyError("this worker was started without the server's at-rest key")
                    body = self._opener(message_id, body)
                self._sender.send(sender, recipient, body)
            except Exception as exc:  # every failure is classified and kept on the row; nothing is dropped
                failure = classify(exc)
                metrics.MAIL_SEND_FAILURES.labels(kind=failure.kind.code).inc()
                if failure.kind.code == "other":
                    log.error("sending %s failed unexpectedly", message_id, exc_info=exc)
                mine = self._failed(row_id, failure)
                if failure.kind.scope == "relay":
                    relay_failure = failure
                    deferred.extend(mine)
                else:
                    self._log_message_failure(message_id, recipient, failure, mine)
                continue
            with self._db.transaction() as session:
                row = session.get(OutboxMessage, row_id)
                assert row is not None
                row.sent_at = self._clock.now()
                row.attempts += 1
                row.claimed_until = None
                row.last_error = None
                row.last_error_kind = None
                self._audit.append(session, "system", "mail.sent", recipient, message_id=message_id)
            sent += 1
            log.info("sent %s to %s", message_id, recipient)
        if relay_failure is not None:
            self._log_relay_failure(relay_failure, deferred)
        return sent

    def _log_relay_failure(self, failure: SendFailure, deferred: list[tuple[str, float]]) -> None:
        soonest = min((delay for _, delay in deferred), default=0.0)
        level = logging.ERROR if failure.kind.config else logging.WARNING
        log.log(
            level,
            "relay failure (%s): %s; %d mail(s) deferred, next attempt in %.0f s; %s%s",
            failure.kind.code,
            failure.text,
            len(deferred),
            soonest,
            failure.kind.hint,
            " (fix the smtp settings and restart, or `mailkms outbox retry --all`)" if failure.kind.config else "",
            extra={"failure_kind": failure.kind.code},
        )

    def _log_message_failure(
        self, message_id: str, recipient: str, failure: SendFailure, deferred: list[tuple[str, float]]
    ) -> None:
        level = logging.ERROR if failure.kind.permanent else logging.WARNING
        delay = deferred[0][1] if deferred else 0.0
        log.log(
            level,
            "mail %s to %s deferred (%s): %s; next attempt in %.0f s%s",
            message_id,
            recipient,
            failure.kind.code,
            failure.text,
            delay,
            "; it stays queued until the relay takes it: see `mailkms outbox`" if failure.kind.permanent else "",
            extra={"failure_kind": failure.kind.code},
        )

    def _renew_lease(self, row_id: int) -> bool:
        """Still ours? Then hold it for another lease while this one message is sent."""
        now = self._clock.now()
        with self._db.transaction() as session:
            result = session.execute(
                update(OutboxMessage)
                .where(
                    OutboxMessage.id == row_id,
                    OutboxMessage.sent_at.is_(None),
                    OutboxMessage.claimed_by == self.worker_id,
                    OutboxMessage.claimed_until >= now,
                )
                .values(claimed_until=now + self._lease)
            )
            return bool(getattr(result, "rowcount", 0) == 1)

    def _failed(self, row_id: int, failure: SendFailure) -> list[tuple[str, float]]:
        """Keep the row, record why, and schedule the next attempt; [(message_id, delay)] if it was ours."""
        now = self._clock.now()
        with self._db.transaction() as session:
            row = session.get(OutboxMessage, row_id)
            if row is None or row.sent_at is not None or row.claimed_by != self.worker_id:
                return []  # another node took it over after our lease ran out
            row.attempts += 1
            if failure.kind.permanent:
                delay = self._retry_max
            else:
                delay = min(self._retry_max, self._retry_base * (2 ** min(row.attempts - 1, 16)))
            row.next_attempt_at = now + dt.timedelta(seconds=delay)
            row.claimed_until = None
            row.last_error = failure.text[:500]
            row.last_error_kind = failure.kind.code
            self._audit.append(
                session,
                "system",
                "mail.deferred",
                row.recipient,
                message_id=row.message_id,
                attempts=row.attempts,
                kind=failure.kind.code,
            )
            return [(row.message_id, delay)]

    def pending(self) -> int:
        return outbox_depth(self._db)[0]
