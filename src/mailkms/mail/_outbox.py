"""The outbox worker: sends queued mail over SMTP with retries and backoff.

Rows are claimed through the database (a lease with the claimant's name), so two workers
never send one row, and a dead worker's lease runs out and another picks the row up.
The Message-ID is fixed when the row is written; the sink and mail clients de-duplicate on it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import smtplib
import socket
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import func, or_, select, update

from mailkms.clock import Clock
from mailkms.config import SMTPConfig
from mailkms.services import AuditLog
from mailkms.store import Database, OutboxMessage

log = logging.getLogger("mailkms.outbox")

LEASE = dt.timedelta(minutes=2)


def node_name() -> str:
    """host:pid:random — names this process in leases and claims, so an operator can tell nodes apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class MailSender(Protocol):
    def send(self, sender: str, recipient: str, body: bytes) -> None: ...


@dataclass
class SMTPSender:
    host: str
    port: int
    starttls: bool = False
    username: str = ""
    password: str = ""
    timeout: float = 10.0

    def send(self, sender: str, recipient: str, body: bytes) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self.username:
                smtp.login(self.username, self.password)
            smtp.sendmail(sender, [recipient], body)


def sender_for(config: SMTPConfig) -> SMTPSender:
    if config.mode == "relay":
        return SMTPSender(
            config.relay_host,
            config.relay_port,
            config.starttls,
            config.username,
            config.password,
            config.timeout_seconds,
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
        for row_id in self._claim(limit):
            if not self._renew_lease(row_id):
                continue  # our lease ran out and another node took the row
            with self._db.transaction() as session:
                row = session.get(OutboxMessage, row_id)
                if row is None:
                    continue
                sender, recipient, body, message_id = row.sender, row.recipient, row.body, row.message_id
            try:
                self._sender.send(sender, recipient, body)
            except (OSError, smtplib.SMTPException) as exc:
                self._failed(row_id, exc)
                continue
            with self._db.transaction() as session:
                row = session.get(OutboxMessage, row_id)
                assert row is not None
                row.sent_at = self._clock.now()
                row.attempts += 1
                row.claimed_until = None
                row.last_error = None
                self._audit.append(session, "system", "mail.sent", recipient, message_id=message_id)
            sent += 1
            log.info("sent %s to %s", message_id, recipient)
        return sent

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

    def _failed(self, row_id: int, exc: Exception) -> None:
        now = self._clock.now()
        with self._db.transaction() as session:
            row = session.get(OutboxMessage, row_id)
            assert row is not None
            row.attempts += 1
            delay = min(self._retry_max, self._retry_base * (2 ** min(row.attempts - 1, 16)))
            row.next_attempt_at = now + dt.timedelta(seconds=delay)
            row.claimed_until = None
            row.last_error = f"{exc.__class__.__name__}: {exc}"[:500]
            self._audit.append(
                session, "system", "mail.deferred", row.recipient, message_id=row.message_id, attempts=row.attempts
            )
        log.warning("mail to %s deferred (attempt %d, retry in %.0fs): %s", row.recipient, row.attempts, delay, exc)

    def pending(self) -> int:
        return outbox_depth(self._db)[0]


def outbox_depth(db: Database) -> tuple[int, dt.datetime | None]:
    """(messages not yet sent, when the oldest of them was queued)."""
    with db.transaction() as session:
        count, oldest = session.execute(
            select(func.count(OutboxMessage.id), func.min(OutboxMessage.created_at)).where(
                OutboxMessage.sent_at.is_(None)
            )
        ).one()
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=dt.UTC)
    return int(count), oldest
